"""Pytree plumbing, in one place: which leaves are perturbed, splitting the perturbed leaves
off a pytree and putting them back, per-block masks, and dtype-keeping leaf-wise algebra on
``optax.tree``.

Everything works leaf by leaf so a sharded model is never gathered onto one device. The
perturbed-leaf rule is computed once per call (``perturbed_leaves``) and passed on as a static
tuple of bools, one per leaf of ``params``.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from phipsimu import _parallel

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


def eager_jit(fn: Callable) -> Callable:
    """``fn(params, *args, key=..., batches=None)`` (the estimators' calling convention) with
    one-batch eager calls routed through a ``jax.jit`` of ``fn`` made once here: a second eager
    call with the same shapes and dtypes reuses the compiled program instead of tracing and
    dispatching op by op again (seconds per call for the Krylov and determinant paths).

    ``fn`` itself runs when the call is already being traced (inside the user's ``jit``,
    ``grad``, ``vmap``, ``shard_map``), with ``batches`` (a Python sweep over a data loader), or
    when an argument leaf is not an array (a Python number or object keeps its eager meaning and
    its validation)."""
    jitted = jax.jit(fn)

    @functools.wraps(fn)
    def call(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("batches") is None:
            kwargs.pop("batches", None)
            leaves = jax.tree_util.tree_leaves((params, args, kwargs))
            if leaves and all(
                isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)
                for x in leaves
            ):
                return jitted(params, *args, **kwargs)
        return fn(params, *args, **kwargs)

    return call


#: Estimators kept per factory by :func:`cached_factory` (least recently used dropped).
FACTORY_CACHE_SIZE = 64

_F = TypeVar("_F", bound=Callable[..., Any])


def cached_factory(factory: _F) -> _F:
    """``factory`` returning the same estimator for the same configuration, so an estimator
    built inline on every call (``phipsimu.sharpness(loss, measure, num_samples=8)(params,
    key=k)`` in a loop) reuses its jitted program instead of compiling again.

    The key is the arguments with their types (``4`` and ``4.0`` differ); operators, measures
    and samplers are frozen dataclasses that compare by value, functions by identity. When
    an argument is not hashable (a dict mask, an array) the factory simply runs. At most
    :data:`FACTORY_CACHE_SIZE` estimators are kept per factory."""
    cache: collections.OrderedDict = collections.OrderedDict()

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        key = (
            tuple((type(a), a) for a in args),
            tuple((k, type(v), v) for k, v in sorted(kwargs.items())),
        )
        try:
            hit = cache.get(key)
        except TypeError:  # an unhashable argument
            return factory(*args, **kwargs)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        out = factory(*args, **kwargs)
        cache[key] = out
        if len(cache) > FACTORY_CACHE_SIZE:
            cache.popitem(last=False)
        return out

    return cast(_F, build)


def per_block(build: Callable[[Any], Callable], mask: Any, blocks: Any) -> Callable:
    """``build(mask)`` for one mask; with ``blocks``, a function returning ``{label: result}``
    with one result per block (its diagonal block of the operator). Validates that at most
    one of ``mask`` and ``blocks`` is given."""
    if mask is not None and blocks is not None:
        raise ValueError("mask and blocks: give at most one (blocks partitions, mask selects)")
    if blocks is None:
        return eager_jit(build(mask))
    if not (callable(blocks) or jax.tree_util.tree_leaves(blocks, is_leaf=lambda x: x is None)):
        raise ValueError(f"blocks={blocks!r}: must be a pytree of labels or a callable")

    def run(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> dict:
        return {
            label: build(m)(params, *args, key=key, batches=batches)
            for label, m in block_masks(params, blocks).items()
        }

    return eager_jit(run)


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


def chunked_map(fn: Callable, v: PyTree, chunk_size: int | None) -> Any:
    """Apply ``fn`` to every sample of ``v``: ``vmap`` when ``chunk_size`` is None, else a
    chunked ``lax.map`` that holds ``chunk_size`` samples in memory at a time.

    In the chunked loop, everything ``fn`` captures (the params, the batch) enters each
    iteration through ``lax.optimization_barrier`` together with the iteration's samples.
    Without it XLA hoists the parts of nested JVPs that do not depend on the samples out of
    the loop, and the copies left inside can no longer be merged with their duplicates (the
    probe rows of ``python -m benchmarks --only cost`` show the cost; the CHANGELOG gives the
    figures before and after). Every value leaves the barrier with the type it had (see
    :func:`_fence`), so the traced ``fn`` also runs inside ``jax.shard_map``'s checks."""
    if chunk_size is None:
        return jax.vmap(fn)(v)
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(jax.tree_util.tree_map(_first, v))
    consts = list(closed.consts)
    # extended dtypes (PRNG keys) cannot pass the barrier; integer work on them is cheap
    fenced = [i for i, c in enumerate(consts) if not _is_key(c)]
    out_leaves, out_tree = jax.tree_util.tree_flatten(shape)
    # outputs without elements (a zero-size parameter leaf) stay out of the loop: they hold
    # no data, and lax.map cannot reshape them back when a partial chunk remains
    empty = [o.size == 0 for o in out_leaves]
    leaves = jax.tree_util.tree_leaves(v)
    num = leaves[0].shape[0] if leaves else 0
    # one loop-varying counter per sample, for the barriers that hold no sample (_fence)
    counter = jnp.arange(num) if leaves else None

    def body(xc: tuple) -> Any:
        x, count = xc
        inner = list(consts)
        kept, x = _fence([consts[i] for i in fenced], x, count)
        for i, c in zip(fenced, kept):
            inner[i] = c
        out = jax.core.eval_jaxpr(closed.jaxpr, inner, *x)
        return [o for o, e in zip(out, empty) if not e]

    it = iter(jax.lax.map(body, (leaves, counter), batch_size=chunk_size))
    out = [
        jnp.zeros((num, *o.shape), o.dtype) if e else next(it) for o, e in zip(out_leaves, empty)
    ]
    return jax.tree_util.tree_unflatten(out_tree, out)


def _fence(consts: list, x: list, count: Any) -> tuple[list, list]:
    """``consts`` and the samples ``x`` through ``lax.optimization_barrier``, every value
    coming out with the type it went in with.

    ``fn``'s program was traced with those types, and its primitives are bound as they are
    (no implicit casts): a barrier over values that vary along different ``shard_map`` axes
    types all its outputs with the union of those axes, so a sample index would come out
    varying next to a key that is not, and ``fold_in`` fails. So the values are fenced in one
    barrier per set of varying axes; a set that holds no sample gets ``count`` (this
    iteration's counter, cast to vary along the same axes: no collective, no data moved),
    which keeps that barrier's outputs inside the loop. Without ``shard_map``'s checks
    every set is empty: one barrier, as before."""
    groups: dict[frozenset, list[tuple[str, int]]] = {}
    for kind, vals in (("c", consts), ("x", x)):
        for i, val in enumerate(vals):
            groups.setdefault(_parallel.varying_axes(val), []).append((kind, i))
    out = {"c": list(consts), "x": list(x)}
    for axes, members in groups.items():
        vals = [out[k][i] for k, i in members]
        has_sample = any(k == "x" for k, _ in members)
        extra = [] if has_sample else [_parallel.vary_along(count, axes)]
        fenced = jax.lax.optimization_barrier(vals + extra)
        for (k, i), val in zip(members, fenced):
            out[k][i] = val
    return out["c"], out["x"]


def _first(a: jax.Array) -> jax.Array:
    return a[0]


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key)
