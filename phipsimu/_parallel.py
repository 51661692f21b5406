"""Data parallelism over a named mapped axis: ``jax.pmap``, ``jax.shard_map`` (with or without
its varying-value checks) and ``jax.vmap`` with ``axis_name``.

The contract, in one place (docs/conventions.md, section "Scaling out"): each device holds one
shard of the global batch and a loss ``L_k`` on it; the global loss is the mean over devices,
``L = mean_k L_k`` (equal shards). Every quantity the library computes from losses is computed
from global losses, so the answer is the single-device answer on the global batch:

* a value is averaged over devices (``pmean``) before any nonlinearity is applied to it;
* a gradient is the gradient of such a global value, averaged over devices at the end.

How JAX differentiates through a collective depends on the mode. Under ``pmap`` and
``shard_map(check_vma=False)`` the gradient of ``pmean(L_k)`` with respect to replicated params
is the device's own ``∇L_k``, and a final ``pmean`` gives the global gradient. Under
``shard_map`` with its default checks, JAX tracks which values vary across the axis: the
gradient of ``pmean(L_k)`` with respect to replicated (unvarying) params is already the global
gradient, and the gradient of the *local* ``L_k`` is their sum ``Σ_k ∇L_k`` (N times the mean).
The final ``pmean`` of an unvarying value is the identity, so "gradient of the pmean-ed value,
then ``pmean``" is right in both modes; incoming gradients (the user's ``jax.grad`` of the
local loss) are brought to the global mean by :func:`mean_gradient`.
"""

from __future__ import annotations

from typing import Any

import jax

from phipsimu import _compat

PyTree = Any


def check_axis_name(name: str, value: Any) -> None:
    """Static check at construction: ``None`` or a str."""
    if value is not None and not isinstance(value, str):
        raise TypeError(
            f"{name}={value!r}: must be a str (the name of the mapped axis given to jax.pmap, "
            "the mesh of jax.shard_map or jax.vmap) or None"
        )


def axis_size(axis_name: str, name: str = "axis_name") -> int:
    """The number of devices along ``axis_name``; a clear error when it is not bound here."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{name}={axis_name!r}: this axis is not bound where the function runs; call it "
            f"inside jax.pmap(..., axis_name={axis_name!r}), inside jax.shard_map over a mesh "
            f"with an axis {axis_name!r}, or inside jax.vmap(..., axis_name={axis_name!r}). "
            "Under plain jax.jit with sharded data, pass axis_name=None: jit already computes "
            "the global-batch answer"
        ) from None


def varying_axes(x: Any) -> frozenset:
    """The ``shard_map`` axes along which ``x`` (an array, tracer or ``ShapeDtypeStruct``) is
    typed as varying; empty outside ``shard_map`` or without its checks."""
    # a ShapeDtypeStruct carries its type; jax.typeof of one from eval_shape inside a
    # shard_map over some of the mesh axes (axis_names=...) fails an assertion in JAX 0.10
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    return _compat.varying_of(aval)


def vary_along(x: Any, axes: frozenset) -> Any:
    """``x`` typed as varying along ``axes`` as well (values unchanged, no communication)."""
    missing = tuple(axes - varying_axes(x))
    return _compat.pcast_varying(x, missing) if missing else x


def sum_to(x: Any, axes: frozenset) -> Any:
    """``x`` summed over the axes it varies along that are not in ``axes``: the transpose of
    :func:`vary_along`, so the cotangent of a value typed as varying along ``axes`` from a
    per-device one (``psum``; ``x`` itself when there is nothing to sum)."""
    extra = tuple(varying_axes(x) - axes)
    return jax.lax.psum(x, extra) if extra else x


def union_axes(tree: PyTree) -> frozenset:
    """Every axis along which some leaf of ``tree`` is typed as varying."""
    return frozenset().union(*map(varying_axes, jax.tree_util.tree_leaves(tree)))


def check_whole(params: PyTree, perturbed: tuple, allowed: tuple, name: str = "params") -> None:
    """Raise a clear error when a perturbed leaf of ``params`` (``perturbed``: one bool per
    leaf) is typed as varying along a ``shard_map`` axis other than ``allowed`` (the data and
    sample axes): the leaf was split by hand, so each device would perturb, normalise and draw
    for its shard alone and the result would silently differ from one device's. Leaves that
    are not perturbed only pass through, so they may be split. Detectable only under
    ``shard_map``'s default checks (``check_vma=True``)."""
    keep = {a for a in allowed if a is not None}
    for (path, leaf), on in zip(jax.tree_util.tree_leaves_with_path(params), perturbed):
        extra = sorted(varying_axes(leaf) - keep) if on else []
        if extra:
            where = jax.tree_util.keystr(path) or "(root)"
            raise ValueError(
                f"{name}: leaf {where} is split along the shard_map axis {extra} (typed as "
                "varying there), so each device would see only its shard; phipsimu perturbs, "
                "normalises and draws over whole parameters. Shard params with jax.jit and a "
                "NamedSharding (the compiler partitions them; supported), run the shard_map "
                "over the data axis only (axis_names={...}), or all_gather the leaf first"
            )


def tracks_varying(axis_name: str) -> bool:
    """Whether JAX tracks varying values along ``axis_name`` (``shard_map`` with its default
    ``check_vma=True``); False under ``pmap``, ``vmap`` and ``shard_map(check_vma=False)``."""
    return axis_name in varying_axes(jax.lax.axis_index(axis_name))


def is_varying(x: Any, axis_name: str) -> bool:
    """Whether ``x`` (an array, tracer or ``ShapeDtypeStruct``) is typed as varying along
    ``axis_name`` (only meaningful when :func:`tracks_varying`)."""
    return axis_name in varying_axes(x)


def pmean(tree: PyTree, axis_name: str | None) -> PyTree:
    """``jax.lax.pmean`` over ``axis_name``; the identity when it is None."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def mean_gradient(grads: list, loss: Any, axis_name: str) -> list:
    """The global-batch gradient from the gradients JAX gives each device for its local loss.

    Args:
      grads: per-device ``jax.grad`` of the local loss (a list of leaves).
      loss: the local loss value, or its ``jax.eval_shape`` (only its type is read).
      axis_name: the data axis.

    Under ``pmap``/``check_vma=False`` each device holds ``∇L_k``: average. Under tracked
    varying values a leaf that varies is ``∇L_k`` (average it); an unvarying leaf of a varying
    loss is JAX's sum ``Σ_k ∇L_k`` (divide by N); an unvarying leaf of an unvarying loss (the
    user averaged the loss already) is the global gradient.
    """
    if not tracks_varying(axis_name):
        return jax.lax.pmean(grads, axis_name)
    n = jax.lax.axis_size(axis_name)
    loss_varies = is_varying(loss, axis_name)
    out = []
    for g in grads:
        if is_varying(g, axis_name):
            out.append(jax.lax.pmean(g, axis_name))
        elif loss_varies:
            out.append((g / n).astype(g.dtype))
        else:
            out.append(g)
    return out


def device_gradient(grads: list, fn: Any, x: list, axis_name: str) -> list:
    """Each device's own gradient ``∇L_k`` of its local loss ``fn`` at ``x``, from the
    gradients JAX gave the user for it (m-sharpness: each device perturbs along its own).

    Under ``pmap``/``check_vma=False``, and for a leaf typed as varying, ``grads`` hold it.
    Under tracked varying values an unvarying leaf of a varying loss holds JAX's sum
    ``Σ_k ∇L_k``, from which no device's own can be recovered: those leaves are recomputed
    (one more gradient of the local loss). An unvarying loss (the user averaged it already)
    is the same on every device, and so is its gradient: ``grads`` as they are.
    """
    if not tracks_varying(axis_name) or not is_varying(jax.eval_shape(fn, x), axis_name):
        return grads
    summed = [not is_varying(g, axis_name) for g in grads]
    if not any(summed):
        return grads
    own = local_gradient(fn, x, axis_name)
    return [o if s else g for g, o, s in zip(grads, own, summed)]


def global_value_fn(value_fn: Any, axis_name: str | None) -> Any:
    """``p -> pmean_k value_fn(p)``: the global-batch loss (identical on every device)."""
    if axis_name is None:
        return value_fn
    return lambda p: jax.lax.pmean(value_fn(p), axis_name)


def to_varying(tree: PyTree, axis_name: str) -> PyTree:
    """Under tracked varying values, every leaf typed as varying along ``axis_name`` (values
    unchanged), so that a gradient taken with respect to it is each device's own rather than
    JAX's sum over devices; otherwise ``tree`` as it is."""
    if not tracks_varying(axis_name):
        return tree
    return jax.tree_util.tree_map(
        lambda v: v if is_varying(v, axis_name) else _compat.pcast_varying(v, axis_name),
        tree,
    )


def local_gradient(fn: Any, x: list, axis_name: str) -> list:
    """Each device's own ``∇fn(x)`` of a per-device ``fn`` (m-sharpness), as a list aligned
    with ``x`` (see :func:`to_varying`)."""
    return local_value_and_grad(fn, x, axis_name)[1]


def local_value_and_grad(fn: Any, x: list, axis_name: str) -> tuple[Any, list]:
    """:func:`local_gradient` with the device's own value ``fn(x)``."""
    return jax.value_and_grad(fn)(to_varying(x, axis_name))


# ---------------------------------------------------------------- samples sharded over an axis


def sample_block(axis_name: str, num: int, what: str) -> tuple[int, jax.Array]:
    """``(size, start)`` of this device's block of ``num`` samples spread over ``axis_name``.

    Raises:
      ValueError: ``axis_name`` not bound, or ``num`` not divisible by its size (``what``
        names the parameter and its value in the message).
    """
    n = axis_size(axis_name, "sample_axis")
    if num % n:
        raise ValueError(
            f"{what}: the {num} perturbations must split evenly over the {n} devices of "
            f"sample_axis={axis_name!r}; use a multiple of {n}"
        )
    size = num // n
    return size, jax.lax.axis_index(axis_name) * size


def gather_samples(x: jax.Array, axis_name: str) -> jax.Array:
    """Every device's block of per-sample values, concatenated in sample order.

    The result is the same on every device, and under tracked varying values it is typed so
    (``to="invarying"``, whose transpose hands each device its own block's cotangent):
    everything computed from it, down to the estimate and the update, can leave
    ``shard_map`` with ``out_specs=P()``. Elsewhere the plain ``all_gather``, whose
    transpose ``pmap`` and ``check_vma=False`` need."""
    return _compat.all_gather_tiled(x, axis_name, invariant=tracks_varying(axis_name))
