"""Preset (φ, ψ, μ) measures from the paper's Table 1, each with its spectral
closed form, and ``invariant_gaussian`` (Theorem 1: scale-invariant; finite on zero-loss
manifolds where every parameter affects the loss)."""

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
