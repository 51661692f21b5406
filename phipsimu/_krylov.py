"""Krylov kernels on a bound curvature operator: Lanczos with full reorthogonalisation, power
iteration, and the definiteness certificate built on Lanczos.

Krylov vectors are lists of the perturbed parameter leaves (pytree-native: no ravel of the
model), in blocks with a leading axis so that one step is one block product (one dataset sweep
for the whole block). The kernels run on a :class:`phipsimu._curvature.Bound` operator, on one
batch (traceable, ``fori_loop``) or over a dataset (Python loop of jitted steps). Nothing here
imports an estimator.

References:
  Lanczos (1950); Golub & Van Loan, "Matrix Computations", §10.1; Golub & Meurant,
  "Matrices, Moments and Quadrature" (2010).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from phipsimu import _curvature, _tree

PyTree = Any
Bound = _curvature.Bound


class Step(NamedTuple):
    """One iteration ``state = update(state, H·current(state))`` on a block of vectors: the
    traceable functions, and the same functions jitted once (module level) for the dataset
    path, so that repeated estimator calls reuse their compilation."""

    update: Callable
    current: Callable
    update_jit: Callable
    current_jit: Callable


def _step(update: Callable, current: Callable) -> Step:
    return Step(update, current, jax.jit(update), jax.jit(current))


def iterate(op: Bound, step: Step, state: Any, n: int) -> Any:
    """``n`` steps of ``step``: a ``fori_loop`` (jit-able) on one batch, a Python loop of the
    jitted step over a dataset."""
    if op.host:
        for _ in range(n):
            state = step.update_jit(state, op.matvec(step.current_jit(state)))
        return state
    return jax.lax.fori_loop(0, n, lambda _, s: step.update(s, op.matvec(step.current(s))), state)


# ---------------------------------------------------------------- Lanczos


class LanczosState(NamedTuple):
    basis: list  # leaves (n + 1, *shape): q_0..q_n, rows not yet reached are zero
    alpha: jax.Array  # (n,) diagonal of T
    beta: jax.Array  # (n,) beta[i] couples q_i and q_{i+1}
    i: jax.Array


def _lanczos_init(v: list, n: int) -> LanczosState:
    nrm = jnp.sqrt(_tree.sq_norm(v))
    basis = [jnp.zeros((n + 1, *x.shape), x.dtype).at[0].set((x / nrm).astype(x.dtype)) for x in v]
    dt = _tree.accum_dtype(v)  # the tridiagonal in at least float32 (no float16 eigh)
    return LanczosState(basis, jnp.zeros((n,), dt), jnp.zeros((n,), dt), jnp.zeros((), int))


def _lanczos_current(s: LanczosState) -> list:
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


def _lanczos_update(s: LanczosState, w: list) -> LanczosState:
    """One Lanczos step with full reorthogonalisation (classical Gram–Schmidt, twice).

    On breakdown (the Krylov space is invariant) the next vector is a random vector
    orthogonal to the basis and ``beta[i] = 0``: T stays ``QᵀHQ`` with Q orthonormal, so the
    Ritz values stay inside the spectrum, and quadrature weights on the new block are zero.
    """
    q = _lanczos_current(s)
    alpha = _tree.vdot(q, w)
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
    return LanczosState(
        basis,
        s.alpha.at[s.i].set(alpha.astype(s.alpha.dtype)),
        s.beta.at[s.i].set(jnp.where(breakdown, 0, beta).astype(s.beta.dtype)),
        s.i + 1,
    )


_LANCZOS_STEP = _step(jax.vmap(_lanczos_update), jax.vmap(_lanczos_current))


def lanczos(op: Bound, v0: list, n: int) -> LanczosState:
    """``n`` Lanczos steps for a block of starting vectors (leading axis b), run together so
    each step is one block HVP (one dataset sweep for all b)."""
    state = jax.vmap(lambda v: _lanczos_init(v, n))(v0)
    return iterate(op, _LANCZOS_STEP, state, n)


def tridiagonal(alpha: jax.Array, beta: jax.Array) -> jax.Array:
    return jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)


def select(theta: jax.Array, which: str, k: int) -> jax.Array:
    order = {"LA": -theta, "SA": theta, "LM": -jnp.abs(theta)}[which]
    return jnp.argsort(order)[:k]


class PowerState(NamedTuple):
    v: list
    theta: jax.Array
    residual: jax.Array
    vector: list


def _power_update(s: PowerState, w: list) -> PowerState:
    theta = _tree.vdot(s.v, w)
    residual = jnp.sqrt(_tree.sq_norm(_tree.add_scale(w, -theta, s.v)))
    nrm = jnp.sqrt(_tree.sq_norm(w))
    v = [(x / jnp.where(nrm > 0, nrm, 1)).astype(x.dtype) for x in w]
    return PowerState(v, theta.astype(s.theta.dtype), residual.astype(s.theta.dtype), s.v)


def _power_current(s: PowerState) -> list:
    return s.v


_POWER_STEP = _step(jax.vmap(_power_update), _power_current)


def power(op: Bound, v0: list, n: int) -> PowerState:
    """``n`` steps of ``v ← Cv/‖Cv‖`` from the block of starting vectors ``v0`` (each
    normalised first); the state holds each vector's last Rayleigh quotient and residual."""
    nrm = jnp.sqrt(_tree.sq_norm(v0))
    v0 = [(x / nrm).astype(x.dtype) for x in v0]
    zero = jnp.zeros((1,), _tree.accum_dtype(v0))
    return iterate(op, _POWER_STEP, PowerState(v0, zero, zero, v0), n)


# ---------------------------------------------------------------- Ritz values


def ritz(s: LanczosState, block: int = 0) -> tuple[jax.Array, jax.Array]:
    """The Ritz values (ascending) and eigenvectors of the tridiagonal ``T = QᵀCQ`` of one
    Lanczos run of a block."""
    return jnp.linalg.eigh(tridiagonal(s.alpha[block], s.beta[block]))


def ritz_certificate(op: Bound, v0: list, n: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The n Ritz values (ascending) of C from n Lanczos steps from ``v0`` (a block of one),
    and the tolerance ``tol = 10·n·eps·max|θ|`` within which a Ritz value counts as 0 (the
    rounding of Ritz values is of order eps·‖C‖ per step).

    By interlacing the k-th smallest Ritz value bounds the k-th smallest eigenvalue from
    above: ``θ_k >= λ_k``. So ``θ_k < −tol`` proves that C has at least k negative
    eigenvalues, and ``θ_1`` over-estimates λ_min (exactly λ_min when n >= d).
    """
    theta, _ = ritz(lanczos(op, v0, n))
    theta = theta.astype(dtype)
    return theta, 10 * n * jnp.finfo(theta.dtype).eps * jnp.max(jnp.abs(theta))


def definiteness(op: Bound, v0: list, n: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Certify the definiteness of C with n Lanczos steps from ``v0`` (a block of one).

    All n Ritz values bound the spectrum from inside (see :func:`ritz_certificate`); returns
    ``(indefinite, singular)``: the smallest Ritz value is below −tol, resp. within tol of 0.
    Exact when n >= d; with fewer steps a negative or null direction outside the Krylov space
    can be missed.
    """
    theta, tol = ritz_certificate(op, v0, n, dtype)
    return theta[0] < -tol, jnp.abs(theta[0]) <= tol
