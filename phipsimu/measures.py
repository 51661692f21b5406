"""Preset (φ, ψ, μ) measures from the paper's Table 1, each with its spectral closed form."""

from phipsimu._measure import (
    determinant,
    eigen_moment,
    frobenius,
    gaussian_moments,
    sphere_moment,
    trace,
)

__all__ = [
    "determinant",
    "eigen_moment",
    "frobenius",
    "gaussian_moments",
    "sphere_moment",
    "trace",
]
