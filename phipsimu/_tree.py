"""Leaf-wise pytree algebra and the rule for which leaves are perturbed.

Everything here works leaf by leaf so a sharded model is never gathered onto one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
MaskLike = PyTree | Callable[[PyTree], PyTree] | None


def is_float_leaf(leaf: Any) -> bool:
    """True for floating-point array leaves; ints, bools and non-arrays are never perturbed."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def perturbed_leaves(params: PyTree, mask: MaskLike = None) -> list[bool]:
    """Static list, one entry per leaf of ``params``: is that leaf perturbed?

    Args:
      params: the parameter pytree.
      mask: ``None`` (all floating leaves), a pytree of Python bools with the structure of
        ``params`` (as in ``optax.masked``), or a callable ``params -> mask``.

    Raises:
      ValueError: if ``mask`` does not have the structure of ``params`` or holds non-bools.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if mask is None:
        return [is_float_leaf(x) for x in leaves]
    m = mask(params) if callable(mask) else mask
    try:
        m_leaves = treedef.flatten_up_to(m)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"mask: its structure {jax.tree_util.tree_structure(m)} does not match the params "
            f"structure {treedef}; pass a pytree of bools shaped like params"
        ) from err
    out = []
    for x, b in zip(leaves, m_leaves):
        if not isinstance(b, bool):
            raise ValueError(f"mask: leaf {b!r} is not a Python bool; masks must be static bools")
        out.append(b and is_float_leaf(x))
    return out


def num_perturbed(params: PyTree, mask: MaskLike = None) -> int:
    """The dimension d: the number of perturbed scalar coordinates (a static int)."""
    leaves = jax.tree_util.tree_leaves(params)
    return sum(int(x.size) for x, p in zip(leaves, perturbed_leaves(params, mask)) if p)


def float_dtype(params: PyTree, mask: MaskLike = None) -> jnp.dtype:
    """The widest floating dtype among perturbed leaves (float32 when there is none)."""
    leaves = jax.tree_util.tree_leaves(params)
    dts = [x.dtype for x, p in zip(leaves, perturbed_leaves(params, mask)) if p]
    return jnp.result_type(*dts) if dts else jnp.dtype(jnp.float32)


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """Sum over leaves of the elementwise products (pass only the leaves to include)."""
    terms = [
        jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    ]
    return sum(terms) if terms else jnp.zeros(())


def sq_norm(a: PyTree) -> jax.Array:
    """Squared Euclidean norm over all leaves together."""
    return dot(a, a)


def axpy(alpha: jax.typing.ArrayLike, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf by leaf, keeping each leaf of ``y``'s dtype."""
    return jax.tree_util.tree_map(lambda a, b: (b + alpha * a).astype(b.dtype), x, y)


def scale(alpha: jax.typing.ArrayLike, x: PyTree) -> PyTree:
    """``alpha * x`` leaf by leaf, keeping dtypes."""
    return jax.tree_util.tree_map(lambda a: (alpha * a).astype(a.dtype), x)


def mul(x: PyTree, y: PyTree) -> PyTree:
    """Elementwise product leaf by leaf."""
    return jax.tree_util.tree_map(lambda a, b: (a * b).astype(b.dtype), x, y)


def random_like(
    key: jax.Array,
    params: PyTree,
    perturbed: list[bool],
    num: int,
    draw: Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array],
) -> PyTree:
    """Draw ``num`` pytrees shaped like ``params`` (leading sample axis) with ``draw``.

    Non-perturbed leaves are zeros of their own dtype, so ``params + rho * v`` leaves them
    unchanged.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, x, p in zip(keys, leaves, perturbed):
        shape = (num, *jnp.shape(x))
        if p:
            out.append(draw(k, shape, x.dtype))
        else:
            out.append(jnp.zeros(shape, jnp.result_type(x)))
    return jax.tree_util.tree_unflatten(treedef, out)


def batched_sq_norm(v: PyTree, perturbed: list[bool]) -> jax.Array:
    """Per-sample squared norm over perturbed leaves of a pytree with a leading sample axis."""
    total = None
    for x, p in zip(jax.tree_util.tree_leaves(v), perturbed):
        if p:
            s = jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=1)
            total = s if total is None else total + s
    return total


def batched_map(fn: Callable, v: PyTree, batch_size: int | None) -> Any:
    """Apply ``fn`` to every sample of ``v``: ``vmap`` when ``batch_size`` is None, else a
    chunked ``lax.map`` that holds ``batch_size`` samples in memory at a time."""
    if batch_size is None:
        return jax.vmap(fn)(v)
    return jax.lax.map(fn, v, batch_size=batch_size)
