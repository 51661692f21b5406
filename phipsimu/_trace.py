"""Stochastic trace and diagonal estimators of a curvature operator (the Hessian of a loss by
default): Hutchinson, Hutch++ and XTrace for ``Tr C`` at a fixed budget of products, and the
Hutchinson-type diagonal ``E[v ⊙ Cv]``.

Hutch++ and XTrace flatten their small probe *blocks* into a ``(d, m)`` matrix for a
Householder QR (the block, not the model: on a sharded model this gathers the m probes).

References:
  Hutchinson (1989); Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix",
  Appl. Numer. Math. 57, 2007; Meyer, Musco, Musco & Woodruff, "Hutch++", SOSA 2021; Epperly,
  Tropp & Webber, "XTrace", SIAM J. Matrix Anal. Appl. 45(1), 2024; Yao et al., "PyHessian",
  2020.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from phipsimu import _checks, _curvature, _diagnostics, _execution, _measure, _mu, _tree
from phipsimu._diagnostics import Status
from phipsimu._measure import Estimate

PyTree = Any

_TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")


# ---------------------------------------------------------------- trace


def _flatten(vs: list) -> jax.Array:
    """A probe block as a ``(num, d)`` matrix (Hutch++/XTrace only: their QR needs it), in at
    least float32: there is no float16/bfloat16 QR or triangular solve, and 16-bit
    orthonormalisation would lose the few digits these methods gain."""
    mat = jax.vmap(lambda *v: ravel_pytree(list(v))[0])(*vs)
    return mat.astype(jnp.promote_types(mat.dtype, jnp.float32))


def _unflatten(mat: jax.Array, like: list) -> list:
    """The rows of ``mat`` as a block shaped like ``like`` (leaves with a leading axis), cast
    back to the dtypes of ``like``."""
    flat, unravel = ravel_pytree([x[0] for x in like])
    return jax.vmap(unravel)(mat.astype(flat.dtype))


def _hutchinson(op: _curvature.Bound, vs: list, c: float) -> jax.Array:
    return op.quad(vs) / c


def _hutch_plus_plus(op: _curvature.Bound, vs: list, c: float) -> tuple[jax.Array, jax.Array]:
    """Hutch++: exact trace on ``Q = orth(HS)``, Hutchinson on the deflated rest.

    ``Tr H = Tr(QᵀHQ) + Tr((I−QQᵀ)H(I−QQᵀ))``; the second term by Hutchinson with the
    projected probes ``(I−QQᵀ)g`` (quadratic forms). Unbiased for any orthonormal Q.
    Returns the deflated part and the per-probe residual estimates.
    """
    m3 = vs[0].shape[0] // 2
    s_block = [x[:m3] for x in vs]
    g_block = [x[m3:] for x in vs]
    q, _ = jnp.linalg.qr(_flatten(op.matvec(s_block)).T)  # (d, m3)
    q_block = _unflatten(q.T, vs)
    low = _tree.vdot(q_block, op.matvec(q_block))
    g = _flatten(g_block).T
    g_proj = g - q @ (q.T @ g)
    return low, op.quad(_unflatten(g_proj.T, vs)) / c


def _qr_leave_one_out_factor(r: jax.Array) -> jax.Array:
    s = jax.scipy.linalg.solve_triangular(r, jnp.eye(r.shape[0], dtype=r.dtype), trans=2)
    return s / jnp.linalg.norm(s, axis=0)


def _xtrace_combine(omega: jax.Array, q: jax.Array, r: jax.Array, z: jax.Array) -> jax.Array:
    """The m leave-one-out estimates from the probes Ω, the sketch ``HΩ = QR`` and ``Z = HQ``
    (all ``(d, m)``, R ``(m, m)``)."""
    d, m = omega.shape

    def exact(_):
        return jnp.full((m,), jnp.vdot(q, z), z.dtype)

    def estimate(_):
        s = _qr_leave_one_out_factor(r)
        h = q.T @ z
        w = q.T @ omega
        t = z.T @ omega
        w_s = jnp.sum(w * s, axis=0)
        x = w - s * w_s
        t_x = jnp.sum(t * x, axis=0)
        x_hx = jnp.sum(x * (h @ x), axis=0)
        s_r = jnp.sum(s * r, axis=0)
        projected = jnp.sum(omega**2, axis=0) - jnp.sum(x**2, axis=0)
        scale = (d - m + 1) / jnp.where(projected == 0, 1.0, projected)
        low_loo = jnp.trace(h) - jnp.sum(s * (h @ s), axis=0)
        return low_loo + scale * (-t_x + x_hx + s_r * w_s)

    # Y rank-deficient (rank H < m): Q spans range(H) and Tr(QᵀHQ) is exact. The test is
    # relative to Y's own scale (Householder QR is column-wise backward stable, so the |r_jj|
    # of a rank-deficient Y are rounding, a few eps·max|r_jj|): an absolute threshold would call
    # every small-scale H "low rank" and return the trace of its sketch alone. The tolerance
    # errs low: a missed deficiency only sends an ill-conditioned R to the leave-one-out
    # formulas, whose normalised factors stay accurate, while a false one drops the residual.
    diag = jnp.abs(jnp.diag(r))
    rank = jnp.sum(diag > m * jnp.finfo(r.dtype).eps * jnp.max(diag))
    return jax.lax.cond(rank < m, exact, estimate, None)


# The dataset path runs eagerly; a cond of fresh closures there would retrace on every call.
_xtrace_combine_jit = jax.jit(_xtrace_combine)


def _xtrace(op: _curvature.Bound, vs: list) -> jax.Array:
    """XTrace: m leave-one-out estimates ``Tr(Q₋ᵢQ₋ᵢᵀH) + ωᵢ-Hutchinson of the rest``, with
    re-sphering (Epperly, Tropp & Webber 2024, Alg. 2; as matfree.stochtrace)."""
    omega = _flatten(vs).T  # (d, m)
    y = _flatten(op.matvec(vs)).T
    q, r = jnp.linalg.qr(y)
    z = _flatten(op.matvec(_unflatten(q.T, vs))).T
    return (_xtrace_combine_jit if op.host else _xtrace_combine)(omega, q, r, z)


@_execution.cached_factory
def hessian_trace(
    loss_fn: _curvature.Curvature,
    *,
    num_samples: int,
    method: str = "hutchinson",
    probes: str | _mu.Sampler | None = None,
    mask: Any = None,
    blocks: Any = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Callable[..., Estimate]:
    """``Tr(H)`` with a budget of ``num_samples`` Hessian products, by one of three methods.

    ``num_samples`` is the budget every estimator takes: the number of curvature products
    (each about one gradient's cost), so the three methods cost the same for the same value.
    For Hutchinson it is the number of probes; Hutch++ and XTrace spend part of it on a
    low-rank sketch.

    * ``"hutchinson"``: ``(1/(c·m)) Σ vᵢᵀHvᵢ`` with ``E[vvᵀ] = c·I``, m = ``num_samples``
      quadratic forms (forward-over-forward, about one gradient each). Probes:
      ``"rademacher"`` (default; lowest variance for diagonally dominant H), ``"gaussian"``,
      ``"sphere"``. Error ∝ ``‖H‖_F/√m``.
    * ``"hutch++"``: ``num_samples`` divisible by 3: m/3 products ``HS``, ``Q = orth(HS)``,
      m/3 products ``HQ`` for the exact ``Tr(QᵀHQ)``, and Hutchinson with m/3 probes on the
      deflated ``(I−QQᵀ)H(I−QQᵀ)``. Error ∝ ``‖H‖_*/m`` — far lower when a few eigenvalues
      dominate, as in trained networks (Meyer et al. 2021).
    * ``"xtrace"``: ``num_samples`` even: m/2 Gaussian (or sphere) probes used both for the
      low-rank part and, leaving each one out in turn, for the residual; the estimate is the
      mean of the m/2 leave-one-out estimates (Epperly, Tropp & Webber 2024).

    Hutch++ and XTrace orthonormalise a probe block with a Householder QR on the block as a
    ``(d, m)`` matrix (the block is flattened, not the model: on a sharded model this gathers
    the m probe vectors). Their standard errors: Hutch++, the residual Hutchinson's;
    XTrace, ``std(leave-one-out estimates)/√m`` (the authors' heuristic).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (the trace of its Hessian H), or a
        curvature operator from :mod:`phipsimu.curvature` (e.g. ``gauss_newton``).
      num_samples: the budget m of Hessian products (>= 1 for Hutchinson, a multiple of 3
        for Hutch++, a multiple of 2 for XTrace; the low-rank methods need ``num_samples/3`` resp.
        ``num_samples/2`` at most d).
      method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
      probes: for Hutchinson/Hutch++ ``"rademacher"`` (default), ``"gaussian"``, ``"sphere"``;
        XTrace re-spheres, which needs rotation-invariant ``"gaussian"`` (default) or
        ``"sphere"``; or that sampler (``phipsimu.mu.rademacher()``, ...; unmasked: ``mask``
        says which leaves). Drawn as ``phipsimu.mu.<probes>(mask=mask).sample(key, params, ·)``.
      mask, blocks, progress: as in :func:`phipsimu.top_eigenvalues`. Per-block traces are
        traces of the diagonal blocks; they sum to Tr(H).
      chunk_size: probes per vmapped chunk of HVPs / quadratic forms (None: 4 on
        CPU; on GPU/TPU as many as fit ``phipsimu.curvature.ACCELERATOR_CHUNK_BYTES``).

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate``; its ``num_samples``
      attribute is the number of random probes drawn (the budget for Hutchinson, 2m/3 for
      Hutch++, m/2 for XTrace).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> a = jnp.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])  # Tr A = 5
      >>> loss = lambda p: 0.5 * p @ a @ p  # its Hessian is A
      >>> est = phipsimu.hessian_trace(loss, num_samples=8)(jnp.ones(3), key=jax.random.key(0))
      >>> # Hutchinson, Rademacher v: vᵀAv = Tr A + 2·A₁₂·v₁v₂, and v₁v₂ = ±1 at random
      >>> print(f"{est.value:.3f} ± {est.stderr:.3f}")
      5.500 ± 0.732
      >>> est = phipsimu.hessian_trace(loss, num_samples=6, method="xtrace")(
      ...     jnp.ones(3), key=jax.random.key(0))
      >>> round(float(est.value), 3)  # 3 probes span d = 3: the low-rank part is all of A
      5.0

    Reference: Hutchinson (1989); Meyer, Musco, Musco & Woodruff (2021), Alg. 1;
    Epperly, Tropp & Webber (2024), Alg. 2.
    """
    op = _curvature.as_operator(loss_fn)
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
    _checks.flag("progress", progress)
    if method not in _TRACE_METHODS:
        raise ValueError(f"method={method!r}: must be one of {_TRACE_METHODS}")
    _checks.integer("num_samples", num_samples, lo=1)
    if method == "hutch++" and (num_samples % 3 or num_samples < 6):
        raise ValueError(
            f"num_samples={num_samples}: Hutch++ splits its budget in three equal parts "
            "(sketch HS, exact HQ, residual probes); use a multiple of 3, at least 6"
        )
    if method == "xtrace" and (num_samples % 2 or num_samples < 4):
        raise ValueError(
            f"num_samples={num_samples}: XTrace spends two HVPs per probe (HΩ, then HQ); "
            "use a multiple of 2, at least 4"
        )
    if probes is None:
        probes = "gaussian" if method == "xtrace" else "rademacher"
    probes = _mu.probe_name(probes, ("gaussian", "sphere") if method == "xtrace" else _mu.PROBES)
    num_probes = {
        "hutchinson": num_samples,
        "hutch++": 2 * num_samples // 3,
        "xtrace": num_samples // 2,
    }[method]
    sweeps = {"hutchinson": 1, "hutch++": 3, "xtrace": 2}[method]

    def build(m: Any) -> Callable[..., Estimate]:
        def estimate(params: PyTree, *args: Any, key: jax.Array, batches: Any = None):
            draw = _mu.probe_sampler(probes, m).draw(key, params, num_probes)
            d = draw.d
            low_rank = {"hutch++": num_samples // 3, "xtrace": num_samples // 2}.get(method, 0)
            if low_rank > d:
                raise ValueError(
                    f"num_samples={num_samples}: {method} would build a rank-{low_rank} sketch "
                    f"of a d={d} dimensional Hessian; use num_samples <= "
                    f"{d * (3 if method == 'hutch++' else 2)}"
                )
            bar = _curvature.progress_bar(progress and batches is not None, sweeps, method)
            bound = _curvature.bind(op, params, args, batches, draw.perturbed, chunk_size, bar)
            vs, c = draw.active(), (1.0 / d if probes == "sphere" else 1.0)
            low: Any
            if method == "hutchinson":
                samples, low = _hutchinson(bound, vs, c), 0.0
            elif method == "hutch++":
                low, samples = _hutch_plus_plus(bound, vs, c)
            else:
                samples, low = _xtrace(bound, vs), 0.0
            bar.close()
            est = _measure.sample_mean(low + samples)
            return est._replace(
                ess=jnp.full((), num_probes, est.value.dtype), num_samples=num_probes
            )

        return estimate

    return _execution.per_block(build, mask, blocks)


# ---------------------------------------------------------------- diagonal


@_execution.cached_factory
def hessian_diagonal(
    loss_fn: _curvature.Curvature,
    *,
    num_samples: int | None = None,
    exact: bool = False,
    max_dim: int = _curvature.MAX_DENSE_DIM,
    mask: Any = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Callable[..., Estimate]:
    """The diagonal of the Hessian (or of any curvature operator C), by Hutchinson-type
    probing or exactly.

    .. math:: \\operatorname{diag}(C) = \\mathbb E[v \\odot Cv] \\approx \\frac1m \\sum_{j=1}^m
       v_j \\odot C v_j, \\qquad v_j \\text{ Rademacher}

    Coordinate i of one probe is ``C_ii + Σ_{k≠i} C_ik v_i v_k``: unbiased, with variance
    ``Σ_{k≠i} C_ik²`` (the off-diagonal mass of row i), so the estimate is exact for a diagonal
    C and its per-coordinate standard error is ``std_j(v_j ⊙ Cv_j)/√m``. Costs m products
    (HVPs) and holds the m products ``v_j ⊙ Cv_j`` at once.

    ``exact=True`` computes ``C_ii = e_iᵀCe_i`` with d quadratic forms (about one gradient each
    for the Hessian; ``stderr = 0``): for small d only (``max_dim``), since the d unit vectors
    are formed as one ``(d, d)`` block.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (the diagonal of its Hessian), or a
        curvature operator from :mod:`phipsimu.curvature` (e.g. ``gauss_newton``: the
        diagonal Gauss–Newton/Fisher used by diagonal preconditioners).
      num_samples: Rademacher probes m (>= 1; >= 2 for a standard error); must be None with
        ``exact=True``.
      exact: d quadratic forms with the unit vectors instead of probes.
      max_dim: largest d accepted with ``exact=True`` (default 4096).
      mask: which leaves to include (a pytree of bools or a callable); the other leaves of
        ``value`` and ``stderr`` are zero.
      chunk_size: probes (or unit vectors) per vmapped chunk (None: as in
        :func:`hessian_trace`).
      progress: a tqdm bar over dataset sweeps (only with ``batches``).

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate`` whose ``value`` and
      ``stderr`` are pytrees shaped like ``params`` and ``log_value`` their elementwise log;
      ``key`` is unused (may be None) with ``exact=True``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p**2)
      >>> est = phipsimu.hessian_diagonal(loss, num_samples=2)(jnp.ones(3), key=jax.random.key(0))
      >>> est.value  # exact for a diagonal Hessian, whatever the probes
      Array([1., 2., 3.], dtype=float32)

    Reference: Bekas, Kokiopoulou & Saad (2007); Yao et al., "PyHessian" (2020).
    """
    op = _curvature.as_operator(loss_fn)
    _checks.flag("exact", exact)
    if exact:
        if num_samples is not None:
            raise ValueError(
                f"num_samples={num_samples!r}: exact=True uses the d unit vectors, not random "
                "probes; leave num_samples=None"
            )
        _checks.integer("max_dim", max_dim, lo=1)
    else:
        if num_samples is None:
            raise ValueError(
                "num_samples=None: must be an int >= 1 (the number of Rademacher probes), "
                "or pass exact=True"
            )
        _checks.integer("num_samples", num_samples, lo=1)
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
    _checks.flag("progress", progress)

    def estimate(params: PyTree, *args: Any, key: Any = None, batches: Any = None) -> Estimate:
        if exact:
            perturbed = _tree.perturbed_leaves(params, mask)
            d = _tree.dim(params, perturbed)
            if d > max_dim:
                raise ValueError(
                    f"params: {d} perturbed coordinates exceed max_dim={max_dim}; "
                    "hessian_diagonal(exact=True) forms the d unit vectors as one (d, d) block. "
                    "Use num_samples=..., or raise max_dim knowingly"
                )
            bar = _curvature.progress_bar(progress and batches is not None, 1, "diagonal")
            bound = _curvature.bind(op, params, args, batches, perturbed, chunk_size, bar)
            eye = jnp.eye(d, dtype=_tree.float_dtype(params, perturbed))
            units = _unflatten(eye, [x[None] for x in bound.active])
            forms = bound.quad(units)
            diag = ravel_pytree(bound.active)[1](forms)
            bar.close()
            value = _tree.unsplit(params, perturbed, diag)
            dtype = _tree.float_dtype(params, perturbed)
            est = _measure.closed_form(value, jax.tree.map(jnp.log, value), dtype)
            return _measure.nonfinite(est, ~jnp.all(jnp.isfinite(forms)))
        assert num_samples is not None  # checked when the estimator was built
        draw = _mu.rademacher(mask=mask).draw(key, params, num_samples)
        bar = _curvature.progress_bar(progress and batches is not None, 1, "diagonal")
        bound = _curvature.bind(op, params, args, batches, draw.perturbed, chunk_size, bar)
        vs = draw.active()
        samples = [(v * cv).astype(v.dtype) for v, cv in zip(vs, bound.matvec(vs))]
        bar.close()
        value = _tree.unsplit(params, draw.perturbed, [jnp.mean(s, axis=0) for s in samples])
        stderr = _tree.unsplit(params, draw.perturbed, [_measure.std_mean(s) for s in samples])
        dtype = _tree.float_dtype(params, draw.perturbed)
        ess = jnp.full((), num_samples, dtype)
        # per-coordinate estimates: no single tail to fit; only non-finite terms are flagged
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(s)) for s in samples]))
        status = _diagnostics.flag(~finite, Status.NONFINITE_LOSS)
        nan = jnp.full((), jnp.nan, dtype)
        log_value = jax.tree.map(jnp.log, value)
        return Estimate(value, stderr, log_value, ess, num_samples, nan, status)

    return _execution.eager_jit(estimate)
