"""Measures μ as samplers: ``phipsimu.mu.sphere()``, ``gaussian()``, ``rademacher()``,
``lebesgue(scale=...)``. Each has ``sample(key, like, num) -> (v, log_weight)``."""

from phipsimu._mu import (
    Gaussian,
    Lebesgue,
    Rademacher,
    Sampler,
    Sphere,
    gaussian,
    lebesgue,
    rademacher,
    sphere,
)

__all__ = [
    "Gaussian",
    "Lebesgue",
    "Rademacher",
    "Sampler",
    "Sphere",
    "gaussian",
    "lebesgue",
    "rademacher",
    "sphere",
]
