"""Measures μ as samplers: ``phipsimu.mu.sphere()``, ``gaussian()``, ``rademacher()``,
``lebesgue(scale=...)``, ``product_density(log_f, ...)`` (Theorem 1, with the
equivariant proposal). Each has ``sample(key, like, num) -> (v, log_weight)``.

Example:
  >>> import jax, jax.numpy as jnp, phipsimu
  >>> for mu in (phipsimu.mu.sphere(), phipsimu.mu.rademacher(), phipsimu.mu.lebesgue()):
  ...     v, log_w = mu.sample(jax.random.key(0), jnp.zeros(3), 2)
  ...     print(type(mu).__name__, v.shape, [round(float(x), 3) for x in log_w])
  Sphere (2, 3) [0.0, 0.0]
  Rademacher (2, 3) [0.0, 0.0]
  Lebesgue (2, 3) [3.73, 5.029]

(Probability measures sampled exactly have ``log w = 0``; the Lebesgue measure's weights are
``(d/2)·log 2π + ‖v‖²/2`` for its N(0, I) proposal.)
"""

from phipsimu._mu import (
    Gaussian,
    Lebesgue,
    ProductDensity,
    Rademacher,
    Sampler,
    Sphere,
    gaussian,
    lebesgue,
    product_density,
    rademacher,
    sphere,
)

__all__ = [
    "Gaussian",
    "Lebesgue",
    "ProductDensity",
    "Rademacher",
    "Sampler",
    "Sphere",
    "gaussian",
    "lebesgue",
    "product_density",
    "rademacher",
    "sphere",
]
