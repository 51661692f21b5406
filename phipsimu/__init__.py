"""phipsimu: (φ, ψ, μ) sharpness measures and sharpness-aware training for JAX.

Reference: Tahmasebi, Soleymani, Jegelka, Jaillet, "On Scale-Invariant Sharpness Measures".
"""

from phipsimu import measures, mu
from phipsimu._curvature import hvp
from phipsimu._estimate import MAX_DENSE_DIM, Estimate, exact_sharpness, sharpness
from phipsimu._measure import Measure
from phipsimu._objective import sharpness_aware_loss
from phipsimu._transforms import (
    SharpnessAwareState,
    frobenius_sam,
    random_sam,
    sam,
    sharpness_aware,
)

__version__ = "0.1.0"

__all__ = [
    "MAX_DENSE_DIM",
    "Estimate",
    "Measure",
    "SharpnessAwareState",
    "exact_sharpness",
    "frobenius_sam",
    "hvp",
    "measures",
    "mu",
    "random_sam",
    "sam",
    "sharpness",
    "sharpness_aware",
    "sharpness_aware_loss",
]
