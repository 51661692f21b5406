"""Spectral estimators of the Hessian: Lanczos eigenvalues, stochastic Lanczos quadrature
(log-determinant, tr f(H), spectral density) and stochastic trace estimators (Hutchinson,
Hutch++, XTrace), on one batch or accumulated over a dataset, for the whole model or per block.

These are the classical measures that every (φ, ψ, μ) comparison names: SAM is biased toward
λ_max(H), the average-perturbation objective toward Tr(H)/d (MATH.md). Every Hessian product
goes through ``phipsimu._curvature`` (the one HVP, the one quadratic form).

Krylov vectors are lists of the perturbed parameter leaves (pytree-native: no ravel of the
model). Only Hutch++ and XTrace flatten their small probe *blocks* into a ``(d, m)`` matrix for
a Householder QR; say so where a sharded model matters.

References:
  Lanczos (1950); Golub & Meurant, "Matrices, Moments and Quadrature" (2010);
  Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature",
  SIAM J. Matrix Anal. Appl. 38(4), 2017; Lin, Saad & Yang, "Approximating spectral densities
  of large matrices", SIAM Review 58(1), 2016; Hutchinson (1989); Meyer, Musco, Musco &
  Woodruff, "Hutch++", SOSA 2021; Epperly, Tropp & Webber, "XTrace", SIAM J. Matrix Anal.
  Appl. 45(1), 2024; Yao et al., "PyHessian", 2020.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from phipsimu import _checks, _curvature, _measure, _mu, _tree
from phipsimu._estimate import Estimate

PyTree = Any

_WHICH = ("LA", "SA", "LM")
_PROBES = {"rademacher": _mu.rademacher, "gaussian": _mu.gaussian, "sphere": _mu.sphere}
_TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")


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
      num_matvecs: Hessian-vector products used.
    """

    value: jax.Array
    vectors: PyTree
    residual: jax.Array
    converged: jax.Array
    num_matvecs: int


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
    """

    nodes: jax.Array
    weights: jax.Array
    grid: jax.Array
    density: jax.Array
    stderr: jax.Array
    bandwidth: jax.Array


# ---------------------------------------------------------------- validation


def _check_common(loss_fn: Any, mask: Any, blocks: Any, batch_size: Any) -> None:
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args)")
    if mask is not None and blocks is not None:
        raise ValueError("mask and blocks: give at most one (blocks partitions, mask selects)")
    _checks.integer("batch_size", batch_size, lo=1, allow_none=True)


def _check_probes(probes: Any, allowed: tuple[str, ...] = tuple(_PROBES)) -> None:
    if probes not in allowed:
        raise ValueError(f"probes={probes!r}: must be one of {allowed}")


# ---------------------------------------------------------------- blocks


def layer_blocks(params: PyTree) -> PyTree:
    """Label every leaf by the path of its parent node: one block per layer.

    For ``[{"w", "b"}, {"w", "b"}]`` the labels are ``"0"`` and ``"1"``; for a flax tree
    ``{"params": {"Dense_0": {"kernel", "bias"}}}`` they are ``"params/Dense_0"``. Pass as
    ``blocks=phipsimu.layer_blocks`` to any spectral estimator.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path[:-1], simple=True, separator="/"), params
    )


def _block_masks(params: PyTree, blocks: Any) -> dict[Any, PyTree]:
    labels = blocks(params) if callable(blocks) else blocks
    treedef = jax.tree_util.tree_structure(params)
    try:
        label_leaves = treedef.flatten_up_to(labels)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"blocks: its structure does not match the params structure {treedef}; pass a "
            "pytree of labels shaped like params (None excludes a leaf) or a callable"
        ) from err
    order: dict[Any, None] = {}
    for lab in label_leaves:
        if lab is not None:
            order.setdefault(lab, None)
    if not order:
        raise ValueError("blocks: every leaf is labelled None, so there is no block to analyse")
    return {
        lab: jax.tree_util.tree_unflatten(treedef, [x == lab for x in label_leaves])
        for lab in order
    }


def _with_blocks(build: Callable[[Any], Callable], mask: Any, blocks: Any) -> Callable:
    """``build(mask)`` for one mask; with ``blocks``, a function returning ``{label: result}``
    with one result per block (its diagonal block of the Hessian)."""
    if blocks is None:
        return build(mask)
    if not (callable(blocks) or jax.tree_util.tree_leaves(blocks, is_leaf=lambda x: x is None)):
        raise ValueError(f"blocks={blocks!r}: must be a pytree of labels or a callable")

    def per_block(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> dict:
        return {
            label: build(m)(params, *args, key=key, batches=batches)
            for label, m in _block_masks(params, blocks).items()
        }

    return per_block


# ---------------------------------------------------------------- the operator


def _block_hvp(
    loss_fn: Callable, perturbed: tuple[bool, ...], chunk: int, params: PyTree, vs: list, args
) -> list:
    """``∇²L vᵢ`` for a block of vectors (leaves of the perturbed parameters with a leading
    axis), through the one HVP of ``_curvature`` applied to the loss restricted to them."""
    active, merge = _curvature.split(params, list(perturbed))
    hvp = _curvature.hvp(lambda a, *ar: loss_fn(merge(a), *ar))
    num = vs[0].shape[0]
    return _tree.batched_map(lambda v: hvp(active, v, *args), vs, None if chunk >= num else chunk)


def _block_quad(
    loss_fn: Callable, perturbed: tuple[bool, ...], chunk: int, params: PyTree, vs: list, args
) -> jax.Array:
    active, merge = _curvature.split(params, list(perturbed))
    return _curvature.quadratic_forms(
        lambda a, *ar: loss_fn(merge(a), *ar),
        active,
        vs,
        args,
        [True] * len(active),
        batch_size=chunk,
    )


_jit_block_hvp = jax.jit(_block_hvp, static_argnums=(0, 1, 2))
_jit_block_quad = jax.jit(_block_quad, static_argnums=(0, 1, 2))


class _Operator(NamedTuple):
    """The Hessian over the perturbed leaves as a block operator.

    ``host`` is True for a dataset sweep (Python-driven, per-batch work jitted); then the
    algorithms run their outer loops in Python. Otherwise everything is traceable.
    """

    matvec: Callable[[list], list]
    quad: Callable[[list], jax.Array]
    host: bool
    active: list


def _operator(
    loss_fn: Callable,
    params: PyTree,
    args: tuple,
    batches: Any,
    perturbed: list[bool],
    chunk: int,
    bar: Any,
) -> _Operator:
    pt = tuple(perturbed)
    active, _ = _curvature.split(params, perturbed)
    if not active:
        raise ValueError(
            "params: no leaf is perturbed (no floating-point leaves, or the mask excludes all)"
        )
    if batches is None:
        _curvature.check_scalar_loss(loss_fn, params, args)
        return _Operator(
            lambda vs: _block_hvp(loss_fn, pt, chunk, params, vs, args),
            lambda vs: _block_quad(loss_fn, pt, chunk, params, vs, args),
            False,
            active,
        )
    if args:
        raise ValueError(
            f"args: with batches=..., every loss_fn argument comes from the batch; got {len(args)} "
            "extra positional argument(s) (close over constants in loss_fn instead)"
        )
    _curvature.check_batches(batches)

    def matvec(vs: list) -> list:
        out = _curvature.dataset_mean(
            lambda *b: _jit_block_hvp(loss_fn, pt, chunk, params, vs, b), batches
        )
        bar.update(1)
        return out

    def quad(vs: list) -> jax.Array:
        out = _curvature.dataset_mean(
            lambda *b: _jit_block_quad(loss_fn, pt, chunk, params, vs, b), batches
        )
        bar.update(1)
        return out

    return _Operator(matvec, quad, True, active)


def _chunk(batch_size: int | None) -> int:
    return _curvature.DEFAULT_CHUNK if batch_size is None else batch_size


def _probes(probes: str, mask: Any, key: jax.Array, params: PyTree, num: int, perturbed):
    """``num`` probe vectors, exactly ``phipsimu.mu.<probes>(mask=mask).sample(key, params,
    num)`` restricted to the perturbed leaves, and c with ``E[vvᵀ] = c·I``."""
    sampler = _PROBES[probes](mask=mask)
    v, _ = sampler.sample(key, params, num)
    vs = [x for x, p in zip(jax.tree_util.tree_leaves(v), perturbed) if p]
    d = sum(int(math.prod(x.shape[1:])) for x in vs)
    return vs, (1.0 / d if probes == "sphere" else 1.0)


class _Step(NamedTuple):
    """One iteration ``state = update(state, H·current(state))`` on a block of vectors: the
    traceable functions, and the same functions jitted once (module level) for the dataset
    path, so that repeated estimator calls reuse their compilation."""

    update: Callable
    current: Callable
    update_jit: Callable
    current_jit: Callable


def _step(update: Callable, current: Callable) -> _Step:
    return _Step(update, current, jax.jit(update), jax.jit(current))


def _iterate(op: _Operator, step: _Step, state: Any, n: int) -> Any:
    """``n`` steps of ``step``: a ``fori_loop`` (jit-able) on one batch, a Python loop of the
    jitted step over a dataset."""
    if op.host:
        for _ in range(n):
            state = step.update_jit(state, op.matvec(step.current_jit(state)))
        return state
    return jax.lax.fori_loop(0, n, lambda _, s: step.update(s, op.matvec(step.current(s))), state)


# ---------------------------------------------------------------- Lanczos


class _LanczosState(NamedTuple):
    basis: list  # leaves (n + 1, *shape): q_0..q_n, rows not yet reached are zero
    alpha: jax.Array  # (n,) diagonal of T
    beta: jax.Array  # (n,) beta[i] couples q_i and q_{i+1}
    i: jax.Array


def _lanczos_init(v: list, n: int) -> _LanczosState:
    nrm = jnp.sqrt(_tree.sq_norm(v))
    basis = [jnp.zeros((n + 1, *x.shape), x.dtype).at[0].set(x / nrm) for x in v]
    dt = _tree.float_dtype(v)
    return _LanczosState(basis, jnp.zeros((n,), dt), jnp.zeros((n,), dt), jnp.zeros((), int))


def _lanczos_current(s: _LanczosState) -> list:
    return [jax.lax.dynamic_index_in_dim(b, s.i, keepdims=False) for b in s.basis]


def _project_out(basis: list, r: list) -> list:
    """``r − Q Qᵀ r`` over all basis rows (unreached rows are zero, so this is the projection
    onto the complement of the Krylov space so far)."""
    c = sum(jnp.tensordot(b, x, axes=x.ndim) for b, x in zip(basis, r))
    return [(x - jnp.tensordot(c, b, axes=1)).astype(x.dtype) for b, x in zip(basis, r)]


def _restart_direction(like: list, i: jax.Array) -> list:
    """A deterministic pseudo-random vector (integer hash of coordinate and step), in
    [−½, ½). Used only on breakdown; a ``jax.random`` draw inside the loop costs seconds of
    compile time on CPU, and any direction outside the Krylov space serves."""
    out, offset = [], 0
    salt = (i.astype(jnp.uint32) + jnp.uint32(1)) * jnp.uint32(0x85EBCA77)
    for x in like:
        h = jnp.arange(x.size, dtype=jnp.uint32) + jnp.uint32(offset)
        h = h * jnp.uint32(0x9E3779B1) + salt
        h = h ^ (h >> 15)
        h = h * jnp.uint32(0x2C1B3C6D)
        h = h ^ (h >> 12)
        h = h * jnp.uint32(0x297A2D39)
        h = h ^ (h >> 15)
        u = h.astype(jnp.float32) / jnp.float32(2**32) - 0.5
        out.append(jnp.reshape(u, x.shape).astype(x.dtype))
        offset += int(x.size)
    return out


def _lanczos_update(s: _LanczosState, w: list) -> _LanczosState:
    """One Lanczos step with full reorthogonalisation (classical Gram–Schmidt, twice).

    On breakdown (the Krylov space is invariant) the next vector is a random vector
    orthogonal to the basis and ``beta[i] = 0``: T stays ``QᵀHQ`` with Q orthonormal, so the
    Ritz values stay inside the spectrum, and quadrature weights on the new block are zero.
    """
    q = _lanczos_current(s)
    alpha = _tree.dot(q, w)
    r = _project_out(s.basis, _project_out(s.basis, w))
    beta = jnp.sqrt(_tree.sq_norm(r))
    eps = jnp.finfo(s.alpha.dtype).eps
    breakdown = beta <= 100 * eps * jnp.sqrt(_tree.sq_norm(w))

    def restart(_):
        g = _restart_direction(r, s.i)
        g = _project_out(s.basis, _project_out(s.basis, g))
        n = jnp.sqrt(_tree.sq_norm(g))
        return [jnp.where(n > 0, x / jnp.where(n > 0, n, 1), 0).astype(x.dtype) for x in g]

    def proceed(_):
        return [(x / beta).astype(x.dtype) for x in r]

    q_next = jax.lax.cond(breakdown, restart, proceed, None)
    basis = [jax.lax.dynamic_update_index_in_dim(b, x, s.i + 1, 0) for b, x in zip(s.basis, q_next)]
    return _LanczosState(
        basis,
        s.alpha.at[s.i].set(alpha.astype(s.alpha.dtype)),
        s.beta.at[s.i].set(jnp.where(breakdown, 0, beta).astype(s.beta.dtype)),
        s.i + 1,
    )


_LANCZOS_STEP = _step(jax.vmap(_lanczos_update), jax.vmap(_lanczos_current))


def _lanczos(op: _Operator, v0: list, n: int) -> _LanczosState:
    """``n`` Lanczos steps for a block of starting vectors (leading axis b), run together so
    each step is one block HVP (one dataset sweep for all b)."""
    state = jax.vmap(lambda v: _lanczos_init(v, n))(v0)
    return _iterate(op, _LANCZOS_STEP, state, n)


def _tridiagonal(alpha: jax.Array, beta: jax.Array) -> jax.Array:
    return jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)


def _select(theta: jax.Array, which: str, k: int) -> jax.Array:
    order = {"LA": -theta, "SA": theta, "LM": -jnp.abs(theta)}[which]
    return jnp.argsort(order)[:k]


def top_eigenvalues(
    loss_fn: Callable[..., jax.Array],
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
    iteration (:func:`power_iteration`; ``benchmarks/bench_spectral.py``). The number of
    steps is fixed, so the whole estimator jits.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
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
    _check_common(loss_fn, mask, blocks, None)
    _checks.integer("k", k, lo=1)
    if which not in _WHICH:
        raise ValueError(f"which={which!r}: must be one of {_WHICH}")
    _checks.integer("num_iterations", num_iterations, lo=k, allow_none=True)
    tol = _checks.real("tol", tol, lo=0.0, strict=True)
    n_req = max(2 * k, k + 40) if num_iterations is None else num_iterations

    def build(m: Any) -> Callable[..., EigenResult]:
        def eig(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> EigenResult:
            _mu.check_key(key)
            perturbed = _tree.perturbed_leaves(params, m)
            d = _tree.num_perturbed(params, m)
            if k > d:
                raise ValueError(f"k={k}: exceeds the dimension d={d} of the perturbed parameters")
            n = min(n_req, d)
            bar = _curvature.progress_bar(progress and batches is not None, n, "Lanczos")
            op = _operator(loss_fn, params, args, batches, perturbed, 1, bar)
            v0, _ = _probes("gaussian", m, key, params, 1, perturbed)
            s = _lanczos(op, v0, n)
            bar.close()
            alpha, beta = s.alpha[0], s.beta[0]
            theta, vecs = jnp.linalg.eigh(_tridiagonal(alpha, beta))
            idx = _select(theta, which, k)
            coef = vecs[:, idx]
            residual = jnp.abs(beta[-1] * coef[-1])
            ritz = [jnp.tensordot(coef.T, b[0, :n], axes=1).astype(b.dtype) for b in s.basis]
            vectors = _unsplit(params, perturbed, ritz, k)
            value = theta[idx]
            converged = residual <= tol * jnp.max(jnp.abs(theta))
            return EigenResult(value, vectors, residual, converged, n)

        return eig

    return _with_blocks(build, mask, blocks)


def _unsplit(params: PyTree, perturbed: list[bool], active: list, num: int) -> PyTree:
    """Put stacked perturbed leaves back into a params-shaped pytree (zeros elsewhere)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    it = iter(active)
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            next(it) if p else jnp.zeros((num, *jnp.shape(x)), x.dtype)
            for x, p in zip(leaves, perturbed)
        ],
    )


class _PowerState(NamedTuple):
    v: list
    theta: jax.Array
    residual: jax.Array
    vector: list


def _power_update(s: _PowerState, w: list) -> _PowerState:
    theta = _tree.dot(s.v, w)
    residual = jnp.sqrt(_tree.sq_norm(_tree.axpy(-theta, s.v, w)))
    nrm = jnp.sqrt(_tree.sq_norm(w))
    v = [(x / jnp.where(nrm > 0, nrm, 1)).astype(x.dtype) for x in w]
    return _PowerState(v, theta.astype(s.theta.dtype), residual.astype(s.theta.dtype), s.v)


def _power_current(s: _PowerState) -> list:
    return s.v


_POWER_STEP = _step(jax.vmap(_power_update), _power_current)


def power_iteration(
    loss_fn: Callable[..., jax.Array],
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
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      num_iterations: HVPs (>= 1).
      tol: relative residual for ``converged``: ``‖Hv − θv‖ <= tol·|θ|``.
      mask, blocks, progress: as in :func:`top_eigenvalues`.

    Returns:
      ``eig(params, *args, key, batches=None) -> EigenResult`` with ``k = 1``.
    """
    _check_common(loss_fn, mask, blocks, None)
    _checks.integer("num_iterations", num_iterations, lo=1)
    tol = _checks.real("tol", tol, lo=0.0, strict=True)

    def build(m: Any) -> Callable[..., EigenResult]:
        def eig(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> EigenResult:
            _mu.check_key(key)
            perturbed = _tree.perturbed_leaves(params, m)
            bar = _curvature.progress_bar(
                progress and batches is not None, num_iterations, "power iteration"
            )
            op = _operator(loss_fn, params, args, batches, perturbed, 1, bar)
            v0, _ = _probes("gaussian", m, key, params, 1, perturbed)
            nrm = jnp.sqrt(_tree.sq_norm(v0))
            v0 = [x / nrm for x in v0]
            zero = jnp.zeros((1,), _tree.float_dtype(v0))
            s = _PowerState(v0, zero, zero, v0)
            s = _iterate(op, _POWER_STEP, s, num_iterations)
            bar.close()
            vectors = _unsplit(params, perturbed, s.vector, 1)
            converged = s.residual <= tol * jnp.abs(s.theta)
            return EigenResult(s.theta, vectors, s.residual, converged, num_iterations)

        return eig

    return _with_blocks(build, mask, blocks)


# ---------------------------------------------------------------- stochastic Lanczos quadrature


def _slq(
    loss_fn: Callable,
    params: PyTree,
    args: tuple,
    batches: Any,
    key: jax.Array,
    *,
    mask: Any,
    probes: str,
    num_samples: int,
    num_iterations: int,
    batch_size: int | None,
    progress: bool,
) -> tuple[jax.Array, jax.Array, int]:
    """Gauss quadrature nodes θ and weights τ (each ``(m, n)``) of every probe, and d.

    Probe j's unit start vector ``uⱼ = vⱼ/‖vⱼ‖`` gives ``uⱼᵀ f(H) uⱼ ≈ Σᵢ τⱼᵢ f(θⱼᵢ)``, exact
    for polynomials of degree < 2n. For Rademacher, Gaussian and sphere probes u is such that
    ``E[d·uᵀAu] = Tr A`` (a normalised Gaussian is uniform on the sphere).
    """
    _mu.check_key(key)
    perturbed = _tree.perturbed_leaves(params, mask)
    d = _tree.num_perturbed(params, mask)
    n = min(num_iterations, d) if d else num_iterations
    chunk = _chunk(batch_size)
    num_chunks = -(-num_samples // chunk)
    bar = _curvature.progress_bar(progress and batches is not None, n * num_chunks, "SLQ")
    op = _operator(loss_fn, params, args, batches, perturbed, chunk, bar)
    vs, _ = _probes(probes, mask, key, params, num_samples, perturbed)

    def run(v: list) -> tuple[jax.Array, jax.Array]:
        s = _lanczos(op, v, n)
        return s.alpha, s.beta

    if op.host:
        parts = [run([x[i : i + chunk] for x in vs]) for i in range(0, num_samples, chunk)]
        alpha = jnp.concatenate([p[0] for p in parts])
        beta = jnp.concatenate([p[1] for p in parts])
    else:

        def one(v: list) -> tuple[jax.Array, jax.Array]:
            a, b = run([x[None] for x in v])
            return a[0], b[0]

        alpha, beta = _tree.batched_map(one, vs, None if chunk >= num_samples else chunk)
    bar.close()
    theta, vecs = jnp.linalg.eigh(jax.vmap(_tridiagonal)(alpha, beta))
    return theta, vecs[:, 0, :] ** 2, d


def _slq_estimate(per_probe: jax.Array) -> Estimate:
    """The mean of per-probe estimates (shape ``(m,)``) with its standard error."""
    value = jnp.mean(per_probe)
    num_samples = per_probe.shape[0]
    ess = jnp.full((), num_samples, per_probe.dtype)
    return Estimate(value, _measure._std_mean(per_probe), jnp.log(value), ess, num_samples)


def _check_slq(num_samples: Any, num_iterations: Any, probes: Any, progress: Any) -> None:
    _checks.integer("num_samples", num_samples, lo=1)
    _checks.integer("num_iterations", num_iterations, lo=1)
    _check_probes(probes)
    if not isinstance(progress, bool):
        raise TypeError(f"progress={progress!r}: must be a bool")


def _slq_estimator(
    loss_fn: Callable[..., jax.Array],
    finish: Callable[[jax.Array, jax.Array, int], Any],
    *,
    num_samples: int,
    num_iterations: int,
    probes: str,
    mask: Any,
    blocks: Any,
    batch_size: int | None,
    progress: bool,
) -> Callable[..., Any]:
    """``fn(params, *args, key, batches=None)`` running SLQ and returning
    ``finish(theta, tau, d)`` (Ritz values, Gauss weights, dimension), per block if asked;
    shared by :func:`trace_function`, :func:`log_determinant` and :func:`spectral_density`.
    Validates the arguments they share."""
    _check_common(loss_fn, mask, blocks, batch_size)
    _check_slq(num_samples, num_iterations, probes, progress)

    def build(m: Any) -> Callable[..., Any]:
        def run(params: PyTree, *args: Any, key: jax.Array, batches: Any = None) -> Any:
            theta, tau, d = _slq(
                loss_fn, params, args, batches, key, mask=m, probes=probes,
                num_samples=num_samples, num_iterations=num_iterations,
                batch_size=batch_size, progress=progress,
            )  # fmt: skip
            return finish(theta, tau, d)

        return run

    return _with_blocks(build, mask, blocks)


def trace_function(
    loss_fn: Callable[..., jax.Array],
    f: Callable[[jax.Array], jax.Array],
    *,
    num_samples: int,
    num_iterations: int = 30,
    probes: str = "rademacher",
    mask: Any = None,
    blocks: Any = None,
    batch_size: int | None = None,
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
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      f: an elementwise JAX function of the eigenvalues (``jnp.log``, ``jnp.square``, …).
      num_samples: probes m (>= 1; >= 2 for a standard error).
      num_iterations: Lanczos steps n per probe (HVPs per probe; capped at d).
      probes: ``"rademacher"`` (default), ``"gaussian"`` or ``"sphere"``, drawn by
        ``phipsimu.mu`` as ``mu.<probes>(mask=mask).sample(key, params, num_samples)``.
      mask, blocks, progress: as in :func:`top_eigenvalues`.
      batch_size: probes whose Lanczos runs go together (vmapped; memory
        ``batch_size·(n+1)·d``); None uses 4. Over a dataset, each group costs n sweeps.

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate`` (``num_samples`` = m).

    Reference: Ubaru, Chen & Saad (2017); Golub & Meurant (2010).
    """
    if not callable(f):
        raise TypeError(f"f={f!r}: must be a callable applied to the eigenvalues")

    def finish(theta: jax.Array, tau: jax.Array, d: int) -> Estimate:
        return _slq_estimate(d * jnp.sum(tau * f(theta), axis=1))

    return _slq_estimator(
        loss_fn,
        finish,
        num_samples=num_samples,
        num_iterations=num_iterations,
        probes=probes,
        mask=mask,
        blocks=blocks,
        batch_size=batch_size,
        progress=progress,
    )


def log_determinant(
    loss_fn: Callable[..., jax.Array],
    *,
    damping: float = 0.0,
    num_samples: int,
    num_iterations: int = 30,
    probes: str = "rademacher",
    mask: Any = None,
    blocks: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Callable[..., Estimate]:
    """``log det(H + δI)`` by stochastic Lanczos quadrature, for ``H + δI`` positive definite.

    .. math:: \\log\\det(H + \\delta I) = \\operatorname{Tr}\\log(H + \\delta I)
       \\approx \\frac{d}{m}\\sum_j \\sum_i \\tau_{ji} \\log(\\theta_{ji} + \\delta)

    The determinant preset of Table 1 (``phipsimu.measures.determinant``) in log space for
    large d. Every Ritz value θ is a Rayleigh quotient ``yᵀHy`` of a unit vector, so
    ``θ + δ <= 0`` *proves* ``H + δI`` is not positive definite. Meaning of the result:

    * ``value = NaN``: some Ritz value has ``θ + δ < −tol`` — H + δI is indefinite, the
      log-determinant of the quadratic model is undefined (add damping > −λ_min);
    * ``value = −inf``: the smallest ``θ + δ`` is within ``tol = n·eps·max|θ + δ|`` of zero —
      H + δI is singular to working precision (det = 0, as on any zero-loss manifold);
    * finite: every Ritz value is positive. Lanczos finds the extreme eigenvalues first, but a
      negative eigenvalue that no Krylov space reached cannot be seen: check
      ``top_eigenvalues(..., which="SA")`` when in doubt.

    ``value`` is the log-determinant itself (negative when det(H + δI) < 1), with its
    standard error over probes. ``log_value`` follows the Estimate convention,
    ``log_value = log(value)``: the log *of the log-determinant* — NaN when ``value < 0``
    (det < 1), −inf when ``value == 0`` (det = 1), NaN when ``value`` is NaN or −inf. It is
    not ``log det``; read ``value`` for that.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      damping: δ >= 0 added to every eigenvalue.
      num_samples, num_iterations, probes, mask, blocks, batch_size, progress: as in
        :func:`trace_function`.

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate`` with ``value`` =
      ``log det(H + δI)`` and ``log_value = log(value)``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * p**2)
      >>> est = phipsimu.log_determinant(loss, num_samples=4, num_iterations=4)(
      ...     jnp.ones(4), key=jax.random.key(0))
      >>> round(float(est.value), 4)  # log 24: exact once n = d
      3.1781

    Reference: Ubaru, Chen & Saad (2017); MATH.md, Table 1 "determinant".
    """
    damping = _checks.real("damping", damping, lo=0.0, strict=False)

    def finish(theta: jax.Array, tau: jax.Array, d: int) -> Estimate:
        shifted = theta + damping
        tol = shifted.shape[1] * jnp.finfo(shifted.dtype).eps * jnp.max(jnp.abs(shifted))
        low = jnp.min(shifted)
        per_probe = d * jnp.sum(tau * jnp.log(jnp.where(shifted > tol, shifted, 1.0)), axis=1)
        est = _slq_estimate(per_probe)
        bad = jnp.where(low < -tol, jnp.nan, -jnp.inf)
        value = jnp.where(low > tol, est.value, bad)
        stderr = jnp.where(low > tol, est.stderr, jnp.nan)
        return est._replace(value=value, stderr=stderr, log_value=jnp.log(value))

    return _slq_estimator(
        loss_fn,
        finish,
        num_samples=num_samples,
        num_iterations=num_iterations,
        probes=probes,
        mask=mask,
        blocks=blocks,
        batch_size=batch_size,
        progress=progress,
    )


def spectral_density(
    loss_fn: Callable[..., jax.Array],
    *,
    num_samples: int,
    num_iterations: int = 80,
    grid_size: int = 512,
    bandwidth: float | None = None,
    probes: str = "rademacher",
    mask: Any = None,
    blocks: Any = None,
    batch_size: int | None = None,
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
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      num_samples: probes m (>= 1; >= 2 for a standard error).
      num_iterations: Lanczos steps n (capped at d).
      grid_size: points of the evaluation grid (>= 2).
      bandwidth: σ > 0, or None for the rule above.
      probes, mask, blocks, batch_size, progress: as in :func:`trace_function`.

    Returns:
      ``density(params, *args, key, batches=None) -> SpectralDensity``.

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
        stderr = _measure._std_mean(per_probe)
        return SpectralDensity(theta, tau, grid, dens, stderr, sigma)

    return _slq_estimator(
        loss_fn,
        finish,
        num_samples=num_samples,
        num_iterations=num_iterations,
        probes=probes,
        mask=mask,
        blocks=blocks,
        batch_size=batch_size,
        progress=progress,
    )


# ---------------------------------------------------------------- trace estimators


def _flatten(vs: list) -> jax.Array:
    """A probe block as a ``(num, d)`` matrix (Hutch++/XTrace only: their QR needs it)."""
    return jnp.concatenate([jnp.reshape(x, (x.shape[0], -1)) for x in vs], axis=1)


def _unflatten(mat: jax.Array, like: list) -> list:
    out, start = [], 0
    for x in like:
        size = int(math.prod(x.shape[1:]))
        piece = mat[:, start : start + size]
        out.append(jnp.reshape(piece, (mat.shape[0], *x.shape[1:])).astype(x.dtype))
        start += size
    return out


def _hutchinson(op: _Operator, vs: list, c: float) -> jax.Array:
    return op.quad(vs) / c


def _hutch_plus_plus(op: _Operator, vs: list, c: float) -> tuple[jax.Array, jax.Array]:
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
    low = _tree.dot(q_block, op.matvec(q_block))
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


def _xtrace(op: _Operator, vs: list) -> jax.Array:
    """XTrace: m leave-one-out estimates ``Tr(Q₋ᵢQ₋ᵢᵀH) + ωᵢ-Hutchinson of the rest``, with
    re-sphering (Epperly, Tropp & Webber 2024, Alg. 2; as matfree.stochtrace)."""
    omega = _flatten(vs).T  # (d, m)
    y = _flatten(op.matvec(vs)).T
    q, r = jnp.linalg.qr(y)
    z = _flatten(op.matvec(_unflatten(q.T, vs))).T
    return (_xtrace_combine_jit if op.host else _xtrace_combine)(omega, q, r, z)


def hessian_trace(
    loss_fn: Callable[..., jax.Array],
    *,
    num_matvecs: int,
    method: str = "hutchinson",
    probes: str | None = None,
    mask: Any = None,
    blocks: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Callable[..., Estimate]:
    """``Tr(H)`` with a budget of ``num_matvecs`` Hessian products, by one of three methods.

    * ``"hutchinson"``: ``(1/(c·m)) Σ vᵢᵀHvᵢ`` with ``E[vvᵀ] = c·I``, m = ``num_matvecs``
      quadratic forms (forward-over-forward, about one gradient each). Probes:
      ``"rademacher"`` (default; lowest variance for diagonally dominant H), ``"gaussian"``,
      ``"sphere"``. Error ∝ ``‖H‖_F/√m``.
    * ``"hutch++"``: ``num_matvecs`` divisible by 3: m/3 products ``HS``, ``Q = orth(HS)``,
      m/3 products ``HQ`` for the exact ``Tr(QᵀHQ)``, and Hutchinson with m/3 probes on the
      deflated ``(I−QQᵀ)H(I−QQᵀ)``. Error ∝ ``‖H‖_*/m`` — far lower when a few eigenvalues
      dominate, as in trained networks (Meyer et al. 2021).
    * ``"xtrace"``: ``num_matvecs`` even: m/2 Gaussian (or sphere) probes used both for the
      low-rank part and, leaving each one out in turn, for the residual; the estimate is the
      mean of the m/2 leave-one-out estimates (Epperly, Tropp & Webber 2024).

    Hutch++ and XTrace orthonormalise a probe block with a Householder QR on the block as a
    ``(d, m)`` matrix (the block is flattened, not the model: on a sharded model this gathers
    the m probe vectors). Their standard errors: Hutch++, the residual Hutchinson's;
    XTrace, ``std(leave-one-out estimates)/√m`` (the authors' heuristic).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      num_matvecs: the HVP budget (>= 1 for Hutchinson, a multiple of 3 for Hutch++, a
        multiple of 2 for XTrace; the low-rank methods need ``num_matvecs/3`` resp.
        ``num_matvecs/2`` at most d).
      method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
      probes: for Hutchinson/Hutch++ ``"rademacher"`` (default), ``"gaussian"``, ``"sphere"``;
        XTrace re-spheres, which needs rotation-invariant ``"gaussian"`` (default) or
        ``"sphere"``. Drawn as ``phipsimu.mu.<probes>(mask=mask).sample(key, params, ·)``.
      mask, blocks, progress: as in :func:`top_eigenvalues`. Per-block traces are traces of
        the diagonal blocks; they sum to Tr(H).
      batch_size: probes per vmapped chunk of HVPs / quadratic forms (None: 4).

    Returns:
      ``estimate(params, *args, key, batches=None) -> Estimate``; ``num_samples`` is the
      number of random probes drawn.

    Reference: Hutchinson (1989); Meyer, Musco, Musco & Woodruff (2021), Alg. 1;
    Epperly, Tropp & Webber (2024), Alg. 2.
    """
    _check_common(loss_fn, mask, blocks, batch_size)
    if method not in _TRACE_METHODS:
        raise ValueError(f"method={method!r}: must be one of {_TRACE_METHODS}")
    _checks.integer("num_matvecs", num_matvecs, lo=1)
    if method == "hutch++" and (num_matvecs % 3 or num_matvecs < 6):
        raise ValueError(
            f"num_matvecs={num_matvecs}: Hutch++ splits its budget in three equal parts "
            "(sketch HS, exact HQ, residual probes); use a multiple of 3, at least 6"
        )
    if method == "xtrace" and (num_matvecs % 2 or num_matvecs < 4):
        raise ValueError(
            f"num_matvecs={num_matvecs}: XTrace spends two HVPs per probe (HΩ, then HQ); "
            "use a multiple of 2, at least 4"
        )
    if probes is None:
        probes = "gaussian" if method == "xtrace" else "rademacher"
    _check_probes(probes, ("gaussian", "sphere") if method == "xtrace" else tuple(_PROBES))
    num_probes = {
        "hutchinson": num_matvecs,
        "hutch++": 2 * num_matvecs // 3,
        "xtrace": num_matvecs // 2,
    }[method]
    sweeps = {"hutchinson": 1, "hutch++": 3, "xtrace": 2}[method]
    chunk = _chunk(batch_size)

    def build(m: Any) -> Callable[..., Estimate]:
        def estimate(params: PyTree, *args: Any, key: jax.Array, batches: Any = None):
            _mu.check_key(key)
            perturbed = _tree.perturbed_leaves(params, m)
            d = _tree.num_perturbed(params, m)
            low_rank = {"hutch++": num_matvecs // 3, "xtrace": num_matvecs // 2}.get(method, 0)
            if low_rank > d:
                raise ValueError(
                    f"num_matvecs={num_matvecs}: {method} would build a rank-{low_rank} sketch "
                    f"of a d={d} dimensional Hessian; use num_matvecs <= "
                    f"{d * (3 if method == 'hutch++' else 2)}"
                )
            bar = _curvature.progress_bar(progress and batches is not None, sweeps, method)
            op = _operator(loss_fn, params, args, batches, perturbed, chunk, bar)
            vs, c = _probes(probes, m, key, params, num_probes, perturbed)
            if method == "hutchinson":
                samples, low = _hutchinson(op, vs, c), 0.0
            elif method == "hutch++":
                low, samples = _hutch_plus_plus(op, vs, c)
            else:
                samples, low = _xtrace(op, vs), 0.0
            bar.close()
            est = _slq_estimate(low + samples)
            return est._replace(
                ess=jnp.full((), num_probes, est.value.dtype), num_samples=num_probes
            )

        return estimate

    return _with_blocks(build, mask, blocks)
