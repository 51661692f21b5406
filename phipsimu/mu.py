"""Measures μ as samplers: ``phipsimu.mu.sphere()``, ``gaussian()``, ``rademacher()``,
``lebesgue(scale=...)``, ``product_density(log_f, ...)`` (Theorem 1, with the
equivariant proposal). Each has ``sample(key, like, num) -> (v, log_weight)``."""

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
