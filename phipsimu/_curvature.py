"""Curvature: the only module that differentiates twice.

Two primitives, both here and nowhere else:

* ``hvp``: the Hessian-vector product ``∇²L(x)v``, forward-over-reverse (``jvp`` of ``grad``);
* ``quadratic_forms``: ``vᵀ∇²L(x)v`` for a batch of probes, as the second directional
  derivative ``d²/dt² L(x + tv)`` at t = 0 (forward-over-forward). A quadratic form needs no
  full ``Hv``; forward-over-forward costs about one gradient per probe where the vmapped
  forward-over-reverse product cost 2–3 (``benchmarks/bench_sharpness.py``).

Only floating-point (and unmasked) leaves are differentiated; others are held fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from phipsimu import _checks, _tree

PyTree = Any

#: Probes per chunk when ``batch_size=None``. On an MLP 64-256-256-10 with batch 512 (CPU),
#: chunks of 4 cost 1.0–1.6 gradients per probe for 16–64 probes, a single ``vmap`` over all
#: probes 2.1–2.2 (``benchmarks/bench_sharpness.py``).
DEFAULT_CHUNK = 4


def check_scalar_loss(loss_fn: Callable, params: PyTree, args: tuple) -> None:
    """Raise a clear error unless ``loss_fn(params, *args)`` is a real scalar."""
    out = jax.eval_shape(loss_fn, params, *args)
    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"loss_fn: must return a real floating-point scalar, got {out!r}; "
            "reduce the loss over the batch (e.g. jnp.mean) before returning it"
        )


def split(params: PyTree, perturbed: list[bool]) -> tuple[list, Callable[[list], PyTree]]:
    """The perturbed leaves of ``params`` and a function that puts new ones back."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    active = [x for x, p in zip(leaves, perturbed) if p]

    def merge(new_active: list) -> PyTree:
        it = iter(new_active)
        return jax.tree_util.tree_unflatten(
            treedef, [next(it) if p else x for x, p in zip(leaves, perturbed)]
        )

    return active, merge


def _restricted(loss_fn: Callable, params: PyTree, perturbed: list[bool], args: tuple):
    active, merge = split(params, perturbed)
    return (lambda a: loss_fn(merge(a), *args)), active


def _active(v: PyTree, perturbed: list[bool]) -> list:
    return [x for x, p in zip(jax.tree_util.tree_leaves(v), perturbed) if p]


def hvp(loss_fn: Callable[..., jax.Array]) -> Callable[..., PyTree]:
    """The Hessian-vector product of ``loss_fn`` with respect to its first argument.

    .. math:: (x, v) \\mapsto \\nabla^2 L(x)\\, v

    Forward-over-reverse (``jax.jvp`` of ``jax.grad``). Leaves of ``params`` that are not
    floating point are not differentiated; the product is zero there.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.

    Returns:
      ``hvp_fn(params, v, *args) -> Hv``, a pure, jit-able function; ``v`` and ``Hv`` are
      shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> loss = lambda p: jnp.sum(p**3)
      >>> phipsimu.hvp(loss)(jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0]))
      Array([6., 0.], dtype=float32)
    """
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args)")

    def hvp_fn(params: PyTree, v: PyTree, *args: Any) -> PyTree:
        check_scalar_loss(loss_fn, params, args)
        perturbed = _tree.perturbed_leaves(params)
        f, active = _restricted(loss_fn, params, perturbed, args)
        _, hv = jax.jvp(jax.grad(f), (active,), (_active(v, perturbed),))
        _, merge = split(jax.tree_util.tree_map(jnp.zeros_like, params), perturbed)
        return merge(hv)

    return hvp_fn


def adaptive_metric(params: PyTree, eta: float, perturbed: list[bool]) -> PyTree:
    """``T_x = |x| + eta`` on perturbed leaves (ASAM's metric; MATH.md "Adaptive metric")."""
    return jax.tree_util.tree_map(
        lambda x, p: (jnp.abs(x) + eta).astype(x.dtype) if p else jnp.zeros_like(x),
        params,
        jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), perturbed),
    )


def metric_probes(params: PyTree, v: PyTree, eta: Any, perturbed: list[bool]) -> PyTree:
    """Probes in the adaptive metric, ``T_x v`` with ``T_x = |x| + eta`` (``v`` has a leading
    sample axis). Differentiable in ``params``."""
    t = adaptive_metric(params, eta, perturbed)
    return jax.tree_util.tree_map(lambda ti, vi: (vi * ti).astype(vi.dtype), t, v)


def float_grad(fn: Callable[[PyTree], jax.Array], params: PyTree) -> list:
    """``∇fn(params)`` with respect to the floating-point leaves only, as a list aligned with
    them (``_tree.perturbed_leaves(params)``); integer and boolean leaves are held fixed, so
    pytrees with step counters or masks can be differentiated."""
    active, merge = split(params, _tree.perturbed_leaves(params))
    return jax.grad(lambda a: fn(merge(a)))(active)


def quadratic_forms(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    v: PyTree,
    args: tuple,
    perturbed: list[bool],
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """``vᵢᵀ∇²L(x)vᵢ`` for every probe ``vᵢ`` (leading axis of ``v``).

    Each form is ``d²/dt² L(x + t vᵢ)`` at t = 0, a forward-over-forward derivative; under
    ``vmap`` the primal pass is shared by all probes in a chunk. ``batch_size`` probes are
    evaluated at a time with ``lax.map``; ``None`` picks :data:`DEFAULT_CHUNK` (measured
    fastest on CPU in ``benchmarks/bench_sharpness.py``; a chunk as large as the number of
    probes is a plain ``vmap``).
    """
    num = jax.tree_util.tree_leaves(v)[0].shape[0]
    chunk = DEFAULT_CHUNK if batch_size is None else batch_size
    f, active = _restricted(loss_fn, params, perturbed, args)

    def one(vi: list) -> jax.Array:
        def directional(a: list) -> jax.Array:
            return jax.jvp(f, (a,), (vi,))[1]

        return jax.jvp(directional, (active,), (vi,))[1]

    return _tree.batched_map(one, _active(v, perturbed), None if chunk >= num else chunk)


# ---------------------------------------------------------------- full-dataset accumulation
#
# The Hessian of the dataset's mean loss is the batch-size-weighted mean of the batches'
# Hessians, so HVPs and quadratic forms are accumulated as Σ n_b·(∇²L_b)v / Σ n_b. The sweep is
# a Python loop (a data loader is not traceable); the per-batch work is jitted by the caller.


def check_batches(batches: Any) -> None:
    """Raise a clear error unless ``batches`` can be swept more than once.

    Accepted: a re-iterable collection (list, tuple, any iterable whose ``iter()`` is a fresh
    iterator) or a zero-argument callable returning a fresh iterable (``lambda: loader``).
    """
    if callable(batches):
        return
    try:
        it = iter(batches)
    except TypeError as err:
        raise TypeError(
            f"batches={batches!r}: must be an iterable of batches or a zero-argument callable "
            "that returns one"
        ) from err
    if it is batches:
        raise TypeError(
            f"batches={batches!r}: a one-shot iterator (e.g. a generator) can be swept only "
            "once, but curvature estimators sweep the data once per matrix-vector product; "
            "pass a list, or a zero-argument callable returning a fresh iterable "
            "(e.g. lambda: iter(loader))"
        )


def batch_args(batch: Any) -> tuple:
    """A tuple batch is unpacked into ``loss_fn(params, *batch)``; anything else (a dict, an
    array) is passed as the single argument ``loss_fn(params, batch)``."""
    return batch if isinstance(batch, tuple) else (batch,)


def batch_weight(batch: Any) -> int:
    """The number of examples in ``batch``: the leading dimension of its first array leaf
    with at least one axis."""
    for leaf in jax.tree_util.tree_leaves(batch):
        shape = jnp.shape(leaf)
        if len(shape) >= 1:
            return int(shape[0])
    raise ValueError(
        "batches: a batch has no array with a leading batch axis, so its size (the weight of "
        "its Hessian in the dataset mean) is unknown"
    )


def dataset_mean(fn: Callable[..., Any], batches: Any) -> Any:
    """``Σ_b n_b fn(*batch_b) / Σ_b n_b`` over one sweep of ``batches``.

    With ``fn`` a per-batch HVP or quadratic form of a loss that is the *mean* over its
    batch, this is the HVP (quadratic form) of the mean loss over the whole dataset, also
    when the last batch is smaller.

    Raises:
      ValueError: if the sweep yields no batch, or a batch has no examples.
    """
    iterable = batches() if callable(batches) else batches
    total = 0
    acc = None
    for batch in iterable:
        n = batch_weight(batch)
        if n < 1:
            raise ValueError("batches: a batch has leading dimension 0 (no examples)")
        out = fn(*batch_args(batch))
        if acc is None:
            acc = jax.tree_util.tree_map(lambda o, n=n: n * o, out)
        else:
            acc = jax.tree_util.tree_map(lambda a, o, n=n: a + n * o, acc, out)
        total += n
    if acc is None:
        raise ValueError(
            "batches: the iterable yielded no batch; a dataset curvature needs at least one"
        )
    return jax.tree_util.tree_map(lambda a: (a / total).astype(a.dtype), acc)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        del n

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str) -> Any:
    """A tqdm bar over ``total`` dataset sweeps when ``enabled`` and tqdm is installed;
    otherwise a no-op with the same ``update``/``close`` methods (tqdm is optional)."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        import warnings

        warnings.warn("progress=True: tqdm is not installed, no progress bar", stacklevel=3)
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="sweep")


def _dataset_quadratic_forms_batch(
    params: PyTree,
    v: PyTree,
    args: tuple,
    *,
    loss_fn: Callable,
    perturbed: tuple[bool, ...],
    batch_size: int | None,
) -> jax.Array:
    return quadratic_forms(loss_fn, params, v, args, list(perturbed), batch_size=batch_size)


_jit_quadratic_forms = jax.jit(
    _dataset_quadratic_forms_batch, static_argnames=("loss_fn", "perturbed", "batch_size")
)


def dataset_quadratic_forms(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    v: PyTree,
    batches: Any,
    perturbed: list[bool],
    *,
    batch_size: int | None = None,
) -> jax.Array:
    """``vᵢᵀ∇²L̄(x)vᵢ`` for the dataset mean loss ``L̄ = Σ_b n_b L_b / Σ_b n_b``.

    The quadratic forms of each batch (:func:`quadratic_forms`, jitted once per batch
    shape) are accumulated with weights ``n_b`` by :func:`dataset_mean`.
    """
    check_batches(batches)
    return dataset_mean(
        lambda *b: _jit_quadratic_forms(
            params, v, b, loss_fn=loss_fn, perturbed=tuple(perturbed), batch_size=batch_size
        ),
        batches,
    )
