"""Pytree plumbing, in one place: which leaves are perturbed, splitting the perturbed leaves
off a pytree and putting them back, per-block masks, and dtype-keeping leaf-wise algebra on
``optax.tree``.

Everything works leaf by leaf so a sharded model is never gathered onto one device. The
perturbed-leaf rule is computed once per call (``perturbed_leaves``) and passed on as a static
tuple of bools, one per leaf of ``params``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
MaskLike = PyTree | Callable[[PyTree], PyTree] | None
Perturbed = tuple[bool, ...]


# ---------------------------------------------------------------- which leaves are perturbed


def is_float_leaf(leaf: Any) -> bool:
    """True for floating-point array leaves; ints, bools and non-arrays are never perturbed."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def perturbed_leaves(params: PyTree, mask: MaskLike = None) -> Perturbed:
    """Static tuple, one entry per leaf of ``params``: is that leaf perturbed?

    Args:
      params: the parameter pytree.
      mask: ``None`` (all floating leaves), a pytree of Python bools with the structure of
        ``params`` (as in ``optax.masked``), or a callable ``params -> mask``.

    Raises:
      ValueError: if ``mask`` does not have the structure of ``params`` or holds non-bools.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if mask is None:
        return tuple(is_float_leaf(x) for x in leaves)
    m = mask(params) if callable(mask) else mask
    try:
        m_leaves = treedef.flatten_up_to(m)  # type: ignore[attr-defined]
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
    return tuple(out)


def dim(params: PyTree, perturbed: Perturbed) -> int:
    """The dimension d: the number of perturbed scalar coordinates (a static int)."""
    leaves = jax.tree_util.tree_leaves(params)
    return sum(int(x.size) for x, p in zip(leaves, perturbed) if p)


def float_dtype(params: PyTree, perturbed: Perturbed | None = None) -> jnp.dtype:
    """The widest floating dtype among the perturbed leaves (all floating leaves when
    ``perturbed`` is None); float32 when there is none."""
    leaves = jax.tree_util.tree_leaves(params)
    if perturbed is None:
        perturbed = tuple(is_float_leaf(x) for x in leaves)
    dts = [x.dtype for x, p in zip(leaves, perturbed) if p]
    return jnp.result_type(*dts) if dts else jnp.dtype(jnp.float32)


# ---------------------------------------------------------------- split and merge


def active(tree: PyTree, perturbed: Perturbed) -> list:
    """The perturbed leaves of ``tree`` (shaped like params, possibly with a leading sample
    axis on every leaf), as a list."""
    return [x for x, p in zip(jax.tree_util.tree_leaves(tree), perturbed) if p]


def split(params: PyTree, perturbed: Perturbed) -> tuple[list, Callable[[list], PyTree]]:
    """The perturbed leaves of ``params`` and a function that puts new ones back (the other
    leaves keep their values)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def merge(new_active: list) -> PyTree:
        it = iter(new_active)
        return jax.tree_util.tree_unflatten(
            treedef, [next(it) if p else x for x, p in zip(leaves, perturbed)]
        )

    return active(params, perturbed), merge


def unsplit(like: PyTree, perturbed: Perturbed, new_active: list, num: int | None = None) -> PyTree:
    """A pytree shaped like ``like`` holding ``new_active`` on the perturbed leaves and zeros
    (of each leaf's own dtype) elsewhere; with ``num``, every leaf has a leading axis ``num``."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    lead = () if num is None else (num,)
    it = iter(new_active)
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            next(it) if p else jnp.zeros((*lead, *jnp.shape(x)), jnp.result_type(x))
            for x, p in zip(leaves, perturbed)
        ],
    )


# ---------------------------------------------------------------- blocks


def layer_blocks(params: PyTree) -> PyTree:
    """Label every leaf by the path of its parent node: one block per layer.

    For ``[{"w", "b"}, {"w", "b"}]`` the labels are ``"0"`` and ``"1"``; for a flax tree
    ``{"params": {"Dense_0": {"kernel", "bias"}}}`` they are ``"params/Dense_0"``. Pass as
    ``blocks=phipsimu.layer_blocks`` to any spectral estimator.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> params = [{"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, {"w": jnp.ones(3)}]
      >>> phipsimu.layer_blocks(params)
      [{'b': '0', 'w': '0'}, {'w': '1'}]
      >>> def loss(p):  # Hessian: I on layer 0 (6 coordinates), 2I on layer 1 (3)
      ...     first = jnp.sum(p[0]["w"] ** 2) + jnp.sum(p[0]["b"] ** 2)
      ...     return 0.5 * first + jnp.sum(p[1]["w"] ** 2)
      >>> traces = phipsimu.hessian_trace(loss, num_samples=4, blocks=phipsimu.layer_blocks)(
      ...     params, key=jax.random.key(0))
      >>> {label: round(float(est.value), 3) for label, est in traces.items()}
      {'0': 6.0, '1': 6.0}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path[:-1], simple=True, separator="/"), params
    )


def block_masks(params: PyTree, blocks: Any) -> dict[Any, PyTree]:
    """``{label: mask}``, one boolean mask per block label (in order of first appearance)."""
    labels = blocks(params) if callable(blocks) else blocks
    treedef = jax.tree_util.tree_structure(params)
    try:
        label_leaves = treedef.flatten_up_to(labels)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"blocks: its structure does not match the params structure {treedef}; pass a "
            "pytree of labels shaped like params (None excludes a leaf) or a callable"
        ) from err
    order: dict[Any, None] = {}
    for lab in label_leaves:
        if lab is not None:
            order.setdefault(lab, None)
    if not order:
        raise ValueError("blocks: every leaf is labelled None, so there is no block to analyse")
    return {
        lab: jax.tree_util.tree_unflatten(treedef, [x == lab for x in label_leaves])
        for lab in order
    }


# ---------------------------------------------------------------- algebra (dtype-keeping)


def accum_dtype(params: PyTree, perturbed: Perturbed | None = None) -> jnp.dtype:
    """The dtype in which norms, inner products and log-weights are accumulated:
    :func:`float_dtype` promoted to at least float32 (float16/bfloat16 params accumulate in
    float32; docs/conventions.md, "Low precision")."""
    return jnp.promote_types(float_dtype(params, perturbed), jnp.float32)


def _upcast(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x).astype(jnp.promote_types(jnp.result_type(x), jnp.float32)), tree
    )


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Sum over leaves of the inner products (``optax.tree.vdot``; pass only the leaves to
    include), accumulated in at least float32: a float16 squared norm overflows at 256²."""
    return jnp.asarray(optax.tree.vdot(_upcast(a), _upcast(b)))


def sq_norm(a: PyTree) -> jax.Array:
    """Squared Euclidean norm over all leaves together."""
    return vdot(a, a)


def add_scale(x: PyTree, alpha: jax.typing.ArrayLike, y: PyTree) -> PyTree:
    """``x + alpha * y`` leaf by leaf (``optax.tree.add_scale``), keeping ``x``'s dtypes.
    Leaves of ``x`` that are not floating point (ints, bools, PRNG keys) are returned as
    they are: they are never perturbed."""
    if all(is_float_leaf(a) for a in jax.tree_util.tree_leaves(x)):
        return optax.tree.cast_like(optax.tree.add_scale(x, alpha, y), x)
    return jax.tree_util.tree_map(
        lambda a, b: (a + alpha * b).astype(a.dtype) if is_float_leaf(a) else a, x, y
    )


def is_narrow(params: PyTree, perturbed: Perturbed) -> bool:
    """True when a perturbed leaf is narrower than float32 (float16, bfloat16)."""
    return any(
        p and jnp.dtype(x.dtype).itemsize < 4
        for x, p in zip(jax.tree_util.tree_leaves(params), perturbed)
    )


def widen(params: PyTree, perturbed: Perturbed) -> PyTree:
    """``params`` with every perturbed leaf narrower than float32 cast to float32 (the others
    as they are). The cast is differentiable: gradients with respect to ``params`` come back
    in each leaf's own dtype. docs/conventions.md, "Low precision"."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            x.astype(jnp.float32) if p and jnp.dtype(x.dtype).itemsize < 4 else x
            for x, p in zip(leaves, perturbed)
        ],
    )


def scale(alpha: jax.typing.ArrayLike, x: PyTree) -> PyTree:
    """``alpha * x`` leaf by leaf (``optax.tree.scale``), keeping dtypes."""
    return optax.tree.cast_like(optax.tree.scale(alpha, x), x)


def mul(x: PyTree, y: PyTree) -> PyTree:
    """Elementwise product leaf by leaf (``optax.tree.mul``), keeping ``y``'s dtypes."""
    return optax.tree.cast_like(optax.tree.mul(x, y), y)


# ---------------------------------------------------------------- samples (leading axis)


def random_like(
    key: jax.Array,
    params: PyTree,
    perturbed: Perturbed,
    num: int,
    draw: Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array],
) -> PyTree:
    """Draw ``num`` pytrees shaped like ``params`` (leading sample axis) with ``draw``.

    Non-perturbed leaves are zeros of their own dtype (float32 for leaves that are not
    numbers, such as PRNG keys), so ``params + rho * v`` leaves them unchanged.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, x, p in zip(keys, leaves, perturbed):
        shape = (num, *jnp.shape(x))
        if p:
            out.append(draw(k, shape, x.dtype))
        else:
            out.append(jnp.zeros(shape, _zeros_dtype(x)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _zeros_dtype(x: Any) -> Any:
    """The dtype of a zero perturbation of a fixed leaf: its own for numbers and bools,
    float32 for the rest (PRNG keys, float0), which cannot hold arithmetic zeros."""
    dtype = jnp.result_type(x)
    numeric = jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
    return dtype if numeric else jnp.float32


def batched_sq_norm(v: PyTree, perturbed: Perturbed) -> jax.Array:
    """Per-sample squared norm over perturbed leaves of a pytree with a leading sample axis,
    accumulated in at least float32."""
    terms = [
        jnp.sum(_upcast(jnp.reshape(x, (x.shape[0], -1))) ** 2, axis=1)
        for x, p in zip(jax.tree_util.tree_leaves(v), perturbed)
        if p
    ]
    return functools.reduce(jnp.add, terms)
