"""Estimators of S(x; φ, ψ, μ): Monte Carlo over the quadratic forms of a curvature operator
(the Hessian of a loss by default), and a dense reference.

Reference: Definition 1 of Tahmasebi et al.; docs/conventions.md, "Definition 1".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from phipsimu import (
    _checks,
    _curvature,
    _diagnostics,
    _execution,
    _krylov,
    _measure,
    _mu,
    _parallel,
    _tree,
)
from phipsimu._curvature import MAX_DENSE_DIM
from phipsimu._diagnostics import Status
from phipsimu._measure import Estimate

PyTree = Any


def _check_common(measure: Any, eta: Any) -> None:
    _measure.check_measure(measure)
    _checks.real("eta", eta, lo=0.0, strict=False)


def _check_probing(measure: _measure.Measure, num_samples: Any, chunk_size: Any) -> None:
    """The Monte Carlo estimator's sizes: probes (2 for an unbiased φ) and chunk size."""
    _checks.integer("num_samples", num_samples, lo=2 if measure.phi_unbiased is not None else 1)
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)


@_execution.cached_factory
def sharpness(
    loss_fn: _curvature.Curvature,
    measure: _measure.Measure,
    *,
    num_samples: int,
    chunk_size: int | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    check_iterations: int = 30,
    sample_axis: str | None = None,
) -> Callable[..., Estimate]:
    """Monte Carlo estimator of the (φ, ψ, μ)-sharpness measure (Definition 1).

    .. math:: S(x) = \\phi\\Big(\\int \\psi(v^\\top \\nabla^2 L(x) v)\\, d\\mu(v)\\Big)
       \\approx \\phi\\Big(\\frac1m \\sum_i w_i\\, \\psi(v_i^\\top \\nabla^2 L(x) v_i)\\Big)

    Probes come from ``measure.mu``; each quadratic form is a second directional derivative
    (about one gradient per probe). Given a curvature operator C instead of a loss, the
    measure is that of C (e.g. ``phipsimu.curvature.gauss_newton``: positive semi-definite,
    so the determinant is defined everywhere).

    With ``batches`` the measure is that of the dataset mean loss: the same probes are used on
    every batch and their quadratic forms are accumulated with weights ``n_b`` (the batch
    sizes) *before* ψ is applied,

    .. math:: v_i^\\top \\bar H v_i
       = \\frac{\\sum_b n_b\\, v_i^\\top \\nabla^2 L_b v_i}{\\sum_b n_b},

    so S is the measure of the full data's Hessian — not the mean of per-batch measures, which
    differs for nonlinear ψ or φ; equal to the one-batch estimate on the concatenated data with
    the same key.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (its Hessian), or a curvature operator
        from :mod:`phipsimu.curvature`.
      measure: a :class:`phipsimu.Measure`.
      num_samples: number of probes m (>= 1; >= 2 for measures with an unbiased φ).
      chunk_size: how many probes to evaluate at once (``vmap`` inside a chunked
        ``lax.map``); memory grows with it, not with ``num_samples`` (each chunk's probes
        are drawn inside the loop). ``None`` (default): chunks of 4 on CPU, which measured
        fastest there (``python -m benchmarks``); on GPU/TPU as many probes as fit
        ``phipsimu.curvature.ACCELERATOR_CHUNK_BYTES`` (:func:`phipsimu.curvature.default_chunk`).
        ``chunk_size=num_samples`` is a single ``vmap``.
      adaptive: measure ``T_x H T_x`` with ``T_x = diag(|x| + eta)`` instead of H (the
        adaptive metric, docs/conventions.md "Adaptive metric").
      eta: the metric's floor (>= 0); only used with ``adaptive=True``.
      check_iterations: for measures whose integral needs a positive definite H (the
        determinant) or may diverge otherwise (``invariant_gaussian``), Lanczos steps n
        (HVPs; n dataset sweeps with ``batches``) on the measured operator (H, or
        ``T_x H T_x`` with ``adaptive``; for product densities without ``adaptive``,
        ``T H T`` with ``T = max(|x|, eps)``, which has H's inertia and is the same matrix at
        every rescaled point, so the verdict is rescaling-invariant; a coordinate with
        ``|x| <= eps``, such as a bias initialised at 0, makes it nearly singular and the
        value then carries ``SINGULAR | NOT_VERIFIED_FINITE``), plus one product that
        finds exact zero rows (``Status.ZERO_CURVATURE``, which makes the determinant and
        product densities diverge). The Ritz values θ, against ``10·n·eps·max|θ|``,
        decide NaN (indefinite), 0 / −inf (singular, or a provably divergent integral) or
        the Monte Carlo value, and set ``Estimate.status``; θ_min also sets the
        determinant's proposal scale when ``scale=None`` and proves infinite variance for a
        given scale. Exact when n >= d; 0 disables the check. Costs n HVPs and n + 1 copies
        of the perturbed parameters (full reorthogonalisation). With ``eta = 0`` a perturbed
        coordinate equal to 0 makes ``T_x H T_x`` singular.
      sample_axis: spread the probes over this mapped axis (a ``jax.shard_map`` mesh axis or
        ``jax.pmap``'s axis; docs/conventions.md, section "Scaling out"): each device
        evaluates ``num_samples/N`` of the same probes as one device (N must divide
        ``num_samples``), the quadratic forms are gathered in probe order and every device
        returns the single-device estimate for the same key.

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate``, pure and jit-able on one
      batch. The same key gives the same probes eagerly and under ``jax.jit``. With
      ``batches`` (a list of batches, or a zero-argument callable returning a fresh iterable;
      a tuple batch is unpacked into ``loss_fn(params, *batch)``, anything else is passed as
      one argument) call it eagerly: the sweep is a Python loop, each batch's quadratic forms
      are jitted.

    Raises:
      ValueError / TypeError: on bad hyperparameters (here), and when called with a
      non-scalar loss, a mask that does not match ``params``, a ``key`` that is not a key, or
      an empty or one-shot batch iterable.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
      >>> est_fn = jax.jit(phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=16))
      >>> est = est_fn({"w": jnp.ones(3)}, jnp.eye(3), key=jax.random.key(0))
      >>> round(float(est.value), 4)  # H = (2/3)·I, so vᵀHv = Tr(H)/d = 2/3 for every probe
      0.6667
    """
    op = _curvature.as_operator(loss_fn)
    _check_common(measure, eta)
    _check_probing(measure, num_samples, chunk_size)
    _checks.integer("check_iterations", check_iterations, lo=0)
    _parallel.check_axis_name("sample_axis", sample_axis)
    eta = float(eta)
    check = measure.needs_certificate and check_iterations > 0

    def estimate(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> Estimate:
        _checks.check_key(key)
        _checks.check_params(params)
        sampler = measure.mu
        perturbed, d = sampler.layout(params)
        dtype = jax.eval_shape(
            lambda: sampler.draw_at(key, params, jnp.zeros((1,), int), adaptive=adaptive)
        ).log_weight.dtype
        bound = _curvature.bind(op, params, args, batches, perturbed, chunk_size)
        # the measured operator: H, or T_x H T_x (same inertia when T_x is nonsingular)
        measured = _curvature.metric_bound(bound, params, eta, perturbed) if adaptive else bound
        if check:
            # a Lanczos block of one vector is a plain vmap whatever the chunk size
            n = min(check_iterations, d)
            start = _mu.gaussian(mask=sampler.mask).draw(jax.random.fold_in(key, 1), params, 1)
            certified = measured
            if measure.may_diverge and not adaptive:
                certified = _curvature.congruence(bound, _invariant_metric(params, sampler))
            theta, tol = _krylov.ritz_certificate(certified, start.active(), n, dtype)
            # exact zero rows: (Cg)ᵢ = 0 for a Gaussian g only if C eᵢ = 0 (almost surely)
            zero = [w[0] == 0 for w in certified.matvec(start.active())]
        # the measure's own proposal scale, tuned from the check when it asks for one
        scale: Any = None
        rescale = False
        if check:
            scale, rescale = measure.proposal_scale(theta, tol)
        indices = jnp.arange(num_samples)
        if sample_axis is not None:
            size, begin = _parallel.sample_block(
                sample_axis, num_samples, f"num_samples={num_samples}"
            )
            indices = begin + jnp.arange(size)

        def make(i: jax.Array) -> tuple[list, jax.Array]:
            # probe i from key alone: drawn inside the chunk loop, so memory holds one chunk
            draw = sampler.draw_at(key, params, i[None], adaptive=adaptive)
            v, log_w = draw.v, draw.log_weight[0]
            if rescale:
                v = _tree.scale(scale, v)
                log_w = log_w + d * jnp.log(scale)
            if adaptive:
                v = _curvature.metric_probes(params, v, eta, perturbed)
            return [a[0] for a in _tree.active(v, perturbed)], log_w

        q, log_w = _curvature.forms_of_draws(bound, make, indices, chunk_size)
        if sample_axis is not None:
            q = _parallel.gather_samples(q, sample_axis)
            log_w = _parallel.gather_samples(log_w, sample_axis)
        est = _measure.reduce(measure, q.astype(dtype), log_w.astype(dtype), d)
        if not check:
            return est
        singular = jnp.abs(theta[0]) <= tol
        if adaptive and eta == 0.0:
            # T_x H T_x is singular wherever a perturbed coordinate is 0, whatever H is
            x = _tree.active(params, perturbed)
            singular = singular | jnp.any(jnp.stack([jnp.any(xi == 0) for xi in x]))
        return measure.certify(est, theta, tol, singular, params=params, scale=scale, zero=zero)

    return _execution.eager_jit(estimate)


def _invariant_metric(params: PyTree, sampler: Any) -> list:
    """``T = max(|x|, eps)`` on the perturbed leaves (eps: the product density's floor).

    The divergence certificate of a product density runs on ``T H T``: for a positive
    diagonal D with ``L(Dx) = L(x)``, ``T_{Dx} H(Dx) T_{Dx} = T_x H(x) T_x`` (where
    ``|x| >= eps``), so its Ritz values from the same start vector, and their tolerance
    ``10·n·eps·max|θ|``, are the same at x and at every rescaled point; by Sylvester's law of
    inertia (T is invertible) it has as many negative and zero eigenvalues as H. On H itself
    the norm, the tolerance and the Krylov space change with D (docs/conventions.md,
    "Product-density integrals")."""
    eps = getattr(sampler, "eps", _mu.DEFAULT_EPS)
    return [
        jnp.maximum(jnp.abs(x), jnp.asarray(eps, x.dtype)).astype(x.dtype)
        for x in _tree.active(params, sampler.perturbed(params))
    ]


@_execution.cached_factory
def exact_sharpness(
    loss_fn: _curvature.Curvature,
    measure: _measure.Measure,
    *,
    num_samples: int = 2**14,
    max_dim: int = MAX_DENSE_DIM,
    adaptive: bool = False,
    eta: float = 0.0,
) -> Callable[..., Estimate]:
    """Reference evaluation of S from the dense matrix of the operator (small d only).

    When the measure carries a spectral closed form (every preset does), S is evaluated
    from the eigenvalues of the dense Hessian (``jax.hessian``) restricted to the perturbed
    coordinates, with ``stderr = 0``. Given an operator, its dense matrix is formed from d
    matrix-vector products with the identity's columns. Otherwise the integral is estimated by
    Monte Carlo with ``num_samples`` draws on the dense quadratic form (no HVPs), with its
    standard error; for measures that may diverge (``invariant_gaussian``) the eigenvalues of
    the dense matrix then decide ``Estimate.status`` as in :func:`sharpness`.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (its Hessian), or a curvature operator
        from :mod:`phipsimu.curvature`.
      measure: a :class:`phipsimu.Measure`.
      num_samples: probes for measures without a closed form.
      max_dim: largest accepted d (default :data:`MAX_DENSE_DIM` = 4096).
      adaptive, eta: as in :func:`sharpness`.

    Returns:
      ``evaluate(params, *args, key=None, batches=None) -> Estimate``; ``key`` is needed only
      without a closed form. With ``batches`` the dense matrix is the batch-size-weighted mean
      of the per-batch matrices (the dataset mean loss).

    Raises:
      ValueError: when d exceeds ``max_dim`` (raised at call time, d depends on params).

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p**2)  # H = diag(1, 3)
      >>> est = phipsimu.exact_sharpness(loss, phipsimu.measures.trace())(jnp.ones(2))
      >>> round(float(est.value), 4), float(est.stderr), int(est.num_samples)  # Tr(H)/d
      (2.0, 0.0, 0)
    """
    op = _curvature.as_operator(loss_fn)
    _check_common(measure, eta)
    _checks.integer("num_samples", num_samples, lo=2)
    _checks.integer("max_dim", max_dim, lo=1)
    eta = float(eta)
    closed = measure.spectral is not None or measure.log_spectral is not None

    def evaluate(
        params: PyTree, *args: Any, key: jax.Array | None = None, batches: Any = None
    ) -> Estimate:
        if batches is None:
            op.check(params, args)
        perturbed = measure.mu.perturbed(params)
        d = _tree.dim(params, perturbed)
        if d > max_dim:
            raise ValueError(
                f"params: {d} perturbed coordinates exceed max_dim={max_dim}; exact_sharpness "
                "builds a dense Hessian. Use phipsimu.sharpness, or raise max_dim knowingly"
            )
        if d == 0:
            raise ValueError("params: no leaf is perturbed")
        h = _curvature.dense(op, params, args, batches, perturbed)
        # float16/bfloat16 matrices are decomposed in float32 (there is no float16 eigh)
        h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
        # a NaN loss makes the Hessian's matrix NaN (the operators check it); NaN params are
        # checked here too, since a user's operator may ignore the params
        x = _tree.active(params, perturbed)
        nonfinite = ~(
            jnp.all(jnp.isfinite(h)) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in x]))
        )
        if adaptive:
            t = jnp.abs(ravel_pytree(_tree.active(params, perturbed))[0]) + eta
            h = t[:, None] * h * t[None, :]
        if closed:
            eigs = jnp.linalg.eigvalsh(h)
            if measure.log_spectral is not None:
                log_value = measure.log_spectral(eigs)
                value = (
                    measure.spectral(eigs) if measure.spectral is not None else jnp.exp(log_value)
                )
            else:
                value = measure.spectral(eigs)  # type: ignore[misc]  # checked when built
                log_value = jnp.log(value)
            est = _measure.closed_form(value, log_value, h.dtype)
            if measure.requires_positive_definite:
                status = _diagnostics.flag(
                    jnp.isnan(log_value) & ~nonfinite, Status.NOT_POSITIVE_DEFINITE
                ) | _diagnostics.flag(log_value == -jnp.inf, Status.SINGULAR | Status.DIVERGENT)
                est = est._replace(status=status)
            return _measure.nonfinite(est, nonfinite)
        if key is None:
            raise ValueError(
                f"key=None: measure {measure.name!r} has no closed form, so exact_sharpness "
                "estimates it by Monte Carlo on the dense Hessian and needs a PRNG key"
            )
        draw = measure.mu.draw(key, params, num_samples, adaptive=adaptive)
        vmat = jax.vmap(lambda *v: ravel_pytree(list(v))[0])(*draw.active())
        q = jnp.einsum("id,de,ie->i", vmat, h, vmat)
        est = _measure.reduce(measure, q.astype(draw.log_weight.dtype), draw.log_weight, d)
        if measure.may_diverge:
            c = h
            if not adaptive:  # the invariant certificate's T H T, as in sharpness
                t = ravel_pytree(_invariant_metric(params, measure.mu))[0].astype(h.dtype)
                c = t[:, None] * h * t[None, :]
            eigs = jnp.linalg.eigvalsh(c).astype(est.value.dtype)
            tol = d * jnp.finfo(eigs.dtype).eps * jnp.max(jnp.abs(eigs))
            rows = jnp.all(c == 0, axis=1)
            sizes = [int(jnp.size(x)) for x in _tree.active(params, perturbed)]
            zero = list(jnp.split(rows, list(itertools.accumulate(sizes))[:-1]))
            singular = jnp.abs(eigs[0]) <= tol
            est = measure.certify(est, eigs, tol, singular, params=params, zero=zero)
        return _measure.nonfinite(est, nonfinite)

    return _execution.eager_jit(evaluate)
