"""Loss landscapes: directions in parameter space (random, filter- or layer-normalised) and
the loss on a 1-D or 2-D grid along them, evaluated by the execution layer (chunked, over a
dataset, spread over a mesh axis).

Reference: Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural
Nets", NeurIPS 2018 (filter normalisation, §4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from phipsimu import _checks, _curvature, _execution, _mu, _parallel, _tree

PyTree = Any

_NORMALIZE = ("filter", "layer", None)


def _filter_norms(a: jax.Array, filter_axis: int) -> jax.Array:
    """Norms of the filters of ``a`` (one leaf with a leading direction axis), broadcast back
    to its shape: the slices along ``filter_axis`` of each leaf with two or more axes, each
    element of a leaf with fewer."""
    if a.ndim - 1 < 2:
        return jnp.abs(a)
    axis = filter_axis % (a.ndim - 1) + 1
    other = tuple(i for i in range(1, a.ndim) if i != axis)
    return jnp.sqrt(jnp.sum(jnp.square(a), axis=other, keepdims=True))


def _layer_norms(a: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)), keepdims=True))


def random_directions(
    key: jax.Array,
    params: PyTree,
    num: int,
    *,
    normalize: str | None = "filter",
    filter_axis: int = -1,
    mask: Any = None,
) -> PyTree:
    """``num`` random directions shaped like ``params``, normalised to the scale of the
    weights they move.

    Entries are drawn N(0, 1) (direction i from ``fold_in(key, i)``, by
    :func:`phipsimu.mu.gaussian`), then rescaled so every *filter* (``"filter"``) or every
    leaf (``"layer"``) of the direction has the norm of the same part of ``params``:
    ``d_f ← d_f · ‖x_f‖ / ‖d_f‖``. A plot along filter-normalised directions is unchanged
    when a network's units are rescaled (Li et al. 2018, §4), so the sharpness it shows can
    be compared across networks.

    What a filter is, per leaf kind (pytree-native; the same rule for every leaf):

    * a leaf with two or more axes (a dense kernel ``(in, out)``, a convolution kernel
      ``(h, w, in, out)``, as in flax and haiku): the slices along ``filter_axis``, the last
      axis by default, which indexes the output units / channels. For PyTorch-layout
      kernels ``(out, in, ...)`` pass ``filter_axis=0``.
    * a leaf with one axis or none (a bias, a norm layer's scale, a scalar): each entry is its
      own filter, the parameter of one unit, so ``|d_j| = |x_j|``. To hold such leaves fixed
      instead (Li et al.'s plots), exclude them with ``mask``.

    A filter of zeros in ``params`` gets a zero direction.

    Args:
      key: a JAX PRNG key.
      params: the parameters x (the scale of the normalisation).
      num: number of directions (>= 1).
      normalize: ``"filter"`` (default), ``"layer"`` (each leaf's norm) or None (raw
        Gaussian entries).
      filter_axis: the axis of a kernel that indexes its filters (default -1).
      mask: which leaves to move (a pytree of bools or a callable; None: every floating
        leaf); the others are zeros.

    Returns:
      a pytree shaped like ``params`` with a leading axis ``num`` on every leaf (direction i
      is ``jax.tree.map(lambda a: a[i], dirs)``), as :func:`surface` takes it.

    Raises:
      ValueError / TypeError: on a bad ``key``, ``num``, ``normalize`` or ``filter_axis``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> dirs = phipsimu.landscape.random_directions(jax.random.key(0), params, 2)
      >>> dirs["w"].shape  # each column (a unit's filter) has the norm of params' column
      (2, 3, 2)
      >>> bool(jnp.allclose(jnp.linalg.norm(dirs["w"][0], axis=0), jnp.sqrt(3.0)))
      True
    """
    _checks.check_key(key)
    _checks.integer("num", num, lo=1)
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize={normalize!r}: must be one of {_NORMALIZE}")
    if isinstance(filter_axis, bool) or not isinstance(filter_axis, int):
        raise TypeError(f"filter_axis={filter_axis!r}: must be an int")
    _checks.check_params(params)
    leaves = jax.tree_util.tree_leaves(params)
    if normalize == "filter":
        for x in leaves:
            if jnp.ndim(x) >= 2 and not -jnp.ndim(x) <= filter_axis < jnp.ndim(x):
                raise ValueError(
                    f"filter_axis={filter_axis}: out of range for a params leaf of shape "
                    f"{jnp.shape(x)}"
                )
    return _directions(_mu.gaussian(mask=mask), num, normalize, filter_axis, key, params)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _directions(
    sampler: _mu.Sampler,
    num: int,
    normalize: str | None,
    filter_axis: int,
    key: jax.Array,
    params: PyTree,
) -> PyTree:
    draw = sampler.draw(key, params, num)
    if normalize is None:
        return draw.v
    out = []
    leaves = jax.tree_util.tree_leaves(params)
    for d, x, p in zip(jax.tree_util.tree_leaves(draw.v), leaves, draw.perturbed):
        if not p:
            out.append(d)
            continue
        if normalize == "filter":
            dn, xn = _filter_norms(d, filter_axis), _filter_norms(x[None], filter_axis)
        else:
            dn, xn = _layer_norms(d), _layer_norms(x[None])
        out.append(jnp.where(dn > 0, d * (xn / jnp.where(dn > 0, dn, 1.0)), 0.0).astype(d.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), out)


def _shape_of(tree: PyTree) -> str:
    return str(jax.tree_util.tree_map(lambda a: tuple(jnp.shape(a)), tree))


def _check_coords(coords: Any) -> list[jax.Array]:
    items = list(coords) if isinstance(coords, (tuple, list)) else [coords]
    if not 1 <= len(items) <= 2:
        raise ValueError(
            f"coords: {len(items)} coordinate arrays given; must be one 1-D array (a 1-D "
            "slice) or a tuple of two (a 2-D grid)"
        )
    out = []
    for i, c in enumerate(items):
        if _checks.is_traced(c):
            raise TypeError(
                f"coords[{i}]: a traced value; the grid's size must be known, pass a concrete "
                "array (np.linspace, jnp.linspace)"
            )
        arr = np.asarray(c)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(
                f"coords[{i}]: shape {arr.shape}, dtype {arr.dtype}; must be a non-empty 1-D "
                "array of numbers, e.g. np.linspace(-1, 1, 21)"
            )
        out.append(jnp.asarray(arr))
    return out


def _stack_directions(directions: Any, params: PyTree, k: int) -> PyTree:
    """``directions`` as one pytree shaped like ``params`` with a leading axis ``k``."""
    # PyTreeDef compares by value; typed Any as in phipsimu._invariance (its stub has no __eq__)
    treedef: Any = jax.tree_util.tree_structure(params)
    given: Any = jax.tree_util.tree_structure(directions)
    if given != treedef:
        if isinstance(directions, (tuple, list)) and all(
            treedef == jax.tree_util.tree_structure(d) for d in directions
        ):
            if len(directions) != k:
                raise ValueError(
                    f"directions: {len(directions)} directions for {k} coordinate array(s); "
                    "give one direction per coords array"
                )
            directions = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *directions)
        else:
            raise ValueError(
                f"directions: structure {given} is not "
                f"that of params {treedef}; pass a pytree shaped like params with a leading "
                "axis (one entry per direction, as random_directions returns) or a tuple of "
                "pytrees shaped like params"
            )
    for path, d, x in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree_util.tree_leaves(directions),
        jax.tree_util.tree_leaves(params),
    ):
        want = (k, *jnp.shape(x))
        if tuple(jnp.shape(d)) != want:
            where = jax.tree_util.keystr(path[0]) or "(root)"
            raise ValueError(
                f"directions: leaf {where} has shape {tuple(jnp.shape(d))}, expected {want} "
                f"(a leading axis of {k}, one per coords array, then the params leaf's shape); "
                f"directions are {_shape_of(directions)}, params {_shape_of(params)}"
            )
    return directions


def _grid(cs: list[jax.Array]) -> jax.Array:
    mesh = jnp.meshgrid(*cs, indexing="ij")
    return jnp.stack([m.reshape(-1) for m in mesh], axis=1)


def _values(
    loss_fn: Callable[..., Any],
    chunk_size: int | None,
    axis_name: str | None,
    params: PyTree,
    args: tuple,
    directions: PyTree,
    points: jax.Array,
) -> jax.Array:
    """``L(x + Σᵢ cᵢ dᵢ)`` at every row c of ``points``; with ``axis_name`` each device
    evaluates its block of rows and the blocks are gathered in order."""
    perturbed = _tree.perturbed_leaves(params)
    # 16-bit leaves in float32 copies (docs/conventions.md, "Low precision")
    x, merge = _tree.split(_tree.widen(params, perturbed), perturbed)
    ds = _tree.active(directions, perturbed)
    n = points.shape[0]
    if axis_name is not None:
        devices = _parallel.axis_size(axis_name)
        if n % devices:
            raise ValueError(
                f"coords: the grid's {n} points must split evenly over the {devices} devices "
                f"of axis_name={axis_name!r}; use a number of points divisible by {devices}"
            )
        size = n // devices
        points = jax.lax.dynamic_slice_in_dim(points, jax.lax.axis_index(axis_name) * size, size)

    def one(c: jax.Array) -> jax.Array:
        moved = [
            (xi + jnp.tensordot(c.astype(di.dtype), di, axes=1)).astype(xi.dtype)
            for xi, di in zip(x, ds)
        ]
        return jnp.asarray(loss_fn(merge(moved), *args))

    chunk = _execution.chunk_for(chunk_size, points.shape[0], _execution.leaf_bytes(x))
    out = _execution.chunked_map(one, points, chunk)
    if axis_name is not None:
        out = _parallel.gather_samples(out, axis_name)
    return out


_values_jit = jax.jit(_values, static_argnums=(0, 1, 2))


def surface(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args: Any,
    directions: Any,
    coords: Any,
    chunk_size: int | None = None,
    batches: Any = None,
    axis_name: str | None = None,
) -> jax.Array:
    """The loss on a 1-D or 2-D grid of points along directions:
    ``L(x + c₁ d₁)`` or ``L(x + c₁ d₁ + c₂ d₂)``.

    The grid points are evaluated by the execution layer: ``chunk_size`` points at a time
    (vmapped inside a ``lax.map``; memory holds one chunk), over a dataset with ``batches``,
    and spread over a mesh axis with ``axis_name``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the centre x.
      *args: passed to ``loss_fn`` (the batch).
      directions: k directions (k = the number of coords arrays): a pytree shaped like
        ``params`` with a leading axis k (as :func:`random_directions` returns), or a tuple
        of k pytrees shaped like ``params``. The top Hessian (or Gauss–Newton) eigenvectors
        are ``phipsimu.top_eigenvalues(loss_fn, k)(params, *args, key=key).vectors``; the SAM
        ascent direction is ``(jax.grad(loss_fn)(params, *args),)``; the maximiser of
        :func:`phipsimu.worst_case_sharpness` is ``(ascent.perturbation,)``.
      coords: a 1-D array ``c1`` (a slice), or a tuple ``(c1, c2)`` of 1-D arrays (a grid).
      chunk_size: grid points evaluated at once (None: the execution layer's default).
      batches: an iterable of batches (or a zero-argument callable returning one): each
        value is the batch-size-weighted mean of the per-batch losses (``args`` must then be
        empty).
      axis_name: a mapped axis (``jax.shard_map`` mesh axis, ``pmap``, ``vmap``) to spread the
        grid over: each device evaluates ``len(c1)·len(c2)/N`` points and every device
        returns the whole grid, the same numbers as one device. The number of points must be
        divisible by N. Call it inside the mapped function.

    Returns:
      the losses, shape ``(len(c1),)`` or ``(len(c1), len(c2))`` (entry ``[i, j]`` at
      ``c1[i], c2[j]``).

    Raises:
      ValueError / TypeError: coords that are not 1-D arrays (or more than two), directions
      not shaped like ``params``, a grid that does not divide over ``axis_name``, a bad
      ``chunk_size``.

    Example:
      >>> import jax.numpy as jnp, numpy as np, phipsimu
      >>> loss = lambda p: jnp.sum(p**2)
      >>> d = (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
      >>> z = phipsimu.landscape.surface(
      ...     loss, jnp.zeros(2), directions=d, coords=(np.linspace(-1, 1, 3), np.zeros(2)))
      >>> z.shape, z[:, 0].tolist()
      ((3, 2), [1.0, 0.0, 1.0])
    """
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args) -> scalar")
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
    _parallel.check_axis_name("axis_name", axis_name)
    cs = _check_coords(coords)
    _checks.check_params(params)
    directions = _stack_directions(directions, params, len(cs))
    points = _grid(cs)
    shape = tuple(c.shape[0] for c in cs)
    if batches is not None:
        if args:
            raise ValueError(
                f"args: with batches=..., every loss_fn argument comes from the batch; got "
                f"{len(args)} extra positional argument(s)"
            )
        _curvature.check_batches(batches)
        out = _curvature.dataset_mean(
            lambda *b: _values_jit(loss_fn, chunk_size, axis_name, params, b, directions, points),
            batches,
        )
        return out.reshape(shape)
    _checks.check_scalar_loss(loss_fn, params, args)
    traced = any(_checks.is_traced(a) for a in jax.tree_util.tree_leaves((params, args)))
    if traced or axis_name is not None:
        out = _values(loss_fn, chunk_size, axis_name, params, args, directions, points)
    else:
        out = _values_jit(loss_fn, chunk_size, axis_name, params, args, directions, points)
    return out.reshape(shape)


def plot(
    values: Any,
    coords: Any,
    *,
    kind: str = "contour",
    ax: Any = None,
    levels: int = 20,
    radius: float | None = None,
) -> Any:
    """Draw a surface from :func:`surface` with matplotlib (the ``examples`` extra; imported
    here, never when phipsimu is imported).

    Args:
      values: the losses, shape ``(len(c1),)`` or ``(len(c1), len(c2))``.
      coords: the coords given to :func:`surface`.
      kind: for a 2-D grid ``"contour"`` (filled contours) or ``"surface"`` (3-D); a 1-D
        slice is always a line.
      ax: a matplotlib axes to draw on (None: a new figure; a 3-D axes for ``"surface"``).
      levels: contour levels.
      radius: mark ``±radius`` on a slice (vertical lines) or the circle of that radius on
        a contour (e.g. the ρ of a sharpness measure, in the directions' units).

    Returns:
      the matplotlib axes.

    Example:
      >>> import jax.numpy as jnp, numpy as np, phipsimu
      >>> c1 = np.linspace(-1.0, 1.0, 5)
      >>> z = phipsimu.landscape.surface(  # a slice along the first axis
      ...     lambda p: jnp.sum(p**2), jnp.zeros(2), directions=(jnp.array([1.0, 0.0]),), coords=c1)
      >>> ax = phipsimu.landscape.plot(z, c1, radius=0.5)
      >>> ax.get_xlabel(), len(ax.lines)  # the slice, and the lines at ±radius
      ('c1', 3)
      >>> ax.lines[0].get_ydata().tolist()
      [1.0, 0.25, 0.0, 0.25, 1.0]
      >>> import matplotlib.pyplot as plt
      >>> plt.close(ax.figure)
    """
    import matplotlib.pyplot as plt

    cs = _check_coords(coords)
    z = np.asarray(values)
    if z.shape != tuple(c.shape[0] for c in cs):
        raise ValueError(
            f"values: shape {z.shape} does not match coords {tuple(c.shape[0] for c in cs)}"
        )
    if kind not in ("contour", "surface"):
        raise ValueError(f"kind={kind!r}: must be 'contour' or 'surface'")
    if len(cs) == 1:
        ax = plt.figure().add_subplot() if ax is None else ax
        ax.plot(np.asarray(cs[0]), z)
        if radius is not None:
            for r in (-radius, radius):
                ax.axvline(r, linestyle="--", color="gray")
        ax.set_xlabel("c1")
        ax.set_ylabel("loss")
        return ax
    a, b = np.meshgrid(np.asarray(cs[0]), np.asarray(cs[1]), indexing="ij")
    if kind == "surface":
        ax = plt.figure().add_subplot(projection="3d") if ax is None else ax
        ax.plot_surface(a, b, z, cmap="viridis")
    else:
        ax = plt.figure().add_subplot() if ax is None else ax
        ax.contourf(a, b, z, levels=levels, cmap="viridis")
        if radius is not None:
            t = np.linspace(0, 2 * np.pi, 200)
            ax.plot(radius * np.cos(t), radius * np.sin(t), "w--")
    ax.set_xlabel("c1")
    ax.set_ylabel("c2")
    return ax
