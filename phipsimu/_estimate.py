"""Estimators of S(x; φ, ψ, μ): Monte Carlo over HVP quadratic forms, and a dense reference.

Reference: Definition 1 of Tahmasebi et al.; MATH.md "Definition 1".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from phipsimu import _checks, _curvature, _measure, _mu

PyTree = Any

#: Largest number of perturbed coordinates ``exact_sharpness`` accepts by default. A dense
#: float32 Hessian of this size takes 64 MiB and its eigendecomposition a few seconds on CPU.
MAX_DENSE_DIM = 4096


class Estimate(NamedTuple):
    """A sharpness estimate with its uncertainty.

    Attributes:
      value: the estimate of S (NaN when the measure is undefined at this point, see the
        preset's docs, or when the loss is NaN).
      stderr: its standard error (delta method through φ; NaN with one sample, 0 for a
        closed form).
      log_value: ``log S``; for log-space measures (the determinant) computed directly and
        finite where ``value`` over- or underflows; otherwise ``log(value)``.
      ess: effective sample size ``(Σu)²/Σu²`` of the importance weights: ``u = w``, or
        ``u = w·ψ`` for log-space measures such as the determinant (so a poorly scaled
        proposal shows as a small ESS). Equal to ``num_samples`` for exactly sampled
        probability measures; ``inf`` for a closed form.
      num_samples: the number of probes (0 for a closed form; an int array once returned
        from a jitted function).
    """

    value: jax.Array
    stderr: jax.Array
    log_value: jax.Array
    ess: jax.Array
    num_samples: int


def _check_common(loss_fn: Any, measure: Any, eta: Any) -> None:
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args)")
    _measure.check_measure(measure)
    _checks.real("eta", eta, lo=0.0, strict=False)


def _check_probing(measure: _measure.Measure, num_samples: Any, batch_size: Any) -> None:
    """The Monte Carlo estimators' sizes: probes (2 for an unbiased φ) and chunk size."""
    _checks.integer("num_samples", num_samples, lo=2 if measure.phi_unbiased is not None else 1)
    _checks.integer("batch_size", batch_size, lo=1, allow_none=True)


def _draw_probes(
    measure: _measure.Measure,
    params: PyTree,
    key: jax.Array,
    num_samples: int,
    adaptive: bool,
    eta: float,
) -> tuple[PyTree, jax.Array, list[bool], int]:
    """Probes from ``measure.mu`` (in the adaptive metric if asked), their log-weights, the
    perturbed leaves and d."""
    perturbed = measure.mu.perturbed(params)
    v, log_w = measure.mu.sample(key, params, num_samples)
    if adaptive:
        v = _curvature.metric_probes(params, v, eta, perturbed)
    return v, log_w, perturbed, measure.mu.dim(params)


def sharpness(
    loss_fn: Callable[..., jax.Array],
    measure: _measure.Measure,
    *,
    num_samples: int,
    batch_size: int | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    check_iterations: int = 30,
) -> Callable[..., Estimate]:
    """Monte Carlo estimator of the (φ, ψ, μ)-sharpness measure (Definition 1).

    .. math:: S(x) = \\phi\\Big(\\int \\psi(v^\\top \\nabla^2 L(x) v)\\, d\\mu(v)\\Big)
       \\approx \\phi\\Big(\\frac1m \\sum_i w_i\\, \\psi(v_i^\\top \\nabla^2 L(x) v_i)\\Big)

    Probes come from ``measure.mu``; each quadratic form is a second directional derivative
    computed by ``phipsimu._curvature.quadratic_forms`` (about one gradient per probe).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      measure: a :class:`phipsimu.Measure`.
      num_samples: number of probes m (>= 1; >= 2 for measures with an unbiased φ).
      batch_size: how many probes to evaluate at once (``vmap`` inside a chunked
        ``lax.map``); memory grows with it. ``None`` (default) uses chunks of 4, which
        measured fastest on CPU (about 1–1.6 gradients per probe,
        ``benchmarks/bench_sharpness.py``); ``batch_size=num_samples`` is a single ``vmap``.
      adaptive: measure ``T_x H T_x`` with ``T_x = diag(|x| + eta)`` instead of H (the
        adaptive metric of MATH.md).
      eta: the metric's floor (>= 0); only used with ``adaptive=True``.
      check_iterations: for measures whose integral needs a positive definite H (the
        determinant), Lanczos steps n (HVPs) used to certify it: the smallest Ritz value,
        against ``10·n·eps·max|θ|``, decides NaN (indefinite), 0 / −inf (singular) or the
        Monte Carlo value. Exact when n >= d; 0 disables the check. Costs n HVPs and n + 1
        copies of the perturbed parameters (full reorthogonalisation). The adaptive metric
        ``T_x H T_x`` has the inertia of H when ``T_x`` is nonsingular, so the check runs on
        H, and with ``eta = 0`` a perturbed coordinate equal to 0 makes it singular.

    Returns:
      ``estimate(params, *args, key) -> Estimate``, pure and jit-able. The same key gives
      the same probes eagerly and under ``jax.jit``.

    Raises:
      ValueError / TypeError: on bad hyperparameters (here), and when called with a
      non-scalar loss, a mask that does not match ``params`` or a ``key`` that is not a key.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
      >>> est_fn = jax.jit(phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=16))
      >>> est = est_fn({"w": jnp.ones(3)}, jnp.eye(3), key=jax.random.key(0))
      >>> est.value.shape
      ()
    """
    _check_common(loss_fn, measure, eta)
    _check_probing(measure, num_samples, batch_size)
    _checks.integer("check_iterations", check_iterations, lo=0)
    eta = float(eta)
    check = measure.requires_positive_definite and check_iterations > 0

    def estimate(params: PyTree, *args: Any, key: jax.Array) -> Estimate:
        _mu.check_key(key)
        _curvature.check_scalar_loss(loss_fn, params, args)
        v, log_w, perturbed, d = _draw_probes(measure, params, key, num_samples, adaptive, eta)
        q = _curvature.quadratic_forms(loss_fn, params, v, args, perturbed, batch_size=batch_size)
        r = _measure.reduce(measure, q.astype(log_w.dtype), log_w, d)
        if check:
            r = _certify_definite(r, loss_fn, measure, params, args, key, perturbed)
        return Estimate(r.value, r.stderr, r.log_value, r.ess, num_samples)

    def _certify_definite(r, loss_fn, measure, params, args, key, perturbed):
        # Lazy import: the spectral module builds on this one.
        from phipsimu import _spectral

        d = measure.mu.dim(params)
        n = min(check_iterations, d)
        # all n Ritz values, ascending: the extremes bound the spectrum from inside
        eig = _spectral.top_eigenvalues(
            loss_fn, n, which="SA", num_iterations=n, mask=measure.mu.mask
        )(params, *args, key=jax.random.fold_in(key, 1))
        theta = eig.value.astype(r.value.dtype)
        # rounding in Ritz values is of order eps·‖H‖ per step (the rule exact_sharpness
        # applies to eigenvalues)
        tol = 10 * n * jnp.finfo(theta.dtype).eps * jnp.max(jnp.abs(theta))
        indefinite = theta[0] < -tol
        singular = jnp.abs(theta[0]) <= tol
        if adaptive and eta == 0.0:
            # T_x H T_x is singular wherever a perturbed coordinate is 0, whatever H is
            x, _ = _curvature.split(params, perturbed)
            singular = singular | jnp.any(jnp.stack([jnp.any(xi == 0) for xi in x]))
        nan = jnp.full_like(r.value, jnp.nan)
        value = jnp.where(indefinite, nan, jnp.where(singular, 0.0, r.value))
        log_value = jnp.where(indefinite, nan, jnp.where(singular, -jnp.inf, r.log_value))
        stderr = jnp.where(indefinite, nan, jnp.where(singular, 0.0, r.stderr))
        return _measure.Reduction(value, stderr, log_value, r.ess)

    return estimate


def dense_hessian(
    loss_fn: Callable[..., jax.Array], params: PyTree, args: tuple, perturbed: list[bool]
) -> jax.Array:
    """The dense Hessian over the perturbed coordinates, in ``ravel_pytree`` order."""
    active, merge = _curvature.split(params, perturbed)
    flat, unravel = ravel_pytree(active)
    return jax.hessian(lambda z: loss_fn(merge(unravel(z)), *args))(flat)


def exact_sharpness(
    loss_fn: Callable[..., jax.Array],
    measure: _measure.Measure,
    *,
    num_samples: int = 2**14,
    max_dim: int = MAX_DENSE_DIM,
    adaptive: bool = False,
    eta: float = 0.0,
) -> Callable[..., Estimate]:
    """Reference evaluation of S from the dense Hessian (small d only).

    When the measure carries a spectral closed form (every preset does), S is evaluated
    from the eigenvalues of the dense Hessian restricted to the perturbed coordinates, with
    ``stderr = 0``. Otherwise the integral is estimated by Monte Carlo with ``num_samples``
    draws on the dense quadratic form (no HVPs), with its standard error.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      measure: a :class:`phipsimu.Measure`.
      num_samples: probes for measures without a closed form.
      max_dim: largest accepted d (default :data:`MAX_DENSE_DIM` = 4096).
      adaptive, eta: as in :func:`sharpness`.

    Returns:
      ``evaluate(params, *args, key=None) -> Estimate``; ``key`` is needed only without a
      closed form.

    Raises:
      ValueError: when d exceeds ``max_dim`` (raised at call time, d depends on params).
    """
    _check_common(loss_fn, measure, eta)
    _checks.integer("num_samples", num_samples, lo=2)
    _checks.integer("max_dim", max_dim, lo=1)
    eta = float(eta)
    closed = measure.spectral is not None or measure.log_spectral is not None

    def evaluate(params: PyTree, *args: Any, key: jax.Array | None = None) -> Estimate:
        _curvature.check_scalar_loss(loss_fn, params, args)
        perturbed = measure.mu.perturbed(params)
        d = measure.mu.dim(params)
        if d > max_dim:
            raise ValueError(
                f"params: {d} perturbed coordinates exceed max_dim={max_dim}; exact_sharpness "
                "builds a dense Hessian. Use phipsimu.sharpness, or raise max_dim knowingly"
            )
        if d == 0:
            raise ValueError("params: no leaf is perturbed")
        h = dense_hessian(loss_fn, params, args, perturbed)
        if adaptive:
            active, _ = _curvature.split(params, perturbed)
            t = jnp.abs(ravel_pytree(active)[0]) + eta
            h = t[:, None] * h * t[None, :]
        if closed:
            eigs = jnp.linalg.eigvalsh(h)
            if measure.log_spectral is not None:
                log_value = measure.log_spectral(eigs)
                value = (
                    measure.spectral(eigs) if measure.spectral is not None else jnp.exp(log_value)
                )
            else:
                value = measure.spectral(eigs)
                log_value = jnp.log(value)
            zero = jnp.zeros((), h.dtype)
            return Estimate(value, zero, log_value, jnp.full((), jnp.inf, h.dtype), 0)
        if key is None:
            raise ValueError(
                f"key=None: measure {measure.name!r} has no closed form, so exact_sharpness "
                "estimates it by Monte Carlo on the dense Hessian and needs a PRNG key"
            )
        _mu.check_key(key)
        v, log_w = measure.mu.sample(key, params, num_samples)
        vmat = jnp.concatenate(
            [
                jnp.reshape(x, (num_samples, -1))
                for x, p in zip(jax.tree_util.tree_leaves(v), perturbed)
                if p
            ],
            axis=1,
        )
        q = jnp.einsum("id,de,ie->i", vmat, h, vmat)
        r = _measure.reduce(measure, q.astype(log_w.dtype), log_w, d)
        return Estimate(r.value, r.stderr, r.log_value, r.ess, num_samples)

    return evaluate


def dataset_sharpness(
    loss_fn: Callable[..., jax.Array],
    measure: _measure.Measure,
    *,
    num_samples: int,
    batch_size: int | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
) -> Callable[..., Estimate]:
    """:func:`sharpness` of the dataset mean loss, from a sweep over its batches.

    .. math:: S = \\phi\\Big(\\frac1m\\sum_i w_i\\, \\psi(v_i^\\top \\bar H v_i)\\Big),
       \\quad v_i^\\top \\bar H v_i
       = \\frac{\\sum_b n_b\\, v_i^\\top \\nabla^2 L_b v_i}{\\sum_b n_b}

    The same probes are used on every batch and their quadratic forms are accumulated with
    weights ``n_b`` (the batch sizes) *before* ψ is applied, so S is the measure of the full
    data's Hessian — not the mean of per-batch measures, which differs for nonlinear ψ or φ.
    Equal to :func:`sharpness` (with ``check_iterations=0``) on the concatenated data with
    the same key. No definiteness certificate runs here (for the determinant, certify with
    ``top_eigenvalues(..., which="SA")(params, key=key, batches=batches)``).

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar``, the *mean* loss over a batch.
      measure, num_samples, batch_size, adaptive, eta: as in :func:`sharpness`.

    Returns:
      ``estimate(params, batches, *, key) -> Estimate``; ``batches`` is a list of batches or a
      zero-argument callable returning a fresh iterable (a tuple batch is unpacked into
      ``loss_fn(params, *batch)``, anything else is passed as one argument). Call it eagerly:
      the sweep is a Python loop, each batch's quadratic forms are jitted.

    Raises:
      ValueError / TypeError: bad hyperparameters; at call time an empty or one-shot batch
      iterable, a bad key.
    """
    _check_common(loss_fn, measure, eta)
    _check_probing(measure, num_samples, batch_size)
    eta = float(eta)

    def estimate(params: PyTree, batches: Any, *, key: jax.Array) -> Estimate:
        _mu.check_key(key)
        _curvature.check_batches(batches)
        v, log_w, perturbed, d = _draw_probes(measure, params, key, num_samples, adaptive, eta)
        q = _curvature.dataset_quadratic_forms(
            loss_fn, params, v, batches, perturbed, batch_size=batch_size
        )
        r = _measure.reduce(measure, q.astype(log_w.dtype), log_w, d)
        return Estimate(r.value, r.stderr, r.log_value, r.ess, num_samples)

    return estimate
