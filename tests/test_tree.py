"""Pytree plumbing: the perturbed-leaf rule, split/merge, blocks and dtype-keeping algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phipsimu import _tree


def _params():
    return {"b": jnp.ones(2, jnp.float16), "n": jnp.array(3), "w": jnp.ones((2, 3))}


def test_perturbed_leaves_dim_and_dtype():
    p = _params()
    assert _tree.perturbed_leaves(p) == (True, False, True)
    assert _tree.perturbed_leaves(p, {"b": False, "n": True, "w": True}) == (False, False, True)
    assert _tree.dim(p, (True, False, True)) == 8
    assert _tree.float_dtype(p, (True, False, False)) == jnp.float16
    assert _tree.float_dtype(p) == jnp.float32
    with pytest.raises(ValueError, match="mask: its structure"):
        _tree.perturbed_leaves(p, {"b": True})
    with pytest.raises(ValueError, match="not a Python bool"):
        _tree.perturbed_leaves(p, {"b": 1, "n": True, "w": True})


def test_split_merge_and_unsplit_keep_the_other_leaves():
    p = _params()
    perturbed = _tree.perturbed_leaves(p)
    active, merge = _tree.split(p, perturbed)
    assert [x.shape for x in active] == [(2,), (2, 3)]
    back = merge([2 * x for x in active])
    assert int(back["n"]) == 3 and float(back["w"][0, 0]) == 2.0
    z = _tree.unsplit(p, perturbed, [x[None] for x in active], num=1)
    assert z["n"].shape == (1,) and z["n"].dtype == p["n"].dtype and int(z["n"][0]) == 0
    assert z["w"].shape == (1, 2, 3)


def test_algebra_keeps_dtypes_and_sums_over_leaves():
    x = [jnp.ones(2, jnp.float16), jnp.full((3,), 2.0)]
    y = [jnp.full(2, 3.0, jnp.float16), jnp.ones(3)]
    assert float(_tree.vdot(x, y)) == 12.0 and float(_tree.sq_norm(x)) == 14.0
    out = _tree.add_scale(x, 0.5, y)
    assert out[0].dtype == jnp.float16
    np.testing.assert_allclose(out[1], 2.5)
    assert _tree.scale(2.0, x)[0].dtype == jnp.float16
    np.testing.assert_allclose(_tree.mul(x, y)[1], 2.0)


def test_layer_blocks_and_block_masks():
    params = [{"w": jnp.ones(2), "b": jnp.ones(1)}, {"w": jnp.ones(2)}]
    assert jax.tree.leaves(_tree.layer_blocks(params)) == ["0", "0", "1"]
    masks = _tree.block_masks(params, _tree.layer_blocks)
    assert list(masks) == ["0", "1"] and jax.tree.leaves(masks["1"]) == [False, False, True]
    with pytest.raises(ValueError, match="every leaf is labelled None"):
        _tree.block_masks(params, jax.tree.map(lambda _: None, params))
