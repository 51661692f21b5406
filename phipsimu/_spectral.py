"""Spectral estimators of a curvature operator (the Hessian of a loss by default): Lanczos
eigenvalues and power iteration, and stochastic Lanczos quadrature (log-determinant,
``tr f(C)``, spectral density), on one batch or accumulated over a dataset, for the whole model
or per block.

These are the classical measures that every (φ, ψ, μ) comparison names: SAM is biased toward
λ_max(H), the average-perturbation objective toward Tr(H)/d (docs/conventions.md). Products go
through the operator (``phipsimu._curvature``), iterations through the Krylov kernels
(``phipsimu._krylov``).

References:
  Lanczos (1950); Golub & Meurant, "Matrices, Moments and Quadrature" (2010);
  Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature",
  SIAM J. Matrix Anal. Appl. 38(4), 2017; Lin, Saad & Yang, "Approximating spectral densities
  of large matrices", SIAM Review 58(1), 2016; Yao et al., "PyHessian", 2020.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phipsimu import _checks, _curvature, _diagnostics, _execution, _krylov, _measure, _mu, _tree
from phipsimu._diagnostics import Status
from phipsimu._measure import Estimate

PyTree = Any

_WHICH = ("LA", "SA", "LM")


class EigenResult(NamedTuple):
    """Eigenvalues of the Hessian (or of a block of it) from a Krylov method.

    Attributes:
      value: shape ``(k,)``, the eigenvalue estimates (Ritz values) in the order asked for:
        descending for ``"LA"``, ascending for ``"SA"``, by descending magnitude for ``"LM"``.
      vectors: the Ritz vectors, a pytree shaped like ``params`` with a leading axis ``k``
        (unit norm; zero on leaves that are not perturbed).
      residual: shape ``(k,)``, ``‖H y − θ y‖`` for each Ritz pair (θ, y). Each θ is within
        ``residual`` of an eigenvalue of H, and within ``residual²/gap`` when the gap to the
        rest of the spectrum is known.
      converged: shape ``(k,)`` bools, ``residual <= tol · max|θ|``.
      num_matvecs: Hessian-vector products used: an int32 array as the estimators return
        it (their calls are compiled, eager calls included), a Python int over a dataset
        (``batches``).
      status: int32 bit flags (:class:`phipsimu.Status`, as :attr:`phipsimu.Estimate.status`;
        0 = nothing to report): ``NONFINITE_LOSS`` when a product (so the loss) or a Ritz
        value was NaN or infinite; ``value`` is then NaN. Jit-safe; :meth:`reasons` puts a
        concrete status into words.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p**2)  # H = diag(1, 2, 3)
      >>> eig = phipsimu.top_eigenvalues(loss, 1)(jnp.ones(3), key=jax.random.key(0))
      >>> round(float(eig.value[0]), 4), bool(eig.converged[0]), int(eig.num_matvecs)
      (3.0, True, 3)
      >>> [round(float(x), 4) for x in jnp.abs(eig.vectors[0])]  # the eigenvector e₃
      [0.0, 0.0, 1.0]
      >>> bool(eig.ok), eig.reasons()
      (True, [])
    """

    value: jax.Array
    vectors: PyTree
    residual: jax.Array
    converged: jax.Array
    num_matvecs: int
    status: jax.Array

    def reasons(self) -> list[str]:
        """The status in words, one sentence per flag (empty when the status is 0).

        Call it on a concrete result (outside ``jit``)."""
        return _diagnostics.describe_status(self.status)

    @property
    def ok(self) -> jax.Array:
        """``status == 0``: nothing to report (a boolean array, jit-safe)."""
        return self.status == 0


def _eigen_result(
    value: jax.Array,
    vectors: PyTree,
    residual: jax.Array,
    converged: jax.Array,
    num_matvecs: int,
    coefficients: jax.Array,
) -> EigenResult:
    """An :class:`EigenResult` whose status flags non-finite Krylov coefficients (a NaN
    product) or Ritz values, with NaN values, residuals and no convergence then."""
    bad = ~(jnp.all(jnp.isfinite(coefficients)) & jnp.all(jnp.isfinite(value)))
    return EigenResult(
        jnp.where(bad, jnp.nan, value).astype(value.dtype),
        vectors,
        jnp.where(bad, jnp.nan, residual).astype(residual.dtype),
        converged & ~bad,
        num_matvecs,
        _diagnostics.flag(bad, Status.NONFINITE_LOSS),
    )


class SpectralDensity(NamedTuple):
    """The spectral density ``ρ(t) = (1/d) Σᵢ δ(t − λᵢ)`` estimated by Lanczos quadrature.

    Attributes:
      nodes: shape ``(num_samples, num_iterations)``, the Ritz values of each probe's Krylov
        space (Gauss quadrature nodes).
      weights: same shape, the Gauss quadrature weights; each probe's weights sum to 1.
      grid: shape ``(grid_size,)``, where the smoothed density is evaluated.
      density: shape ``(grid_size,)``, ``(1/m) Σⱼ Σᵢ wⱼᵢ N(t; θⱼᵢ, σ²)``; integrates to 1.
      stderr: shape ``(grid_size,)``, the standard error of ``density`` over probes.
      bandwidth: σ, the standard deviation of the Gaussian kernel.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0, 4.0]) * p**2)
      >>> dens = phipsimu.spectral_density(loss, num_samples=2, num_iterations=4, grid_size=400)(
      ...     jnp.ones(4), key=jax.random.key(0))
      >>> dens.nodes.shape, dens.density.shape
      ((2, 4), (400,))
      >>> step = dens.grid[1] - dens.grid[0]
      >>> round(float(jnp.sum(dens.density) * step), 3)  # the smoothed density integrates to 1
      1.0
      >>> round(float(jnp.sum(dens.grid * dens.density) * step), 3)  # its mean: Tr(H)/d = 2.5
      2.5
    """

    nodes: jax.Array
    weights: jax.Array
    grid: jax.Array
    density: jax.Array
    stderr: jax.Array
    bandwidth: jax.Array


@_execution.cached_factory
def top_eigenvalues(
    loss_fn: _curvature.Curvature,
    k: int = 1,
    *,
    which: str = "LA",
    num_iterations: int | None = None,
    tol: float = 1e-5,
    mask: Any = None,
    blocks: Any = None,
    progress: bool = False,
) -> Callable[..., EigenResult]:
    """The k extreme eigenvalues of the Hessian by Lanczos with full reorthogonalisation.

    Builds the Krylov space ``span{q, Hq, …, H^{n−1}q}`` of a random Gaussian start q with
    n = ``num_iterations`` HVPs, orthogonalising every new vector against all previous ones
    (twice), and returns the Ritz values of ``T = QᵀHQ``. Extreme eigenvalues converge first,
    at a rate set by the gap ratio (Kaniel–Paige–Saad bounds), much faster than power
    iteration (:func:`power_iteration`; ``python -m benchmarks``). The number of
    steps is fixed, so the whole estimator jits.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (its Hessian H is analysed), or a
        curvature operator from :mod:`phipsimu.curvature` (e.g. ``gauss_newton``).
      k: how many eigenvalues (>= 1; at most ``num_iterations`` and the dimension d).
      which: ``"LA"`` largest algebraic (λ_max first, SAM's measure), ``"SA"`` smallest
        algebraic (most negative first), ``"LM"`` largest magnitude.
      num_iterations: Lanczos steps n = HVPs (>= k; capped at d, where Lanczos is exact).
        ``None`` uses ``max(2k, k + 40)``.
      tol: relative residual for the ``converged`` flag: ``‖Hy − θy‖ <= tol · max|θ|``.
      mask: which leaves to analyse (the Hessian's diagonal block on them): a pytree of bools
        shaped like params, or a callable ``params -> mask``; None for every float leaf.
      blocks: per-block analysis instead of ``mask``: a pytree of labels shaped like params
        (``None`` excludes a leaf) or a callable such as :func:`layer_blocks`; the result is
        a dict ``{label: EigenResult}`` of each diagonal block.
      progress: show a tqdm bar over dataset sweeps (only with ``batches``; tqdm optional).

    Returns:
      ``eig(params, *args, key, batches=None) -> EigenResult``, pure and jit-able on one
      batch. With ``batches`` (a list of batches, or a zero-argument callable returning a
      fresh iterable; a tuple batch is unpacked into ``loss_fn(params, *batch)``), H is the
      Hessian of the dataset mean loss, each HVP a size-weighted sweep over the batches; call
      it eagerly then (the sweep is a Python loop, each batch's HVP is jitted).

    Raises:
      ValueError / TypeError: bad hyperparameters (here); at call time, ``k`` larger than d,
      an empty or one-shot batch iterable, a bad key or mask.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 6.0) * p**2)
      >>> eig = phipsimu.top_eigenvalues(loss, 2)(jnp.ones(5), key=jax.random.key(0))
      >>> [round(float(x), 4) for x in eig.value]
      [5.0, 4.0]

    Reference: Lanczos (1950); Golub & Van Loan, "Matrix Computations", §10.1.
    """
    op = _curvature.as_operator(loss_fn)
    _checks.integer("k", k, lo=1)
    if which not in _WHICH:
        raise ValueError(f"which={which!r}: must be one of {_WHICH}")
    _checks.integer("num_iterations", num_iterations, lo=k, allow_none=True)
    tol = _checks.real("tol", tol, lo=0.0, strict=True)
    n_req = max(2 * k, k + 40) if num_iterations is None else num_iterations

    def build(m: Any) -> Callable[..., EigenResult]:
        def eig(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> EigenResult:
            start = _mu.gaussian(mask=m).draw(key, params, 1)
            perturbed, d = start.perturbed, start.d
            if k > d:
                raise ValueError(f"k={k}: exceeds the dimension d={d} of the perturbed parameters")
            n = min(n_req, d)
            bar = _curvature.progress_bar(progress and batches is not None, n, "Lanczos")
            bound = _curvature.bind(op, params, args, batches, perturbed, 1, bar)
            s = _krylov.lanczos(bound, start.active(), n)
            bar.close()
            theta, vecs = _krylov.ritz(s)
            idx = _krylov.select(theta, which, k)
            coef = vecs[:, idx]
            residual = jnp.abs(s.beta[0][-1] * coef[-1])
            ritz = [jnp.tensordot(coef.T, b[0, :n], axes=1).astype(b.dtype) for b in s.basis]
            vectors = _tree.unsplit(params, perturbed, ritz, k)
            value = theta[idx]
            converged = residual <= tol * jnp.max(jnp.abs(theta))
            coefficients = jnp.concatenate([s.alpha[0], s.beta[0]])
            return _eigen_result(value, vectors, residual, converged, n, coefficients)

        return eig

    return _execution.per_block(build, mask, blocks)


@_execution.cached_factory
def power_iteration(
    loss_fn: _curvature.Curvature,
    *,
    num_iterations: int = 100,
    tol: float = 1e-5,
    mask: Any = None,
    blocks: Any = None,
    progress: bool = False,
) -> Callable[..., EigenResult]:
    """The largest-magnitude eigenvalue by power iteration: the baseline Lanczos is measured
    against (PyHessian's and hessian-eigenthings' default).

    ``v ← Hv/‖Hv‖`` from a random Gaussian start; after n HVPs it reports the Rayleigh
    quotient ``θ = vᵀHv`` of the last iterate and its residual ``‖Hv − θv‖``. The error
    shrinks like ``(λ₂/λ₁)^{2n}``, so it is slow when the top eigenvalues are close; prefer
    :func:`top_eigenvalues` (same cost per step).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (its Hessian H is analysed), or a
        curvature operator from :mod:`phipsimu.curvature` (e.g. ``gauss_newton``).
      num_iterations: HVPs (>= 1).
      tol: relative residual for ``converged``: ``‖Hv − θv‖ <= tol·|θ|``.
      mask, blocks, progress: as in :func:`top_eigenvalues`.

    Returns:
      ``eig(params, *args, key, batches=None) -> EigenResult`` with ``k = 1``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 4.0]) * p**2)  # H = diag(1, 2, 4)
      >>> eig_fn = phipsimu.power_iteration(loss, num_iterations=40)
      >>> eig = eig_fn(jnp.ones(3), key=jax.random.key(0))
      >>> round(float(eig.value[0]), 4), bool(eig.converged[0])  # error ~ (2/4)^(2·40)
      (4.0, True)
    """
    op = _curvature.as_operator(loss_fn)
    _checks.integer("num_iterations", num_iterations, lo=1)
    tol = _checks.real("tol", tol, lo=0.0, strict=True)

    def build(m: Any) -> Callable[..., EigenResult]:
        def eig(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> EigenResult:
            start = _mu.gaussian(mask=m).draw(key, params, 1)
            bar = _curvature.progress_bar(
                progress and batches is not None, num_iterations, "power iteration"
            )
            bound = _curvature.bind(op, params, args, batches, start.perturbed, 1, bar)
            s = _krylov.power(bound, start.active(), num_iterations)
            bar.close()
            vectors = _tree.unsplit(params, start.perturbed, s.vector, 1)
            converged = s.residual <= tol * jnp.abs(s.theta)
            return _eigen_result(s.theta, vectors, s.residual, converged, num_iterations, s.theta)

        return eig

    return _execution.per_block(build, mask, blocks)


# ---------------------------------------------------------------- stochastic Lanczos quadrature


def _slq(
    op: _curvature.Operator,
    params: PyTree,
    args: tuple,
    batches: Any,
    key: jax.Array,
    *,
    mask: Any,
    probes: str,
    num_samples: int,
    num_iterations: int,
    chunk_size: int | None,
    progress: bool,
) -> tuple[jax.Array, jax.Array, int]:
    """Gauss quadrature nodes θ and weights τ (each ``(m, n)``) of every probe, and d.

    Probe j's unit start vector ``uⱼ = vⱼ/‖vⱼ‖`` gives ``uⱼᵀ f(C) uⱼ ≈ Σᵢ τⱼᵢ f(θⱼᵢ)``, exact
    for polynomials of degree < 2n. For Rademacher, Gaussian and sphere probes u is such that
    ``E[d·uᵀAu] = Tr A`` (a normalised Gaussian is uniform on the sphere).
    """
    draw = _mu.probe_sampler(probes, mask).draw(key, params, num_samples)
    n = min(num_iterations, draw.d)
    chunk = chunk_size
    if chunk is None:
        # each probe's Lanczos run holds n + 1 vectors
        per_probe = (n + 1) * _execution.leaf_bytes(draw.active()) // num_samples
        chunk = _execution.default_chunk(num_samples, per_probe)
    num_chunks = -(-num_samples // chunk)
    bar = _curvature.progress_bar(progress and batches is not None, n * num_chunks, "SLQ")
    bound = _curvature.bind(op, params, args, batches, draw.perturbed, chunk, bar)
    vs = draw.active()

    def run(v: list) -> tuple[jax.Array, jax.Array]:
        s = _krylov.lanczos(bound, v, n)
        return s.alpha, s.beta

    if bound.host:
        parts = [run([x[i : i + chunk] for x in vs]) for i in range(0, num_samples, chunk)]
        alpha = jnp.concatenate([p[0] for p in parts])
        beta = jnp.concatenate([p[1] for p in parts])
    else:

        def one(v: list) -> tuple[jax.Array, jax.Array]:
            a, b = run([x[None] for x in v])
            return a[0], b[0]

        alpha, beta = _execution.chunked_map(
            one, vs, None if chunk >= num_samples else chunk, unroll=False
        )
    bar.close()
    theta, vecs = jnp.linalg.eigh(jax.vmap(_krylov.tridiagonal)(alpha, beta))
    return theta, vecs[:, 0, :] ** 2, draw.d


def _slq_estimator(
    loss_fn: _curvature.Curvature,
    finish: Callable[[jax.Array, jax.Array, int], Any],
    *,
    num_samples: int,
    num_iterations: int,
    probes: str | _mu.Sampler,
    mask: Any,
    blocks: Any,
    chunk_size: int | None,
    progress: bool,
) -> Callable[..., Any]:
    """``fn(params, *args, key, batches=None)`` running SLQ and returning
    ``finish(theta, tau, d)`` (Ritz values, Gauss weights, dimension), per block if asked;
    shared by :func:`trace_function`, :func:`log_determinant` and :func:`spectral_density`.
    Validates the arguments they share."""
    op = _curvature.as_operator(loss_fn)
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
    _checks.integer("num_samples", num_samples, lo=1)
    _checks.integer("num_iterations", num_iterations, lo=1)
    probes = _mu.probe_name(probes)
    _checks.flag("progress", progress)

    def build(m: Any) -> Callable[..., Any]:
        def run(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> Any:
            theta, tau, d = _slq(
                op, params, args, batches, key, mask=m, probes=probes,
                num_samples=num_samples, num_iterations=num_iterations,
                chunk_size=chunk_size, progress=progress,
            )  # fmt: skip
            return finish(theta, tau, d)

        return run

    return _execution.per_block(build, mask, blocks)


def _check_elementwise(f: Callable[[jax.Array], jax.Array]) -> None:
    """Raise a ValueError unless ``f`` acts elementwise on a few positive test values: it
    keeps the shape of a (2, 4) array, commutes with a permutation and gives the same values
    on a prefix (``jnp.sum``, ``jnp.sort``, ``jnp.cumsum``, ``x - x.mean()`` fail). Ten scalar
    evaluations, once, when built."""
    x = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
    perm = np.array([2, 0, 3, 1])
    try:
        shape = jax.eval_shape(f, jax.ShapeDtypeStruct((2, 4), jnp.float32)).shape
        # concrete even when the estimator is built inside jit
        with jax.ensure_compile_time_eval():
            fx, fpx, head = (np.asarray(f(jnp.asarray(y))) for y in (x, x[perm], x[:2]))
    except Exception as err:
        raise ValueError(
            f"f={f!r}: must be an elementwise JAX function of an array of eigenvalues "
            f"(jnp.log, jnp.square, ...); calling it on an array raised {err!r}"
        ) from err
    elementwise = (
        shape == (2, 4)
        and fx.shape == fpx.shape == (4,)
        and head.shape == (2,)
        and np.allclose(fx[np.asarray(perm)], fpx, rtol=1e-6, atol=0.0, equal_nan=True)
        and np.allclose(fx[:2], head, rtol=1e-6, atol=0.0, equal_nan=True)
    )
    if not elementwise:
        raise ValueError(
            f"f={f!r}: must act elementwise on the eigenvalues (f(θ)[i] = f(θ[i]), as "
            "jnp.log or jnp.square); on test values it changed the shape of its input, did "
            "not commute with a permutation or mixed entries (a reduction such as jnp.sum, "
            "jnp.sort, x - x.mean())"
        )


@_execution.cached_factory
def trace_function(
    loss_fn: _curvature.Curvature,
    f: Callable[[jax.Array], jax.Array],
    *,
    num_samples: int,
    num_iterations: int = 30,
    probes: str | _mu.Sampler = "rademacher",
    mask: Any = None,
    blocks: Any = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Callable[..., Estimate]:
    """``Tr f(H)`` by stochastic Lanczos quadrature (SLQ).

    .. math:: \\operatorname{Tr} f(H) \\approx \\frac{d}{m} \\sum_{j=1}^m \\sum_{i=1}^n
       \\tau_{ji} f(\\theta_{ji})

    where ``(θⱼᵢ, τⱼᵢ)`` are the Ritz values and squared first eigenvector components of the
    n×n Lanczos tridiagonal of probe j (Gauss quadrature for ``uⱼᵀ f(H) uⱼ``, exact for
    polynomials of degree < 2n). The standard error is over probes; the quadrature bias
    (smooth f converges geometrically in n) is not in it.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (its Hessian H is analysed), or a
        curvature operator from :mod:`phipsimu.curvature` (e.g. ``gauss_newton``).
      f: an elementwise JAX function of the eigenvalues (``jnp.log``, ``jnp.square``, …);
        checked when built on a few test values: a reduction (``jnp.sum``) or a function
        that mixes entries (``jnp.sort``) raises a ValueError.
      num_samples: probes m (>= 1; >= 2 for a standard error).
      num_iterations: Lanczos steps n per probe (HVPs per probe; capped at d).
      probes: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"``, or that sampler
        (``phipsimu.mu.rademacher()``, ...; unmasked: ``mask`` says which leaves), drawn as
        ``mu.<probes>(mask=mask).sample(key, params, num_samples)``.
      mask, blocks, progress: as in :func:`top_eigenvalues`.
      chunk_size: probes whose Lanczos runs go together (vmapped; memory
        ``chunk_size·(n+1)·d``); None: 4 on CPU, as many as fit
        ``phipsimu.curvature.ACCELERATOR_CHUNK_BYTES`` on GPU/TPU. Over a dataset, each group
        costs n sweeps.

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate`` (``num_samples`` = m).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0, 4.0]) * p**2)
      >>> est = phipsimu.trace_function(loss, jnp.square, num_samples=4, num_iterations=4)(
      ...     jnp.ones(4), key=jax.random.key(0))
      >>> round(float(est.value), 3)  # Tr H² = 1 + 4 + 9 + 16; exact: n = d, H diagonal
      30.0

    Reference: Ubaru, Chen & Saad (2017); Golub & Meurant (2010).
    """
    if not callable(f):
        raise TypeError(f"f={f!r}: must be a callable applied to the eigenvalues")
    _check_elementwise(f)

    def finish(theta: jax.Array, tau: jax.Array, d: int) -> Estimate:
        return _measure.sample_mean(d * jnp.sum(tau * f(theta), axis=1))

    return _slq_estimator(
        loss_fn,
        finish,
        num_samples=num_samples,
        num_iterations=num_iterations,
        probes=probes,
        mask=mask,
        blocks=blocks,
        chunk_size=chunk_size,
        progress=progress,
    )


@_execution.cached_factory
def log_determinant(
    loss_fn: _curvature.Curvature,
    *,
    damping: float = 0.0,
    num_samples: int,
    num_iterations: int = 30,
    probes: str | _mu.Sampler = "rademacher",
    mask: Any = None,
    blocks: Any = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Callable[..., Estimate]:
    """``log det(H + δI)`` by stochastic Lanczos quadrature, for ``H + δI`` positive definite.

    .. math:: \\log\\det(H + \\delta I) = \\operatorname{Tr}\\log(H + \\delta I)
       \\approx \\frac{d}{m}\\sum_j \\sum_i \\tau_{ji} \\log(\\theta_{ji} + \\delta)

    The determinant preset of Table 1 (``phipsimu.measures.determinant``) in log space for
    large d. Every Ritz value θ is a Rayleigh quotient ``yᵀHy`` of a unit vector, so
    ``θ + δ <= 0`` *proves* ``H + δI`` is not positive definite. Meaning of the result:

    * ``value = NaN``: some Ritz value has ``θ < −tol`` and ``θ + δ < −tol`` — H + δI is
      indefinite, the log-determinant of the quadratic model is undefined (add damping
      > −λ_min);
    * ``value = −inf``: H + δI is singular to working precision (det = 0, as on any zero-loss
      manifold): with ``δ = 0`` a Ritz value within ``tol = n·eps·max|θ|`` (the rounding of
      H's own products) of zero, with ``δ > 0`` a negative θ within tol of ``−δ``. A Ritz
      value within tol of zero counts as 0, so ``θ + δ = δ``: with δ > 0 a positive
      semi-definite operator (Gauss–Newton) is never reported singular, whatever its norm;
    * finite: every Ritz value is positive. Lanczos finds the extreme eigenvalues first, but a
      negative eigenvalue that no Krylov space reached cannot be seen: check
      ``top_eigenvalues(..., which="SA")`` when in doubt.

    ``value`` is the log-determinant itself (negative when det(H + δI) < 1), with its
    standard error over probes. ``log_value`` is the same number: the log of the determinant
    (as ``log_value`` of the determinant preset), not the log of the log-determinant.

    For a network away from a minimum the Hessian is indefinite and the log-determinant
    undefined; the Gauss–Newton operator (``phipsimu.curvature.gauss_newton``) is positive
    semi-definite, so ``log det(G + δI)`` is defined for every δ > 0.

    How much of it is the damping's: with δ > 0, ``Estimate.damping_share`` is the share of
    the spectrum's weight (the Ritz values' quadrature weights, averaged over probes) below
    δ. Over that share of the d terms ``log(λ + δ)`` lies in ``[log δ, log δ + log 2)``: the
    damping, not the operator, sets them (a value near ``d·log δ`` has a share near 1). It
    "dominates" when the share exceeds 0.5 (more than half of the terms are the damping's);
    the estimate then carries ``Status.DAMPING_DOMINATED``: lower δ, or compare models by
    quantities that do not count the null space (``top_eigenvalues``, the trace).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (its Hessian H is analysed), or a
        curvature operator from :mod:`phipsimu.curvature` (e.g. ``gauss_newton``).
      damping: δ >= 0 added to every eigenvalue.
      num_samples, num_iterations, probes, mask, blocks, chunk_size, progress: as in
        :func:`trace_function`.

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate`` with ``value`` =
      ``log_value`` = ``log det(H + δI)``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * p**2)
      >>> est = phipsimu.log_determinant(loss, num_samples=4, num_iterations=4)(
      ...     jnp.ones(4), key=jax.random.key(0))
      >>> round(float(est.value), 4)  # log 24: exact once n = d
      3.1781

    Reference: Ubaru, Chen & Saad (2017); docs/conventions.md, "Table 1 presets".
    """
    damping = _checks.real("damping", damping, lo=0.0, strict=False)

    def finish(theta: jax.Array, tau: jax.Array, d: int) -> Estimate:
        # Ritz values carry the operator's own rounding, n·eps·max|θ|: one within it of 0 is
        # an eigenvalue of 0 to working precision, and θ + δ is then δ exactly. Only a θ
        # below −tol proves H indefinite, so the damping is never compared with the rounding
        # of ‖H‖ (a damped PSD operator is never singular, however large its norm).
        tol = theta.shape[1] * jnp.finfo(theta.dtype).eps * jnp.max(jnp.abs(theta))
        rounded = jnp.where(jnp.abs(theta) <= tol, 0.0, theta)
        shifted = rounded + damping
        low = jnp.min(shifted)
        negative = low < 0.0
        singular = (low == 0.0) | ((jnp.abs(low) <= tol) & (jnp.min(rounded) < 0.0))
        ok = ~negative & ~singular
        per_probe = d * jnp.sum(tau * jnp.log(jnp.where(shifted > 0.0, shifted, 1.0)), axis=1)
        est = _measure.sample_mean(per_probe)
        bad = jnp.where(negative & ~singular, jnp.nan, -jnp.inf)
        value = jnp.where(ok, est.value, bad)
        stderr = jnp.where(ok, est.stderr, jnp.nan)
        status = (
            est.status
            | _diagnostics.flag(negative & ~singular, Status.NOT_POSITIVE_DEFINITE)
            | _diagnostics.flag(singular, Status.SINGULAR)
        )
        est = est._replace(value=value, stderr=stderr, log_value=value, status=status)
        if damping > 0:
            # the spectrum's weight below δ, where log(λ + δ) ∈ [log δ, log δ + log 2)
            share = jnp.mean(jnp.sum(tau * (rounded < damping), axis=1))
            dominated = share > _diagnostics.DAMPING_DOMINATED_SHARE
            est = est._replace(
                damping_share=share,
                status=est.status | _diagnostics.flag(dominated, Status.DAMPING_DOMINATED),
            )
        # a NaN product (a NaN loss) gives NaN Ritz values, which compare false everywhere
        return _measure.nonfinite(est, ~jnp.all(jnp.isfinite(theta)))

    return _slq_estimator(
        loss_fn,
        finish,
        num_samples=num_samples,
        num_iterations=num_iterations,
        probes=probes,
        mask=mask,
        blocks=blocks,
        chunk_size=chunk_size,
        progress=progress,
    )


@_execution.cached_factory
def spectral_density(
    loss_fn: _curvature.Curvature,
    *,
    num_samples: int,
    num_iterations: int = 80,
    grid_size: int = 512,
    bandwidth: float | None = None,
    probes: str | _mu.Sampler = "rademacher",
    mask: Any = None,
    blocks: Any = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Callable[..., SpectralDensity]:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (PyHessian's
    density plot).

    .. math:: \\rho(t) = \\frac1d\\sum_k \\delta(t - \\lambda_k) \\approx
       \\frac1m \\sum_j \\sum_i \\tau_{ji}\\, \\mathcal N(t;\\, \\theta_{ji}, \\sigma^2)

    The discrete measure ``Σ τⱼᵢ δ(t − θⱼᵢ)/m`` has total mass 1 and its moments are unbiased
    estimates of ``Tr(H^p)/d`` for p < 2n (Gauss quadrature exactness); the smoothed density
    adds the kernel's variance σ² to the second moment.

    Bandwidth rule (``bandwidth=None``): ``σ = (θ_max − θ_min)/n``, the mean spacing of n
    Gauss nodes over the Ritz range — roughly the resolution n-point quadrature has
    (Lin, Saad & Yang 2016, §3.2); narrower kernels only show the individual nodes. The grid
    spans ``[θ_min − 5σ, θ_max + 5σ]`` so the density's mass outside it is below 1e−6.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (its Hessian H is analysed), or a
        curvature operator from :mod:`phipsimu.curvature` (e.g. ``gauss_newton``).
      num_samples: probes m (>= 1; >= 2 for a standard error).
      num_iterations: Lanczos steps n (capped at d).
      grid_size: points of the evaluation grid (>= 2).
      bandwidth: σ > 0, or None for the rule above.
      probes, mask, blocks, chunk_size, progress: as in :func:`trace_function`.

    Returns:
      ``density(params, *args, key, batches=None) -> SpectralDensity``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0, 4.0]) * p**2)
      >>> dens = phipsimu.spectral_density(loss, num_samples=2, num_iterations=4)(
      ...     jnp.ones(4), key=jax.random.key(0))
      >>> [round(float(t), 3) for t in dens.nodes[0]]  # with n = d the nodes are H's eigenvalues
      [1.0, 2.0, 3.0, 4.0]
      >>> [round(float(w), 3) for w in dens.weights[0]]  # each of weight 1/d
      [0.25, 0.25, 0.25, 0.25]
      >>> round(float(dens.bandwidth), 3)  # (θ_max − θ_min)/n
      0.75

    Reference: Lin, Saad & Yang (2016); Ghorbani, Krishnan & Xiao (2019); Yao et al. (2020).
    """
    _checks.integer("grid_size", grid_size, lo=2)
    if bandwidth is not None:
        bandwidth = _checks.real("bandwidth", bandwidth, lo=0.0, strict=True)

    def finish(theta: jax.Array, tau: jax.Array, d: int) -> SpectralDensity:
        lo, hi = jnp.min(theta), jnp.max(theta)
        if bandwidth is None:
            # floor relative to the spectrum's scale (a coincident spectrum has no spread);
            # eps itself only for H = 0, which has no scale at all
            eps = jnp.finfo(theta.dtype).eps
            tiny = eps * jnp.maximum(jnp.abs(lo), jnp.abs(hi))
            sigma = jnp.maximum((hi - lo) / theta.shape[1], tiny)
            sigma = jnp.where(sigma > 0, sigma, eps)
        else:
            sigma = jnp.asarray(bandwidth, theta.dtype)
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=theta.dtype)
        z = (grid[None, None, :] - theta[:, :, None]) / sigma
        kern = jnp.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        per_probe = jnp.sum(tau[:, :, None] * kern, axis=1)
        dens = jnp.mean(per_probe, axis=0)
        stderr = _measure.std_mean(per_probe)
        return SpectralDensity(theta, tau, grid, dens, stderr, sigma)

    return _slq_estimator(
        loss_fn,
        finish,
        num_samples=num_samples,
        num_iterations=num_iterations,
        probes=probes,
        mask=mask,
        blocks=blocks,
        chunk_size=chunk_size,
        progress=progress,
    )
