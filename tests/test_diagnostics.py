"""Diagnostics on every Estimate: Pareto k̂, status flags and their words."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import phipsimu
from phipsimu import Status
from phipsimu._diagnostics import pareto_k, tail_size


@pytest.mark.parametrize("shape", [-0.3, 0.0, 0.5, 1.0])
def test_pareto_k_recovers_the_shape_of_a_generalised_pareto_sample(shape):
    # 4000 draws: a tail of 190 terms; k̂'s sampling sd is about (1 + k)/sqrt(190) <= 0.15
    x = scipy.stats.genpareto.rvs(shape, size=4000, random_state=np.random.default_rng(1))
    k = float(pareto_k(jnp.log(jnp.asarray(x))))
    assert abs(k - shape) < 0.3


def test_pareto_k_matches_scipys_maximum_likelihood_on_the_same_tail():
    x = scipy.stats.genpareto.rvs(0.6, size=2000, random_state=np.random.default_rng(2))
    n = tail_size(x.size)
    top = np.sort(x)[-(n + 1) :]
    shape_ml, _, _ = scipy.stats.genpareto.fit(top[1:] - top[0], floc=0.0)
    k = float(pareto_k(jnp.log(jnp.asarray(x))))
    # k̂ is a posterior mean shrunk to 0.5 by 10 pseudo-observations: close to the MLE
    assert abs(k - shape_ml) < 0.1


def test_pareto_k_is_nan_when_it_cannot_be_fitted():
    assert np.isnan(pareto_k(jnp.zeros(16)))  # m < 25: tail of fewer than 5 terms
    assert np.isnan(pareto_k(jnp.zeros(100)))  # flat tail
    assert np.isnan(pareto_k(jnp.full(100, jnp.nan)))
    # zero terms (log = −inf) are fine
    x = jnp.log(jnp.concatenate([jnp.zeros(50), jnp.arange(1.0, 51.0)]))
    assert np.isfinite(pareto_k(x))


def test_pareto_k_is_jit_and_vmap_safe():
    x = jnp.log(jax.random.pareto(jax.random.key(0), 1.0, (3, 1000)) + 1.0)
    k = jax.jit(jax.vmap(pareto_k))(x)
    np.testing.assert_allclose(k, [pareto_k(row) for row in x], rtol=1e-5)
    assert np.all((k > 0.6) & (k < 1.4))


def test_describe_status_and_reasons():
    assert phipsimu.describe_status(0) == []
    words = phipsimu.describe_status(Status.SINGULAR | Status.HEAVY_TAILED)
    assert len(words) == 2 and "singular" in words[0] and "heavy-tailed" in words[1]
    assert all(phipsimu.describe_status(flag) for flag in Status if flag)


def _quadratic(diag):
    a = jnp.asarray(diag)
    return lambda x: 0.5 * jnp.sum(a * x**2), jnp.ones_like(a)


def test_a_nan_loss_says_why():
    loss = lambda x: jnp.nan * jnp.sum(x**2)  # noqa: E731
    est = phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=32)(
        jnp.ones(3), key=jax.random.key(0)
    )
    assert np.isnan(est.value)
    assert est.status & Status.NONFINITE_LOSS
    assert "non-finite" in est.reasons()[0]


def test_a_clean_estimate_has_status_zero_and_a_light_tail():
    loss, x = _quadratic([1.0, 2.0, 3.0])
    est = jax.jit(phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=256))(
        x, key=jax.random.key(0)
    )
    assert int(est.status) == 0 and bool(est.ok) and est.reasons() == []
    assert float(est.pareto_k) < 0.5  # ψ is bounded on the sphere


@pytest.mark.parametrize(
    ("diag", "flags", "log_value"),
    [
        ([1.0, -1.0, 2.0], Status.NOT_POSITIVE_DEFINITE, np.nan),
        ([1.0, 0.0, 2.0], Status.SINGULAR | Status.DIVERGENT, -np.inf),
    ],
)
def test_determinant_status_on_indefinite_and_singular_hessians(diag, flags, log_value):
    loss, x = _quadratic(diag)
    measure = phipsimu.measures.determinant(scale=1.0)
    est = jax.jit(phipsimu.sharpness(loss, measure, num_samples=64))(x, key=jax.random.key(0))
    assert est.status & flags == flags
    np.testing.assert_equal(float(est.log_value), log_value)
    exact = phipsimu.exact_sharpness(loss, measure)(x)
    assert exact.status & flags == flags


def test_log_determinant_status():
    loss, x = _quadratic([1.0, -1.0, 2.0])
    est = phipsimu.log_determinant(loss, num_samples=4, num_iterations=3)(x, key=jax.random.key(0))
    assert np.isnan(est.value) and est.status & Status.NOT_POSITIVE_DEFINITE


def test_closed_forms_and_spectral_estimators_carry_diagnostics():
    loss, x = _quadratic([1.0, 2.0, 3.0])
    exact = phipsimu.exact_sharpness(loss, phipsimu.measures.trace())(x)
    assert int(exact.status) == 0 and np.isnan(exact.pareto_k)
    tr = phipsimu.hessian_trace(loss, num_samples=60)(x, key=jax.random.key(0))
    # Rademacher probes are exact on a diagonal H: every term equal, a flat tail, no k̂
    assert int(tr.status) == 0 and np.isnan(tr.pareto_k)
    diag = phipsimu.hessian_diagonal(loss, num_samples=8)(x, key=jax.random.key(0))
    assert int(diag.status) == 0


def _example1(x):
    return (x[0] * x[1] - 1.0) ** 2


def test_adaptive_invariant_gaussian_applies_the_metric_once():
    # T H T at (4, 1/4) is H at (1, 1): the same matrix, so the same value with the same key
    # (the exact value is 1/3.397 = 0.2944 by quadrature, tests/test_coverage.py); applying
    # T_x in both the equivariant proposal and the metric gave 0.336 at (4, 1/4)
    measure = phipsimu.measures.invariant_gaussian()
    fn = jax.jit(phipsimu.sharpness(_example1, measure, num_samples=1024, adaptive=True))
    a = fn(jnp.array([1.0, 1.0]), key=jax.random.key(0))
    b = fn(jnp.array([4.0, 0.25]), key=jax.random.key(0))
    np.testing.assert_allclose(b.value, a.value, rtol=1e-5)
    assert abs(float(b.value) - 0.2944) < 4 * float(b.stderr)


def _relu_loss(params, x, y):
    h = jax.nn.relu(x @ params[0]["w"] + params[0]["b"])
    return jnp.mean((h @ params[1]["w"] + params[1]["b"] - y) ** 2)


def test_invariant_gaussian_flags_a_divergent_integral_on_a_relu_net():
    keys = jax.random.split(jax.random.key(5), 6)
    params = [
        {"w": jax.random.normal(keys[0], (3, 5)), "b": 0.1 * jax.random.normal(keys[1], (5,))},
        {"w": jax.random.normal(keys[2], (5, 2)), "b": 0.1 * jax.random.normal(keys[3], (2,))},
    ]
    x, y = jax.random.normal(keys[4], (16, 3)), jax.random.normal(keys[5], (16, 2))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hess = np.asarray(jax.hessian(lambda z: _relu_loss(unravel(z), x, y))(flat), np.float64)
    eigs = np.linalg.eigvalsh(hess)
    # more than one negative eigenvalue: every H_(−i) is indefinite, the integral is infinite
    assert np.sum(eigs < -1e-6 * np.abs(eigs).max()) >= 2
    measure = phipsimu.measures.invariant_gaussian()
    est = jax.jit(phipsimu.sharpness(_relu_loss, measure, num_samples=64))(
        params, x, y, key=jax.random.key(1)
    )
    assert est.status & Status.DIVERGENT
    assert float(est.value) == 0.0 and float(est.log_value) == -np.inf
    dense = jax.jit(phipsimu.exact_sharpness(_relu_loss, measure, num_samples=64))
    assert dense(params, x, y, key=jax.random.key(1)).status & Status.DIVERGENT
    # at a positive definite point it is verified finite and reports nothing
    loss, x0 = _quadratic([1.0, 2.0, 3.0])
    est = phipsimu.sharpness(loss, measure, num_samples=64)(x0, key=jax.random.key(1))
    assert int(est.status) == 0 and np.isfinite(est.log_value)


def _relu_net():
    keys = jax.random.split(jax.random.key(5), 6)
    params = [
        {"w": jax.random.normal(keys[0], (3, 5)), "b": 0.1 * jax.random.normal(keys[1], (5,))},
        {"w": jax.random.normal(keys[2], (5, 2)), "b": 0.1 * jax.random.normal(keys[3], (2,))},
    ]
    return params, jax.random.normal(keys[4], (16, 3)), jax.random.normal(keys[5], (16, 2))


def test_divergence_certificate_is_invariant_under_neuron_rescaling():
    # H has 9 negative eigenvalues (d = 32): the integral is infinite at x and at every
    # rescaled point. Certified on H, 8 Lanczos steps missed it at rescaled points (status 0
    # or NOT_VERIFIED_FINITE: ‖D⁻¹HD⁻¹‖ and the tolerance grow with D); on T H T, T = |x|,
    # the matrix, its Ritz values and the tolerance are the same at every point.
    params, x, y = _relu_net()
    measure = phipsimu.measures.invariant_gaussian()
    fn = jax.jit(
        phipsimu.sharpness(_relu_loss, measure, num_samples=16, chunk_size=16, check_iterations=8)
    )
    rng = np.random.default_rng(0)
    for trial in range(7):
        c = np.exp(rng.normal(0.0, 3.0, 5)) if trial else np.ones(5)
        c = c / np.exp(np.mean(np.log(c)))  # ∏c = 1, so det D = ∏c^(3 + 1 − 2) = 1
        p = phipsimu.symmetries.rescale_neurons(params, 0, jnp.asarray(c, jnp.float32))
        est = fn(p, x, y, key=jax.random.key(3))
        assert est.status & Status.DIVERGENT, (trial, est.reasons())
        assert float(est.log_value) == -np.inf


@pytest.mark.slow
def test_check_invariance_never_calls_a_divergent_measure_invariant():
    # both estimates are 0 (DIVERGENT) and agree; the verdict was "invariant"
    params, x, y = _relu_net()
    c = jnp.array([4.0, 0.25, 2.0, 0.5, 1.0])
    rep = phipsimu.check_invariance(
        _relu_loss,
        phipsimu.measures.invariant_gaussian(),
        params,
        lambda q: phipsimu.symmetries.rescale_neurons(q, 0, c),
        x,
        y,
        key=jax.random.key(3),
        num_samples=16,
    )
    assert rep.estimate.status & Status.DIVERGENT
    assert rep.loss_preserved and rep.verdict == "divergent" and not rep.invariant


def _pixel_loss(x):
    return (x[1] - 1.0) ** 2 + (x[2] - 2.0) ** 2  # x[0] has no effect: H e₀ = 0


def _check_zero_curvature(est, flags):
    # S = 0 (a finite sample gave log S = −2.96, stable in m, before zero rows were read)
    assert float(est.log_value) == -np.inf and float(est.value) == 0.0
    assert est.status & (flags | Status.ZERO_CURVATURE) == flags | Status.ZERO_CURVATURE
    assert est.null_coordinates.tolist() == [0] + [-1] * 7
    assert "coordinates 0 " in est.reasons()[-1]


def test_a_parameter_without_effect_makes_invariant_gaussian_diverge():
    measure = phipsimu.measures.invariant_gaussian()
    fn = phipsimu.sharpness(_pixel_loss, measure, num_samples=64, chunk_size=64)
    _check_zero_curvature(fn(jnp.array([1.0, 1.0, 2.0]), key=jax.random.key(0)), Status.DIVERGENT)


@pytest.mark.slow
def test_a_parameter_without_effect_in_the_determinant_and_the_dense_reference():
    x = jnp.array([1.0, 1.0, 2.0])
    det = phipsimu.sharpness(_pixel_loss, phipsimu.measures.determinant(), num_samples=64)
    _check_zero_curvature(det(x, key=jax.random.key(0)), Status.SINGULAR | Status.DIVERGENT)
    dense = phipsimu.exact_sharpness(_pixel_loss, phipsimu.measures.invariant_gaussian())
    _check_zero_curvature(dense(x, key=jax.random.key(0)), Status.DIVERGENT)
    # a measure on the sphere is finite there: no certificate, nothing to report
    est = phipsimu.sharpness(_pixel_loss, phipsimu.measures.trace(), num_samples=64)(
        x, key=jax.random.key(0)
    )
    assert int(est.status) == 0 and est.null_coordinates is None


def test_heavy_tail_flags_mark_the_keys_whose_intervals_fail_at_small_m():
    # eigen_moment(4) on H = diag(10, 1, ..., 1), d = 20, m = 16: (vᵀHv)⁴ is strongly
    # right-skewed (one spike), 0.64 of 400 keys cover the closed form; no k̂ is fitted below
    # m = 25, so every key had status 0. Cochran's m >= 25·g₁² rule must mark the failing
    # keys: covered-or-flagged >= 0.93 on 64 fixed keys (binomial sd 0.03 at 0.95).
    h = np.ones(20)
    h[0] = 10.0
    loss = lambda x: 0.5 * jnp.sum(jnp.asarray(h, jnp.float32) * x**2)  # noqa: E731
    t1, t2, t3, t4 = (np.sum(h**k) for k in (1, 2, 3, 4))
    # E_sphere[(vᵀHv)⁴]: the Gaussian moment from the cumulants (t₁, 2t₂, 8t₃, 48t₄)
    exact = (t1**4 + 12 * t1**2 * t2 + 32 * t1 * t3 + 12 * t2**2 + 48 * t4) / (20 * 22 * 24 * 26)
    fn = phipsimu.sharpness(loss, phipsimu.measures.eigen_moment(4), num_samples=16, chunk_size=16)
    keys = jax.random.split(jax.random.key(11), 64)
    est = jax.jit(jax.vmap(lambda k: fn(jnp.ones(20), key=k)))(keys)
    covered = np.abs(np.asarray(est.value) - exact) <= 1.96 * np.asarray(est.stderr)
    flagged = (np.asarray(est.status) & Status.HEAVY_TAILED) != 0
    assert covered.mean() < 0.8  # the case is hard: without flags it would fail
    assert (covered | flagged).mean() >= 0.93, ((covered | flagged).mean(), flagged.mean())


def test_a_damping_dominated_log_determinant_says_so():
    # 8 of 10 eigenvalues are 1e-3 < δ = 0.1: log det(H + δI) ≈ 8·log 0.1 + log 2.1 + log 3.1,
    # 80% of it the damping's. Rademacher probes on a diagonal H give quadrature weights 1/d
    # on every eigenvalue (n = d steps: exact), so the share below δ is 0.8 exactly.
    def loss(x, a):
        return 0.5 * jnp.sum(a * x**2)

    fn = phipsimu.log_determinant(loss, damping=0.1, num_samples=2, num_iterations=10)
    x, a = jnp.ones(10), jnp.array([1e-3] * 8 + [2.0, 3.0])
    est = fn(x, a, key=jax.random.key(0))
    np.testing.assert_allclose(est.value, 8 * np.log(0.101) + np.log(2.1 * 3.1), rtol=1e-4)
    np.testing.assert_allclose(est.damping_share, 0.8, rtol=1e-4)
    assert est.status & Status.DAMPING_DOMINATED and "0.800" in est.reasons()[-1]
    # δ below every eigenvalue: none of it is the damping's
    est = fn(x, a.at[:8].set(1.0), key=jax.random.key(0))
    assert float(est.damping_share) == 0.0 and not est.status & Status.DAMPING_DOMINATED
