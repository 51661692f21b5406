"""Gradients of the (φ, ψ, μ)-sharpness-aware loss on the importance-weighted (log-space) path
and with the adaptive metric, the ρ → 0 limit for the invariant measure, and NaN propagation.

References are computed by hand from the sampler's draws (``measure.mu.sample`` with the same
key): numpy closed forms of the universal-SAM update, or ``jax.grad`` of the eq. (10) formula
written out here with jnp. Everything runs in float64, where both sides agree to rounding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_mlp, mlp_loss, random_spd

import phipsimu

A = np.asarray(random_spd(7, 4))
C = np.array([1.0, -0.7, 1.3, 0.9])  # the minimum, off the origin so T_x is not constant


def convex_loss(x):
    """Strictly convex, not quadratic: ½(x−c)ᵀA(x−c) + Σ(e^{x−c} − 1 − (x−c)).

    Minimum at c with Hessian A + I there; the exponential gives nonzero third derivatives,
    so the finite-difference curvatures differ from vᵀHv at O(ρ)."""
    y = x - jnp.asarray(C, x.dtype)
    return 0.5 * y @ jnp.asarray(A, x.dtype) @ y + jnp.sum(jnp.exp(y) - 1.0 - y)


def draws(measure, key, x, num):
    v, log_w = measure.mu.sample(key, x, num)
    return np.asarray(v, np.float64), np.asarray(log_w, np.float64)


def universal_sam_parts(x, v, rho):
    """Δ_i = 2(L(x+ρv_i) − L(x))/ρ², ∇L(x) and ∇L(x+ρv_i), each from its own jax.grad call."""
    base, g0 = jax.value_and_grad(convex_loss)(x)
    deltas, gs = [], []
    for vi in v:
        li, gi = jax.value_and_grad(convex_loss)(x + rho * jnp.asarray(vi))
        deltas.append(2.0 * (float(li) - float(base)) / rho**2)
        gs.append(np.asarray(gi))
    return np.array(deltas), np.asarray(g0), np.stack(gs)


def det_phi_prime(ybar, d):
    """φ(t) = (2π)^d/t² ⇒ φ'(t) = −2(2π)^d/t³."""
    return -2.0 * (2.0 * np.pi) ** d / ybar**3


def inv_phi_prime(ybar, d):
    """φ(t) = 1/t ⇒ φ'(t) = −1/t²."""
    del d
    return -1.0 / ybar**2


def gauss_psi(t):
    return np.exp(-0.5 * t)


def gauss_psi_prime(t):
    return -0.5 * np.exp(-0.5 * t)


def closed_form(x, v, log_w, rho, strength, phi_prime, sampler_term=False):
    """∇L + s·φ'(ȳ)·mean_i w_i ψ'(Δ_i)·2(∇L(x+ρv_i) − ∇L(x)) [+ the proposal's term].

    ψ = exp(−t/2) (both importance-weighted presets), ȳ = mean_i w_i ψ(Δ_i).

    With ``sampler_term`` the draws are v_i(x) = σ z_i ⊙ |x| / gm(|x|) (the equivariant
    proposal; z_i and log w_i do not depend on x). jax.grad of the objective then also
    differentiates v_i(x): dΔ_i/dx = (2/ρ²)(∇L(x+ρv_i)(I + ρ J_i) − ∇L(x)) with
    J_i = ∂v_i/∂x. From ∂v_ij/∂x_k = v_ij (δ_jk − 1/d)/x_k (|x_k| > eps),
    (J_iᵀ g)_k = (g_k v_ik − mean_j g_j v_ij)/x_k, so the correct reference adds
    2ρ·(J_iᵀ ∇L(x+ρv_i)) inside the bracket. Holding v fixed instead would be the gradient of
    a different function (the objective with the proposal frozen at x), not of this one.
    """
    d = x.shape[0]
    deltas, g0, gs = universal_sam_parts(x, v, rho)
    w = np.exp(log_w)
    ybar = np.mean(w * gauss_psi(deltas))
    bracket = gs - g0
    if sampler_term:
        xn = np.asarray(x)
        jt = (gs * v - np.mean(gs * v, axis=1, keepdims=True)) / xn
        bracket = bracket + rho * jt
    coef = w * gauss_psi_prime(deltas)
    return g0 + strength * phi_prime(ybar, d) * np.mean(coef[:, None] * 2.0 * bracket, axis=0)


def test_determinant_gradient_is_the_universal_sam_update_near_a_minimum():
    measure = phipsimu.measures.determinant(scale=0.7)
    rho, num, strength, key = 0.1, 8, 0.6, jax.random.key(11)
    with jax.enable_x64(True):
        x = jnp.asarray(C + np.array([2e-3, -1e-3, 1.5e-3, -2e-3]))
        obj = phipsimu.sharpness_aware_loss(
            convex_loss, measure, rho=rho, num_samples=num, strength=strength
        )
        grad = np.asarray(jax.jit(jax.grad(obj))(x, key=key))
        v, log_w = draws(measure, key, x, num)
        deltas = universal_sam_parts(x, v, rho)[0]
        assert np.all(deltas > 0)  # otherwise ψ is NaN (the Lebesgue integral diverges)
        expected = closed_form(x, v, log_w, rho, strength, det_phi_prime)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, expected, rtol=1e-8, atol=1e-10)


def test_invariant_gaussian_gradient_where_the_proposal_is_locally_constant():
    """With eps above every |x_i|, T_x = max(|x|, eps) = eps near x, so v = σz does not move
    with x and the gradient is exactly the universal-SAM update with the draws held fixed."""
    measure = phipsimu.measures.invariant_gaussian(eps=2.0)
    rho, num, strength, key = 0.1, 8, 0.6, jax.random.key(12)
    with jax.enable_x64(True):
        x = jnp.asarray(C + np.array([0.05, -0.03, 0.02, 0.04]))
        assert float(jnp.max(jnp.abs(x))) < 2.0
        obj = phipsimu.sharpness_aware_loss(
            convex_loss, measure, rho=rho, num_samples=num, strength=strength
        )
        grad = np.asarray(jax.jit(jax.grad(obj))(x, key=key))
        v, log_w = draws(measure, key, x, num)
        expected = closed_form(x, v, log_w, rho, strength, inv_phi_prime)
    np.testing.assert_allclose(grad, expected, rtol=1e-8, atol=1e-10)


def test_invariant_gaussian_gradient_includes_the_equivariant_proposal_term():
    measure = phipsimu.measures.invariant_gaussian()
    rho, num, strength, key = 0.1, 8, 0.6, jax.random.key(13)
    with jax.enable_x64(True):
        x = jnp.asarray(C + np.array([0.05, -0.03, 0.02, 0.04]))
        obj = phipsimu.sharpness_aware_loss(
            convex_loss, measure, rho=rho, num_samples=num, strength=strength
        )
        grad = np.asarray(jax.jit(jax.grad(obj))(x, key=key))
        v, log_w = draws(measure, key, x, num)
        expected = closed_form(x, v, log_w, rho, strength, inv_phi_prime, sampler_term=True)
        frozen = closed_form(x, v, log_w, rho, strength, inv_phi_prime)
    np.testing.assert_allclose(grad, expected, rtol=1e-8, atol=1e-10)
    # the proposal's term is not negligible here, so the test can tell the two apart
    assert np.max(np.abs(expected - frozen)) > 1e-3 * np.max(np.abs(expected))


HAND_WRITTEN = {
    "trace": (phipsimu.measures.trace(), lambda t: t, lambda t: t),
    "eigen_moment_2_sqrt": (
        phipsimu.measures.eigen_moment(2, phi=jnp.sqrt),
        jnp.sqrt,
        lambda t: t**2,
    ),
}


@pytest.mark.slow  # every case: the fast suite's budget (CONTRIBUTING.md)
@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_adaptive_gradient_flows_through_the_metric(name):
    measure, phi, psi = HAND_WRITTEN[name]
    rho, num, strength, eta, key = 0.1, 6, 0.7, 0.01, jax.random.key(4)
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(0), [3, 4, 2])
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        bx = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
        by = jax.random.normal(jax.random.key(2), (6, 2), jnp.float64)
        obj = phipsimu.sharpness_aware_loss(
            mlp_loss, measure, rho=rho, num_samples=num, strength=strength, adaptive=True, eta=eta
        )
        grad = jax.jit(jax.grad(obj))(params, bx, by, key=key)
        v, log_w = measure.mu.sample(key, params, num)  # the sphere: independent of params

        def reference(p, metric_of=lambda p: p):
            # L(x) + s ρ² φ(mean_i w_i ψ(2(L(x + ρ(|x|+η)⊙v_i) − L(x))/ρ²))
            base = mlp_loss(p, bx, by)
            t = jax.tree_util.tree_map(lambda a: jnp.abs(a) + eta, metric_of(p))

            def delta(vi):
                xi = jax.tree_util.tree_map(lambda a, ti, b: a + rho * ti * b, p, t, vi)
                return 2.0 * (mlp_loss(xi, bx, by) - base) / rho**2

            ybar = jnp.mean(jnp.exp(log_w) * psi(jax.vmap(delta)(v)))
            return base + strength * rho**2 * phi(ybar)

        expected = jax.jit(jax.grad(reference))(params)
        # the same formula with T_x held constant: must differ, or the test could not fail
        frozen_metric = jax.jit(
            jax.grad(
                lambda p: reference(p, lambda q: jax.tree_util.tree_map(jax.lax.stop_gradient, q))
            )
        )(params)
        flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])  # noqa: E731
        assert flat(grad).dtype == np.float64
        np.testing.assert_allclose(flat(grad), flat(expected), rtol=1e-8, atol=1e-11)
        assert np.max(np.abs(flat(expected) - flat(frozen_metric))) > 1e-3


def assert_order_rho(errs, rhos, scale):
    """Error O(ρ), as in tests/test_objective.py: |error|/ρ stays bounded by twice its value
    at the largest ρ, the error falls at least 3× as ρ shrinks 4×, and ends below 5% of S."""
    bound = 2 * errs[0] / rhos[0]
    assert all(e / r <= bound for e, r in zip(errs, rhos))
    assert errs[-1] < errs[0] / 3
    assert errs[-1] < 0.05 * scale


def test_invariant_gaussian_leading_term_converges_to_sharpness_at_a_minimum():
    """Same key, same probes: the equivariant proposal at c (|c_i| differ, so T_x/gm ≠ 1)
    gives the same v_i, log w_i to the objective and to the Hessian-based estimator."""
    measure = phipsimu.measures.invariant_gaussian()
    key, num, rhos = jax.random.key(5), 2000, [0.04, 0.02, 0.01]
    with jax.enable_x64(True):
        x = jnp.asarray(C)
        est = phipsimu.sharpness(convex_loss, measure, num_samples=num)(x, key=key)
        errs = []
        for rho in rhos:
            obj = phipsimu.sharpness_aware_loss(convex_loss, measure, rho=rho, num_samples=num)
            term = (obj(x, key=key) - convex_loss(x)) / rho**2
            errs.append(abs(float(term - est.value)))
        assert np.isfinite(float(est.value)) and float(est.value) > 0
    assert_order_rho(errs, rhos, float(est.value))


IW_PRESETS = {
    "determinant": phipsimu.measures.determinant(scale=0.7),
    "invariant_gaussian": phipsimu.measures.invariant_gaussian(),
}


@pytest.mark.parametrize("name", list(IW_PRESETS))
def test_nan_loss_gives_nan_objective(name):
    measure = IW_PRESETS[name]
    x = jnp.asarray(C, jnp.float32)
    everywhere = phipsimu.sharpness_aware_loss(
        lambda p: convex_loss(p) * jnp.nan, measure, rho=0.1, num_samples=8
    )
    assert np.isnan(float(everywhere(x, key=jax.random.key(0))))

    # NaN only at perturbed points with v_0 > 0: the clean loss is finite
    def partly_nan(p):
        return jnp.where(p[0] > x[0], jnp.nan, convex_loss(p))

    v, _ = measure.mu.sample(jax.random.key(0), x, 8)
    assert 0 < int(jnp.sum(v[:, 0] > 0)) < 8 and np.isfinite(float(partly_nan(x)))
    partly = phipsimu.sharpness_aware_loss(partly_nan, measure, rho=0.1, num_samples=8)
    assert np.isnan(float(partly(x, key=jax.random.key(0))))


@dataclasses.dataclass(frozen=True)
class MovingProposal(phipsimu.mu.Sampler):
    """A user-written proposal whose draws and log-weights both move with x (no preset has
    log-weights that depend on x, so this is the only test of that path of the gradient)."""

    def _draw(self, key, like, num, perturbed, d):
        s = 1.0 + 0.1 * jnp.mean(like**2)
        g = jax.random.normal(key, (num, *like.shape), like.dtype)
        return s * g, -d * jnp.log(s) + 0.1 * (g @ like)


MOVING = {
    # linear path: φ = √, ψ(t) = t²
    "linear": phipsimu.Measure(jnp.sqrt, lambda t: t**2, MovingProposal()),
    # log space: φ(t) = 1/t, ψ(t) = exp(−t/2)
    "log_space": phipsimu.Measure(
        lambda t: 1.0 / t,
        lambda t: jnp.exp(-0.5 * t),
        MovingProposal(),
        log_psi=lambda t: -0.5 * t,
        log_phi=lambda log_t: -log_t,
    ),
}


@pytest.mark.slow  # fast-suite time; runs in the slow suite
@pytest.mark.parametrize("name", list(MOVING))
def test_gradient_through_log_weights_that_depend_on_x(name):
    """jax.grad of the objective against jax.grad of eq. (10) written out with the sampler's
    draws, which differentiates both v_i(x) and log w_i(x)."""
    measure = MOVING[name]
    rho, num, strength, key = 0.1, 6, 0.6, jax.random.key(21)
    with jax.enable_x64(True):
        x = jnp.asarray(C + np.array([0.05, -0.03, 0.02, 0.04]))

        def reference(x, weights=lambda lw: lw):
            base = convex_loss(x)
            v, log_w = measure.mu.sample(key, x, num)
            delta = jax.vmap(lambda vi: 2.0 * (convex_loss(x + rho * vi) - base) / rho**2)(v)
            ybar = jnp.mean(jnp.exp(weights(log_w)) * measure.psi(delta))
            return base + strength * rho**2 * measure.phi(ybar)

        obj = phipsimu.sharpness_aware_loss(
            convex_loss, measure, rho=rho, num_samples=num, strength=strength, chunk_size=4
        )
        grad = np.asarray(jax.jit(jax.grad(obj))(x, key=key))
        expected = np.asarray(jax.grad(reference)(x))
        frozen = np.asarray(jax.grad(lambda x: reference(x, jax.lax.stop_gradient))(x))
        value, expected_value = float(obj(x, key=key)), float(reference(x))
        term_grad = expected - np.asarray(jax.grad(convex_loss)(x))
    np.testing.assert_allclose(value, expected_value, rtol=1e-10)
    np.testing.assert_allclose(grad, expected, rtol=1e-8, atol=1e-11)
    # the log-weights' own term is far above the tolerance, so the test can
    # tell the two apart
    assert np.max(np.abs(expected - frozen)) > 1e-3 * np.max(np.abs(term_grad))


def test_gradient_with_respect_to_the_batch_is_exact():
    """The loss captures the batch; the term's gradient rule takes it as an input, so the
    gradient with respect to the data (as for adversarial examples) is jax.grad of the
    formula written out, not zero. 6 samples in chunks of 4 also covers the last, partial
    chunk."""
    measure = phipsimu.measures.trace()
    rho, num, strength, key = 0.1, 6, 0.7, jax.random.key(5)
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(0), [3, 4, 2])
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        bx = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
        by = jax.random.normal(jax.random.key(2), (6, 2), jnp.float64)
        obj = phipsimu.sharpness_aware_loss(
            mlp_loss, measure, rho=rho, num_samples=num, strength=strength, chunk_size=4
        )
        grad = jax.jit(jax.grad(obj, argnums=(0, 1)))(params, bx, by, key=key)
        v, _ = measure.mu.sample(key, params, num)

        def reference(p, bx):
            base = mlp_loss(p, bx, by)

            def delta(vi):
                xi = jax.tree_util.tree_map(lambda a, b: a + rho * b, p, vi)
                return 2.0 * (mlp_loss(xi, bx, by) - base) / rho**2

            return base + strength * rho**2 * jnp.mean(jax.vmap(delta)(v))

        expected = jax.grad(reference, argnums=(0, 1))(params, bx)
        plain = jax.grad(mlp_loss, argnums=1)(params, bx, by)
        flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])  # noqa: E731
        np.testing.assert_allclose(flat(grad), flat(expected), rtol=1e-8, atol=1e-11)
        assert np.max(np.abs(flat(expected[1]) - flat(plain))) > 1e-3


def test_differentiating_the_term_in_rho_is_refused():
    params = jnp.array([1.0, -0.5])

    def value(rho):
        obj = phipsimu.sharpness_aware_loss(
            lambda p: jnp.sum(p**4), phipsimu.measures.trace(), rho=rho, num_samples=2
        )
        return obj(params, key=jax.random.key(0))

    with pytest.raises(NotImplementedError, match="rho, strength"):
        jax.grad(value)(0.05)


# Every preset, at the point C near the convex loss's minimum (the determinant's ψ is NaN
# where a perturbation lowers the loss, so its points stay where every Δ > 0).
EVERY_PRESET = {
    "trace": phipsimu.measures.trace(),
    "determinant": phipsimu.measures.determinant(scale=0.3),
    "eigen_moment_3": phipsimu.measures.eigen_moment(3),
    "eigen_moment_2_sqrt": phipsimu.measures.eigen_moment(2, phi=jnp.sqrt),
    "frobenius": phipsimu.measures.frobenius(),
    "invariant_gaussian": phipsimu.measures.invariant_gaussian(),
}


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize("name", list(EVERY_PRESET))
def test_one_pass_rule_equals_grad_of_the_rematerialised_objective(name, adaptive):
    """The term's custom reverse-mode rule against plain ``jax.grad`` of the same objective
    through the chunked, rematerialised path (``jax.checkpoint`` per chunk, no custom rule).
    That path is the one ``sample_axis`` takes; under ``jax.vmap`` over an axis of size 1
    it evaluates the same draws on one "device". 6 samples in chunks of 4: a full and a
    partial chunk."""
    measure = EVERY_PRESET[name]
    rho, num, strength, key = 0.1, 6, 0.7, jax.random.key(11)
    kwargs = dict(rho=rho, num_samples=num, strength=strength, chunk_size=4, adaptive=adaptive)
    with jax.enable_x64(True):
        x = jnp.asarray(C + np.array([0.02, -0.01, 0.03, 0.01]))
        fused = phipsimu.sharpness_aware_loss(convex_loss, measure, **kwargs)
        plain = phipsimu.sharpness_aware_loss(convex_loss, measure, sample_axis="s", **kwargs)
        value, grad = jax.jit(jax.value_and_grad(fused))(x, key=key)
        want_value, want = jax.vmap(jax.value_and_grad(lambda x: plain(x, key=key)), axis_name="s")(
            x[None]
        )
        term_grad = np.asarray(want[0]) - np.asarray(jax.grad(convex_loss)(x))
    assert np.all(np.isfinite(np.asarray(want)))
    np.testing.assert_allclose(float(value), float(want_value[0]), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want[0]), rtol=1e-9, atol=1e-12)
    # the term contributes to the gradient well above the tolerance
    assert np.max(np.abs(term_grad)) > 1e-3
