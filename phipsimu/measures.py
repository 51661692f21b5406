"""Preset (φ, ψ, μ) measures from the paper's Table 1, each with its spectral
closed form, and ``invariant_gaussian`` (Theorem 1: scale-invariant; finite on zero-loss
manifolds where every parameter affects the loss).

Example:
  >>> import jax.numpy as jnp, phipsimu
  >>> from phipsimu import measures
  >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)  # H = diag(1, 3)
  >>> for m in (measures.trace(), measures.frobenius(), measures.determinant(),
  ...           measures.eigen_moment(2)):
  ...     print(m.name, round(float(phipsimu.exact_sharpness(loss, m)(jnp.ones(2)).value), 4))
  trace 2.0
  frobenius 10.0
  determinant 3.0
  eigen_moment_2 4.5
"""

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
