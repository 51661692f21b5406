"""Finite-radius sharpness: the worst case over a ball (projected gradient ascent with
momentum, step-size control and restarts), the average over a sampled perturbation, and the
PAC-Bayes σ (the largest Gaussian perturbation whose expected loss stays within a threshold).

All three perturb in the metric ``T``: ``T = I``, or ``T = diag(|x| + eta)`` with
``adaptive=True`` (ASAM's metric). With ``eta = 0`` the adaptive forms are invariant under
every positive diagonal rescaling ``x ↦ Dx`` that leaves the loss unchanged (the
perturbation ``T_x u`` becomes ``D T_x u``, so every loss evaluated is the same).

References: Andriushchenko, Croce, Müller, Hein & Flammarion, "A modern look at the
relationship between sharpness and generalization", ICML 2023 (worst-case and average-case
adaptive sharpness); Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020 (auto-PGD); Jiang, Neyshabur,
Mobahi, Krishnan & Bengio, "Fantastic generalization measures and where to find them",
ICLR 2020 (the PAC-Bayes σ search); docs/conventions.md, section "Finite-radius
sharpness".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from phipsimu import _checks, _curvature, _diagnostics, _execution, _measure, _mu, _tree
from phipsimu._diagnostics import Status
from phipsimu._measure import Estimate

PyTree = Any

_NORMS = ("l2", "linf")

#: the momentum weight of auto-PGD (Croce & Hein 2020, eq. 2)
_ALPHA = 0.75
#: auto-PGD halves the step when fewer than this fraction of a window's steps rose
_RISE_FRACTION = 0.75


def _check_metric(rho_name: str, rho: Any, adaptive: Any, eta: Any) -> float:
    _checks.flag("adaptive", adaptive)
    _checks.real("eta", eta, lo=0.0, strict=False)
    return float(_checks.real(rho_name, rho, lo=0.0, strict=True))


def _metric(params: PyTree, perturbed: tuple, adaptive: bool, eta: float) -> list:
    """``T`` on the perturbed leaves: ``|x| + eta`` (adaptive) or ones."""
    if adaptive:
        return _curvature.adaptive_metric(params, eta, perturbed)
    return [jnp.ones_like(x) for x in _tree.active(params, perturbed)]


def _sweep(fn: Callable[..., Any], args: tuple, batches: Any) -> Any:
    """``fn(*args)`` on one batch, or its batch-size-weighted mean over ``batches``."""
    if batches is None:
        return fn(*args)
    _curvature.check_batches(batches)
    if args:
        raise ValueError(
            f"args: with batches=..., every loss_fn argument comes from the batch; got "
            f"{len(args)} extra positional argument(s)"
        )
    return _curvature.dataset_mean(fn, batches)


def _check_call(loss_fn: Any, params: PyTree, args: tuple, key: Any, batches: Any) -> None:
    _checks.check_key(key)
    _checks.check_params(params)
    if batches is None:
        _checks.check_scalar_loss(loss_fn, params, args)


# ---------------------------------------------------------------- average case


def _differences(
    loss_fn: Callable[..., Any],
    sampler: _mu.Sampler,
    params: PyTree,
    args: tuple,
    key: jax.Array,
    scale: Any,
    *,
    num: int,
    adaptive: bool,
    eta: float,
    antithetic: bool,
    chunk_size: int | None,
    slopes: bool = False,
) -> Any:
    """Per-sample ``L(x + s·T v_i) − L(x)`` (the mean of ``±v_i`` with ``antithetic``) for
    ``num`` draws ``v_i`` of ``sampler`` (draw i from ``fold_in(key, i)``), evaluated in
    chunks; with ``slopes`` also their derivatives in ``s``."""
    perturbed, _ = sampler.layout(params)
    # 16-bit leaves in float32 copies, as in the eq. 10 term (docs/conventions.md, "Low
    # precision"): rounded to 16 bits, x + s·Tv would leave small moves undone
    params = _tree.widen(params, perturbed)
    x, merge = _tree.split(params, perturbed)
    t = _metric(params, perturbed, adaptive, eta)
    dtype = _tree.accum_dtype(params, perturbed)
    base = jnp.asarray(loss_fn(params, *args)).astype(dtype)

    def one(i: jax.Array) -> Any:
        draw = sampler.draw_at(key, params, i[None], adaptive=adaptive)
        v = [(a[0] * ti).astype(a.dtype) for a, ti in zip(draw.active(), t)]

        def at(s: Any) -> jax.Array:
            moved = [(xi + s * vi).astype(xi.dtype) for xi, vi in zip(x, v)]
            return jnp.asarray(loss_fn(merge(moved), *args)).astype(dtype)

        def diff(s: Any) -> jax.Array:
            if antithetic:
                return 0.5 * (at(s) + at(-s)) - base
            return at(s) - base

        s0 = jnp.asarray(scale, dtype)
        if slopes:
            return jax.jvp(diff, (s0,), (jnp.ones_like(s0),))
        return diff(s0)

    chunk = _execution.chunk_for(chunk_size, num, _execution.leaf_bytes(x))
    return _execution.chunked_map(one, jnp.arange(num), chunk)


def _check_probability(mu: Any) -> _mu.Sampler:
    if not isinstance(mu, (_mu.Sphere, _mu.Gaussian, _mu.Rademacher)):
        raise TypeError(
            f"mu={mu!r}: must be a probability measure to average over: phipsimu.mu.sphere(), "
            "phipsimu.mu.gaussian() or phipsimu.mu.rademacher()"
        )
    return mu


def _check_pairs(num_samples: Any, antithetic: Any) -> int:
    _checks.flag("antithetic", antithetic)
    if antithetic:
        _checks.integer("num_samples", num_samples, lo=4)
        if num_samples % 2:
            raise ValueError(
                f"num_samples={num_samples}: antithetic=True evaluates pairs (v, −v); use an "
                "even number >= 4"
            )
        return num_samples // 2
    _checks.integer("num_samples", num_samples, lo=2)
    return num_samples


@_execution.cached_factory
def average_sharpness(
    loss_fn: Callable[..., Any],
    *,
    rho: float,
    num_samples: int,
    mu: _mu.Sampler | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    antithetic: bool = False,
    chunk_size: int | None = None,
) -> Callable[..., Estimate]:
    """Average-case sharpness at radius ρ, by Monte Carlo with a standard error.

    .. math:: S_{\\text{avg}}(x) = \\mathbb E_{v \\sim \\mu}\\big[L(x + \\rho\\, T v)\\big]
       - L(x), \\qquad T = \\operatorname{diag}(|x| + \\eta) \\text{ (adaptive) or } I

    Each sample is one loss evaluation (two with ``antithetic``), no derivatives. At a
    minimum of a quadratic with Hessian H and μ the unit sphere,
    ``S_avg = ρ² Tr(THT) / (2d)``; for μ = N(0, I), ``ρ² Tr(THT) / 2``. With
    ``adaptive=True, eta=0`` the value is invariant under loss-preserving rescalings
    ``x ↦ Dx`` (sample by sample, for the same key).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      rho: the radius ρ (> 0).
      num_samples: perturbations m (>= 2; with ``antithetic`` an even number >= 4).
      mu: the distribution of v: ``phipsimu.mu.sphere()`` (default), ``gaussian()`` or
        ``rademacher()``; its ``mask`` says which leaves are perturbed. Draw i comes from
        ``fold_in(key, i)``.
      adaptive: perturb ``x + ρ T_x v`` with ``T_x = |x| + eta``.
      eta: the metric's floor (>= 0); only with ``adaptive=True``.
      antithetic: evaluate ``v`` and ``−v`` (m/2 pairs; the standard error is over pairs).
        Cancels the odd terms of the loss around x, the gradient among them.
      chunk_size: perturbations evaluated at once (None: the execution layer's default);
        memory holds one chunk, whatever ``num_samples``.

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate`` with the mean loss
      difference, its standard error over samples (pairs), Pareto k̂ of the differences and
      ``status``. With ``batches`` (an iterable of batches, or a zero-argument callable
      returning one) each difference is that of the dataset mean loss (batch-size weighted;
      the same perturbations on every batch).

    Raises:
      ValueError / TypeError: on bad hyperparameters (here), a non-scalar loss, a bad key.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)
      >>> est = phipsimu.average_sharpness(loss, rho=0.1, num_samples=64)(
      ...     jnp.zeros(2), key=jax.random.key(0))
      >>> bool(abs(est.value - 0.01 * 4.0 / 4) < 4 * est.stderr + 1e-7)
      True
    """
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args) -> scalar")
    rho = _check_metric("rho", rho, adaptive, eta)
    sampler = _check_probability(_mu.sphere() if mu is None else mu)
    pairs = _check_pairs(num_samples, antithetic)
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
    eta = float(eta)

    def diffs(params: PyTree, args: tuple, key: jax.Array) -> jax.Array:
        return _differences(
            loss_fn,
            sampler,
            params,
            args,
            key,
            rho,
            num=pairs,
            adaptive=adaptive,
            eta=eta,
            antithetic=antithetic,
            chunk_size=chunk_size,
        )

    diffs_jit = jax.jit(diffs)

    def estimate(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> Estimate:
        _check_call(loss_fn, params, args, key, batches)
        if batches is None:
            d = diffs(params, args, key)
        else:
            d = _sweep(lambda *b: diffs_jit(params, b, key), args, batches)
        return _measure.sample_mean(d)._replace(num_samples=num_samples)

    return _execution.eager_jit(estimate)


# ---------------------------------------------------------------- PAC-Bayes σ


@_execution.cached_factory
def pac_bayes_sigma(
    loss_fn: Callable[..., Any],
    *,
    threshold: float,
    num_samples: int,
    sigma_min: float = 1e-5,
    sigma_max: float = 1.0,
    num_bisections: int = 20,
    adaptive: bool = False,
    eta: float = 0.0,
    antithetic: bool = False,
    mask: Any = None,
    chunk_size: int | None = None,
) -> Callable[..., Estimate]:
    """PAC-Bayes flatness: the largest σ whose Gaussian perturbation raises the expected loss
    by at most ``threshold``, with the Monte Carlo error of σ.

    .. math:: \\sigma^* = \\max\\{\\sigma :\\ \\mathbb E_{z \\sim N(0, I)}
       [L(x + \\sigma T z)] - L(x) \\le \\text{threshold}\\}

    σ is the **standard deviation** of the perturbation ``σ T z ~ N(0, σ² T²)`` (not its
    variance), ``T = diag(|x| + eta)`` with ``adaptive=True`` (``eta = 0``: invariant under
    loss-preserving rescalings) and ``I`` otherwise. At a minimum of a quadratic
    ``E[L(x + σTz)] − L(x) = σ² Tr(THT)/2``, so ``σ* = (2·threshold/Tr(THT))^{1/2}``. A
    flatter minimum has a larger σ* (the PAC-Bayes bound's KL term ``‖x‖²/(2σ²)`` is smaller).

    The search bisects ``log σ`` on ``[sigma_min, sigma_max]`` with the same m draws z_i at
    every σ (common random numbers: the estimated gap is a smooth function of σ), and returns
    the largest σ tested within the threshold. It finds a crossing; if the gap is not
    increasing in σ it need not be the largest one. The standard error is the delta method
    through the root: ``se(gap(σ*)) / |d gap/dσ (σ*)|``, the slope from forward-mode
    derivatives of the same m samples.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (a loss, or an error rate to bound the
        accuracy drop).
      threshold: the largest allowed rise of the expected loss (> 0).
      num_samples: draws z_i (>= 2; with ``antithetic`` an even number >= 4).
      sigma_min, sigma_max: the searched range (0 < sigma_min < sigma_max).
      num_bisections: bisection steps (>= 1); the bracket's relative width is
        ``(sigma_max/sigma_min)^(2^-num_bisections)``.
      adaptive, eta, antithetic, chunk_size: as in :func:`average_sharpness`.
      mask: which leaves are perturbed (a pytree of bools or a callable; None: all floating
        leaves).

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate`` with ``value`` = σ*,
      ``log_value = log σ*`` and its standard error. ``status`` has
      ``Status.AT_SEARCH_BOUND`` when the answer is outside the range (then ``value`` is
      ``sigma_max``, a lower bound on σ*, or ``sigma_min``, an upper bound), and
      ``NONFINITE_LOSS`` when a loss was not finite.

    Raises:
      ValueError / TypeError: on bad hyperparameters (here), a non-scalar loss, a bad key.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(p**2)
      >>> est = phipsimu.pac_bayes_sigma(loss, threshold=0.01, num_samples=64)(
      ...     jnp.zeros(2), key=jax.random.key(0))
      >>> bool(abs(est.value - 0.1) < 4 * est.stderr)
      True

    Reference: Jiang et al. (ICLR 2020), "Fantastic generalization measures", the
    sharpness/PAC-Bayes flatness measures (their σ' search).
    """
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args) -> scalar")
    threshold = _check_metric("threshold", threshold, adaptive, eta)
    lo = _checks.real("sigma_min", sigma_min, lo=0.0, strict=True)
    hi = _checks.real("sigma_max", sigma_max, lo=0.0, strict=True)
    if not lo < hi:
        raise ValueError(
            f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}: need sigma_min < sigma_max"
        )
    _checks.integer("num_bisections", num_bisections, lo=1)
    pairs = _check_pairs(num_samples, antithetic)
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
    sampler = _mu.gaussian(mask=mask)
    eta = float(eta)

    def diffs(params: PyTree, args: tuple, key: jax.Array, sigma: Any, slopes: bool) -> Any:
        return _differences(
            loss_fn,
            sampler,
            params,
            args,
            key,
            sigma,
            num=pairs,
            adaptive=adaptive,
            eta=eta,
            antithetic=antithetic,
            chunk_size=chunk_size,
            slopes=slopes,
        )

    diffs_jit = jax.jit(diffs, static_argnums=4)

    def search(gap: Callable[[Any], Any], host: bool) -> tuple[Any, Any]:
        """``(log σ*, flag)``: bisection on log σ of ``gap(σ) <= threshold``."""
        log_lo, log_hi = math.log(lo), math.log(hi)
        g_lo, g_hi = gap(lo), gap(hi)
        below = g_lo > threshold  # even sigma_min exceeds the threshold
        above = g_hi <= threshold  # even sigma_max stays within it
        bad = ~jnp.isfinite(g_lo) | ~jnp.isfinite(g_hi)

        def bisect(_: Any, bracket: tuple) -> tuple:
            a, b = bracket
            mid = 0.5 * (a + b)
            ok = gap(jnp.exp(mid)) <= threshold
            return jnp.where(ok, mid, a), jnp.where(ok, b, mid)

        bracket = (jnp.asarray(log_lo), jnp.asarray(log_hi))
        if host:
            for i in range(num_bisections):
                bracket = bisect(i, bracket)
        else:
            bracket = jax.lax.fori_loop(0, num_bisections, bisect, bracket)
        log_s = jnp.where(above, log_hi, jnp.where(below, log_lo, bracket[0]))
        flag = _diagnostics.flag((below | above) & ~bad, Status.AT_SEARCH_BOUND)
        return log_s, flag

    def estimate(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> Estimate:
        _check_call(loss_fn, params, args, key, batches)
        if batches is None:

            def at(sigma: Any, slopes: bool = False) -> Any:
                return diffs(params, args, key, sigma, slopes)
        else:

            def at(sigma: Any, slopes: bool = False) -> Any:
                return _sweep(lambda *b: diffs_jit(params, b, key, sigma, slopes), args, batches)

        log_s, flag = search(lambda s: jnp.mean(at(s)), batches is not None)
        sigma = jnp.exp(log_s)
        d, slope = at(sigma, True)
        gap = _measure.sample_mean(d)
        stderr = gap.stderr / jnp.abs(jnp.mean(slope))
        status = gap.status | flag
        finite = jnp.all(jnp.isfinite(d)) & jnp.all(jnp.isfinite(slope))
        est = Estimate(
            sigma, stderr, log_s, gap.ess, num_samples, gap.pareto_k, status.astype(jnp.int32)
        )
        return _measure.nonfinite(est, ~finite)

    return _execution.eager_jit(estimate)


# ---------------------------------------------------------------- worst case


class Ascent(NamedTuple):
    """What the ascent of :func:`phipsimu.worst_case_sharpness` found
    (``return_maximiser=True``).

    Attributes:
      perturbation: δ of the best restart, a pytree shaped like params (zeros on leaves that
        are not perturbed; float32 for 16-bit leaves, whose points are evaluated in float32
        copies): ``params + perturbation`` is the maximiser found, within the ball
        ``‖T⁻¹δ‖ <= ρ``.
      restart_values: shape ``(num_restarts,)``, each restart's best ``L(x+δ) − L(x)``.
      converged: shape ``(num_restarts,)``, whether each restart's best value rose by at
        most ``rtol`` (relative) over its last window of steps.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)  # λ_max along e₂
      >>> est, ascent = phipsimu.worst_case_sharpness(loss, rho=0.1, return_maximiser=True)(
      ...     jnp.zeros(2), key=jax.random.key(0))
      >>> [round(float(x), 4) for x in jnp.abs(ascent.perturbation)]  # δ = ±ρ e₂
      [0.0, 0.1]
      >>> [round(float(v), 4) for v in ascent.restart_values]  # each ρ²·3/2
      [0.015, 0.015, 0.015, 0.015]
      >>> bool(ascent.converged.all())
      True
    """

    perturbation: PyTree
    restart_values: jax.Array
    converged: jax.Array


class _State(NamedTuple):
    u: list  # the iterate, in units of T (δ = T u)
    u_prev: list
    u_best: list
    f_best: jax.Array
    f_prev: jax.Array
    step: jax.Array  # the step size, in units of ρ-sized moves
    rises: jax.Array  # steps in the current window whose loss rose
    f_check: jax.Array  # the best value at the last checkpoint
    reduced: jax.Array  # whether the step was halved at the last checkpoint


@_execution.cached_factory
def worst_case_sharpness(
    loss_fn: Callable[..., Any],
    *,
    rho: float,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    num_steps: int = 20,
    num_restarts: int = 4,
    step_size: float = 2.0,
    rtol: float = 1e-3,
    mask: Any = None,
    chunk_size: int | None = None,
    return_maximiser: bool = False,
) -> Callable[..., Any]:
    """Worst-case sharpness at radius ρ, by projected gradient ascent (auto-PGD).

    .. math:: S_{\\max}(x) = \\max_{\\|T^{-1}\\delta\\|_p \\le \\rho} L(x + \\delta) - L(x),
       \\qquad T = \\operatorname{diag}(|x| + \\eta) \\text{ (adaptive) or } I

    The ascent runs on ``u = T⁻¹δ`` in the ball ``‖u‖_p <= ρ`` (p = 2 or ∞): a step along the
    normalised gradient (l2) or its sign (l∞), projected, then momentum
    ``u ← P(u + α(z − u) + (1 − α)(u − u_prev))`` with α = 0.75; every ``num_steps // 5``
    steps (a window) the step is halved and the ascent restarts from its best point when
    fewer than 75% of the window's steps raised the loss, or when the best value did not
    rise and the step was not halved at the previous checkpoint (Croce & Hein 2020). Restart
    r starts from a random point at radius ρ/2 (a direction on the l2 sphere, or a corner of
    the l∞ box, drawn from ``fold_in(key, r)``: a minimum has no gradient to start from); the
    value is the best over restarts. Costs ``num_steps × num_restarts`` gradients.

    The value is a **lower bound** of the maximum (an ascent finds a local maximum); its
    ``stderr`` is NaN (it is not a Monte Carlo estimate). At a minimum of a quadratic with
    Hessian H the maximum is ``ρ² λ_max(THT)/2`` (l2), and ``ρ² Σᵢ Tᵢᵢ² hᵢ/2`` (l∞, H
    diagonal). With ``adaptive=True, eta=0`` the value is invariant under loss-preserving
    rescalings ``x ↦ Dx`` (the ascent sees the same function of u).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      rho: the radius ρ (> 0).
      norm: ``"l2"`` or ``"linf"``: the norm of ``T⁻¹δ``.
      adaptive: ``T = |x| + eta`` instead of the identity.
      eta: the metric's floor (>= 0); only with ``adaptive=True``.
      num_steps: ascent steps per restart (>= 2), one gradient each.
      num_restarts: independent restarts (>= 1).
      step_size: the first step, in units of ρ (> 0; auto-PGD's 2).
      rtol: a restart has converged when its best value rose by at most ``rtol`` times the
        value over its last window (> 0).
      mask: which leaves are perturbed (a pytree of bools or a callable; None: all floating
        leaves).
      chunk_size: restarts evaluated at once (None: the execution layer's default).
      return_maximiser: also return an :class:`phipsimu.Ascent` (the maximiser, the
        per-restart values and convergence).

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate`` (or ``(Estimate, Ascent)``
      with ``return_maximiser``): ``value`` the best ``L(x+δ) − L(x)`` found; ``stderr``,
      ``ess`` and ``pareto_k`` NaN; ``num_samples`` the number of restarts; ``status`` with
      ``Status.NOT_CONVERGED`` when the best restart had not converged and
      ``NONFINITE_LOSS`` when a loss was not finite. With ``batches`` each step's loss and
      gradient are those of the dataset mean (one sweep per step, a Python loop).

    Raises:
      ValueError / TypeError: on bad hyperparameters (here), a non-scalar loss, a bad key.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)
      >>> est = phipsimu.worst_case_sharpness(loss, rho=0.1)(jnp.zeros(2), key=jax.random.key(0))
      >>> round(float(est.value), 6)  # ρ² λ_max / 2
      0.015

    Reference: Andriushchenko et al. (ICML 2023), eq. 1; Croce & Hein (ICML 2020), Alg. 1.
    """
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args) -> scalar")
    rho = _check_metric("rho", rho, adaptive, eta)
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r}: must be one of {_NORMS}")
    _checks.integer("num_steps", num_steps, lo=2)
    _checks.integer("num_restarts", num_restarts, lo=1)
    step_size = _checks.real("step_size", step_size, lo=0.0, strict=True)
    rtol = _checks.real("rtol", rtol, lo=0.0, strict=True)
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
    _checks.flag("return_maximiser", return_maximiser)
    eta = float(eta)
    window = max(1, num_steps // 5)
    start = _mu.sphere(mask=mask) if norm == "l2" else _mu.rademacher(mask=mask)

    def project(u: list) -> list:
        if norm == "linf":
            return [jnp.clip(a, -rho, rho).astype(a.dtype) for a in u]
        n = jnp.sqrt(_tree.sq_norm(u))
        s = jnp.minimum(1.0, rho / jnp.where(n > 0, n, 1.0))
        return [(a * s).astype(a.dtype) for a in u]

    def direction(g: list) -> list:
        if norm == "linf":
            return [jnp.sign(a) for a in g]
        n = jnp.sqrt(_tree.sq_norm(g))
        return [(a / jnp.where(n > 0, n, 1.0)).astype(a.dtype) for a in g]

    def value_and_grads(params: PyTree, args: tuple, u: list) -> tuple:
        """Loss and gradient in u at every restart (u with a leading restart axis)."""
        perturbed = start.perturbed(params)
        x, merge = _tree.split(params, perturbed)
        t = _metric(params, perturbed, adaptive, eta)
        dtype = _tree.accum_dtype(params, perturbed)

        def f(ur: list) -> jax.Array:
            moved = [(xi + ti * ui).astype(xi.dtype) for xi, ti, ui in zip(x, t, ur)]
            return jnp.asarray(loss_fn(merge(moved), *args)).astype(dtype)

        chunk = _execution.chunk_for(chunk_size, num_restarts, _execution.leaf_bytes(x))
        return _execution.chunked_map(jax.value_and_grad(f), u, chunk)

    def step(s: _State, f: jax.Array, g: list, k: jax.Array) -> _State:
        """One auto-PGD step of one restart, given the loss and gradient at ``s.u``."""
        better = f > s.f_best
        u_best = [jnp.where(better, a, b) for a, b in zip(s.u, s.u_best)]
        f_best = jnp.where(better, f, s.f_best)
        rises = s.rises + (f > s.f_prev).astype(s.rises.dtype)
        z = project([a + s.step * rho * d for a, d in zip(s.u, direction(g))])
        moved = project(
            [a + _ALPHA * (b - a) + (1 - _ALPHA) * (a - c) for a, b, c in zip(s.u, z, s.u_prev)]
        )
        u_new = [jnp.where(k == 0, b, a) for a, b in zip(moved, z)]
        check = (k + 1) % window == 0
        halve = check & ((rises < _RISE_FRACTION * window) | (~s.reduced & (f_best <= s.f_check)))
        u_new = [jnp.where(halve, b, a).astype(b.dtype) for a, b in zip(u_new, u_best)]
        u_prev = [jnp.where(halve, b, a) for a, b in zip(s.u, u_best)]
        return _State(
            u=u_new,
            u_prev=u_prev,
            u_best=u_best,
            f_best=f_best,
            f_prev=f,
            step=jnp.where(halve, 0.5 * s.step, s.step),
            rises=jnp.where(check, 0, rises),
            f_check=jnp.where(check, f_best, s.f_check),
            reduced=jnp.where(check, halve, s.reduced),
        )

    steps = jax.vmap(step, in_axes=(0, 0, 0, None))

    def init(params: PyTree, key: jax.Array) -> _State:
        draw = start.draw_at(key, params, jnp.arange(num_restarts))
        # the iterate in at least float32: 16-bit params would round the ascent's small steps
        dtype = _tree.accum_dtype(params, draw.perturbed)
        u = [(0.5 * rho * a).astype(jnp.promote_types(a.dtype, dtype)) for a in draw.active()]
        n = (num_restarts,)
        ninf = jnp.full(n, -jnp.inf, dtype)
        return _State(
            u, u, u, ninf, ninf, jnp.full(n, step_size, jnp.float32), jnp.zeros(n, jnp.int32),
            ninf, jnp.zeros(n, bool),
        )  # fmt: skip

    def run(params: PyTree, args: tuple, key: jax.Array) -> tuple:
        def body(s: _State, k: jax.Array) -> tuple:
            f, g = value_and_grads(params, args, s.u)
            s = steps(s, f, g, k)
            return s, s.f_best

        return jax.lax.scan(body, init(params, key), jnp.arange(num_steps))

    vg_jit = jax.jit(value_and_grads)
    step_jit = jax.jit(steps)
    init_jit = jax.jit(init)

    def run_host(params: PyTree, key: jax.Array, batches: Any) -> tuple:
        s = init_jit(params, key)
        history = []
        for k in range(num_steps):
            f, g = _sweep(lambda *b, u=s.u: vg_jit(params, b, u), (), batches)
            s = step_jit(s, f, g, jnp.asarray(k))
            history.append(s.f_best)
        return s, jnp.stack(history)

    def estimate(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> Any:
        _check_call(loss_fn, params, args, key, batches)
        perturbed, _ = start.layout(params)
        params = _tree.widen(params, perturbed)  # 16-bit leaves in float32, as in _differences
        dtype = _tree.accum_dtype(params, perturbed)
        base = _sweep(lambda *b: jnp.asarray(loss_fn(params, *b)).astype(dtype), args, batches)
        if batches is None:
            s, history = run(params, args, key)
        else:
            s, history = run_host(params, key, batches)
        # history: (num_steps, num_restarts), each restart's best value after every step
        values = s.f_best - base
        gain = history[-1] - history[-1 - window]
        converged = gain <= rtol * jnp.abs(values)
        best = jnp.argmax(jnp.where(jnp.isnan(values), -jnp.inf, values))
        value = values[best]
        finite = jnp.isfinite(base) & jnp.all(jnp.isfinite(s.f_best))
        status = _diagnostics.flag(~converged[best] & finite, Status.NOT_CONVERGED)
        nan = jnp.full((), jnp.nan, value.dtype)
        est = Estimate(value, nan, jnp.log(value), nan, num_restarts, nan, status)
        est = _measure.nonfinite(est, ~finite)
        if not return_maximiser:
            return est
        t = _metric(params, perturbed, adaptive, eta)
        delta = [(ti * a[best]).astype(ti.dtype) for ti, a in zip(t, s.u_best)]
        return est, Ascent(_tree.unsplit(params, perturbed, delta), values, converged)

    return _execution.eager_jit(estimate)
