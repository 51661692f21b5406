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
PARETO_K_THRESHOLD = 0.7

#: Fewer tail terms than this and k̂ is not fitted (NaN).
_MIN_TAIL = 5

#: How many zero-curvature coordinates an estimate names (:func:`null_coordinates`).
NULL_SLOTS = 8


class Status(enum.IntFlag):
    """Bit flags of :attr:`phipsimu.Estimate.status` (an int32 array, 0 = nothing to report).

    Combine and test them like any ``enum.IntFlag``: ``est.status & Status.HEAVY_TAILED``;
    :meth:`phipsimu.Estimate.reasons` and :func:`describe_status` turn them into words.
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
    #: Pareto k̂ > 0.7: the stderr (and the value) are not to be trusted.
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
        f"heavy-tailed: Pareto k > {PARETO_K_THRESHOLD}, the estimate and its stderr are not "
        "reliable"
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
    Status.ZERO_CURVATURE: (
        "zero curvature: the operator has exact zero rows (parameters without effect on the "
        "loss), along which a product-density or Lebesgue integral is infinite"
    ),
}


def describe_status(status: Any, null_coordinates: Any = None) -> list[str]:
    """The reasons encoded in a concrete status value, one sentence per flag set (empty when
    the status is 0). Not for use inside ``jit``: pass the returned array out first.

    ``null_coordinates`` (:attr:`phipsimu.Estimate.null_coordinates`, −1 padded) names the
    zero-curvature coordinates in the ``ZERO_CURVATURE`` sentence.

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
