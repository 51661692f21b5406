"""Diagnostics carried by every :class:`phipsimu.Estimate`: the status bit flags that say why
a number is NaN, infinite or not to be trusted, and the Pareto shape k̂ of the largest Monte
Carlo terms (Pareto-smoothed importance sampling).

Reference: Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto Smoothed Importance Sampling"
(JMLR 2024); Zhang & Stephens, "A new and efficient estimation method for the generalized
Pareto distribution" (Technometrics 2009); docs/conventions.md, section "Diagnostics".
"""

from __future__ import annotations

import enum
import math
from typing import Any

import jax
import jax.numpy as jnp

#: Above this Pareto shape k̂ the estimate and its standard error are not to be trusted
#: (Vehtari et al.: the Monte Carlo error then converges too slowly for any practical m).
#: The cap of the sample-size threshold :func:`pareto_k_threshold` that sets the flag.
#:
#: Example:
#:   >>> import math, phipsimu
#:   >>> # the threshold min(1 − 1/log₁₀ m, cap) for m = 64 and a million samples
#:   >>> [round(min(1 - 1 / math.log10(m), phipsimu.PARETO_K_THRESHOLD), 3) for m in (64, 10**6)]
#:   [0.446, 0.7]
PARETO_K_THRESHOLD = 0.7

#: Cochran's rule: the sample mean is near normal only when ``m >= 25·g₁²``, g₁ the
#: skewness of the terms (Cochran, "Sampling Techniques", 3rd ed. 1977, §2.15).
SKEWNESS_RULE = 25.0

#: Fewer tail terms than this and k̂ is not fitted (NaN).
_MIN_TAIL = 5

#: Above this share of the spectrum's weight below the damping δ, a damped log-determinant is
#: flagged ``DAMPING_DOMINATED``: over that share of its d terms, ``log(λ + δ)`` is within
#: ``log 2`` of ``log δ``, so δ, not the operator, sets the larger part of the sum.
DAMPING_DOMINATED_SHARE = 0.5

#: How many zero-curvature coordinates an estimate names (:func:`null_coordinates`).
NULL_SLOTS = 8


class Status(enum.IntFlag):
    """Bit flags of :attr:`phipsimu.Estimate.status` (an int32 array, 0 = nothing to report).

    Combine and test them like any ``enum.IntFlag``: ``est.status & Status.HEAVY_TAILED``;
    :meth:`phipsimu.Estimate.reasons` and :func:`describe_status` turn them into words.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> from phipsimu import Status
      >>> loss = lambda p: 0.5 * p[0] ** 2  # H = diag(1, 0): singular, det H = 0
      >>> est = phipsimu.exact_sharpness(loss, phipsimu.measures.determinant())(jnp.ones(2))
      >>> float(est.value), float(est.log_value), int(est.status)
      (0.0, -inf, 12)
      >>> [flag.name for flag in Status if flag and est.status & flag]  # 12 = 4 | 8
      ['SINGULAR', 'DIVERGENT']
      >>> bool(est.status & Status.NOT_POSITIVE_DEFINITE)
      False
    """

    OK = 0
    #: a quadratic form (so the loss or an HVP) was NaN or infinite: the value is NaN.
    NONFINITE_LOSS = 1
    #: H is provably not positive definite (a negative Ritz value, or a probe with
    #: vᵀHv <= 0). For the determinant the integral diverges and the value is NaN.
    NOT_POSITIVE_DEFINITE = 2
    #: H is singular to working precision (smallest Ritz value within the tolerance of 0).
    SINGULAR = 4
    #: the integral is provably infinite (value 0 or NaN, log_value −inf, as documented by
    #: the measure).
    DIVERGENT = 8
    #: H is not positive definite and the integral could not be shown to be finite: the
    #: value is the Monte Carlo number, which may be meaningless.
    NOT_VERIFIED_FINITE = 16
    #: the largest terms dominate: Pareto k̂ above ``min(1 − 1/log₁₀ m, 0.7)`` or
    #: ``m < 25·g₁²`` (g₁ the terms' sample skewness): the stderr (and the value) are not to
    #: be trusted.
    HEAVY_TAILED = 32
    #: the importance weights provably have infinite variance (determinant with
    #: ``scale² <= 1/(2·λ_min)``): the stderr underestimates the error.
    INFINITE_VARIANCE = 64
    #: an iterative search (the ascent of :func:`phipsimu.worst_case_sharpness`) stopped at
    #: its step budget while its best value was still rising: the value is a looser bound.
    NOT_CONVERGED = 128
    #: a search over a range (:func:`phipsimu.pac_bayes_sigma`) ended at one of its ends:
    #: the value is that end, a bound on the answer rather than the answer.
    AT_SEARCH_BOUND = 256
    #: the measured operator has exact zero rows: ``C eᵢ = 0`` for some perturbed coordinate
    #: i (a parameter without effect on the loss: an input that is zero in every example, a
    #: dead unit). Product densities and the determinant then diverge (``DIVERGENT``);
    #: :attr:`phipsimu.Estimate.null_coordinates` names the coordinates.
    ZERO_CURVATURE = 512
    #: a damped log-determinant ``log det(H + δI)`` is mostly the damping's: more than
    #: :data:`DAMPING_DOMINATED_SHARE` of the spectrum's weight lies below δ, where
    #: ``log(λ + δ)`` is within log 2 of ``log δ``
    #: (:attr:`phipsimu.Estimate.damping_share` holds the share).
    DAMPING_DOMINATED = 1024


_WORDS = {
    Status.NONFINITE_LOSS: "non-finite loss or curvature: a quadratic form was NaN or inf",
    Status.NOT_POSITIVE_DEFINITE: (
        "not positive definite: the curvature has a negative eigenvalue (a negative Ritz value "
        "or a probe with vᵀHv <= 0)"
    ),
    Status.SINGULAR: "singular curvature: the smallest eigenvalue is 0 to working precision",
    Status.DIVERGENT: "divergent: the integral is infinite",
    Status.NOT_VERIFIED_FINITE: (
        "not verified finite: the curvature is not positive definite and the integral could "
        "not be shown to be finite"
    ),
    Status.HEAVY_TAILED: (
        "heavy-tailed: the largest terms dominate (Pareto k above min(1 - 1/log10 m, "
        f"{PARETO_K_THRESHOLD}), or m < {SKEWNESS_RULE:g}·skewness²), the estimate and its "
        "stderr are not reliable"
    ),
    Status.INFINITE_VARIANCE: (
        "infinite variance: the importance weights have infinite variance (proposal too "
        "narrow), the stderr is too small"
    ),
    Status.NOT_CONVERGED: (
        "not converged: the search used its whole budget while its best value still rose"
    ),
    Status.AT_SEARCH_BOUND: (
        "at a search bound: the answer lies outside the searched range, the value is its end"
    ),
    Status.DAMPING_DOMINATED: (
        "damping-dominated: most of the spectrum lies below the damping δ, where log(λ + δ) "
        "is within log 2 of log δ, so the log-determinant mostly measures δ"
    ),
    Status.ZERO_CURVATURE: (
        "zero curvature: the operator has exact zero rows (parameters without effect on the "
        "loss), along which a product-density or Lebesgue integral is infinite"
    ),
}


def describe_status(
    status: Any, null_coordinates: Any = None, damping_share: Any = None
) -> list[str]:
    """The reasons encoded in a concrete status value, one sentence per flag set (empty when
    the status is 0). Not for use inside ``jit``: pass the returned array out first.

    ``null_coordinates`` (:attr:`phipsimu.Estimate.null_coordinates`, −1 padded) names the
    zero-curvature coordinates in the ``ZERO_CURVATURE`` sentence, ``damping_share``
    (:attr:`phipsimu.Estimate.damping_share`) the share in the ``DAMPING_DOMINATED`` one.

    Example:
      >>> import phipsimu
      >>> phipsimu.describe_status(phipsimu.Status.SINGULAR | phipsimu.Status.DIVERGENT)[0]
      'singular curvature: the smallest eigenvalue is 0 to working precision'
    """
    flags = Status(int(status))
    words = []
    for which, text in _WORDS.items():
        if not flags & which:
            continue
        if which == Status.ZERO_CURVATURE and null_coordinates is not None:
            idx = [int(i) for i in jax.device_get(null_coordinates).reshape(-1) if i >= 0]
            more = ", ..." if len(idx) == NULL_SLOTS else ""
            text += (
                f"; coordinates {', '.join(map(str, idx))}{more} (flat indices over the "
                "perturbed leaves, each raveled, in leaf order)"
            )
        if which == Status.DAMPING_DOMINATED and damping_share is not None:
            text += f" (share of the spectrum below δ: {float(damping_share):.3f})"
        words.append(text)
    return words


def flag(condition: Any, which: Status) -> jax.Array:
    """``which`` where ``condition`` holds, else 0, as an int32 array (jit-safe)."""
    return jnp.where(condition, jnp.int32(int(which)), jnp.int32(0))


def ok() -> jax.Array:
    """The empty status (an int32 array)."""
    return jnp.zeros((), jnp.int32)


def tail_size(m: int) -> int:
    """How many of the largest terms PSIS fits: ``min(⌈m/5⌉, ⌈3√m⌉)``."""
    return min(math.ceil(0.2 * m), math.ceil(3.0 * math.sqrt(m)))


def pareto_k(log_terms: jax.Array) -> jax.Array:
    """Generalised-Pareto shape k̂ of the largest terms, given their logarithms.

    Fits the exceedances of the ``M = min(⌈m/5⌉, ⌈3√m⌉)`` largest terms over the next one
    with the Zhang & Stephens (2009) profile-likelihood estimate and the weakly informative
    prior of PSIS (k ← (M·k + 5)/(M + 10)). NaN when ``M < 5`` (m < 25), when a term is not
    finite, or when the tail is flat (all top terms equal); ``−inf`` entries (zero terms) are
    allowed. k̂ < 0.5: finite variance, the CLT-based stderr is fine; 0.5–0.7: finite mean,
    slow convergence; > 0.7: the estimate is not to be trusted.

    Args:
      log_terms: shape ``(m,)``, ``log(w_i ψ_i)`` (or ``log|·|`` of the linearised terms).

    Returns:
      the scalar k̂, in the dtype of ``log_terms``.
    """
    log_terms = jax.lax.stop_gradient(log_terms)
    m = log_terms.shape[0]
    n = tail_size(m)
    dtype = log_terms.dtype
    if n < _MIN_TAIL:
        return jnp.full((), jnp.nan, dtype)
    top = jax.lax.top_k(log_terms, n + 1)[0]  # descending
    valid = jnp.all(jnp.isfinite(top[:n])) & ~jnp.any(jnp.isnan(log_terms))
    safe = jnp.where(jnp.isfinite(top), top, top[0])
    # exceedances in units of the largest term (the shape is scale-free), ascending
    x = jnp.exp(safe[:n][::-1] - safe[0]) - jnp.exp(safe[n] - safe[0])
    x = jnp.where(jnp.isfinite(top[n]), x, jnp.exp(safe[:n][::-1] - safe[0]))
    flat = x[-1] <= 0
    x = jnp.where(flat, jnp.ones_like(x), x)
    k = _zhang_stephens(x)
    return jnp.where(valid & ~flat, k, jnp.nan).astype(dtype)


def _zhang_stephens(x: jax.Array) -> jax.Array:
    """Shape of a generalised Pareto fitted to ascending exceedances ``x >= 0`` (Zhang &
    Stephens 2009: posterior mean of θ = −k/σ over a grid, then the profile k)."""
    n = x.shape[0]
    grid = 30 + math.isqrt(n)
    j = jnp.arange(1, grid + 1, dtype=x.dtype)
    quartile = x[max(math.floor(n / 4 + 0.5) - 1, 0)]
    quartile = jnp.where(quartile > 0, quartile, x[-1])
    theta = 1.0 / x[-1] + (1.0 - jnp.sqrt(grid / (j - 0.5))) / (3.0 * quartile)
    k_grid = jnp.mean(jnp.log1p(-theta[:, None] * x[None, :]), axis=1)
    profile = n * (jnp.log(-theta / k_grid) - k_grid - 1.0)
    weight = jax.nn.softmax(jnp.where(jnp.isfinite(profile), profile, -jnp.inf))
    theta_hat = jnp.sum(theta * weight)
    k = jnp.mean(jnp.log1p(-theta_hat * x))
    # PSIS's weakly informative prior towards k = 0.5 (10 pseudo-observations)
    return (n * k + 10 * 0.5) / (n + 10)


def null_coordinates(zero: list) -> jax.Array:
    """The flat indices (over the given leaves, each raveled, in order) of the first
    :data:`NULL_SLOTS` true entries of the boolean leaves ``zero``, padded with −1 (jit-safe)."""
    flat = jnp.concatenate([jnp.reshape(z, (-1,)) for z in zero])
    return jnp.nonzero(flat, size=NULL_SLOTS, fill_value=-1)[0].astype(jnp.int32)


def pareto_k_threshold(m: int) -> float:
    """PSIS's sample-size-dependent threshold ``min(1 − 1/log₁₀ m, 0.7)`` on k̂ (0.45 at
    m = 64, 0.58 at 256, 0.67 at 1000; Vehtari et al. 2024, §3.2): above it the Monte Carlo
    error at this m is larger than the stderr says. (k̂ is fitted only from m = 25 on.)"""
    return min(1.0 - 1.0 / math.log10(m), PARETO_K_THRESHOLD) if m > 10 else 0.0


def skewness(terms: jax.Array) -> jax.Array:
    """Sample skewness ``g₁ = m₃ / m₂^{3/2}`` of ``terms`` (shape ``(m,)``); NaN when they do
    not vary or m < 3."""
    terms = jax.lax.stop_gradient(terms)
    if terms.shape[0] < 3:
        return jnp.full((), jnp.nan, terms.dtype)
    c = terms - jnp.mean(terms)
    m2 = jnp.mean(c**2)
    return jnp.where(m2 > 0, jnp.mean(c**3) / jnp.where(m2 > 0, m2, 1.0) ** 1.5, jnp.nan)


def heavy_tailed(terms: jax.Array, k: jax.Array) -> jax.Array:
    """Whether the m Monte Carlo ``terms`` (their Pareto shape ``k``) are too heavy-tailed
    for their mean's stderr: ``k > min(1 − 1/log₁₀ m, 0.7)`` (PSIS, m >= 25), or Cochran's
    rule ``m < 25·g₁²`` (any m >= 3; the only rule below 25 samples).

    Why both (docs/conventions.md, "Diagnostics"): with right-skewed terms the keys whose
    intervals fail are the ones that missed the rare large terms, and their fitted tail looks
    light; the skewness rule flags them from the bulk. On a tanh MLP 4-10-6-3 with
    ``eigen_moment(4)`` (coverage 0.82 at m = 64), k̂ > 0.7 alone left the failing keys
    unflagged (``python -m benchmarks.coverage_flags``)."""
    m = terms.shape[0]
    g1 = skewness(terms)
    return (k > pareto_k_threshold(m)) | (m < SKEWNESS_RULE * g1**2)
