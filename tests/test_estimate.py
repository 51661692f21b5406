"""Monte Carlo sharpness against closed forms nobody here wrote (numpy formulas on dense
Hessians from jax.hessian), Example 1, reproducibility and bad input.

Every Monte Carlo assertion fixes its key and allows 4 of the estimator's own standard
errors: a correct estimator fails one such check with probability ≈ 6e-5.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    example1,
    init_mlp,
    mlp_loss,
    quadratic_loss,
    random_spd,
    split_batches,
    unregister_duration_listener,
)
from test_measure import sphere_moment_reference

import phipsimu

D = 6


def references(a: np.ndarray) -> dict[str, float]:
    """S for every preset from numpy alone (docs/conventions.md, "Table 1 presets")."""
    return {
        "trace": np.trace(a) / a.shape[0],
        "eigen_moment_2": sphere_moment_reference(a, 2),
        "eigen_moment_3": sphere_moment_reference(a, 3),
        "frobenius": float(np.sum(a**2)),
    }


# The determinant is checked separately: on SPD quadratics with d <= 6 (an isotropic Lebesgue
# proposal needs small d for a usable ESS) and through its definiteness certificate (an MLP's
# Hessian is indefinite, where the determinant measure is NaN by design).
PRESETS = {
    "trace": phipsimu.measures.trace(),
    "eigen_moment_2": phipsimu.measures.eigen_moment(2),
    "eigen_moment_3": phipsimu.measures.eigen_moment(3),
    "frobenius": phipsimu.measures.frobenius(),
}


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("seed", [0, 1])
def test_preset_mc_matches_closed_form_on_spd_quadratic(name, seed):
    a = random_spd(seed, D)
    loss, params = quadratic_loss(a)
    num = 4000  # stderr ≈ 1–3% of the value for these presets at d = 6
    est = jax.jit(phipsimu.sharpness(loss, PRESETS[name], num_samples=num))(
        params, key=jax.random.key(seed)
    )
    ref = references(a)[name]
    assert est.num_samples == num
    assert 0 < float(est.stderr) < 0.1 * abs(ref)
    assert abs(float(est.value) - ref) < 4 * float(est.stderr)
    exact = phipsimu.exact_sharpness(loss, PRESETS[name])(params)
    np.testing.assert_allclose(exact.value, ref, rtol=1e-4)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_mc_matches_dense_hessian_of_mlp(small_mlp, name):
    params, x, y, hess = small_mlp
    num = 4000
    est = jax.jit(phipsimu.sharpness(mlp_loss, PRESETS[name], num_samples=num))(
        params, x, y, key=jax.random.key(3)
    )
    ref = references(hess)[name]
    assert abs(float(est.value) - ref) < 4 * float(est.stderr)
    np.testing.assert_allclose(
        phipsimu.exact_sharpness(mlp_loss, PRESETS[name])(params, x, y).value,
        ref,
        rtol=1e-3,
        atol=1e-7,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("d", [2, 4, 6])
def test_determinant_mc_matches_slogdet(seed, d):
    a = random_spd(seed + 10 * d, d)
    loss, params = quadratic_loss(a)
    # proposal N(0, σ²I) with σ² = 1/mean eigenvalue: the integrand's typical width. The
    # weights have finite variance iff 2A − I/σ² is positive definite (closed form): 4 of
    # these 9 matrices are not, and then the estimate must say so rather than be trusted.
    scale = 1.0 / math.sqrt(np.trace(a) / d)
    finite = np.linalg.eigvalsh(2 * a - np.eye(d) / scale**2)[0] > 0
    num = 20_000
    sign, logdet = np.linalg.slogdet(a)
    assert sign == 1
    for s in (scale, None):  # None: the estimator picks σ² = 1/θ_min (always finite)
        est = jax.jit(
            phipsimu.sharpness(loss, phipsimu.measures.determinant(scale=s), num_samples=num)
        )(params, key=jax.random.key(seed))
        flagged = bool(est.status & phipsimu.Status.INFINITE_VARIANCE)
        assert flagged == (s is not None and not finite)
        if flagged:
            continue
        se_log = float(est.stderr / est.value)
        assert se_log < 0.05
        assert abs(float(est.log_value) - logdet) < 4 * se_log
        assert float(est.ess) > 0.1 * num
    np.testing.assert_allclose(
        phipsimu.exact_sharpness(loss, phipsimu.measures.determinant())(params).log_value,
        logdet,
        rtol=1e-5,
    )


def test_determinant_ess_small_when_proposal_poorly_scaled():
    a = random_spd(0, D)
    loss, params = quadratic_loss(a)
    good_scale = 1.0 / math.sqrt(np.trace(a) / D)
    ess = {}
    for scale in (good_scale, 5 * good_scale):
        est = phipsimu.sharpness(
            loss, phipsimu.measures.determinant(scale=scale), num_samples=5000
        )(params, key=jax.random.key(0))
        ess[scale] = float(est.ess)
    assert ess[good_scale] > 0.5 * 5000
    assert ess[5 * good_scale] < 0.01 * 5000


def test_determinant_of_indefinite_hessian_is_nan_not_finite():
    a = np.diag([2.0, -1.0, 1.0, 3.0])
    loss, params = quadratic_loss(a)
    est = phipsimu.sharpness(loss, phipsimu.measures.determinant(), num_samples=64)(
        params, key=jax.random.key(0)
    )
    assert np.isnan(float(est.value)) and np.isnan(float(est.log_value))
    assert np.isnan(
        float(phipsimu.exact_sharpness(loss, phipsimu.measures.determinant())(params).log_value)
    )


@pytest.mark.parametrize(
    ("diag", "expect"),
    [
        ((1.0, 0.0, 2.0), "singular"),  # det = 0: the Lebesgue integral diverges, S = 0
        ((1.0, -1e-3, 2.0), "indefinite"),  # mildly indefinite: probes rarely see vᵀHv <= 0
        ((1.0, 1e-2, 2.0), "definite"),
        ((1.0, 1.0, 1.0, 1e-4), "definite"),  # small but nonzero: rounding is eps·‖H‖
    ],
)
def test_determinant_certifies_definiteness(diag, expect):
    """Without the Lanczos certificate these gave confident finite numbers (e.g. 0.09 ± 0.03
    for a singular H): Monte Carlo alone cannot see a null or slightly negative direction."""
    loss, params = quadratic_loss(np.diag(diag))
    # a fixed proposal scale, so that the checked and unchecked runs draw the same probes
    measure = phipsimu.measures.determinant(scale=1.0)
    est = jax.jit(phipsimu.sharpness(loss, measure, num_samples=2000))(
        params, key=jax.random.key(0)
    )
    if expect == "singular":
        assert float(est.value) == 0.0 and float(est.log_value) == -np.inf
    elif expect == "indefinite":
        assert np.isnan(float(est.value)) and np.isnan(float(est.log_value))
    else:
        assert np.isfinite(float(est.log_value))
        unchecked = phipsimu.sharpness(loss, measure, num_samples=2000, check_iterations=0)(
            params, key=jax.random.key(0)
        )
        assert float(unchecked.value) == float(est.value)


def test_determinant_adaptive_with_a_zero_coordinate_is_singular():
    """T_x = |x| with x_0 = 0 makes T_x H T_x singular even though H is positive definite."""
    a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))

    def loss(x):
        return 0.5 * (x + 1) @ a @ (x + 1)

    fn = phipsimu.sharpness(loss, phipsimu.measures.determinant(), num_samples=200, adaptive=True)
    assert float(fn(jnp.array([0.0, 1.0, 2.0]), key=jax.random.key(0)).log_value) == -np.inf
    assert np.isfinite(float(fn(jnp.array([0.5, 1.0, 2.0]), key=jax.random.key(0)).log_value))


class TestExample1:
    """L = x₁²x₂² − 2x₁x₂ + 1: ½Tr H = x₁² + x₂², det H = 0 on x₁x₂ = 1."""

    @pytest.mark.parametrize("point", [(1.0, 1.0), (2.0, 0.5), (0.3, -1.7), (4.0, 0.25)])
    def test_half_trace(self, point):
        x = jnp.array(point)
        exact = phipsimu.exact_sharpness(example1, phipsimu.measures.trace())(x)
        # trace preset is Tr/d with d = 2, i.e. ½Tr H
        np.testing.assert_allclose(exact.value, point[0] ** 2 + point[1] ** 2, rtol=1e-5)
        est = phipsimu.sharpness(example1, phipsimu.measures.trace(), num_samples=2000)(
            x, key=jax.random.key(1)
        )
        assert abs(float(est.value) - (point[0] ** 2 + point[1] ** 2)) < 4 * float(est.stderr)

    @pytest.mark.parametrize("k", [1.0, 2.0, 4.0, 10.0])
    def test_determinant_zero_on_manifold(self, k):
        x = jnp.array([k, 1.0 / k])
        exact = phipsimu.exact_sharpness(example1, phipsimu.measures.determinant())(x)
        assert float(exact.value) == 0.0 and float(exact.log_value) == -np.inf
        est = phipsimu.sharpness(example1, phipsimu.measures.determinant(), num_samples=500)(
            x, key=jax.random.key(0)
        )
        assert float(est.value) == 0.0 and float(est.log_value) == -np.inf

    def test_determinant_off_manifold(self):
        x = jnp.array([1.0, 0.5])  # det H = 4x₁²x₂² − (4x₁x₂ − 2)² = 1 − 0 = 1
        exact = phipsimu.exact_sharpness(example1, phipsimu.measures.determinant())(x)
        np.testing.assert_allclose(exact.value, 1.0, rtol=1e-5)


def test_pytree_float64_and_jit():
    with jax.enable_x64(True):
        a = random_spd(5, D)
        loss, params = quadratic_loss(a)
        assert params["u"].dtype == jnp.float64
        est = jax.jit(phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=500))(
            params, key=jax.random.key(0)
        )
        assert est.value.dtype == jnp.float64
        assert abs(float(est.value) - np.trace(a) / D) < 4 * float(est.stderr)


def test_nested_pytree_with_integer_leaves_and_mask(small_mlp):
    params, x, y, hess = small_mlp
    tree = {"layers": params, "step": jnp.array(3, jnp.int32)}

    def loss(t, x, y):
        return mlp_loss(t["layers"], x, y)

    mask = {"layers": [{"w": True, "b": False}, {"w": True, "b": False}], "step": False}
    measure = phipsimu.measures.trace(mask=mask)
    est = jax.jit(phipsimu.sharpness(loss, measure, num_samples=3000))(
        tree, x, y, key=jax.random.key(0)
    )
    # reference: the dense Hessian restricted to the weight matrices (ravel order b0, w0, b1, w1)
    idx = np.r_[5:20, 22:32]
    ref = np.trace(hess[np.ix_(idx, idx)]) / len(idx)
    assert measure.mu.dim(tree) == 25
    assert abs(float(est.value) - ref) < 4 * float(est.stderr)
    np.testing.assert_allclose(
        phipsimu.exact_sharpness(loss, measure)(tree, x, y).value, ref, rtol=1e-4
    )


def test_adaptive_trace_matches_dense_metric(small_mlp):
    params, x, y, hess = small_mlp
    flat = np.asarray(jax.flatten_util.ravel_pytree(params)[0], np.float64)
    t = np.abs(flat) + 0.1
    ref = np.trace(t[:, None] * hess * t[None, :]) / len(flat)
    est = phipsimu.sharpness(
        mlp_loss, phipsimu.measures.trace(), num_samples=3000, adaptive=True, eta=0.1
    )(params, x, y, key=jax.random.key(0))
    assert abs(float(est.value) - ref) < 4 * float(est.stderr)


def test_custom_measure_without_closed_form_exact_uses_dense_mc(small_mlp):
    params, x, y, _ = small_mlp
    measure = phipsimu.Measure(jnp.sqrt, jnp.abs, phipsimu.mu.rademacher())
    exact = phipsimu.exact_sharpness(measure=measure, loss_fn=mlp_loss)(
        params, x, y, key=jax.random.key(0)
    )
    est = phipsimu.sharpness(mlp_loss, measure, num_samples=2000)(
        params, x, y, key=jax.random.key(1)
    )
    assert exact.num_samples == 2**14
    assert abs(float(est.value - exact.value)) < 4 * math.hypot(est.stderr, exact.stderr)
    with pytest.raises(ValueError, match="key=None"):
        phipsimu.exact_sharpness(mlp_loss, measure)(params, x, y)


def test_same_key_eager_vs_jit_and_different_keys(small_mlp):
    params, x, y, _ = small_mlp
    fn = phipsimu.sharpness(mlp_loss, phipsimu.measures.eigen_moment(2), num_samples=16)
    eager = fn(params, x, y, key=jax.random.key(0))
    jitted = jax.jit(fn)(params, x, y, key=jax.random.key(0))
    # the probes are identical; XLA may fuse the arithmetic differently (float32 rounding)
    np.testing.assert_allclose(eager.value, jitted.value, rtol=1e-5)
    np.testing.assert_allclose(eager.stderr, jitted.stderr, rtol=1e-4)
    other = jax.jit(fn)(params, x, y, key=jax.random.key(1))
    assert float(other.value) != float(eager.value)


def test_chunked_equals_vmapped(small_mlp):
    """The same probes in one vmap (chunk_size=num_samples) and in chunks of 3."""
    params, x, y, _ = small_mlp
    kwargs = {"num_samples": 10}
    a = phipsimu.sharpness(mlp_loss, phipsimu.measures.trace(), chunk_size=10, **kwargs)(
        params, x, y, key=jax.random.key(0)
    )
    b = phipsimu.sharpness(mlp_loss, phipsimu.measures.trace(), chunk_size=3, **kwargs)(
        params, x, y, key=jax.random.key(0)
    )
    np.testing.assert_allclose(a.value, b.value, rtol=1e-5)


def test_nan_loss_gives_nan_estimate():
    def loss(p):
        return jnp.sum(p**2) * jnp.nan

    extra = [phipsimu.measures.determinant(), phipsimu.measures.invariant_gaussian()]
    for measure in [*PRESETS.values(), *extra]:
        est = phipsimu.sharpness(loss, measure, num_samples=4)(jnp.ones(3), key=jax.random.key(0))
        assert np.isnan(float(est.value))


def _linear_least_squares_with_a_nan_target():
    # the curvature of a model linear in its params never reads the targets
    loss = lambda p, x, y: jnp.mean((x @ p - y) ** 2)  # noqa: E731
    return loss, jnp.ones(3), jnp.eye(3), jnp.array([0.0, jnp.nan, 0.0])


def test_nan_target_of_a_linear_model_is_flagged():
    loss, params, x, y = _linear_least_squares_with_a_nan_target()
    nonfinite = int(phipsimu.Status.NONFINITE_LOSS)
    est = phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=2)(
        params, x, y, key=jax.random.key(0)
    )
    assert np.isnan(float(est.value)) and int(est.status) & nonfinite
    exact = phipsimu.exact_sharpness(loss, phipsimu.measures.trace())(params, x, y)
    assert np.isnan(float(exact.value)) and int(exact.status) & nonfinite


def test_exact_sharpness_flags_nan_params():
    loss, params, x, _ = _linear_least_squares_with_a_nan_target()
    for measure in [phipsimu.measures.trace(), phipsimu.measures.determinant()]:
        est = phipsimu.exact_sharpness(loss, measure)(params.at[0].set(jnp.nan), x, jnp.zeros(3))
        assert np.isnan(float(est.value))
        assert est.reasons() == phipsimu.describe_status(phipsimu.Status.NONFINITE_LOSS)


def test_sharpness_with_batches_applies_psi_to_full_data_forms():
    """ψ(t) = t² is nonlinear: the dataset measure is ψ of the pooled quadratic form, equal
    to the one-batch measure on the concatenated data, and not the mean of per-batch
    measures (the batches are made to differ in curvature)."""
    params = init_mlp(jax.random.key(0), [3, 5, 2])
    x = (
        jax.random.normal(jax.random.key(1), (24, 3))
        * jnp.where(jnp.arange(24) < 10, 3.0, 0.3)[:, None]
    )
    y = jax.random.normal(jax.random.key(2), (24, 2))
    batches = split_batches(x, y, [10, 9, 5])
    measure = phipsimu.measures.eigen_moment(2)
    key = jax.random.key(0)
    pooled = phipsimu.sharpness(mlp_loss, measure, num_samples=64)(params, key=key, batches=batches)
    whole = phipsimu.sharpness(mlp_loss, measure, num_samples=64)(params, x, y, key=key)
    np.testing.assert_allclose(pooled.value, whole.value, rtol=1e-5)
    np.testing.assert_allclose(pooled.stderr, whole.stderr, rtol=1e-4)
    per_batch = (
        sum(
            len(b[0])
            * float(
                phipsimu.sharpness(mlp_loss, measure, num_samples=64)(params, *b, key=key).value
            )
            for b in batches
        )
        / 24
    )
    assert abs(per_batch - float(whole.value)) > 0.1 * float(whole.value)


class TestBadInput:
    def test_non_scalar_loss(self):
        fn = phipsimu.sharpness(lambda p: p**2, phipsimu.measures.trace(), num_samples=2)
        with pytest.raises(ValueError, match="loss_fn"):
            fn(jnp.ones(3), key=jax.random.key(0))

    @pytest.mark.parametrize("num", [0, -1, 2.5, True])
    def test_num_samples(self, num):
        with pytest.raises(ValueError, match="num_samples"):
            phipsimu.sharpness(example1, phipsimu.measures.trace(), num_samples=num)

    def test_frobenius_needs_two_samples(self):
        with pytest.raises(ValueError, match="num_samples=1: must be an int >= 2"):
            phipsimu.sharpness(example1, phipsimu.measures.frobenius(), num_samples=1)

    def test_check_iterations(self):
        with pytest.raises(ValueError, match="check_iterations=-1"):
            phipsimu.sharpness(
                example1, phipsimu.measures.determinant(), num_samples=2, check_iterations=-1
            )

    def test_chunk_size_and_eta(self):
        with pytest.raises(ValueError, match="chunk_size"):
            phipsimu.sharpness(example1, phipsimu.measures.trace(), num_samples=2, chunk_size=0)
        with pytest.raises(ValueError, match="eta"):
            phipsimu.sharpness(example1, phipsimu.measures.trace(), num_samples=2, eta=-1.0)

    def test_measure_and_loss_types(self):
        with pytest.raises(TypeError, match="measure"):
            phipsimu.sharpness(example1, "trace", num_samples=2)
        with pytest.raises(TypeError, match="loss_fn"):
            phipsimu.sharpness(None, phipsimu.measures.trace(), num_samples=2)

    @pytest.mark.parametrize("key", [0, np.zeros(3, np.uint32), jnp.ones(2)])
    def test_key_type(self, key):
        fn = phipsimu.sharpness(example1, phipsimu.measures.trace(), num_samples=2)
        with pytest.raises(TypeError, match="key"):
            fn(jnp.ones(2), key=key)

    def test_mask_mismatch(self):
        fn = phipsimu.sharpness(
            lambda p: jnp.sum(p["a"] ** 2),
            phipsimu.measures.trace(mask={"b": True}),
            num_samples=2,
        )
        with pytest.raises(ValueError, match="mask"):
            fn({"a": jnp.ones(2)}, key=jax.random.key(0))

    def test_empty_batches(self):
        fn = phipsimu.sharpness(example1, phipsimu.measures.trace(), num_samples=2)
        with pytest.raises(ValueError, match=r"yielded no batch"):
            fn(jnp.ones(2), key=jax.random.key(0), batches=lambda: iter(()))

    def test_exact_too_large(self):
        with pytest.raises(ValueError, match="max_dim=10"):
            phipsimu.exact_sharpness(
                lambda p: jnp.sum(p**2), phipsimu.measures.trace(), max_dim=10
            )(jnp.ones(11))


def test_estimator_built_inline_does_not_recompile():
    """Building the estimator anew on every call (in a Python loop) reuses the first build's
    compilation: the factories cache by configuration (counted by JAX's trace events)."""
    params = {"w": jnp.ones(3)}
    x = jnp.eye(3)
    traces = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    def loss(p, x):
        return jnp.mean((x @ p["w"]) ** 2)

    builds = {
        "sharpness": lambda: phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=2),
        "trace": lambda: phipsimu.hessian_trace(loss, num_samples=2),
        "lanczos": lambda: phipsimu.top_eigenvalues(loss, 1, num_iterations=2),
    }
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for name, build in builds.items():
            first = build()(params, x, key=jax.random.key(0))
            traces.clear()
            second = build()(params, x, key=jax.random.key(0))
            assert not traces, f"{name}: {len(traces)} retrace(s) when built again"
            np.testing.assert_array_equal(second.value, first.value)
    finally:
        unregister_duration_listener(listener)
    # an unhashable argument (a dict mask) still builds, without the cache
    mask = {"w": True}
    est = phipsimu.hessian_trace(loss, num_samples=2, mask=mask)(params, x, key=jax.random.key(0))
    assert int(est.status) == 0
