"""The HVP and the batched quadratic forms against dense jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_loss

import phipsimu
from phipsimu import _curvature, _tree


def test_hvp_matches_dense_hessian(small_mlp):
    params, x, y, hess = small_mlp
    v = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    hv = jax.jit(phipsimu.hvp(mlp_loss))(params, v, x, y)
    flat_v = jax.flatten_util.ravel_pytree(v)[0]
    flat_hv = jax.flatten_util.ravel_pytree(hv)[0]
    np.testing.assert_allclose(flat_hv, hess @ np.asarray(flat_v), rtol=1e-4, atol=1e-5)


def test_hvp_ignores_integer_leaves():
    def loss(p):
        return jnp.sum(p["w"] ** 3) * p["n"]

    params = {"w": jnp.array([1.0, 2.0]), "n": jnp.array(2)}
    v = {"w": jnp.array([1.0, 1.0]), "n": jnp.array(0)}
    hv = phipsimu.hvp(loss)(params, v)
    np.testing.assert_allclose(hv["w"], [12.0, 24.0])
    assert hv["n"].dtype == params["n"].dtype and int(hv["n"]) == 0


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_quadratic_forms_match_dense(small_mlp, batch_size):
    params, x, y, hess = small_mlp
    v, _ = phipsimu.mu.gaussian().sample(jax.random.key(0), params, 7)
    perturbed = _tree.perturbed_leaves(params)
    q = _curvature.quadratic_forms(mlp_loss, params, v, (x, y), perturbed, batch_size=batch_size)
    vm = np.stack(
        [
            np.asarray(
                jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda a, i=i: a[i], v))[0]
            )
            for i in range(7)
        ]
    )
    ref = np.einsum("id,de,ie->i", vm, hess, vm)
    np.testing.assert_allclose(q, ref, rtol=1e-4, atol=1e-5)


def test_non_scalar_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="loss_fn: must return a real floating-point scalar"):
        phipsimu.hvp(lambda p: p * 2)(jnp.ones(2), jnp.ones(2))
