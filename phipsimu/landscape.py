"""Loss landscapes: ``random_directions(key, params, num, normalize="filter")`` (filter
normalisation of Li et al. 2018, defined per leaf kind), ``surface(loss_fn, params, *args,
directions=..., coords=...)`` (the loss on a 1-D or 2-D grid, chunked, over batches or a mesh
axis) and ``plot`` (matplotlib, the ``examples`` extra)."""

from phipsimu._landscape import plot, random_directions, surface

__all__ = ["plot", "random_directions", "surface"]
