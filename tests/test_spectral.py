"""Spectral estimators (Lanczos, power iteration, SLQ) against references nobody here wrote:
numpy's dense eigendecomposition of a jax.hessian, matfree on the same matvec and probes, and
closed forms.

Stochastic checks fix their key and allow 4 of the estimator's own standard errors
(a correct estimator fails one with probability ≈ 6e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    init_mlp,
    matfree_quadratic,
    mlp_loss,
    quadratic_loss,
    random_spd,
    split_batches,
    unregister_duration_listener,
)

import phipsimu

SIZES = [16, 40, 30, 4]  # d = 2034


@pytest.fixture(scope="module")
def mlp():
    """A tanh MLP (d = 2034) at random init (indefinite Hessian), its data, the dense
    Hessian of the mean loss and its eigenvalues (float64, numpy)."""
    params = init_mlp(jax.random.key(0), SIZES)
    x = jax.random.normal(jax.random.key(1), (64, SIZES[0]))
    y = jax.random.normal(jax.random.key(2), (64, SIZES[-1]))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda z: mlp_loss(unravel(z), x, y)))(flat)
    hess = np.asarray(hess, np.float64)
    hess = 0.5 * (hess + hess.T)
    return params, x, y, hess, np.linalg.eigvalsh(hess)


def test_top_eigenvalues_match_dense_eigh(mlp):
    params, x, y, hess, lam = mlp
    eig = jax.jit(phipsimu.top_eigenvalues(mlp_loss, 5, num_iterations=60))(
        params, x, y, key=jax.random.key(0)
    )
    ref = lam[::-1][:5]
    np.testing.assert_allclose(eig.value, ref, rtol=1e-4)
    assert eig.converged.all() and eig.num_matvecs == 60
    # each Ritz pair's residual is the true ‖Hy − θy‖ (vectors checked with the dense H)
    flat_vecs = jax.vmap(lambda v: jax.flatten_util.ravel_pytree(v)[0])(eig.vectors)
    vecs = np.asarray(flat_vecs, np.float64)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    true_res = np.linalg.norm(vecs @ hess - np.asarray(eig.value)[:, None] * vecs, axis=1)
    assert np.all(true_res < 1e-4 * ref[0])

    most_negative = jax.jit(phipsimu.top_eigenvalues(mlp_loss, 2, which="SA", num_iterations=60))(
        params, x, y, key=jax.random.key(1)
    )
    assert lam[0] < 0
    np.testing.assert_allclose(most_negative.value, lam[:2], rtol=1e-4)


def test_power_iteration_baseline():
    a = random_spd(3, 30, 0.1, 1.0)
    w, q = np.linalg.eigh(a)
    w[-1] = 3.0  # gap ratio 1/3: 40 steps reach float32 accuracy
    a = (q * w) @ q.T
    loss, params = quadratic_loss(a)
    eig = jax.jit(phipsimu.power_iteration(loss, num_iterations=40))(params, key=jax.random.key(0))
    np.testing.assert_allclose(eig.value, [3.0], rtol=1e-5)
    assert eig.converged.all()


def test_which_selects_algebraic_or_magnitude():
    loss, params = quadratic_loss(np.diag([-5.0, -1.0, 0.5, 2.0, 3.0, 4.0]))
    key = jax.random.key(0)
    for which, ref in [("LA", [4.0, 3.0]), ("SA", [-5.0, -1.0]), ("LM", [-5.0, 4.0])]:
        eig = phipsimu.top_eigenvalues(loss, 2, which=which, num_iterations=6)(params, key=key)
        np.testing.assert_allclose(eig.value, ref, rtol=1e-5)


def test_log_determinant_matches_slogdet_and_flags_indefinite(mlp):
    params, x, y, _, lam = mlp
    damping = 1.0 - lam[0]  # H + δI has eigenvalues in [1, 1 + λ_max − λ_min]
    est = jax.jit(phipsimu.log_determinant(mlp_loss, damping=damping, num_samples=16))(
        params, x, y, key=jax.random.key(0)
    )
    ref = np.sum(np.log(lam + damping))
    assert 0 < float(est.stderr) < 0.05 * abs(ref)
    assert abs(float(est.value) - ref) < 4 * float(est.stderr)


def test_log_determinant_singular_is_minus_inf_indefinite_is_nan():
    # diagonal, so Rademacher probes have vᵀf(A)v = Tr f(A) and n = d makes SLQ exact
    a = np.diag([0.0, 1, 2, 3, 4, 5, 6, 7])
    loss, params = quadratic_loss(a)
    est = phipsimu.log_determinant(loss, num_samples=2, num_iterations=8)(
        params, key=jax.random.key(0)
    )
    assert float(est.value) == -np.inf
    ok = phipsimu.log_determinant(loss, damping=0.5, num_samples=2, num_iterations=8)(
        params, key=jax.random.key(0)
    )
    np.testing.assert_allclose(ok.value, np.sum(np.log(np.linalg.eigvalsh(a) + 0.5)), rtol=1e-4)
    # one negative eigenvalue: a Ritz value proves H + δI indefinite, so NaN, never finite
    loss, params = quadratic_loss(np.diag([-0.1, 1, 2, 3, 4, 5, 6, 7]))
    bad = phipsimu.log_determinant(loss, damping=0.05, num_samples=2, num_iterations=8)(
        params, key=jax.random.key(0)
    )
    assert np.isnan(bad.value) and np.isnan(bad.stderr)


def test_log_determinant_log_value_is_the_log_determinant():
    """``value`` and ``log_value`` are both log det(H + δI) (also when det < 1, where the log
    of the log-determinant would be NaN), and ``log_value`` equals the determinant preset's
    closed-form ``log_value``. Diagonal H and n = d make SLQ exact."""
    key = jax.random.key(0)
    for diag in ([2.0, 3.0, 4.0, 5.0], [0.1, 0.2, 0.5, 2.0]):
        loss, params = quadratic_loss(np.diag(diag))
        est = phipsimu.log_determinant(loss, num_samples=2, num_iterations=4)(params, key=key)
        ref = np.sum(np.log(diag))
        np.testing.assert_allclose(est.value, ref, rtol=1e-5)
        np.testing.assert_allclose(est.log_value, ref, rtol=1e-5)
        det = phipsimu.exact_sharpness(loss, phipsimu.measures.determinant())(params)
        np.testing.assert_allclose(est.log_value, det.log_value, rtol=1e-5)


def test_spectral_density_mass_and_moments(mlp):
    params, x, y, _, lam = mlp
    m = 16
    dens = jax.jit(phipsimu.spectral_density(mlp_loss, num_samples=m, num_iterations=40))(
        params, x, y, key=jax.random.key(0)
    )
    assert dens.nodes.shape == dens.weights.shape == (m, 40)
    np.testing.assert_allclose(np.sum(dens.weights, axis=1), 1.0, rtol=1e-5)
    grid, rho = np.asarray(dens.grid, np.float64), np.asarray(dens.density, np.float64)
    np.testing.assert_allclose(np.trapezoid(rho, grid), 1.0, atol=1e-4)
    nodes, weights = np.asarray(dens.nodes, np.float64), np.asarray(dens.weights, np.float64)
    for p in (1, 2, 3):
        per_probe = np.sum(weights * nodes**p, axis=1)  # uᵀHᵖu, exact quadrature for p < 2n
        stderr = per_probe.std(ddof=1) / np.sqrt(m)
        assert abs(per_probe.mean() - np.mean(lam**p)) < 4 * stderr
    # the smoothed density's mean is the nodes' mean; its variance adds σ²
    mean = np.trapezoid(grid * rho, grid)
    np.testing.assert_allclose(mean, np.sum(weights * nodes) / m, rtol=1e-4, atol=1e-6)
    second = np.trapezoid(grid**2 * rho, grid)
    sigma = float(dens.bandwidth)
    np.testing.assert_allclose(second, np.sum(weights * nodes**2) / m + sigma**2, rtol=1e-4)


def test_spectral_density_bandwidth_scales_with_the_spectrum():
    """The default bandwidth is (θ_max − θ_min)/n at any scale: no absolute floor that
    swamps a Hessian of scale 1e-9 (the floor used to be eps·max(|θ_max|, 1) ≈ 1e-7)."""
    a = random_spd(1, 20, 0.5, 3.0).astype(np.float32)
    key = jax.random.key(0)

    def density(scale):
        loss, params = quadratic_loss((scale * a).astype(np.float32))
        return phipsimu.spectral_density(loss, num_samples=4, num_iterations=10)(params, key=key)

    base = density(1.0)
    for scale in (1e-9, 1e9):
        dens = density(scale)
        np.testing.assert_allclose(dens.bandwidth / scale, base.bandwidth, rtol=1e-4)
        np.testing.assert_allclose(dens.density * scale, base.density, rtol=1e-3, atol=1e-6)


def test_trace_function_square_is_frobenius(mlp):
    params, x, y, _, lam = mlp
    est = jax.jit(phipsimu.trace_function(mlp_loss, jnp.square, num_samples=16))(
        params, x, y, key=jax.random.key(4)
    )
    ref = np.sum(lam**2)
    assert abs(float(est.value) - ref) < 4 * float(est.stderr)


# ---------------------------------------------------------------- matfree, same probes


def test_slq_log_determinant_agrees_with_matfree():
    from matfree import decomp, funm, stochtrace

    with jax.enable_x64(True):
        _, loss, params, matvec = matfree_quadratic()
        m, n, key = 8, 12, jax.random.key(7)
        probes, _ = phipsimu.mu.rademacher().sample(key, params, m)
        integrand = funm.monte_carlo_funm_sym_logdet(decomp.tridiag_sym(n))
        ref = stochtrace.estimator_monte_carlo(integrand, lambda _: probes)(
            lambda v: matvec(v), key
        )
        est = phipsimu.log_determinant(loss, num_samples=m, num_iterations=n)(params, key=key)
        np.testing.assert_allclose(est.value, ref, rtol=1e-10)


# ---------------------------------------------------------------- datasets and blocks


def test_dataset_accumulation_with_unequal_batches_equals_full_batch(mlp):
    params, x, y, _, lam = mlp
    batches = split_batches(x, y, [30, 20, 14])
    key = jax.random.key(3)
    eig = phipsimu.top_eigenvalues(mlp_loss, 3, num_iterations=40)(params, key=key, batches=batches)
    np.testing.assert_allclose(eig.value, lam[::-1][:3], rtol=1e-4)
    full = phipsimu.hessian_trace(mlp_loss, num_samples=8)(params, x, y, key=key)
    swept = phipsimu.hessian_trace(mlp_loss, num_samples=8)(
        params, key=key, batches=lambda: iter(batches)
    )
    np.testing.assert_allclose(swept.value, full.value, rtol=1e-5)
    np.testing.assert_allclose(swept.stderr, full.stderr, rtol=1e-4)


def test_dataset_path_does_not_retrace_on_a_second_call():
    """Over a dataset the loops run in Python with jitted steps: a second call with the same
    loss and shapes must reuse every compilation (counted by JAX's trace events), and give
    the same result."""
    params = init_mlp(jax.random.key(0), [3, 5, 2])
    x = jax.random.normal(jax.random.key(1), (24, 3))
    y = jax.random.normal(jax.random.key(2), (24, 2))
    batches = split_batches(x, y, [10, 14])
    estimators = {
        "lanczos": phipsimu.top_eigenvalues(mlp_loss, 2, num_iterations=6),
        "power": phipsimu.power_iteration(mlp_loss, num_iterations=5),
        "slq": phipsimu.trace_function(mlp_loss, jnp.square, num_samples=3, num_iterations=4),
        "hutch++": phipsimu.hessian_trace(mlp_loss, num_samples=6, method="hutch++"),
        "xtrace": phipsimu.hessian_trace(mlp_loss, num_samples=6, method="xtrace"),
    }
    traces = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for name, fn in estimators.items():
            first = fn(params, key=jax.random.key(0), batches=batches)
            traces.clear()
            second = fn(params, key=jax.random.key(0), batches=batches)
            assert not traces, f"{name}: {len(traces)} retrace(s) on the second call"
            np.testing.assert_array_equal(second.value, first.value)
    finally:
        unregister_duration_listener(listener)


def test_per_block_analysis_matches_dense_diagonal_blocks(small_mlp):
    params, x, y, hess = small_mlp
    sizes = [int(leaf.size) for leaf in jax.tree_util.tree_leaves(params)]
    # ravel_pytree order: layer 0 {b, w}, layer 1 {b, w}
    cut = sizes[0] + sizes[1]
    dense_blocks = {"0": hess[:cut, :cut], "1": hess[cut:, cut:]}
    eig = jax.jit(
        phipsimu.top_eigenvalues(mlp_loss, 1, num_iterations=16, blocks=phipsimu.layer_blocks)
    )(params, x, y, key=jax.random.key(0))
    tr = phipsimu.hessian_trace(
        mlp_loss, num_samples=8, method="xtrace", blocks=phipsimu.layer_blocks
    )
    tr = tr(params, x, y, key=jax.random.key(0))
    assert set(eig) == set(tr) == {"0", "1"}
    for label, block in dense_blocks.items():
        lam = np.linalg.eigvalsh(block)
        np.testing.assert_allclose(eig[label].value, lam[-1:], rtol=1e-4)
        if block.shape[0] <= 8:  # XTrace with 4 probes is exact on a block of rank <= 4
            np.testing.assert_allclose(tr[label].value, np.trace(block), rtol=1e-4)
    masked = phipsimu.top_eigenvalues(
        mlp_loss, 1, num_iterations=16, mask=[{"w": True, "b": True}, {"w": False, "b": False}]
    )(params, x, y, key=jax.random.key(0))
    np.testing.assert_allclose(masked.value, eig["0"].value, rtol=1e-5)


def test_eager_equals_jit():
    # diagonal, so Rademacher probes have vᵀf(A)v = Tr f(A) and n = d makes SLQ exact
    a = np.diag(np.linspace(0.5, 3.0, 12))
    loss, params = quadratic_loss(a)
    fn = phipsimu.trace_function(loss, jnp.log, num_samples=4, num_iterations=12)
    eager = fn(params, key=jax.random.key(0))
    jitted = jax.jit(fn)(params, key=jax.random.key(0))
    np.testing.assert_allclose(eager.value, jitted.value, rtol=1e-5)
    np.testing.assert_allclose(eager.value, np.sum(np.log(np.diag(a))), rtol=1e-4)


# ---------------------------------------------------------------- bad input


def test_bad_input():
    a = random_spd(0, 6)
    loss, params = quadratic_loss(a)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"k=7: exceeds the dimension d=6"):
        phipsimu.top_eigenvalues(loss, 7)(params, key=key)
    with pytest.raises(ValueError, match=r"num_iterations=2: must be an int >= 3"):
        phipsimu.top_eigenvalues(loss, 3, num_iterations=2)
    with pytest.raises(ValueError, match=r"which='XX'"):
        phipsimu.top_eigenvalues(loss, which="XX")
    with pytest.raises(ValueError, match=r"damping=-1.0"):
        phipsimu.log_determinant(loss, damping=-1.0, num_samples=2)
    with pytest.raises(ValueError, match=r"mask and blocks"):
        phipsimu.hessian_trace(loss, num_samples=4, mask={"u": True, "w": True}, blocks="x")
    with pytest.raises(ValueError, match=r"yielded no batch"):
        phipsimu.hessian_trace(loss, num_samples=4)(params, key=key, batches=[])
    with pytest.raises(TypeError, match=r"one-shot iterator"):
        phipsimu.hessian_trace(loss, num_samples=4)(params, key=key, batches=iter([(1.0,)]))
    with pytest.raises(TypeError, match=r"key="):
        phipsimu.hessian_trace(loss, num_samples=4)(params, key=0)


def test_damped_gauss_newton_with_a_large_norm_is_never_singular():
    """A ReLU net rescaled without changing its function (‖G‖ ≈ 9·10⁴): in float32 the
    Ritz values' rounding (n·eps·‖G‖ ≈ 0.7) exceeds the damping 0.1, yet G + δI >= δI is
    positive definite. The log-determinant is finite and within its standard error of
    slogdet of the float64 matrix; it used to be −inf with SINGULAR."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    s = jnp.array([1000.0, 1e-3, 50.0, 0.02, 300.0, 1.0, 1 / 300, 7.0])
    params = {
        "w1": jax.random.normal(k1, (4, 8)) * s,
        "b1": 0.1 * jax.random.normal(k2, (8,)) * s,
        "w2": jax.random.normal(k3, (8, 3)) / s[:, None],
    }
    x, y = jax.random.normal(k4, (32, 4)), jnp.arange(32) % 3

    def apply(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    def output_loss(out, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))

    ggn = phipsimu.curvature.gauss_newton(apply, output_loss)
    damping = 0.1
    est = phipsimu.log_determinant(ggn, damping=damping, num_samples=8, num_iterations=64)(
        params, x, y, key=jax.random.key(1)
    )
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        g = np.asarray(ggn.dense(p64, jnp.asarray(x, jnp.float64), y))
    sign, want = np.linalg.slogdet(g + damping * np.eye(g.shape[0]))
    assert sign == 1.0 and np.linalg.norm(g, 2) > 1e4
    # not SINGULAR; most of this low-rank G's spectrum is below δ, which the estimate says
    # (DAMPING_DOMINATED, issue 27 item 7) and nothing else
    dominated = int(phipsimu.Status.DAMPING_DOMINATED)
    assert int(est.status) == dominated and float(est.damping_share) > 0.5, est.reasons()
    assert np.isfinite(float(est.value))
    assert abs(float(est.value) - want) < 4 * float(est.stderr)


def test_nan_loss_is_flagged_by_eigen_results_and_slq():
    # a NaN target of a linear model: the curvature alone is finite, the loss is not
    loss = lambda p, x, y: jnp.mean((x @ p - y) ** 2)  # noqa: E731
    args = (jnp.ones(3), jnp.eye(3), jnp.array([0.0, jnp.nan, 0.0]))
    key = jax.random.key(0)
    nonfinite = phipsimu.describe_status(phipsimu.Status.NONFINITE_LOSS)
    for eig in [
        phipsimu.top_eigenvalues(loss, 1, num_iterations=3)(*args, key=key),
        phipsimu.power_iteration(loss, num_iterations=2)(*args, key=key),
    ]:
        assert np.isnan(float(eig.value[0])) and not bool(eig.converged[0])
        assert eig.reasons() == nonfinite and not bool(eig.ok)
    est = phipsimu.log_determinant(loss, num_samples=2, num_iterations=3)(*args, key=key)
    assert np.isnan(float(est.value)) and est.reasons() == nonfinite


def test_eigen_result_status_is_zero_on_a_finite_loss():
    loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * p**2)  # noqa: E731
    eig = phipsimu.top_eigenvalues(loss, 1, num_iterations=3)(jnp.ones(3), key=jax.random.key(0))
    assert eig.status.dtype == jnp.int32 and int(eig.status) == 0 and eig.reasons() == []


@pytest.mark.parametrize("f", [jnp.sum, jnp.sort, jnp.cumsum, lambda x: x - jnp.mean(x)])
def test_trace_function_rejects_a_non_elementwise_f(f):
    with pytest.raises(ValueError, match=r"f=.*must act elementwise"):
        phipsimu.trace_function(lambda p: jnp.sum(p**2), f, num_samples=2)


@pytest.mark.parametrize("f", [jnp.log, jnp.square, jnp.exp, lambda x: jnp.where(x > 1, x, 0.0)])
def test_trace_function_accepts_elementwise_f(f):
    phipsimu.trace_function(lambda p: jnp.sum(p**2), f, num_samples=2)


def test_trace_function_built_inside_jit():
    """f's elementwise check runs on concrete test values even under a jit trace."""
    loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * p**2)  # noqa: E731

    @jax.jit
    def run(p):
        fn = phipsimu.trace_function(loss, jnp.log1p, num_samples=2, num_iterations=3)
        return fn(p, key=jax.random.key(0)).value

    np.testing.assert_allclose(run(jnp.ones(3)), np.sum(np.log1p([1.0, 2.0, 3.0])), rtol=1e-4)
