"""phipsimu: (φ, ψ, μ) sharpness measures and sharpness-aware training for JAX.

Reference: Tahmasebi, Soleymani, Jegelka, Jaillet, "On Scale-Invariant Sharpness Measures".
"""

from phipsimu import measures, mu
from phipsimu._curvature import hvp
from phipsimu._estimate import MAX_DENSE_DIM, Estimate, exact_sharpness, sharpness
from phipsimu._measure import Measure

__version__ = "0.1.0"

__all__ = [
    "MAX_DENSE_DIM",
    "Estimate",
    "Measure",
    "exact_sharpness",
    "hvp",
    "measures",
    "mu",
    "sharpness",
]
