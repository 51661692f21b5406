"""Preset (φ, ψ, μ) measures from the paper's Table 1, each with its spectral
closed form, and ``invariant_gaussian`` (Theorem 1: scale-invariant, non-degenerate on zero-loss
manifolds)."""

from phipsimu._measure import (
    determinant,
    eigen_moment,
    frobenius,
    gaussian_moments,
    invariant_gaussian,
    sphere_moment,
    trace,
)

__all__ = [
    "determinant",
    "eigen_moment",
    "frobenius",
    "gaussian_moments",
    "invariant_gaussian",
    "sphere_moment",
    "trace",
]
