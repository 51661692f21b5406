"""The execution layer: how a function is evaluated over m samples (probes, perturbations,
grid points), in one place.

* the chunk policy: how many samples run at once when ``chunk_size=None``
  (:func:`default_chunk`; :data:`DEFAULT_CHUNK` on CPU, :data:`ACCELERATOR_CHUNK_BYTES` of
  probe-sized buffers on GPU/TPU);
* the strategy (:func:`unroll_for`): ``vmap`` chunks in a loop, or, for small programs with
  convolutions on CPU, one sample at a time in straight-line code;
* :func:`chunked_map` (one ``vmap``, a chunked ``lax.map`` whose memory holds one chunk, or
  unrolled) and :func:`fold` (the same with a carry, for running sums);
* :func:`lift`: a function with everything it captures made explicit inputs (the chunked
  loop fences them; the eq. 10 rule differentiates them);
* the estimators' calling convention: :func:`eager_jit` (an eager call compiles once per
  shape), :func:`cached_factory` (an estimator built again with the same configuration is
  the same function) and :func:`per_block` (one result per block of leaves).

Numbers never depend on the strategy: every sample is drawn from the key and its index alone.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from phipsimu import _compat, _parallel, _tree

PyTree = Any


# ---------------------------------------------------------------- the chunk policy

#: Probes per chunk when ``chunk_size=None``. On an MLP 64-256-256-10 with batch 512 (CPU),
#: chunks of 4 cost 1.0–1.6 gradients per probe for 16–64 probes, a single ``vmap`` over all
#: probes 2.1–2.2 (``python -m benchmarks``).
#:
#: Example:
#:   >>> import phipsimu
#:   >>> phipsimu.curvature.DEFAULT_CHUNK
#:   4
#:   >>> phipsimu.curvature.default_chunk(1000, 4 * 10**6, backend="cpu")  # whatever the model
#:   4
DEFAULT_CHUNK = 4

#: On GPU and TPU, ``chunk_size=None`` evaluates as many probes at once as fit this many bytes
#: of probe-sized buffers (about 8 parameter-sized buffers per probe: the probe, its tangents
#: and cotangents), up to all of them in one ``vmap``: accelerators are fast when one kernel
#: sees many probes, and slow on a long sequential loop. Activations are not counted, so a
#: large batch may need an explicit ``chunk_size``.
#:
#: Example:
#:   >>> import phipsimu
#:   >>> phipsimu.curvature.ACCELERATOR_CHUNK_BYTES / 2**30  # GiB
#:   1.0
#:   >>> # 10⁶ float32 parameters: 4 MiB per probe buffer, 8 buffers per probe
#:   >>> phipsimu.curvature.default_chunk(256, 4 * 2**20, backend="gpu")  # 2³⁰ / (8·4·2²⁰)
#:   32
ACCELERATOR_CHUNK_BYTES = 2**30


def default_chunk(num: int, probe_bytes: int, backend: str | None = None) -> int:
    """The chunk size used when ``chunk_size=None``, for ``num`` probes of ``probe_bytes``
    bytes each: :data:`DEFAULT_CHUNK` on CPU (measured fastest there, and memory flat in
    ``num``), otherwise the largest chunk within :data:`ACCELERATOR_CHUNK_BYTES`.

    Example:
      >>> import phipsimu
      >>> probe = 4 * 2**20  # bytes per probe: 10⁶ float32 parameters
      >>> [phipsimu.curvature.default_chunk(64, probe, backend=b) for b in ("cpu", "gpu")]
      [4, 32]
      >>> phipsimu.curvature.default_chunk(16, probe, backend="tpu")  # never more than num
      16
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu":
        return DEFAULT_CHUNK
    return max(1, min(num, ACCELERATOR_CHUNK_BYTES // max(1, 8 * probe_bytes)))


#: The most samples :func:`unroll_for` runs as straight-line code. Each one is a copy of the
#: per-sample program, so compile time grows with it.
UNROLL_MAX = 16

#: The most equations (the per-sample program's, times the number of samples) that
#: :func:`unroll_for` runs as straight-line code. XLA:CPU's compile time grows faster than
#: the program: the eq. 10 term of the test-size ResNet-18 of ``benchmarks/zoo.py`` (3,781
#: equations per sample) compiles in about a minute at m = 1 and took over ten minutes at
#: m = 4 unrolled; a small CNN's (350 per sample) unrolls up to m = 16 in seconds.
UNROLL_EQUATIONS = 8192

#: Primitives that XLA:CPU runs an order of magnitude slower batched over samples (a ``vmap``
#: of a convolution over perturbed kernels becomes a grouped convolution) or inside a loop
#: than as one plain call per sample (``python -m benchmarks --only strategy``).
UNROLL_PRIMITIVES = frozenset({"conv_general_dilated"})

#: Set by benchmarks and tests to compare strategies: "unroll", "loop" or None (the policy).
_FORCE: str | None = None


def unroll_for(num: int, program: Callable[[], Any] | None = None) -> bool:
    """Whether ``num`` samples run as straight-line code, one at a time, rather than in
    ``vmap`` chunks inside a loop: on CPU, when ``num <= UNROLL_MAX``, the per-sample
    program (``program()`` returns its jaxpr, traced only when needed) holds one of
    :data:`UNROLL_PRIMITIVES`, and ``num`` copies of it stay within
    :data:`UNROLL_EQUATIONS`. Elsewhere the loop wins: on an MLP and a transformer a
    ``vmap`` chunk shares work between samples that straight-line code repeats, on
    accelerators one kernel over many samples is what they are fast at, and a large
    program unrolled takes minutes to compile."""
    if _FORCE is not None:
        return _FORCE == "unroll"
    if not 0 < num <= UNROLL_MAX or jax.default_backend() != "cpu" or program is None:
        return False
    jaxpr = program()
    return bool(primitives(jaxpr) & UNROLL_PRIMITIVES) and num * size(jaxpr) <= UNROLL_EQUATIONS


def size(jaxpr: Any) -> int:
    """Equations in ``jaxpr`` and in every program nested in it."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return len(jaxpr.eqns) + sum(size(sub) for sub in _compat.subjaxprs(jaxpr))


def primitives(jaxpr: Any) -> set[str]:
    """Names of the primitives in ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``) and in every
    program nested in its equations (``jit``, ``scan``, ``cond``, custom rules)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    for sub in _compat.subjaxprs(jaxpr):
        names |= primitives(sub)
    return names


def leaf_bytes(leaves: list) -> int:
    """Bytes of one vector given as a list of leaves (static shapes and dtypes)."""
    return sum(int(jnp.size(x)) * jnp.dtype(jnp.result_type(x)).itemsize for x in leaves)


def chunk_for(chunk: int | None, num: int, probe_bytes: int) -> int | None:
    """The chunk to give :func:`chunked_map` for ``num`` probes of ``probe_bytes`` bytes:
    ``chunk`` (None: :func:`default_chunk`), or None when one chunk holds them all (a plain
    ``vmap``)."""
    if chunk is None:
        chunk = default_chunk(num, probe_bytes)
    return None if chunk >= num else chunk


def chunk_of(chunk: int | None, vs: list) -> int | None:
    """:func:`chunk_for` a block ``vs`` of vectors with a leading axis."""
    return chunk_for(chunk, vs[0].shape[0], leaf_bytes([v[0] for v in vs]))


# ---------------------------------------------------------------- closures made explicit


class Lifted(NamedTuple):
    """A function traced once, with everything it captures as explicit inputs:
    ``call(consts, *args)`` evaluates it on the argument leaves with ``consts`` in place of
    the captured values (``consts`` as traced, or replacements of the same types)."""

    consts: list
    call: Callable[..., Any]
    shape: Any
    jaxpr: Any = None


def lift(fn: Callable[..., Any], *example: Any) -> Lifted:
    """Trace ``fn(*example)`` and return it with its captured values (the params and batch a
    closure holds, PRNG keys, constants) hoisted into :attr:`Lifted.consts`.

    ``jax.closure_convert`` hoists only the captured values that are being differentiated;
    the chunked loop must fence all of them and the eq. 10 rule must see all of them as
    inputs, so this traces to a jaxpr and keeps every constant."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*example)
    out_tree = jax.tree_util.tree_structure(shape)

    def call(consts: list, *args: Any) -> Any:
        out = jax.core.eval_jaxpr(closed.jaxpr, list(consts), *jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(out_tree, out)

    return Lifted(list(closed.consts), call, shape, closed)


# ---------------------------------------------------------------- loops over samples


def chunked_map(fn: Callable, v: PyTree, chunk_size: int | None, unroll: bool | None = None) -> Any:
    """Apply ``fn`` to every sample of ``v``: one sample at a time in straight-line code when
    ``unroll`` (None: :func:`unroll_for`), else ``vmap`` when ``chunk_size`` is None, else a
    chunked ``lax.map`` that holds ``chunk_size`` samples in memory at a time.

    In the chunked loop, everything ``fn`` captures (the params, the batch) enters each
    iteration through ``lax.optimization_barrier`` together with the iteration's samples.
    Without it XLA hoists the parts of nested JVPs that do not depend on the samples out of
    the loop, and the copies left inside can no longer be merged with their duplicates (the
    probe rows of ``python -m benchmarks --only cost`` show the cost; the CHANGELOG gives the
    figures before and after). Every value leaves the barrier with the type it had (see
    :func:`_fence`), so the traced ``fn`` also runs inside ``jax.shard_map``'s checks."""
    leaves = jax.tree_util.tree_leaves(v)
    num = leaves[0].shape[0] if leaves else 0
    lifted = None

    def program() -> Any:
        nonlocal lifted
        lifted = lift(fn, jax.tree_util.tree_map(_first, v))
        return lifted.jaxpr

    if unroll is None:
        unroll = unroll_for(num, program)
    if unroll and num:
        outs = [fn(jax.tree_util.tree_map(lambda a, j=j: a[j], v)) for j in range(num)]
        return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outs)
    if chunk_size is None:
        return jax.vmap(fn)(v)
    lifted = lift(fn, jax.tree_util.tree_map(_first, v)) if lifted is None else lifted
    consts = lifted.consts
    # extended dtypes (PRNG keys) cannot pass the barrier; integer work on them is cheap
    fenced = [i for i, c in enumerate(consts) if not _is_key(c)]
    out_leaves, out_tree = jax.tree_util.tree_flatten(lifted.shape)
    # outputs without elements (a zero-size parameter leaf) stay out of the loop: they hold
    # no data, and lax.map cannot reshape them back when a partial chunk remains
    empty = [o.size == 0 for o in out_leaves]
    # one loop-varying counter per sample, for the barriers that hold no sample (_fence)
    counter = jnp.arange(num) if leaves else None

    def body(xc: tuple) -> Any:
        x, count = xc
        inner = list(consts)
        kept, x = _fence([consts[i] for i in fenced], x, count)
        for i, c in zip(fenced, kept):
            inner[i] = c
        out = jax.tree_util.tree_leaves(lifted.call(inner, *x))
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


def fold(
    block: Callable, carry: Any, indices: jax.Array, chunk: int | None, unroll: bool | None = None
) -> tuple:
    """``block(carry, idx) -> (carry, ys)`` over ``indices`` in chunks of ``chunk`` (all at
    once when None), the ys concatenated in order; with ``unroll``, one index at a time in
    straight-line code (no loop)."""
    n = indices.shape[0]
    if unroll is None:
        unroll = unroll_for(n, lambda: jax.make_jaxpr(block)(carry, indices[:1]))
    if unroll and n:
        parts = []
        for j in range(n):
            carry, ys = block(carry, indices[j : j + 1])
            parts.append(ys)
        return carry, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)
    if chunk is None:
        return block(carry, indices)
    full = n // chunk * chunk
    parts = []
    if full:
        carry, ys = jax.lax.scan(block, carry, indices[:full].reshape(-1, chunk))
        parts.append(jax.tree_util.tree_map(lambda a: a.reshape((full, *a.shape[2:])), ys))
    if full < n:
        carry, ys = block(carry, indices[full:])
        parts.append(ys)
    return carry, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *parts)


# ---------------------------------------------------------------- the calling convention


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


#: Estimators kept per factory by :func:`cached_factory` (least recently used dropped). Each
#: keeps its arguments alive (the loss function and what it captures) and its compiled
#: programs, so the cache stays small.
FACTORY_CACHE_SIZE = 8

_F = TypeVar("_F", bound=Callable[..., Any])


def cached_factory(factory: _F) -> _F:
    """``factory`` returning the same estimator for the same configuration, so an estimator
    built inline on every call (``phipsimu.sharpness(loss, measure, num_samples=8)(params,
    key=k)`` in a loop) reuses its jitted program instead of compiling again.

    The key is the arguments' leaves with their types (``4`` and ``4.0`` differ, and so do
    ``(True, False)`` and ``(1, 0)``); operators, measures
    and samplers are frozen dataclasses that compare by value, functions by identity. When
    a leaf is not hashable (an array) the factory simply runs. At most
    :data:`FACTORY_CACHE_SIZE` estimators are kept per factory, with the arguments they hold
    (a loss built as a new closure on every call never hits the cache, and at most that many
    of them stay alive)."""
    cache: collections.OrderedDict = collections.OrderedDict()
    lock = threading.Lock()

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        # every leaf with its type, so containers that compare equal across types
        # (mask=(True, False) and (1, 0)) do not share an entry
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        key = (treedef, tuple((type(x), x) for x in leaves))
        try:
            hash(key)
        except TypeError:  # an unhashable argument
            return factory(*args, **kwargs)
        with lock:
            hit = cache.get(key)
            if hit is not None:
                cache.move_to_end(key)
                return hit
        out = factory(*args, **kwargs)
        with lock:
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
            for label, m in _tree.block_masks(params, blocks).items()
        }

    return eager_jit(run)
