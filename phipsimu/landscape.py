"""Loss landscapes: ``random_directions(key, params, num, normalize="filter")`` (filter
normalisation of Li et al. 2018, defined per leaf kind), ``surface(loss_fn, params, *args,
directions=..., coords=...)`` (the loss on a 1-D or 2-D grid, chunked, over batches or a mesh
axis) and ``plot`` (matplotlib, the ``examples`` extra).

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, phipsimu
  >>> params = {"w": jnp.ones((2, 2))}
  >>> loss = lambda p: jnp.sum(p["w"] ** 2)
  >>> dirs = phipsimu.landscape.random_directions(jax.random.key(0), params, 2)
  >>> c = np.linspace(-1.0, 1.0, 5)
  >>> z = phipsimu.landscape.surface(loss, params, directions=dirs, coords=(c, c))
  >>> z.shape, round(float(z[2, 2]), 4)  # a 5 × 5 grid; at its centre, L(x)
  ((5, 5), 4.0)
"""

from phipsimu._landscape import plot, random_directions, surface

__all__ = ["plot", "random_directions", "surface"]
