"""Curvature operators (Hessian, Gauss–Newton, a user's matvec) against dense references
nobody here wrote: ``jax.hessian``, ``jax.jacfwd`` Jacobians, and the Fisher information from
log-softmax gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flat_rows, init_mlp, mlp_apply, mlp_loss, mse, split_batches

import phipsimu
from phipsimu import curvature


def _flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def dense_ggn(params, x, y, output_loss):
    """Jᵀ∇²ℓJ from a dense Jacobian (jax.jacfwd) and a dense output-space Hessian."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    out = mlp_apply(params, x)
    jac = jax.jacfwd(lambda z: mlp_apply(unravel(z), x))(flat).reshape(out.size, -1)
    h_out = jax.hessian(lambda o: output_loss(o.reshape(out.shape), y))(out.ravel())
    jac, h_out = np.asarray(jac, np.float64), np.asarray(h_out, np.float64)
    return jac.T @ h_out @ jac


@pytest.fixture(scope="module")
def ggn_setup():
    """A 3-5-2 tanh MLP (d = 32) with squared error, and its dense Gauss–Newton matrix."""
    params = init_mlp(jax.random.key(0), [3, 5, 2])
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jax.random.normal(jax.random.key(2), (8, 2))
    return params, x, y, dense_ggn(params, x, y, mse)


# ---------------------------------------------------------------- Hessian


def test_hvp_matches_dense_hessian(small_mlp):
    params, x, y, hess = small_mlp
    v = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    hv = jax.jit(phipsimu.hvp(mlp_loss))(params, v, x, y)
    np.testing.assert_allclose(_flat(hv), hess @ _flat(v), rtol=1e-4, atol=1e-5)
    hv2 = curvature.hessian(mlp_loss).matvec(params, v, x, y)
    np.testing.assert_allclose(_flat(hv2), _flat(hv), rtol=1e-5, atol=1e-7)


def test_hvp_ignores_integer_leaves():
    def loss(p):
        return jnp.sum(p["w"] ** 3) * p["n"]

    params = {"w": jnp.array([1.0, 2.0]), "n": jnp.array(2)}
    v = {"w": jnp.array([1.0, 1.0]), "n": jnp.array(0)}
    hv = phipsimu.hvp(loss)(params, v)
    np.testing.assert_allclose(hv["w"], [12.0, 24.0])
    assert hv["n"].dtype == params["n"].dtype and int(hv["n"]) == 0


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_quadratic_forms_match_dense(small_mlp, chunk_size):
    params, x, y, hess = small_mlp
    v, _ = phipsimu.mu.gaussian().sample(jax.random.key(0), params, 7)
    q = curvature.hessian(mlp_loss).quadratic_forms(params, v, x, y, chunk_size=chunk_size)
    vm = flat_rows(v)
    np.testing.assert_allclose(q, np.einsum("id,de,ie->i", vm, hess, vm), rtol=1e-4, atol=1e-5)


def test_dense_and_mask(small_mlp):
    params, x, y, hess = small_mlp
    np.testing.assert_allclose(curvature.hessian(mlp_loss).dense(params, x, y), hess, rtol=1e-5)
    # the operator on the first layer only is the Hessian's diagonal block there
    mask = [{"w": True, "b": True}, {"w": False, "b": False}]
    block = curvature.hessian(mlp_loss).dense(params, x, y, mask=mask)
    np.testing.assert_allclose(block, hess[:20, :20], rtol=1e-5, atol=1e-7)


def test_non_scalar_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="loss_fn: must return a real floating-point scalar"):
        phipsimu.hvp(lambda p: p * 2)(jnp.ones(2), jnp.ones(2))


# ---------------------------------------------------------------- Gauss–Newton


def test_gauss_newton_matches_dense_jt_h_j(ggn_setup):
    params, x, y, g = ggn_setup
    ggn = curvature.gauss_newton(mlp_apply, mse)
    v, _ = phipsimu.mu.gaussian().sample(jax.random.key(3), params, 5)
    vm = flat_rows(v)
    gv = jax.jit(jax.vmap(ggn.matvec, in_axes=(None, 0, None, None)))(params, v, x, y)
    np.testing.assert_allclose(flat_rows(gv), vm @ g, rtol=1e-4, atol=1e-6)
    q = jax.jit(ggn.quadratic_forms)(params, v, x, y)
    np.testing.assert_allclose(q, np.einsum("id,de,ie->i", vm, g, vm), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ggn.dense(params, x, y), g, rtol=1e-4, atol=1e-6)
    # positive semi-definite, and not the Hessian of this nonlinear model
    assert np.linalg.eigvalsh(g)[0] > -1e-6
    hess = np.asarray(curvature.hessian(mlp_loss).dense(params, x, y), np.float64)
    assert np.abs(hess - g).max() > 1e-2 * np.abs(g).max()


def test_gauss_newton_through_the_estimators(ggn_setup):
    """Lanczos, SLQ log-determinant and Hutchinson trace given the operator agree with the
    dense Jᵀ∇²ℓJ (d = 32: Lanczos with n = d is exact)."""
    params, x, y, g = ggn_setup
    ggn = curvature.gauss_newton(mlp_apply, mse)
    lam = np.linalg.eigvalsh(g)
    key = jax.random.key(0)
    eig = phipsimu.top_eigenvalues(ggn, 3, num_iterations=32)(params, x, y, key=key)
    np.testing.assert_allclose(eig.value, lam[::-1][:3], rtol=1e-4)
    damping = 0.1
    logdet = phipsimu.log_determinant(ggn, damping=damping, num_samples=64)(params, x, y, key=key)
    ref = np.sum(np.log(lam + damping))
    assert abs(float(logdet.value) - ref) < 4 * float(logdet.stderr)
    tr = phipsimu.hessian_trace(ggn, num_samples=200)(params, x, y, key=key)
    assert abs(float(tr.value) - np.trace(g)) < 4 * float(tr.stderr)
    exact = phipsimu.exact_sharpness(ggn, phipsimu.measures.trace())(params, x, y)
    np.testing.assert_allclose(exact.value, np.trace(g) / 32, rtol=1e-4)


def test_gauss_newton_equals_hessian_on_linear_least_squares():
    w = {"a": jax.random.normal(jax.random.key(0), (4, 3)), "c": jnp.zeros(3)}
    x = jax.random.normal(jax.random.key(1), (10, 4))
    y = jax.random.normal(jax.random.key(2), (10, 3))

    def apply_fn(p, x):
        return x @ p["a"] + p["c"]

    ggn = curvature.gauss_newton(apply_fn, mse)
    hess = curvature.hessian(lambda p, x, y: mse(apply_fn(p, x), y))
    np.testing.assert_allclose(ggn.dense(w, x, y), hess.dense(w, x, y), rtol=1e-5, atol=1e-6)
    v, _ = phipsimu.mu.rademacher().sample(jax.random.key(3), w, 4)
    np.testing.assert_allclose(
        ggn.quadratic_forms(w, v, x, y), hess.quadratic_forms(w, v, x, y), rtol=1e-5
    )


def test_gauss_newton_of_softmax_cross_entropy_is_the_fisher():
    """For the mean softmax cross-entropy, G = (1/N) Σᵢ Σ_c p_ic g_ic g_icᵀ with
    g_ic = ∇ log p(c | xᵢ): the Fisher information, from log-softmax gradients."""
    params = init_mlp(jax.random.key(0), [3, 4, 3])
    x = jax.random.normal(jax.random.key(1), (6, 3))
    labels = jax.nn.one_hot(jnp.array([0, 1, 2, 0, 1, 2]), 3)

    def xent(logits, y):
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    logp = jax.nn.log_softmax(mlp_apply(params, x))
    grads = jax.jacfwd(lambda z: jax.nn.log_softmax(mlp_apply(unravel(z), x)))(flat)  # (N, C, d)
    p = np.exp(np.asarray(logp, np.float64))
    grads = np.asarray(grads, np.float64)
    fisher = np.einsum("nc,ncd,nce->de", p, grads, grads) / x.shape[0]
    ggn = curvature.gauss_newton(mlp_apply, xent).dense(params, x, labels)
    np.testing.assert_allclose(ggn, fisher, rtol=1e-4, atol=1e-6)


def test_operators_sweep_batches(ggn_setup):
    params, x, y, _ = ggn_setup
    batches = split_batches(x, y, [5, 3])
    v = jax.tree_util.tree_map(lambda p: jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    for op in (curvature.gauss_newton(mlp_apply, mse), curvature.hessian(mlp_loss)):
        full = op.matvec(params, v, x, y)
        swept = op.matvec(params, v, batches=batches)
        np.testing.assert_allclose(_flat(swept), _flat(full), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(op.dense(params, batches=batches), op.dense(params, x, y),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


# ---------------------------------------------------------------- a user's matvec


def test_linear_operator_of_a_matrix():
    a = np.diag([1.0, 2.0, 3.0, 4.0]) + 0.5
    params = {"u": jnp.zeros(2), "w": jnp.zeros(2), "n": jnp.array(3)}

    def matvec(p, v):
        z = jnp.concatenate([v["u"], v["w"]]) @ jnp.asarray(a, jnp.float32)
        return {"u": z[:2], "w": z[2:], "n": jnp.array(0)}

    op = curvature.linear_operator(matvec)
    np.testing.assert_allclose(op.dense(params), a, rtol=1e-6)
    v, _ = phipsimu.mu.gaussian().sample(jax.random.key(0), params, 3)
    vm = flat_rows({"u": v["u"], "w": v["w"]})
    np.testing.assert_allclose(op.quadratic_forms(params, v), np.einsum("id,de,ie->i", vm, a, vm),
                               rtol=1e-5)  # fmt: skip
    quad = curvature.linear_operator(matvec, quadratic_form=lambda p, v: jnp.float32(7.0))
    np.testing.assert_allclose(quad.quadratic_forms(params, v), [7.0, 7.0, 7.0])


def test_operators_are_hashable_and_equal_when_rebuilt():
    assert curvature.hessian(mlp_loss) == curvature.hessian(mlp_loss)
    assert hash(curvature.gauss_newton(mlp_apply, mse)) == hash(
        curvature.gauss_newton(mlp_apply, mse)
    )
    assert curvature.hessian(mlp_loss) != curvature.gauss_newton(mlp_apply, mse)


def test_bad_input():
    with pytest.raises(TypeError, match="loss_fn=3"):
        curvature.hessian(3)
    with pytest.raises(TypeError, match="output_loss=None"):
        curvature.gauss_newton(mlp_apply, None)
    with pytest.raises(TypeError, match="matvec="):
        curvature.linear_operator("no")
    with pytest.raises(TypeError, match="loss_fn='x'"):
        phipsimu.hessian_trace("x", num_samples=2)
    params = init_mlp(jax.random.key(0), [3, 2])
    ggn = curvature.gauss_newton(mlp_apply, lambda out, y: out - y)
    x, y = jnp.ones((4, 3)), jnp.ones((4, 2))
    with pytest.raises(ValueError, match="output_loss: must return a real floating-point scalar"):
        ggn.matvec(params, params, x, y)
    with pytest.raises(ValueError, match=r"args: the Gauss-Newton operator is called with \(x"):
        curvature.gauss_newton(mlp_apply, mse).matvec(params, params)


def test_default_chunk_per_backend():
    from phipsimu import curvature

    assert curvature.default_chunk(256, 4 * 85_002, "cpu") == curvature.DEFAULT_CHUNK
    # accelerators: one vmap over every probe when they fit the budget, else the budget's share
    assert curvature.default_chunk(256, 4 * 85_002, "gpu") == 256
    per_probe = 4 * 10**7
    fit = curvature.ACCELERATOR_CHUNK_BYTES // (8 * per_probe)
    assert curvature.default_chunk(256, per_probe, "tpu") == fit == 3
    assert curvature.default_chunk(256, 10 * curvature.ACCELERATOR_CHUNK_BYTES, "gpu") == 1
    assert curvature.default_chunk(256, 4, jax.default_backend()) >= 1


@pytest.mark.parametrize(
    "matvec, got",
    [
        (lambda p, v: {"a": v["a"][:2]}, r"\{'a': \(2,\)\}"),
        (lambda p, v: jnp.concatenate([v["a"], v["a"]]), r"structure PyTreeDef\(\*\)"),
    ],
)
def test_linear_operator_matvec_of_the_wrong_shape_is_named(matvec, got):
    op = curvature.linear_operator(matvec)
    params = {"a": jnp.ones(3)}
    match = rf"matvec: .*expected structure .* leaf shapes \{{'a': \(3,\)\}}, got .*{got}"
    with pytest.raises(ValueError, match=match):
        op.matvec(params, params)
    with pytest.raises(ValueError, match=match):
        phipsimu.hessian_trace(op, num_samples=2)(params, key=jax.random.key(0))
