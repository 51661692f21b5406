"""Finite-radius sharpness against closed forms on quadratics at their minimum
(docs/conventions.md, section "Finite-radius sharpness"), invariance of the adaptive forms
under neuron rescaling, the dataset path, the status flags, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phipsimu
from phipsimu import Status

H_DIAG = jnp.array([1.0, 2.0, 3.0, 5.0, 8.0])
X_STAR = jnp.array([0.5, -1.0, 2.0, 0.3, 1.5])
KEY = jax.random.key(0)


def dense_quadratic():
    """A non-diagonal positive definite H (eigenvalues 1..8) and its loss at minimum X_STAR."""
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (5, 5)))
    h = (q * H_DIAG) @ q.T
    h = 0.5 * (h + h.T)

    def loss(p):
        r = p - X_STAR
        return 0.5 * r @ h @ r

    return h, loss


def diag_loss(p):
    return 0.5 * jnp.sum(H_DIAG * (p - X_STAR) ** 2)


@pytest.mark.parametrize(
    "adaptive,eta", [(True, 0.1), pytest.param(False, 0.0, marks=pytest.mark.slow)]
)
def test_worst_case_l2_matches_the_top_eigenvalue(adaptive, eta):
    h, loss = dense_quadratic()
    rho = 0.1
    t = jnp.abs(X_STAR) + eta if adaptive else jnp.ones(5)
    exact = rho**2 * jnp.linalg.eigvalsh(t[:, None] * h * t[None, :])[-1] / 2
    fn = phipsimu.worst_case_sharpness(
        loss, rho=rho, adaptive=adaptive, eta=eta, num_steps=40, return_maximiser=True
    )
    est, ascent = fn(X_STAR, key=KEY)
    # a lower bound of the maximum, found to 1e-4 by 40 steps (float32 rounding: 1e-6)
    assert float(est.value) <= float(exact) * (1 + 1e-5)
    assert float(est.value) >= float(exact) * (1 - 1e-4)
    assert int(est.status) == 0 and bool(jnp.all(ascent.converged))
    assert np.isnan(est.stderr)
    # the maximiser is in the ball and attains the value
    delta = ascent.perturbation
    assert float(jnp.linalg.norm(delta / t)) <= rho * (1 + 1e-6)
    np.testing.assert_allclose(loss(X_STAR + delta) - loss(X_STAR), est.value, rtol=1e-5)
    np.testing.assert_allclose(jnp.max(ascent.restart_values), est.value, rtol=0)


@pytest.mark.parametrize("adaptive", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_worst_case_linf_with_diagonal_hessian_is_the_corner(adaptive):
    rho = 0.1
    t = jnp.abs(X_STAR) if adaptive else jnp.ones(5)
    exact = rho**2 * jnp.sum(t**2 * H_DIAG) / 2
    est = phipsimu.worst_case_sharpness(diag_loss, rho=rho, norm="linf", adaptive=adaptive)(
        X_STAR, key=KEY
    )
    np.testing.assert_allclose(est.value, exact, rtol=1e-5)


@pytest.mark.slow
def test_worst_case_flags_an_unfinished_ascent_and_a_nan_loss():
    _, loss = dense_quadratic()
    est = phipsimu.worst_case_sharpness(loss, rho=0.1, num_steps=2, num_restarts=1)(X_STAR, key=KEY)
    assert est.status & Status.NOT_CONVERGED
    est = phipsimu.worst_case_sharpness(lambda p: loss(p) * jnp.nan, rho=0.1, num_steps=2)(
        X_STAR, key=KEY
    )
    assert est.status & Status.NONFINITE_LOSS and np.isnan(est.value)


def test_average_over_the_sphere_matches_the_trace_within_stderr():
    h, loss = dense_quadratic()
    rho, d, m = 0.1, 5, 256
    sphere = phipsimu.average_sharpness(loss, rho=rho, num_samples=m)(X_STAR, key=KEY)
    assert abs(float(sphere.value) - rho**2 * float(jnp.trace(h)) / (2 * d)) <= 4 * float(
        sphere.stderr
    )
    assert int(sphere.status) == 0


@pytest.mark.slow
def test_average_value_and_stderr_are_those_of_the_per_sample_differences():
    h, loss = dense_quadratic()
    rho, m = 0.1, 256
    sphere = phipsimu.average_sharpness(loss, rho=rho, num_samples=m)(X_STAR, key=KEY)
    v = jax.jit(lambda k: phipsimu.mu.sphere().sample(k, X_STAR, m)[0])(KEY)
    q = jnp.einsum("id,de,ie->i", v, h, v) * rho**2 / 2
    np.testing.assert_allclose(sphere.value, jnp.mean(q), rtol=1e-4)
    np.testing.assert_allclose(sphere.stderr, jnp.std(q, ddof=1) / np.sqrt(m), rtol=1e-3)


@pytest.mark.slow
def test_average_over_a_gaussian_matches_the_trace_within_stderr():
    h, loss = dense_quadratic()
    rho, m = 0.1, 256
    gauss = phipsimu.average_sharpness(
        loss, rho=rho, num_samples=m, mu=phipsimu.mu.gaussian(), chunk_size=64
    )(X_STAR, key=KEY)
    assert abs(float(gauss.value) - rho**2 * float(jnp.trace(h)) / 2) <= 4 * float(gauss.stderr)
    assert int(gauss.status) == 0


@pytest.mark.slow
def test_antithetic_pairs_cancel_the_gradient_term():
    rho, m = 0.1, 64
    x = X_STAR + 1.0  # off the minimum: the linear term dominates single samples
    exact = rho**2 * float(jnp.sum(H_DIAG)) / (2 * 5)
    plain = phipsimu.average_sharpness(diag_loss, rho=rho, num_samples=m)(x, key=KEY)
    pairs = phipsimu.average_sharpness(diag_loss, rho=rho, num_samples=m, antithetic=True)(
        x, key=KEY
    )
    assert abs(float(pairs.value) - exact) <= 4 * float(pairs.stderr)
    assert abs(float(plain.value) - exact) <= 4 * float(plain.stderr)
    assert float(pairs.stderr) < 0.2 * float(plain.stderr)


def test_pac_bayes_sigma_matches_the_closed_form_within_its_stderr():
    h, loss = dense_quadratic()
    thr = 0.01
    t = jnp.abs(X_STAR)
    est = phipsimu.pac_bayes_sigma(loss, threshold=thr, num_samples=256, adaptive=True)(
        X_STAR, key=KEY
    )
    exact = np.sqrt(2 * thr / float(jnp.trace(t[:, None] * h * t[None, :])))
    assert int(est.status) == 0
    assert abs(float(est.value) - exact) <= 4 * float(est.stderr)


@pytest.mark.slow
def test_pac_bayes_sigma_is_a_standard_deviation():
    """The sample gap at σ̂ is the threshold, to the bisection's resolution
    ((1e5)^(2^-20) − 1 ≈ 1e-5 in σ), with σ̂ the standard deviation of σ̂Tz."""
    h, loss = dense_quadratic()
    thr = 0.01
    t = jnp.abs(X_STAR)
    est = phipsimu.pac_bayes_sigma(loss, threshold=thr, num_samples=256, adaptive=True)(
        X_STAR, key=KEY
    )
    z = jax.jit(lambda k: phipsimu.mu.gaussian().sample(k, X_STAR, 256)[0])(KEY) * t
    gap = jnp.mean(jnp.einsum("id,de,ie->i", z, h, z)) * est.value**2 / 2
    np.testing.assert_allclose(gap, thr, rtol=1e-4)


@pytest.mark.slow
def test_pac_bayes_sigma_flags_a_search_that_ends_at_the_range():
    est = phipsimu.pac_bayes_sigma(diag_loss, threshold=1e3, num_samples=8, sigma_max=0.5)(
        X_STAR, key=KEY
    )
    assert est.status & Status.AT_SEARCH_BOUND
    np.testing.assert_allclose(est.value, 0.5, rtol=1e-6)


def relu_mlp():
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    params = [
        {"w": jax.random.normal(k1, (3, 4)), "b": jnp.full((4,), 0.1, jnp.float32)},
        {"w": jax.random.normal(k2, (4, 2))},
    ]
    x = jax.random.normal(k3, (16, 3))
    y = jnp.sin(x[:, :2])

    def loss(p, x, y):
        hidden = jax.nn.relu(x @ p[0]["w"] + p[0]["b"])
        return jnp.mean((hidden @ p[1]["w"] - y) ** 2)

    return params, loss, (x, y)


FACTORS = jnp.array([3.0, 0.5, 2.0, 0.25])


def rescaled(params):
    return phipsimu.symmetries.rescale_neurons(params, 0, FACTORS)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["worst", "average", "pac_bayes"])
def test_adaptive_forms_are_invariant_under_neuron_rescaling(which):
    params, loss, data = relu_mlp()

    def build(adaptive):
        if which == "worst":
            return phipsimu.worst_case_sharpness(loss, rho=0.05, adaptive=adaptive)
        if which == "average":
            return phipsimu.average_sharpness(loss, rho=0.05, num_samples=32, adaptive=adaptive)
        return phipsimu.pac_bayes_sigma(loss, threshold=0.01, num_samples=32, adaptive=adaptive)

    rep = phipsimu.check_invariance(
        loss, None, params, rescaled, *data, key=KEY, estimator=build(True)
    )
    assert rep.loss_preserved and rep.verdict == "invariant", rep
    assert int(rep.estimate.status) == 0 and int(rep.transformed_estimate.status) == 0
    # without the metric the same rescaling moves the value: the check can fail
    rep = phipsimu.check_invariance(
        loss, None, params, rescaled, *data, key=KEY, estimator=build(False)
    )
    assert not rep.invariant and abs(float(rep.ratio) - 1) > 0.05, rep


def test_adaptive_average_is_invariant_under_neuron_rescaling():
    """The fast-suite case of the test above, through check_invariance."""
    params, loss, data = relu_mlp()
    fn = phipsimu.average_sharpness(loss, rho=0.05, num_samples=8, adaptive=True)
    rep = phipsimu.check_invariance(loss, None, params, rescaled, *data, key=KEY, estimator=fn)
    assert rep.verdict == "invariant", rep
    with pytest.raises(ValueError, match=r"num_samples=8: with estimator=\.\.\. it is"):
        phipsimu.check_invariance(
            loss, None, params, rescaled, *data, key=KEY, estimator=fn, num_samples=8
        )


@pytest.mark.slow
def test_batches_give_the_dataset_mean():
    params, loss, (x, y) = relu_mlp()
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    for fn in (
        phipsimu.average_sharpness(loss, rho=0.05, num_samples=8),
        phipsimu.worst_case_sharpness(loss, rho=0.05, num_steps=6, num_restarts=2),
        phipsimu.pac_bayes_sigma(loss, threshold=0.01, num_samples=8, num_bisections=6),
    ):
        whole = fn(params, x, y, key=KEY)
        swept = fn(params, key=KEY, batches=batches)
        np.testing.assert_allclose(swept.value, whole.value, rtol=1e-4)
        np.testing.assert_allclose(swept.stderr, whole.stderr, rtol=1e-3)


def test_bad_input_fails_at_construction_naming_the_parameter():
    with pytest.raises(ValueError, match=r"rho=0\.0: must be a finite number > 0"):
        phipsimu.worst_case_sharpness(diag_loss, rho=0.0)
    with pytest.raises(ValueError, match=r"rho=-1: must be"):
        phipsimu.average_sharpness(diag_loss, rho=-1, num_samples=4)
    with pytest.raises(ValueError, match=r"norm='l1': must be one of \('l2', 'linf'\)"):
        phipsimu.worst_case_sharpness(diag_loss, rho=0.1, norm="l1")
    with pytest.raises(TypeError, match=r"mu=.*must be a probability measure"):
        phipsimu.average_sharpness(diag_loss, rho=0.1, num_samples=4, mu=phipsimu.mu.lebesgue())
    with pytest.raises(ValueError, match=r"num_samples=5: antithetic=True"):
        phipsimu.average_sharpness(diag_loss, rho=0.1, num_samples=5, antithetic=True)
    with pytest.raises(ValueError, match=r"sigma_min=1\.0, sigma_max=0\.5"):
        phipsimu.pac_bayes_sigma(
            diag_loss, threshold=0.1, num_samples=4, sigma_min=1.0, sigma_max=0.5
        )
    with pytest.raises(ValueError, match=r"threshold=0: must be"):
        phipsimu.pac_bayes_sigma(diag_loss, threshold=0, num_samples=4)
    with pytest.raises(ValueError, match=r"num_steps=1: must be an int >= 2"):
        phipsimu.worst_case_sharpness(diag_loss, rho=0.1, num_steps=1)


@pytest.mark.slow
def test_the_same_numbers_chunked_and_under_jit():
    _, loss = dense_quadratic()
    one = phipsimu.worst_case_sharpness(loss, rho=0.1, num_steps=8, chunk_size=1)
    all_ = phipsimu.worst_case_sharpness(loss, rho=0.1, num_steps=8)
    np.testing.assert_allclose(one(X_STAR, key=KEY).value, all_(X_STAR, key=KEY).value, rtol=1e-6)
    for fn in (
        phipsimu.average_sharpness(loss, rho=0.1, num_samples=8, chunk_size=3),
        phipsimu.pac_bayes_sigma(loss, threshold=0.01, num_samples=8, num_bisections=8),
    ):
        eager = fn(X_STAR, key=KEY)
        jitted = jax.jit(lambda p, k, fn=fn: fn(p, key=k))(X_STAR, KEY)
        np.testing.assert_allclose(jitted.value, eager.value, rtol=1e-6)
        np.testing.assert_allclose(jitted.stderr, eager.stderr, rtol=1e-5)


@pytest.mark.slow
def test_16_bit_params_are_evaluated_in_float32_copies():
    """bfloat16 params (values exact in bfloat16) give the float32 numbers: the perturbed
    points are formed in float32, not rounded to the params' 16 bits."""
    x16 = jnp.array([0.5, -1.0, 2.0, 0.25, 1.5], jnp.bfloat16)
    x32 = x16.astype(jnp.float32)

    def loss(p):
        return 0.5 * jnp.sum(H_DIAG * (p.astype(jnp.float32) - x32) ** 2)

    for fn in (
        phipsimu.worst_case_sharpness(loss, rho=0.01, num_steps=10),
        phipsimu.average_sharpness(loss, rho=0.01, num_samples=8),
        phipsimu.pac_bayes_sigma(loss, threshold=1e-4, num_samples=8, num_bisections=10),
    ):
        np.testing.assert_allclose(fn(x16, key=KEY).value, fn(x32, key=KEY).value, rtol=1e-6)
