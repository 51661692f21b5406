"""phipsimu: (φ, ψ, μ) sharpness measures and sharpness-aware training for JAX.

Reference: Tahmasebi, Soleymani, Jegelka, Jaillet, "On Scale-Invariant Sharpness Measures".
"""

from phipsimu import curvature, landscape, measures, mu, symmetries
from phipsimu._curvature import MAX_DENSE_DIM, hvp
from phipsimu._diagnostics import PARETO_K_THRESHOLD, Status, describe_status
from phipsimu._estimate import exact_sharpness, sharpness
from phipsimu._finite import Ascent, average_sharpness, pac_bayes_sigma, worst_case_sharpness
from phipsimu._invariance import InvarianceReport, check_invariance
from phipsimu._measure import Estimate, Measure
from phipsimu._objective import sharpness_aware_loss
from phipsimu._spectral import (
    EigenResult,
    SpectralDensity,
    log_determinant,
    power_iteration,
    spectral_density,
    top_eigenvalues,
    trace_function,
)
from phipsimu._trace import hessian_diagonal, hessian_trace
from phipsimu._transforms import (
    SamState,
    SharpnessAwareState,
    frobenius_sam,
    random_sam,
    sam,
    sharpness_aware,
)
from phipsimu._tree import layer_blocks

__version__ = "0.1.0"

__all__ = [
    "MAX_DENSE_DIM",
    "PARETO_K_THRESHOLD",
    "Ascent",
    "EigenResult",
    "Estimate",
    "InvarianceReport",
    "Measure",
    "SamState",
    "SharpnessAwareState",
    "SpectralDensity",
    "Status",
    "average_sharpness",
    "check_invariance",
    "curvature",
    "describe_status",
    "exact_sharpness",
    "frobenius_sam",
    "hessian_diagonal",
    "hessian_trace",
    "hvp",
    "landscape",
    "layer_blocks",
    "log_determinant",
    "measures",
    "mu",
    "pac_bayes_sigma",
    "power_iteration",
    "random_sam",
    "sam",
    "sharpness",
    "sharpness_aware",
    "sharpness_aware_loss",
    "spectral_density",
    "symmetries",
    "top_eigenvalues",
    "trace_function",
    "worst_case_sharpness",
]
