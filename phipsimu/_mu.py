"""Measures μ as samplers: the one place that draws perturbations.

A sampler draws ``v_1..v_m`` from a proposal q and returns ``log w_i = log(dμ/dq)(v_i)``; the
integral ``∫ g dμ`` is then estimated by ``mean_i w_i g(v_i)``. Probability measures sampled
exactly have ``log w = 0``. Every draw is a pytree shaped like the parameters with a leading
sample axis; leaves that are not floating point, or that the ``mask`` excludes, are zero.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from phipsimu import _tree

PyTree = Any


def _freeze_mask(mask: Any) -> Any:
    """Masks are stored in a hashable form so samplers can be static arguments of jit."""
    if mask is None or callable(mask):
        return mask
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    for b in leaves:
        if not isinstance(b, bool):
            raise ValueError(f"mask: leaf {b!r} is not a Python bool; masks must be static bools")
    return _FrozenMask(treedef, tuple(leaves))


@dataclasses.dataclass(frozen=True)
class _FrozenMask:
    treedef: Any
    leaves: tuple[bool, ...]

    def __call__(self, params: PyTree) -> PyTree:
        return jax.tree_util.tree_unflatten(self.treedef, self.leaves)


def check_key(key: Any, name: str = "key") -> None:
    """Raise a clear error unless ``key`` is a JAX PRNG key (typed or raw uint32[2])."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if jnp.shape(key) == ():
            return
    elif dtype == jnp.uint32 and jnp.shape(key) == (2,):
        return
    raise TypeError(
        f"{name}={key!r}: must be a single JAX PRNG key, from jax.random.key(seed) or "
        "jax.random.PRNGKey(seed)"
    )


def _check_num(num: Any) -> int:
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num={num!r}: must be an int >= 1")
    return num


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base class of the μ samplers. Subclasses implement ``_draw``.

    Attributes:
      mask: which leaves are perturbed: ``None`` (every floating leaf), a pytree of bools
        shaped like the params (as in ``optax.masked``) or a callable ``params -> mask``.
    """

    mask: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", _freeze_mask(self.mask))

    def perturbed(self, like: PyTree) -> list[bool]:
        """Per leaf of ``like``: is it perturbed?"""
        return _tree.perturbed_leaves(like, self.mask)

    def dim(self, like: PyTree) -> int:
        """The dimension d of the perturbed parameters (static)."""
        return _tree.num_perturbed(like, self.mask)

    def sample(self, key: jax.Array, like: PyTree, num: int) -> tuple[PyTree, jax.Array]:
        """Draw ``num`` perturbations shaped like ``like``.

        Args:
          key: a JAX PRNG key.
          like: the current parameters (samplers may use their values).
          num: the number of draws (a static int >= 1).

        Returns:
          ``(v, log_weight)``: ``v`` has a leading axis of size ``num``; ``log_weight`` has
          shape ``(num,)`` and holds ``log(dμ/dq)`` at each draw.
        """
        check_key(key)
        num = _check_num(num)
        perturbed = self.perturbed(like)
        d = sum(int(x.size) for x, p in zip(jax.tree_util.tree_leaves(like), perturbed) if p)
        if d == 0:
            raise ValueError(
                "like: no leaf is perturbed (no floating-point leaves, or the mask excludes all)"
            )
        return self._draw(key, like, num, perturbed, d)

    def _draw(
        self, key: jax.Array, like: PyTree, num: int, perturbed: list[bool], d: int
    ) -> tuple[PyTree, jax.Array]:
        raise NotImplementedError


def _normal(k: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.random.normal(k, shape, dtype)


def _weight_dtype(like: PyTree, perturbed: list[bool]) -> Any:
    leaves = jax.tree_util.tree_leaves(like)
    return jnp.result_type(*[x.dtype for x, p in zip(leaves, perturbed) if p])


@dataclasses.dataclass(frozen=True)
class Sphere(Sampler):
    """Uniform probability measure on the unit sphere of the whole perturbed vector."""

    def _draw(self, key, like, num, perturbed, d):
        g = _tree.random_like(key, like, perturbed, num, _normal)
        norm = jnp.sqrt(_tree.batched_sq_norm(g, perturbed))
        v = jax.tree_util.tree_map(
            lambda x: (x / norm.reshape((num,) + (1,) * (x.ndim - 1))).astype(x.dtype), g
        )
        return v, jnp.zeros((num,), _weight_dtype(like, perturbed))


@dataclasses.dataclass(frozen=True)
class Gaussian(Sampler):
    """The probability measure N(0, stddev² I) on the perturbed coordinates."""

    stddev: float = 1.0

    def _draw(self, key, like, num, perturbed, d):
        def draw(k, shape, dtype):
            return (self.stddev * jax.random.normal(k, shape, dtype)).astype(dtype)

        v = _tree.random_like(key, like, perturbed, num, draw)
        return v, jnp.zeros((num,), _weight_dtype(like, perturbed))


@dataclasses.dataclass(frozen=True)
class Rademacher(Sampler):
    """Independent ±1 coordinates (a probability measure; E[vvᵀ] = I)."""

    def _draw(self, key, like, num, perturbed, d):
        def draw(k, shape, dtype):
            return jax.random.rademacher(k, shape, dtype)

        v = _tree.random_like(key, like, perturbed, num, draw)
        return v, jnp.zeros((num,), _weight_dtype(like, perturbed))


@dataclasses.dataclass(frozen=True)
class Lebesgue(Sampler):
    """Lebesgue measure on R^d, by importance sampling with the proposal N(0, scale² I).

    ``log w = (d/2)·log(2π scale²) + ‖v‖²/(2 scale²)``, kept in log space: for large d the
    weights themselves overflow. The proposal should be about as wide as the integrand
    (for ψ = exp(−t/2), scale² ≈ 1/λ for the Hessian's typical eigenvalue λ); a poorly
    scaled proposal shows up as a small effective sample size.
    """

    scale: float = 1.0

    def _draw(self, key, like, num, perturbed, d):
        def draw(k, shape, dtype):
            return jax.random.normal(k, shape, dtype)

        g = _tree.random_like(key, like, perturbed, num, draw)
        sq = _tree.batched_sq_norm(g, perturbed)
        log_w = 0.5 * d * math.log(2.0 * math.pi * self.scale**2) + 0.5 * sq
        return _tree.scale(self.scale, g), log_w


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r}: must be a float > 0")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be finite")
    return float(value)


def sphere(*, mask: Any = None) -> Sphere:
    """Uniform measure on the unit sphere S^{d-1} of all perturbed coordinates together.

    The draws are normalised across every leaf at once (not leaf by leaf), so
    ``E[vvᵀ] = I/d`` and ``E[vᵀHv] = Tr(H)/d``.

    Args:
      mask: which leaves to perturb (pytree of bools, callable, or None for all float leaves).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> v, logw = phipsimu.mu.sphere().sample(jax.random.key(0), {"w": jnp.ones(3)}, 4)
      >>> v["w"].shape
      (4, 3)
    """
    return Sphere(mask=mask)


def gaussian(*, stddev: float = 1.0, mask: Any = None) -> Gaussian:
    """The Gaussian probability measure N(0, stddev² I) on the perturbed coordinates."""
    return Gaussian(mask=mask, stddev=_check_positive("stddev", stddev))


def rademacher(*, mask: Any = None) -> Rademacher:
    """Independent Rademacher (±1) coordinates on the perturbed leaves."""
    return Rademacher(mask=mask)


def lebesgue(*, scale: float = 1.0, mask: Any = None) -> Lebesgue:
    """Lebesgue measure on R^d, sampled by importance sampling from N(0, scale² I).

    Args:
      scale: the proposal's standard deviation (> 0).
      mask: which leaves to perturb.
    """
    return Lebesgue(mask=mask, scale=_check_positive("scale", scale))
