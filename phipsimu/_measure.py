"""The (φ, ψ, μ) triple, the result layer (:class:`Estimate` and the Monte Carlo reduction
``φ(mean_i w_i ψ(t_i))`` that produces it, shared by every estimator and the zeroth-order
objective), and the presets of the paper's Table 1 with their spectral closed forms.

Reference: Tahmasebi et al., "On Scale-Invariant Sharpness Measures", Definition 1, Table 1;
docs/conventions.md, sections "Definition 1", "Estimators and standard errors" and
"Table 1 presets".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from phipsimu import _diagnostics, _mu
from phipsimu._diagnostics import Status

_LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class Measure:
    """A sharpness measure ``S(x) = φ(∫ ψ(vᵀ∇²L(x)v) dμ(v))`` (Definition 1).

    Immutable and hashable, so it can be a static argument of ``jax.jit``. Two presets built
    with the same arguments compare equal.

    Attributes:
      phi: φ, a JAX-traceable function of the integral (a scalar, or a vector when ψ is
        vector-valued). Called as ``phi(t)``, or ``phi(t, d)`` when ``phi_uses_dim``.
      psi: ψ, a JAX-traceable function of a scalar quadratic form; may return a vector of
        length k (then φ takes a length-k vector), as the Frobenius preset does.
      mu: a sampler from ``phipsimu.mu``.
      phi_uses_dim: whether φ (and ``log_phi``) take the dimension d of the perturbed
        parameters as a second argument, e.g. the determinant's ``(2π)^d``.
      log_psi: optional ``log ψ``; with ``log_phi`` it makes the reduction run in log space
        (needed when the weights or ψ over- or underflow, as for the determinant).
      log_phi: optional ``log φ`` as a function of ``log t`` (and ``d`` if ``phi_uses_dim``).
      phi_unbiased: optional ``(mean_psi, num_samples) -> value``, an unbiased replacement for
        the plug-in ``φ(mean ψ)`` where one exists (the Frobenius variance).
      spectral: optional closed form of S as a function of the Hessian eigenvalues restricted
        to the perturbed coordinates (used by ``exact_sharpness`` and the tests).
      log_spectral: optional closed form of ``log S`` from the eigenvalues.
      requires_positive_definite: the integral is finite only for a positive definite H
        (the determinant); estimators then certify definiteness with a short Lanczos run.
      may_diverge: the integral is finite for a positive definite H and may diverge
        otherwise (the product densities of Theorem 1, ``invariant_gaussian``); estimators
        then detect provable divergence with a short Lanczos run (see ``invariant_gaussian``).
      name: a short label for tables and reprs.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> # S = (E_sphere[(vᵀHv)²])^½, with its closed form for exact_sharpness
      >>> rms = phipsimu.Measure(jnp.sqrt, jnp.square, phipsimu.mu.sphere(),
      ...     spectral=lambda eigs: jnp.sqrt(phipsimu.measures.sphere_moment(eigs, 2)))
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)  # H = diag(1, 3)
      >>> est = phipsimu.exact_sharpness(loss, rms)(jnp.ones(2))
      >>> round(float(est.value), 4)  # √((Tr(H)² + 2 Tr(H²))/(d(d+2))) = √4.5
      2.1213
      >>> phipsimu.measures.trace() == phipsimu.measures.trace()  # hashable, comparable
      True
    """

    phi: Callable[..., Any]
    psi: Callable[[Any], Any]
    mu: _mu.Sampler
    phi_uses_dim: bool = False
    log_psi: Callable[[Any], Any] | None = None
    log_phi: Callable[..., Any] | None = None
    phi_unbiased: Callable[[Any, int], Any] | None = None
    spectral: Callable[[jax.Array], jax.Array] | None = None
    log_spectral: Callable[[jax.Array], jax.Array] | None = None
    requires_positive_definite: bool = False
    may_diverge: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("phi", "psi"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field}={getattr(self, field)!r}: must be a callable")
        if not isinstance(self.mu, _mu.Sampler):
            raise TypeError(
                f"mu={self.mu!r}: must be a sampler from phipsimu.mu (e.g. phipsimu.mu.sphere())"
            )
        if (self.log_psi is None) != (self.log_phi is None):
            raise ValueError(
                "log_psi and log_phi: give both (log-space reduction) or neither, got "
                f"log_psi={self.log_psi!r}, log_phi={self.log_phi!r}"
            )

    @property
    def log_space(self) -> bool:
        """Whether the reduction runs in log space."""
        return self.log_psi is not None

    @property
    def needs_certificate(self) -> bool:
        """Whether the integral can fail for some curvature (a determinant needs H positive
        definite; a product density may diverge): estimators then run a short Lanczos check
        on the measured operator and pass its Ritz values to :meth:`certify`."""
        return self.requires_positive_definite or self.may_diverge

    def proposal_scale(self, theta: jax.Array, tol: Any) -> tuple[Any, bool]:
        """``(scale, tuned)``: the Lebesgue proposal's scale, with ``tuned`` when it is set
        here from the ascending Ritz values θ of the check (``scale=None``): s² = 1/θ_min,
        twice the 1/(2λ_min) below which the weights have infinite variance when
        θ_min = λ_min (the draw is then made at scale 1 and rescaled). ``(None, False)`` for
        other samplers."""
        if not isinstance(self.mu, _mu.Lebesgue):
            return None, False
        if self.mu.scale is not None:
            return self.mu.scale, False
        return jnp.where(theta[0] > tol, theta[0], 1.0) ** -0.5, True

    def certify(
        self,
        est: Estimate,
        theta: jax.Array,
        tol: Any,
        singular: jax.Array,
        *,
        params: Any,
        scale: Any = None,
        zero: list | None = None,
    ) -> Estimate:
        """``est`` judged by the measure's own failure modes, from the ascending eigenvalues
        or Ritz values θ of the measured operator (within ``tol`` of 0: rounding), whether it
        is ``singular``, the proposal ``scale`` and ``zero``, boolean leaves aligned with the
        perturbed ones that mark the exact zero rows of the operator (docs/conventions.md,
        "Diagnostics").

        * A determinant (``requires_positive_definite``): NaN when H is indefinite, 0 / −inf
          with ``SINGULAR | DIVERGENT`` when singular or with a zero row,
          ``INFINITE_VARIANCE`` when the Lebesgue proposal is too narrow for the smallest
          eigenvalue.
        * A product density (``may_diverge``): 0 / −inf with ``DIVERGENT`` when H has more
          negative eigenvalues than the sampler has groups, or a zero row in a group of two
          or more coordinates; ``NOT_VERIFIED_FINITE`` when it is indefinite or singular
          without that proof.
        * Any other measure: ``est`` as it is.

        Zero rows set ``Status.ZERO_CURVATURE`` and ``Estimate.null_coordinates``.
        """
        if zero is not None:
            est = est._replace(
                status=est.status
                | _diagnostics.flag(
                    jnp.any(jnp.stack([jnp.any(z) for z in zero])), Status.ZERO_CURVATURE
                ),
                null_coordinates=_diagnostics.null_coordinates(zero),
            )
        if self.requires_positive_definite:
            if zero is not None:
                # C eᵢ = 0: ∫exp(−½vᵀCv)dv is constant along vᵢ, infinite; det C = 0
                singular = singular | jnp.any(jnp.stack([jnp.any(z) for z in zero]))
            est = _certify_definite(est, theta[0] < -tol, singular)
            if scale is None:
                return est
            # ∫(ψ dμ/dq)² dq < ∞ iff H − I/(2s²) is positive definite; θ_min >= λ_min
            infinite = 2.0 * jnp.asarray(scale, theta.dtype) ** 2 * theta[0] <= 1.0
            flag = _diagnostics.flag(infinite & (theta[0] > tol), Status.INFINITE_VARIANCE)
            return est._replace(status=est.status | flag)
        if self.may_diverge:
            mu: Any = self.mu  # a product density: the only sampler with groups
            index, sizes = mu.group_index(params, mu.perturbed(params))
            null = jnp.zeros((), bool)
            if zero is not None:
                # C eᵢ = 0 with i in a group g of >= 2 coordinates: integrating f over vᵢ
                # leaves c/|∏_{j∈g, j≠i} vⱼ|, not integrable at vⱼ = 0 (docs/conventions.md,
                # "Product-density integrals"); a singleton group integrates to a constant
                shared = [jnp.asarray(sizes[i] >= 2) for i in index if i is not None]
                null = jnp.any(
                    jnp.stack([jnp.any(z.reshape(-1) & g) for z, g in zip(zero, shared)])
                )
            return _certify_finite(est, theta, tol, singular, len(sizes), null)
        return est

    def is_linear(self) -> bool:
        """Whether ``φ(mean ψ(t))`` is affine in the curvatures t (the trace): then the eq. 10
        step's weights do not depend on the finite-difference curvatures, and their rounding
        cannot move the update. Checked numerically: zero second derivatives of ψ and φ at a
        few points (φ at two dimensions d); a vector ψ, an unbiased φ or a log-space reduction
        is never linear. A piecewise-linear ψ (relu, abs) passes the check; the only use is
        to leave such steps out of ``unresolved_count``."""
        if self.log_space or self.phi_unbiased is not None:
            return False
        # concrete even when a transform is built inside jit (optax.inject_hyperparams); a ψ
        # or φ without second derivatives counts as nonlinear (the safe side: a flag)
        try:
            with jax.ensure_compile_time_eval():
                t = jnp.array([0.5, 2.0, 7.0], jnp.float32)
                if jax.eval_shape(self.psi, t[0]).shape != ():
                    return False
                second = jax.vmap(jax.grad(jax.grad(lambda u: jnp.asarray(self.psi(u)))))(t)
                flat = bool(jnp.all(second == 0.0))
                for d in (1, 3):
                    phi = jax.grad(jax.grad(lambda u, d=d: jnp.asarray(self.apply_phi(u, d))))
                    flat = flat and bool(jnp.all(jax.vmap(phi)(t) == 0.0))
                return flat
        except Exception:
            return False

    def apply_phi(self, t: Any, d: int) -> jax.Array:
        """φ(t), passing d when φ needs it."""
        return self.phi(t, d) if self.phi_uses_dim else self.phi(t)

    def apply_log_phi(self, log_t: Any, d: int) -> jax.Array:
        """log φ as a function of log t."""
        log_phi = self.log_phi
        if log_phi is None:
            raise ValueError(f"{self.name}: no log_phi, the reduction is not in log space")
        return log_phi(log_t, d) if self.phi_uses_dim else log_phi(log_t)


def check_measure(measure: Any) -> Measure:
    """Raise a clear error unless ``measure`` is a :class:`Measure`."""
    if not isinstance(measure, Measure):
        raise TypeError(
            f"measure={measure!r}: must be a phipsimu.Measure (e.g. phipsimu.measures.trace())"
        )
    return measure


class Estimate(NamedTuple):
    """An estimate with its uncertainty and diagnostics: the one result type of every
    estimator.

    Attributes:
      value: the estimate (NaN when the quantity is undefined at this point, see the
        estimator's or preset's docs and ``status``, or when the loss is NaN). A pytree shaped
        like the params for :func:`phipsimu.hessian_diagonal`.
      stderr: its standard error (delta method through φ for sharpness measures; NaN with one
        sample, 0 for a closed form). Shaped like ``value``. Trust it only when ``status`` is 0
        (in particular ``pareto_k <= 0.7``).
      log_value: ``log S`` of the quantity S the estimator measures. For log-space measures
        (the determinant) computed directly and finite where ``value`` over- or underflows;
        otherwise ``log(value)``. For :func:`phipsimu.log_determinant`, whose ``value`` is
        already the logarithm ``log det(H + δI)``, ``log_value`` is the same number (the log
        of the determinant, as for the determinant preset), not the log of the
        log-determinant.
      ess: effective sample size ``(Σu)²/Σu²`` of the importance weights: ``u = w``, or
        ``u = w·ψ`` for log-space measures such as the determinant (so a poorly scaled
        proposal shows as a small ESS). Equal to ``num_samples`` for exactly sampled
        probability measures and for the spectral/trace estimators; ``inf`` for a closed form.
      num_samples: the number of probes (0 for a closed form): an int32 array as the
        estimators return it (their calls are compiled, eager calls included), a Python int
        over a dataset (``batches``).
      pareto_k: the generalised-Pareto shape k̂ fitted to the largest Monte Carlo terms
        ``|w_i ψ_i|`` (Pareto-smoothed importance sampling; for a vector ψ the terms are
        linearised through φ). Below 0.5 the stderr is reliable; above PSIS's sample-size
        threshold ``min(1 − 1/log₁₀ m, 0.7)`` (0.45 at m = 64; the cap is
        :data:`phipsimu.PARETO_K_THRESHOLD`) the estimate and its stderr are not to be
        trusted (``Status.HEAVY_TAILED``, which sharpness measures also set when
        ``m < 25·g₁²``, g₁ the terms' skewness, Cochran's rule, at any m). NaN when not
        fitted: fewer than 25 samples, a closed form, a flat tail, or non-finite terms.
      status: int32 bit flags (:class:`phipsimu.Status`; 0 = nothing to report) saying why a
        value is NaN, 0 or −inf, or why it is not to be trusted. Jit-safe (an array);
        :meth:`reasons` puts a concrete status into words.
      null_coordinates: for measures that certify their integral (the determinant, product
        densities), the flat indices (over the perturbed leaves, each raveled, in leaf
        order) of up to 8 coordinates i with ``C eᵢ = 0`` exactly (``Status.ZERO_CURVATURE``),
        padded with −1; None for other estimates.
      damping_share: for :func:`phipsimu.log_determinant` with damping δ > 0, the share of
        the spectrum's weight below δ (the Ritz values' quadrature weights, averaged over
        probes): over that share of the d terms ``log(λ + δ)`` is within log 2 of
        ``log δ``, i.e. set by the damping. Above 0.5, ``Status.DAMPING_DOMINATED``. None
        for other estimates.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)  # H = diag(1, 3)
      >>> est = phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=64)(
      ...     jnp.ones(2), key=jax.random.key(0))
      >>> print(f"{est.value:.3f} ± {est.stderr:.3f}")  # Monte Carlo estimate of Tr(H)/d = 2
      2.038 ± 0.091
      >>> int(est.num_samples), round(float(est.ess), 1), bool(est.ok), est.reasons()
      (64, 64.0, True, [])
    """

    value: Any
    stderr: Any
    log_value: Any
    ess: jax.Array
    num_samples: int
    pareto_k: jax.Array
    status: jax.Array
    null_coordinates: Any = None
    damping_share: Any = None

    def reasons(self) -> list[str]:
        """The status in words, one sentence per flag (empty when the status is 0); the
        zero-curvature sentence names the coordinates.

        Call it on a concrete estimate (outside ``jit``)."""
        return _diagnostics.describe_status(self.status, self.null_coordinates, self.damping_share)

    @property
    def ok(self) -> jax.Array:
        """``status == 0``: nothing to report (a boolean array, jit-safe)."""
        return self.status == 0


def std_mean(x: jax.Array) -> jax.Array:
    """Standard error of the mean of ``x`` along axis 0 (NaN for a single sample)."""
    m = x.shape[0]
    if m < 2:
        return jnp.full(x.shape[1:], jnp.nan, x.dtype)
    return jnp.std(x, axis=0, ddof=1) / math.sqrt(m)


def sample_mean(per_sample: jax.Array) -> Estimate:
    """The mean of ``m`` equally weighted per-sample estimates (shape ``(m,)``) as an
    :class:`Estimate`: standard error of the mean, ``log_value = log(value)``, ESS = m, Pareto
    k̂ of ``|per_sample|`` and the status flags that follow from them."""
    value = jnp.mean(per_sample)
    m = per_sample.shape[0]
    ess_ = jnp.full((), m, per_sample.dtype)
    k = _diagnostics.pareto_k(jnp.log(jnp.abs(per_sample)))
    status = sample_status(per_sample, k)
    return Estimate(value, std_mean(per_sample), jnp.log(value), ess_, m, k, status)


def sample_status(terms: jax.Array, k: jax.Array) -> jax.Array:
    """``NONFINITE_LOSS`` if a term is NaN or infinite, ``HEAVY_TAILED`` if k̂ > 0.7."""
    return _diagnostics.flag(
        ~jnp.all(jnp.isfinite(terms)), Status.NONFINITE_LOSS
    ) | _diagnostics.flag(k > _diagnostics.PARETO_K_THRESHOLD, Status.HEAVY_TAILED)


def closed_form(value: Any, log_value: Any, dtype: Any) -> Estimate:
    """A closed-form (exact) :class:`Estimate`: stderr 0, ESS inf, no samples, k̂ NaN."""
    stderr = jax.tree.map(jnp.zeros_like, value)
    inf = jnp.full((), jnp.inf, dtype)
    nan = jnp.full((), jnp.nan, dtype)
    return Estimate(value, stderr, log_value, inf, 0, nan, _diagnostics.ok())


def nonfinite(est: Estimate, condition: Any) -> Estimate:
    """``est`` with ``Status.NONFINITE_LOSS`` and NaN value, stderr and log_value (leaf by
    leaf) where ``condition`` holds (jit-safe)."""

    def nan(tree: Any) -> Any:
        # integer leaves (the zeros of unperturbed int params) have no NaN: left as they are
        return jax.tree.map(
            lambda x: (
                jnp.where(condition, jnp.nan, x).astype(x.dtype)
                if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
                else x
            ),
            tree,
        )

    return est._replace(
        value=nan(est.value),
        stderr=nan(est.stderr),
        log_value=nan(est.log_value),
        status=est.status | _diagnostics.flag(condition, Status.NONFINITE_LOSS),
    )


def ess(log_weight: jax.Array) -> jax.Array:
    """Effective sample size ``(Σw)²/Σw²`` of importance weights, computed in log space."""
    lse = jax.scipy.special.logsumexp
    return jnp.exp(2.0 * lse(log_weight) - lse(2.0 * log_weight))


def reduce(
    measure: Measure, t: jax.Array, log_weight: jax.Array, d: int, *, with_stats: bool = True
) -> Estimate:
    """Estimate ``φ(∫ ψ(t(v)) dμ(v))`` from draws ``t_i = t(v_i)`` with weights ``log w_i``.

    The standard error is the delta method through φ: ``|∇φ(ȳ)|``-weighted standard error of
    the mean of ``y_i = w_i ψ(t_i)``. For nonlinear φ the plug-in estimate is biased by
    O(1/m). In log space (``measure.log_space``) ``log ȳ`` is a ``logsumexp`` and the error is
    propagated through ``log φ``; ``log_value`` is then exact where ``value`` would overflow.

    The effective sample size is ``(Σu)²/Σu²`` with ``u_i = w_i`` in the linear path and
    ``u_i = w_i ψ(t_i)`` in log space (where ψ > 0, so ``ψ dμ`` is the measure being
    importance-sampled and the ESS shows how well the proposal matches the integrand). The
    Pareto k̂ is fitted to the largest ``|w_i ψ(t_i)|`` (linearised through φ for a vector ψ);
    ``status`` gets ``NONFINITE_LOSS`` (a non-finite t), ``NOT_POSITIVE_DEFINITE`` (a t <= 0
    for a measure that needs a positive definite H) and ``HEAVY_TAILED`` (k̂ above
    ``min(1 − 1/log₁₀ m, 0.7)``, or ``m < 25·g₁²`` with g₁ the terms' skewness: see
    :func:`phipsimu._diagnostics.heavy_tailed`).

    Args:
      measure: the (φ, ψ, μ) triple.
      t: shape ``(m,)``, the quadratic forms (or finite-difference curvatures).
      log_weight: shape ``(m,)``, ``log(dμ/dq)`` at each draw.
      d: the dimension of the perturbed parameters.
      with_stats: compute stderr, ESS and k̂ (skip them inside objectives; NaN then).

    Returns:
      an :class:`Estimate` with ``num_samples = m``.
    """
    m = t.shape[0]
    nan = jnp.full((), jnp.nan, t.dtype)
    status = _diagnostics.flag(~jnp.all(jnp.isfinite(t)), Status.NONFINITE_LOSS)
    if measure.requires_positive_definite:
        # a probe with vᵀHv <= 0 proves H is not positive definite
        status = status | _diagnostics.flag(jnp.any(t <= 0), Status.NOT_POSITIVE_DEFINITE)
    if measure.log_space:
        ell = log_weight + measure.log_psi(t)  # type: ignore[misc]  # log_space: both set
        log_mean = jax.scipy.special.logsumexp(ell) - math.log(m)
        log_value = measure.apply_log_phi(log_mean, d)
        value = jnp.exp(log_value)
        if not with_stats:
            return Estimate(value, nan, log_value, nan, m, nan, status)
        z = jnp.exp(ell - jax.lax.stop_gradient(jnp.max(ell)))
        rel = std_mean(z) / jnp.mean(z)
        slope = jax.grad(lambda s: measure.apply_log_phi(s, d))(log_mean)
        stderr_log = jnp.abs(slope) * rel
        k = _diagnostics.pareto_k(ell)
        status = status | _diagnostics.flag(_diagnostics.heavy_tailed(z, k), Status.HEAVY_TAILED)
        # ψ > 0 here, so w·ψ are the importance weights of the target measure ψ dμ: their
        # ESS shows how well the proposal matches the integrand, not just μ.
        return Estimate(value, value * stderr_log, log_value, ess(ell), m, k, status)

    y = jax.vmap(measure.psi)(t)
    w = jnp.exp(log_weight).reshape((m,) + (1,) * (y.ndim - 1))
    y = w * y
    mean = jnp.mean(y, axis=0)

    def phi(s):
        if measure.phi_unbiased is not None:
            return measure.phi_unbiased(s, m)
        return measure.apply_phi(s, d)

    value = jnp.asarray(phi(mean))
    log_value = jnp.log(value)
    if not with_stats:
        return Estimate(value, nan, log_value, nan, m, nan, status)
    grad = jax.grad(phi)(mean)
    # the terms linearised through φ: their spread is the stderr, their tail is k̂
    lin = jnp.reshape(y, (m, -1)) @ jnp.reshape(grad, (-1,))
    stderr = std_mean(lin)
    k = _diagnostics.pareto_k(jnp.log(jnp.abs(lin)))
    status = status | _diagnostics.flag(_diagnostics.heavy_tailed(lin, k), Status.HEAVY_TAILED)
    return Estimate(value, stderr, log_value, ess(log_weight), m, k, status)


# ---------------------------------------------------------------- presets (Table 1)


def _identity(t):
    return t


def _mean(eigs):
    return jnp.mean(eigs)


def trace(*, mask: Any = None) -> Measure:
    """Tr(H)/d: φ(t) = t, ψ(t) = t, μ = Uniform(S^{d−1}) (Table 1, row 1; §4.1).

    The explicit bias of the average-perturbation objective (Wen et al.).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)
      >>> est = phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=64)(
      ...     jnp.ones(2), key=jax.random.key(0))
      >>> bool(abs(est.value - 2.0) < 4 * est.stderr + 1e-6)
      True
    """
    return Measure(_identity, _identity, _mu.sphere(mask=mask), spectral=_mean, name="trace")


def _det_phi(t, d):
    return jnp.exp(d * _LOG_2PI) / t**2


def _det_log_phi(log_t, d):
    return d * _LOG_2PI - 2.0 * log_t


def _det_psi(t):
    # ∫exp(−½vᵀHv)dv diverges unless H is positive definite; a probe with vᵀHv <= 0
    # certifies that, and the estimate becomes NaN rather than a finite wrong number.
    return jnp.where(t > 0, jnp.exp(-0.5 * t), jnp.nan)


def _det_log_psi(t):
    return jnp.where(t > 0, -0.5 * t, jnp.nan)


def _det_log_spectral(eigs):
    # Eigenvalues within rounding of zero (d·eps·max|λ|) count as zero: a singular PSD Hessian
    # (any zero-loss manifold) has det = 0 exactly, not a tiny negative or positive number.
    tol = eigs.shape[0] * jnp.finfo(eigs.dtype).eps * jnp.max(jnp.abs(eigs))
    lam_min = jnp.min(eigs)
    logdet = jnp.sum(jnp.log(jnp.where(eigs > tol, eigs, 1.0)))
    return jnp.where(lam_min > tol, logdet, jnp.where(lam_min >= -tol, -jnp.inf, jnp.nan))


def _det_spectral(eigs):
    return jnp.exp(_det_log_spectral(eigs))


def determinant(*, scale: float | None = None, mask: Any = None) -> Measure:
    """det(H): φ(t) = (2π)^d/t², ψ(t) = exp(−t/2), μ = Lebesgue on R^d (Table 1; §4.2).

    Evaluated in log space, ``log S = d·log 2π − 2·log ∫exp(−½vᵀHv)dv``, so ``log_value`` is
    finite where ``value`` over- or underflows. The integral converges only for positive
    definite H. Meaning of the results:

    * :func:`phipsimu.sharpness` certifies definiteness with a short Lanczos run (its
      ``check_iterations`` n, exact when n >= d): a smallest Ritz value below
      ``−10·n·eps·max|θ|`` gives NaN (indefinite), one within that tolerance of 0 gives
      value 0 and log_value −inf (singular: the integral diverges and S = det H = 0);
    * a probe with ``vᵀHv <= 0`` also proves H is not positive definite: NaN;
    * the closed form (``exact_sharpness``) gives ``log S = −inf`` (S = 0) for a singular
      positive semi-definite H (eigenvalues within ``d·eps·max|λ|`` of zero count as zero),
      where the integral diverges, and NaN for an indefinite H;
    * with fewer Lanczos steps than d, a negative or zero direction outside the Krylov
      space can be missed; ``Estimate.ess`` then collapses and ``Estimate.pareto_k`` grows
      (they also flag a poorly matched proposal).

    ``Estimate.status`` says which case applied (``NOT_POSITIVE_DEFINITE``, ``SINGULAR |
    DIVERGENT``, ``INFINITE_VARIANCE``, ``HEAVY_TAILED``).

    The proposal N(0, s²I): the weights ``w·ψ`` have finite variance only if
    ``s² > 1/(2·λ_min)``; below that the Monte Carlo error decays slower than 1/√m and the
    reported stderr is too small. ``scale=None`` (default) lets :func:`phipsimu.sharpness`
    pick ``s² = 1/θ_min`` from the smallest Ritz value of its definiteness check
    (``θ_min = λ_min`` when ``check_iterations >= d``, so s² is twice the limit; with fewer
    steps ``θ_min >= λ_min`` and the margin is smaller). On ``H = diag(0.2, 1, 1, 1, 1)``
    with m = 1000 (float64, 200 keys) this covers the exact log det within 1.96 stderr on
    93.5% of keys, where ``s = 1/√(mean eigenvalue)`` covered 65.5% and s = 1 57%, both
    flagged. A user-given ``scale`` with
    ``2·s²·θ_min <= 1`` (certain infinite variance, since θ_min >= λ_min) sets
    ``Status.INFINITE_VARIANCE``. Outside :func:`phipsimu.sharpness` (the objective, Monte
    Carlo in ``exact_sharpness``) ``scale=None`` draws at s = 1.

    Args:
      scale: standard deviation s of the Gaussian proposal, or None (default) to choose it
        from the curvature as above. If you set it, keep ``s² > 1/(2·λ_min)``: about
        ``1/sqrt(λ_min)``, not ``1/sqrt`` of a typical eigenvalue.
      mask: which leaves to perturb.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([2.0, 3.0]) * p**2)  # det H = 6
      >>> est = phipsimu.sharpness(loss, phipsimu.measures.determinant(), num_samples=256)(
      ...     jnp.ones(2), key=jax.random.key(0))
      >>> print(f"{est.value:.2f} ± {est.stderr:.2f}")  # importance sampling, s² = 1/λ_min
      5.78 ± 0.16
      >>> est = phipsimu.exact_sharpness(loss, phipsimu.measures.determinant())(jnp.ones(2))
      >>> round(float(est.value), 4), round(float(est.log_value), 4)  # 6 and log 6
      (6.0, 1.7918)
    """
    return Measure(
        _det_phi,
        _det_psi,
        _mu.lebesgue(scale=scale, mask=mask),
        phi_uses_dim=True,
        log_psi=_det_log_psi,
        log_phi=_det_log_phi,
        spectral=_det_spectral,
        log_spectral=_det_log_spectral,
        requires_positive_definite=True,
        name="determinant",
    )


def gaussian_moments(eigs: jax.Array, n: int) -> jax.Array:
    """``E[(gᵀHg)^n]`` for g ~ N(0, I) from the eigenvalues of H.

    Uses the cumulants ``κ_k = 2^{k−1}(k−1)! Tr(H^k)`` and the moment recursion
    ``m_n = Σ_k C(n−1, k−1) κ_k m_{n−k}``.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> eigs = jnp.array([1.0, 3.0])
      >>> [round(float(phipsimu.measures.gaussian_moments(eigs, n)), 4) for n in (1, 2)]
      [4.0, 36.0]

      (``Tr H = 4`` and ``Tr(H)² + 2 Tr(H²) = 16 + 20``.)
    """
    kappa: list[Any] = [None] + [
        2.0 ** (k - 1) * math.factorial(k - 1) * jnp.sum(eigs**k) for k in range(1, n + 1)
    ]
    moments: list[Any] = [jnp.ones((), eigs.dtype)]
    for j in range(1, n + 1):
        moments.append(
            sum(math.comb(j - 1, k - 1) * kappa[k] * moments[j - k] for k in range(1, j + 1))
        )
    return moments[n]


def sphere_moment(eigs: jax.Array, n: int) -> jax.Array:
    """``p(λ) = E_sphere[(vᵀHv)^n] = E_gauss[(gᵀHg)^n] / ∏_{j<n}(d + 2j)``.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> eigs = jnp.array([1.0, 3.0])
      >>> [round(float(phipsimu.measures.sphere_moment(eigs, n)), 4) for n in (1, 2)]
      [2.0, 4.5]

      (``Tr(H)/d = 4/2`` and ``36/(d(d + 2)) = 36/8``.)

    Reference: docs/conventions.md, "Table 1 presets".
    """
    d = eigs.shape[0]
    return gaussian_moments(eigs, n) / math.prod(d + 2 * j for j in range(n))


@dataclasses.dataclass(frozen=True)
class _Power:
    n: int

    def __call__(self, t):
        return t**self.n


@dataclasses.dataclass(frozen=True)
class _SphereMomentClosedForm:
    n: int
    phi: Callable[[Any], Any]

    def __call__(self, eigs):
        return self.phi(sphere_moment(eigs, self.n))


def eigen_moment(n: int, *, phi: Callable[[Any], Any] = _identity, mask: Any = None) -> Measure:
    """φ(p(λ)) with ψ(t) = tⁿ, μ = Uniform(S^{d−1}) (Table 1, row 3; §4.3).

    ``p(λ) = E_sphere[(Σᵢ λᵢ vᵢ²)ⁿ]``; for n = 2, ``(Tr(H)² + 2 Tr(H²)) / (d(d+2))``.

    Args:
      n: the power, an int >= 1.
      phi: any JAX-traceable scalar function (default: identity).
      mask: which leaves to perturb.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)  # H = diag(1, 3)
      >>> measure = phipsimu.measures.eigen_moment(2)
      >>> round(float(phipsimu.exact_sharpness(loss, measure)(jnp.ones(2)).value), 4)
      4.5
      >>> est = phipsimu.sharpness(loss, measure, num_samples=256)(
      ...     jnp.ones(2), key=jax.random.key(0))
      >>> print(f"{est.value:.2f} ± {est.stderr:.2f}")  # Monte Carlo, E[(vᵀHv)²] on the sphere
      4.27 ± 0.17
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: must be an int >= 1")
    if not callable(phi):
        raise TypeError(f"phi={phi!r}: must be a callable")
    return Measure(
        phi,
        _Power(n),
        _mu.sphere(mask=mask),
        spectral=_SphereMomentClosedForm(n, phi),
        name=f"eigen_moment_{n}",
    )


def _frob_psi(t):
    return jnp.stack([t, t**2])


def _frob_phi(s):
    return 0.5 * (s[1] - s[0] ** 2)


def _frob_phi_unbiased(s, m):
    # The plug-in mean(t²) − mean(t)² is the variance with denominator m; rescale to m − 1.
    return _frob_phi(s) * (m / (m - 1)) if m > 1 else jnp.full((), jnp.nan, s.dtype)


def _frob_spectral(eigs):
    return jnp.sum(eigs**2)


def frobenius(*, mask: Any = None) -> Measure:
    """‖H‖_F² with a vector-valued ψ: ψ(t) = (t, t²), φ(a, b) = (b − a²)/2, μ = N(0, I).

    ``E[(gᵀHg)²] = Tr(H)² + 2‖H‖_F²`` so ``Var[gᵀHg]/2 = ‖H‖_F²`` (docs/conventions.md,
    "Frobenius"). The estimate
    uses the unbiased sample variance (denominator m − 1), not the plug-in, which is biased
    by (m − 1)/m. Needs at least 2 samples.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)  # ‖H‖_F² = 1 + 9
      >>> measure = phipsimu.measures.frobenius()
      >>> round(float(phipsimu.exact_sharpness(loss, measure)(jnp.ones(2)).value), 4)
      10.0
      >>> est = phipsimu.sharpness(loss, measure, num_samples=256)(
      ...     jnp.ones(2), key=jax.random.key(0))
      >>> print(f"{est.value:.2f} ± {est.stderr:.2f}")  # Monte Carlo, Var[gᵀHg]/2
      7.94 ± 2.06
    """
    return Measure(
        _frob_phi,
        _frob_psi,
        _mu.gaussian(mask=mask),
        phi_unbiased=_frob_phi_unbiased,
        spectral=_frob_spectral,
        name="frobenius",
    )


# ---------------------------------------------------------------- Theorem 1 preset


def _gauss_product_log_f(sign, log_abs_prod):
    # f(t) = exp(−t²), so log f = −t² = −exp(2·log|t|): even, and finite for any product.
    del sign
    return -jnp.exp(2.0 * log_abs_prod)


def _gauss_psi(t):
    return jnp.exp(-0.5 * t)


def _gauss_log_psi(t):
    return -0.5 * t


def _reciprocal(t):
    return 1.0 / t


def _negate(log_t):
    return -log_t


def invariant_gaussian(
    *,
    scale: float = 1.0,
    groups: Any = None,
    eps: float = _mu.DEFAULT_EPS,
    mask: Any = None,
) -> Measure:
    """A scale-invariant measure (Theorem 1), finite on zero-loss manifolds whose null
    directions are not coordinate axes; 0 (divergent) where a parameter has no effect.

    .. math::
       S(x) = \\Big(\\int \\exp\\big(-\\tfrac12 v^\\top H v\\big)\\,
       \\prod_g \\exp\\Big(-\\Big(\\prod_{i \\in g} v_i\\Big)^2\\Big)\\, dv\\Big)^{-1}

    ψ(t) = exp(−t/2), μ = :func:`phipsimu.mu.product_density` with f(t) = exp(−t²), and
    φ(t) = 1/t, so ``log S = −log ∫ψ dμ`` (the "φ = −log" of the issue is ``log_value``).
    φ = 1/t was chosen because S must grow with the curvature (the integral shrinks as H
    grows) and stay positive, which the log-space reduction needs; like the determinant's
    ``(2π)^d/t²``, it is evaluated entirely in log space.

    Invariant under every positive diagonal D with ``L(Dx) = L(x)`` and det D = 1 (within
    each group, if ``groups`` is given), and, with the equivariant proposal, the same key
    gives the same estimate at x and Dx sample by sample. Unlike the determinant (f ≡ 1),
    which is 0 on any zero-loss manifold, the factor f damps the null directions of H that
    are not coordinate axes: on Example 1, ``∫ψ dμ ≈ 3.397`` at every point (k, 1/k) of the
    manifold x₁x₂ = 1 (2-D quadrature; importance sampling gives ≈ 3.40),
    so S ≈ 0.294 there.

    When it diverges (docs/conventions.md, section "Diagnostics"): f ≤ 1, so the integral is
    finite when H is positive definite. Where one coordinate of every group is 0, each
    group's product is 0 and f = 1: on that subspace the integrand is ``exp(−½uᵀH_KK u)``,
    K the remaining coordinates, and if ``H_KK`` has a negative eigenvalue the integral is
    infinite and S = 0. With G groups that happens for every such K once H has more than G
    negative eigenvalues (Cauchy interlacing), the normal case for a network away from a
    minimum. :func:`phipsimu.sharpness` runs ``check_iterations`` Lanczos steps on
    ``T H T``, ``T = diag(max(|x|, eps))`` (H's inertia by Sylvester's law, and the same
    matrix, Ritz values and tolerance at x and at every rescaled point Dx, so the verdict is
    invariant too) and, when the (G+1)-th smallest Ritz value is negative (a proof, since
    ``θ_k >= λ_k``), returns value 0, ``log_value = −inf`` and ``Status.DIVERGENT``, never a
    finite Monte Carlo number. When H is indefinite or singular without that proof the
    integral may be finite or not (on Example 1's manifold H is singular and the integral is
    finite) and the value comes with ``Status.NOT_VERIFIED_FINITE``. No closed form exists:
    ``exact_sharpness`` estimates it on the dense Hessian (needs a key) with the same check
    on the eigenvalues of ``T H T``.

    Zero curvature along a coordinate: if ``H eᵢ = 0`` (a parameter without effect on the
    loss: a weight on an input that is zero in every example, a dead unit's weights) and
    i's group has two or more coordinates, integrating f over vᵢ leaves
    ``c/|∏_{j≠i} vⱼ|``, which is not integrable: the integral is infinite and S = 0
    whatever a finite sample says. The estimators find exact zero rows from one extra
    product with the check's start vector (``(Hg)ᵢ = 0`` for a Gaussian g only if
    ``H eᵢ = 0``, almost surely) and return 0 / −inf with ``DIVERGENT | ZERO_CURVATURE``,
    naming the coordinates in ``Estimate.null_coordinates`` and ``reasons()``. So the
    measure is finite on a zero-loss manifold only where no parameter is idle: mask such
    parameters out (``mask=``) or drop them from the model.

    Args:
      scale: σ of the equivariant proposal. σ = 1 matches Example 1 (ESS ≈ 63% of draws).
      groups: group ids (see :func:`phipsimu.mu.product_density`); f then applies to every
        group's product.
      eps: floor of the proposal's metric ``max(|x|, eps)``.
      mask: which leaves to perturb.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda x: (x[0] * x[1] - 1.0) ** 2  # Example 1
      >>> fn = phipsimu.sharpness(loss, phipsimu.measures.invariant_gaussian(), num_samples=256)
      >>> a = fn(jnp.array([1.0, 1.0]), key=jax.random.key(0))
      >>> b = fn(jnp.array([4.0, 0.25]), key=jax.random.key(0))
      >>> bool(jnp.allclose(a.value, b.value, rtol=1e-5))
      True

    Reference: Tahmasebi et al., Theorem 1; docs/conventions.md, "Theorem 1".
    """
    return Measure(
        _reciprocal,
        _gauss_psi,
        _mu.product_density(_gauss_product_log_f, scale=scale, groups=groups, eps=eps, mask=mask),
        log_psi=_gauss_log_psi,
        log_phi=_negate,
        may_diverge=True,
        name="invariant_gaussian",
    )


def _certify_definite(est: Estimate, indefinite: jax.Array, singular: jax.Array) -> Estimate:
    """A determinant-type estimate: NaN where H is indefinite, 0 / −inf where singular."""
    nan = jnp.full_like(est.value, jnp.nan)
    value = jnp.where(indefinite, nan, jnp.where(singular, 0.0, est.value))
    log_value = jnp.where(indefinite, nan, jnp.where(singular, -jnp.inf, est.log_value))
    stderr = jnp.where(indefinite, nan, jnp.where(singular, 0.0, est.stderr))
    status = (
        est.status
        | _diagnostics.flag(indefinite, Status.NOT_POSITIVE_DEFINITE)
        | _diagnostics.flag(singular & ~indefinite, Status.SINGULAR | Status.DIVERGENT)
    )
    return est._replace(value=value, stderr=stderr, log_value=log_value, status=status)


def _certify_finite(
    est: Estimate, theta: jax.Array, tol: Any, singular: jax.Array, groups: int, null: Any
) -> Estimate:
    """Status and value of a product-density measure from the ascending eigenvalues or Ritz
    values θ of the measured operator (docs/conventions.md, section "Product-density
    integrals")."""
    # Product densities (Theorem 1): finite when H is positive definite (f <= 1). With
    # more than G negative eigenvalues (G groups), every principal submatrix left after
    # zeroing one coordinate per group is indefinite (Cauchy interlacing), f = 1 on that
    # subspace and the integral is infinite: S = 0. θ_{G+1} < −tol proves it.
    indefinite = theta[0] < -tol
    divergent = theta[groups] < -tol if theta.shape[0] > groups else jnp.zeros((), bool)
    divergent = divergent | null
    unverified = indefinite | singular
    value = jnp.where(divergent, 0.0, est.value)
    log_value = jnp.where(divergent, -jnp.inf, est.log_value)
    stderr = jnp.where(divergent, 0.0, est.stderr)
    status = (
        est.status
        | _diagnostics.flag(indefinite, Status.NOT_POSITIVE_DEFINITE)
        | _diagnostics.flag(singular, Status.SINGULAR)
        | _diagnostics.flag(divergent, Status.DIVERGENT)
        | _diagnostics.flag(unverified & ~divergent, Status.NOT_VERIFIED_FINITE)
    )
    return est._replace(value=value, stderr=stderr, log_value=log_value, status=status)
