"""Measures μ as samplers: the one place that draws perturbations.

A sampler draws ``v_1..v_m`` from a proposal q and returns ``log w_i = log(dμ/dq)(v_i)``; the
integral ``∫ g dμ`` is then estimated by ``mean_i w_i g(v_i)``. Probability measures sampled
exactly have ``log w = 0``. Every draw is a pytree shaped like the parameters with a leading
sample axis; leaves that are not floating point, or that the ``mask`` excludes, are zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phipsimu import _checks, _tree

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


class Draw(NamedTuple):
    """One draw of ``num`` perturbations, with what every caller needs computed once.

    Attributes:
      v: a pytree shaped like the params with a leading sample axis ``num`` (zeros on
        leaves that are not perturbed).
      log_weight: shape ``(num,)``, ``log(dμ/dq)`` at each draw.
      perturbed: static tuple of bools, one per leaf of the params: is it perturbed?
      d: the number of perturbed coordinates (static).
    """

    v: PyTree
    log_weight: jax.Array
    perturbed: tuple[bool, ...]
    d: int

    def active(self) -> list:
        """The perturbed leaves of ``v`` (each with the leading sample axis)."""
        return _tree.active(self.v, self.perturbed)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base class of the μ samplers. Subclasses implement ``_draw``.

    Attributes:
      mask: which leaves are perturbed: ``None`` (every floating leaf), a pytree of bools
        shaped like the params (as in ``optax.masked``) or a callable ``params -> mask``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> mu = phipsimu.mu.rademacher(mask={"b": False, "w": True})
      >>> isinstance(mu, phipsimu.mu.Sampler)
      True
      >>> params = {"b": jnp.zeros(2), "w": jnp.ones(3)}
      >>> mu.perturbed(params), mu.dim(params)  # per leaf (in pytree order), and d
      ((False, True), 3)
      >>> v, log_w = mu.sample(jax.random.key(0), params, 2)
      >>> v["b"].tolist(), v["w"].shape, log_w.tolist()  # masked leaves are zero
      ([[0.0, 0.0], [0.0, 0.0]], (2, 3), [0.0, 0.0])
    """

    mask: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", _freeze_mask(self.mask))

    def perturbed(self, like: PyTree) -> tuple[bool, ...]:
        """Per leaf of ``like``: is it perturbed?"""
        return _tree.perturbed_leaves(like, self.mask)

    def dim(self, like: PyTree) -> int:
        """The dimension d of the perturbed parameters (static)."""
        return _tree.dim(like, self.perturbed(like))

    def layout(self, like: PyTree) -> tuple[tuple[bool, ...], int]:
        """``(perturbed, d)``: per leaf of ``like`` whether it is perturbed, and the number of
        perturbed coordinates.

        Raises:
          ValueError: when no leaf is perturbed.
        """
        perturbed = self.perturbed(like)
        d = _tree.dim(like, perturbed)
        if d == 0:
            raise ValueError(
                "params: no leaf is perturbed (no floating-point array leaves, or the mask "
                "excludes all of them)"
            )
        return perturbed, d

    def symmetric(self, like: PyTree) -> bool:
        """Whether μ and its proposal, on params shaped like ``like``, are invariant under
        v → −v (antithetic pairs need it). Static: decided from shapes, not values."""
        return True

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
        out = self.draw(key, like, num)
        return out.v, out.log_weight

    def draw(self, key: jax.Array, like: PyTree, num: int, *, adaptive: bool = False) -> Draw:
        """:meth:`sample`, returned as a :class:`Draw` that also carries the perturbed
        leaves and d (computed once here, for the callers that need them).

        Draw i comes from ``jax.random.fold_in(key, i)`` alone, so ``draw(key, like, num)``
        is :meth:`draw_at` at ``0 .. num−1``: the first draws do not depend on ``num``, and
        a caller can draw them a chunk at a time (memory flat in ``num``).

        Args:
          key, like, num: as in :meth:`sample`.
          adaptive: the caller multiplies the draws by the adaptive metric ``T_x`` itself
            (``adaptive=True`` estimators and objectives measure ``T_x H T_x``, which is
            already invariant). A proposal that scales by x (the equivariant proposal of
            :func:`product_density`) then draws as at x = 1, so ``T_x`` is applied once.
        """
        _checks.integer("num", num, lo=1)
        return self.draw_at(key, like, jnp.arange(num), adaptive=adaptive)

    def draw_at(
        self, key: jax.Array, like: PyTree, indices: jax.Array, *, adaptive: bool = False
    ) -> Draw:
        """Draws number ``indices`` (an integer array of shape ``(n,)``, may be traced) of the
        stream of ``key``: row j is draw ``indices[j]`` of :meth:`draw`, whatever the number
        of draws and however they are split into chunks or over devices.

        Args:
          key: a JAX PRNG key.
          like: the current parameters.
          indices: which draws, shape ``(n,)``.
          adaptive: as in :meth:`draw`.

        Returns:
          a :class:`Draw` with leading sample axis n.
        """
        _checks.check_key(key)
        if adaptive:
            like = jax.tree_util.tree_map(jnp.ones_like, like)
        perturbed, d = self.layout(like)

        def one(i: jax.Array) -> tuple[PyTree, jax.Array]:
            v, log_w = self._draw(jax.random.fold_in(key, i), like, 1, perturbed, d)
            return jax.tree_util.tree_map(lambda a: a[0], v), log_w[0]

        v, log_w = jax.vmap(one)(jnp.asarray(indices))
        return Draw(v, log_w, perturbed, d)

    def _draw(
        self, key: jax.Array, like: PyTree, num: int, perturbed: tuple[bool, ...], d: int
    ) -> tuple[PyTree, jax.Array]:
        raise NotImplementedError


def _normal(k: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normal entries, two per threefry hash.

    With JAX's default (partitionable) threefry stream ``jax.random.normal`` spends one hash
    per entry: it XORs the two output words of each hash into one. Splitting the key into
    keys laid out like the draw, with the last axis halved, hashes once per key and keeps
    both words, side by side. Each word's top 23 bits give a uniform on the grid
    ``±(2j + 1)·2⁻²³`` (symmetric about 0, never 0 or ±1), mapped to a normal by the inverse
    error function, as ``jax.random.normal`` maps its uniforms. (``jax.random.split``
    rather than the raw hash keeps shard_map's record of which values differ across
    devices.) Keys of other implementations, float64 and complex leaves, scalars and leaves
    whose last axis is shorter than 2 take ``jax.random.normal``. 16-bit leaves are drawn in
    float32 and rounded on every path.
    """
    dtype = jnp.dtype(dtype)
    wide = jnp.float32 if dtype.itemsize < 4 else dtype
    if (
        str(jax.random.key_impl(k)) != "threefry2x32"
        or dtype.itemsize > 4
        or not shape
        or shape[-1] < 2
        or math.prod(shape) == 0
    ):
        return jax.random.normal(k, shape, wide).astype(dtype)
    # Keys laid out like the draw with the last axis halved: both words of a hash land
    # side by side. (Drawing flat and reshaping keeps XLA from fusing the draw into its
    # consumers, which cost more than the hashes saved.)
    half = -(-shape[-1] // 2)
    keys = jax.random.split(k, (*shape[:-1], half))
    words = jax.random.key_data(keys).reshape(*shape[:-1], 2 * half)[..., : shape[-1]]
    # The top 23 bits b give the odd integer 2b + 1 − 2²³ in (−2²³, 2²³). It and its product
    # with 2⁻²³ are exact in float32, and the grid is built in integers, so no rewrite of
    # float constants under jit can move it; no clamp is needed before erf_inv.
    odd = (words >> 9).astype(jnp.int32) * 2 + (1 - 2**23)
    u = odd.astype(jnp.float32) * np.float32(2.0**-23)
    return (np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)).astype(dtype)


def _packed_signs(k: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Independent ±1 entries, one random bit each: every 32-bit word of the key's stream
    gives 32 signs, where ``jax.random.rademacher`` spends a whole word (one threefry hash)
    per sign."""
    n = math.prod(shape)
    words = jax.random.bits(k, (-(-n // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    signs = 2 * bits.reshape(-1)[:n].astype(jnp.int32) - 1
    return signs.reshape(shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Sphere(Sampler):
    """Uniform probability measure on the unit sphere of the whole perturbed vector.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> params = {"a": jnp.ones(2), "b": jnp.ones(1)}
      >>> v, _ = phipsimu.mu.sphere().sample(jax.random.key(0), params, 3)
      >>> norms = jnp.sqrt(jnp.sum(v["a"] ** 2, axis=1) + v["b"][:, 0] ** 2)
      >>> [round(float(n), 4) for n in norms]  # unit norm across both leaves together
      [1.0, 1.0, 1.0]
    """

    def _draw(self, key, like, num, perturbed, d):
        g = _tree.random_like(key, like, perturbed, num, _normal)
        norm = jnp.sqrt(_tree.batched_sq_norm(g, perturbed))
        v = jax.tree_util.tree_map(
            lambda x: (x / norm.reshape((num,) + (1,) * (x.ndim - 1))).astype(x.dtype), g
        )
        return v, jnp.zeros((num,), _tree.accum_dtype(like, perturbed))


@dataclasses.dataclass(frozen=True)
class Gaussian(Sampler):
    """The probability measure N(0, stddev² I) on the perturbed coordinates.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> mu = phipsimu.mu.Gaussian(stddev=0.5)
      >>> mu == phipsimu.mu.gaussian(stddev=0.5)
      True
      >>> v, _ = mu.sample(jax.random.key(0), jnp.zeros(4), 1000)
      >>> round(float(jnp.mean(v**2)), 2)  # Monte Carlo estimate of stddev² = 0.25
      0.24
    """

    stddev: float = 1.0

    def _draw(self, key, like, num, perturbed, d):
        def draw(k, shape, dtype):
            return (self.stddev * _normal(k, shape, dtype)).astype(dtype)

        v = _tree.random_like(key, like, perturbed, num, draw)
        return v, jnp.zeros((num,), _tree.accum_dtype(like, perturbed))


@dataclasses.dataclass(frozen=True)
class Rademacher(Sampler):
    """Independent ±1 coordinates (a probability measure; E[vvᵀ] = I).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> v, _ = phipsimu.mu.Rademacher().sample(jax.random.key(0), jnp.zeros(3), 1000)
      >>> sorted(set(v.ravel().tolist()))
      [-1.0, 1.0]
      >>> second_moment = jnp.mean(v[:, :, None] * v[:, None, :], axis=0)  # E[vvᵀ] = I
      >>> (jnp.round(second_moment, 1) + 0.0).tolist()  # (+ 0.0 turns −0.0 into 0.0)
      [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """

    def _draw(self, key, like, num, perturbed, d):
        v = _tree.random_like(key, like, perturbed, num, _packed_signs)
        return v, jnp.zeros((num,), _tree.accum_dtype(like, perturbed))


@dataclasses.dataclass(frozen=True)
class Lebesgue(Sampler):
    """Lebesgue measure on R^d, by importance sampling with the proposal N(0, scale² I).

    ``log w = (d/2)·log(2π scale²) + ‖v‖²/(2 scale²)``, kept in log space: for large d the
    weights themselves overflow. For ψ = exp(−t/2) the weights ``w·ψ`` have finite variance
    only if ``scale² > 1/(2·λ_min)`` (λ_min the smallest eigenvalue of H); ``scale=None``
    leaves the choice to the estimator (:func:`phipsimu.sharpness` picks ``scale² = 1/λ_min``
    from its Lanczos check) and draws at scale 1 elsewhere.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> v, log_w = phipsimu.mu.Lebesgue(scale=1.0).sample(jax.random.key(0), jnp.zeros(2), 4)
      >>> bool(jnp.allclose(log_w, jnp.log(2 * jnp.pi) + 0.5 * jnp.sum(v**2, axis=1)))
      True
      >>> # ∫exp(−‖v‖²/2)dv = 2π: with this proposal every term w·ψ is 2π exactly
      >>> [round(float(x), 4) for x in jnp.exp(log_w - 0.5 * jnp.sum(v**2, axis=1))]
      [6.2832, 6.2832, 6.2832, 6.2832]
    """

    scale: float | None = 1.0

    def _draw(self, key, like, num, perturbed, d):
        scale = 1.0 if self.scale is None else self.scale
        g = _tree.random_like(key, like, perturbed, num, _normal)
        sq = _tree.batched_sq_norm(g, perturbed)
        log_w = 0.5 * d * math.log(2.0 * math.pi * scale**2) + 0.5 * sq
        return _tree.scale(scale, g), log_w


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
      >>> [round(float(n), 4) for n in jnp.linalg.norm(v["w"], axis=1)]
      [1.0, 1.0, 1.0, 1.0]
    """
    return Sphere(mask=mask)


def gaussian(*, stddev: float = 1.0, mask: Any = None) -> Gaussian:
    """The Gaussian probability measure N(0, stddev² I) on the perturbed coordinates.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> mu = phipsimu.mu.gaussian(stddev=2.0, mask={"b": False, "w": True})
      >>> v, log_w = mu.sample(jax.random.key(0), {"b": jnp.zeros(1), "w": jnp.zeros(2)}, 2)
      >>> v["b"].tolist(), v["w"].shape, log_w.tolist()  # a probability measure: log w = 0
      ([[0.0], [0.0]], (2, 2), [0.0, 0.0])
    """
    return Gaussian(mask=mask, stddev=_checks.real("stddev", stddev, lo=0.0, strict=True))


def rademacher(*, mask: Any = None) -> Rademacher:
    """Independent Rademacher (±1) coordinates on the perturbed leaves.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> v, _ = phipsimu.mu.rademacher().sample(jax.random.key(0), jnp.zeros(3), 2)
      >>> bool(jnp.all(jnp.abs(v) == 1.0)), v.shape
      (True, (2, 3))
    """
    return Rademacher(mask=mask)


#: The probe distributions of the spectral and trace estimators (``probes=``).
PROBES = ("rademacher", "gaussian", "sphere")


def probe_name(probes: Any, allowed: tuple[str, ...] = PROBES) -> str:
    """An estimator's ``probes=`` option as the name of its distribution, validated against
    ``allowed``: a name, or an unmasked sampler of that kind (``phipsimu.mu.rademacher()``,
    ``gaussian()`` with stddev 1, ``sphere()``), so probes are said the same way as a
    measure's μ. Which leaves are probed is the estimator's ``mask=``/``blocks=``: a sampler
    with its own mask is refused (one way to mask).

    Raises:
      ValueError: an unknown name or sampler, or a sampler with a mask.
    """
    kinds = {Rademacher: "rademacher", Gaussian: "gaussian", Sphere: "sphere"}
    given = probes
    if isinstance(probes, Sampler):
        name = kinds.get(type(probes))
        if name is None or (isinstance(probes, Gaussian) and probes.stddev != 1.0):
            raise ValueError(
                f"probes={probes!r}: must be one of {allowed} or the sampler of one of them "
                "(phipsimu.mu.rademacher(), gaussian() with stddev 1, sphere())"
            )
        if probes.mask is not None:
            raise ValueError(
                f"probes={probes!r}: the sampler has a mask; say which leaves are probed with "
                "the estimator's mask= (or blocks=) instead"
            )
        probes = name
    if probes not in allowed:
        raise ValueError(f"probes={given!r}: must be one of {allowed} (or its sampler)")
    return str(probes)


def probe_sampler(probes: str, mask: Any) -> Sampler:
    """The sampler of the probe distribution named ``probes`` (see :func:`probe_name`), on the
    leaves selected by ``mask``."""
    factories: dict[str, Callable[..., Sampler]] = {
        "rademacher": rademacher,
        "gaussian": gaussian,
        "sphere": sphere,
    }
    return factories[probes](mask=mask)


def lebesgue(*, scale: float | None = 1.0, mask: Any = None) -> Lebesgue:
    """Lebesgue measure on R^d, sampled by importance sampling from N(0, scale² I).

    Args:
      scale: the proposal's standard deviation (> 0), or None: chosen from the curvature by
        :func:`phipsimu.sharpness` (``scale² = 1/λ_min`` from its Lanczos check; 1 where no
        check runs).
      mask: which leaves to perturb.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> mu = phipsimu.mu.lebesgue(scale=0.8)
      >>> v, log_w = mu.sample(jax.random.key(0), jnp.zeros(2), 4096)
      >>> # importance sampling of ∫exp(−‖v‖²)dv over R² = π
      >>> round(float(jnp.mean(jnp.exp(log_w - jnp.sum(v**2, axis=1)))), 2)
      3.14
    """
    if scale is not None:
        scale = _checks.real("scale", scale, lo=0.0, strict=True)
    return Lebesgue(mask=mask, scale=scale)


# ---------------------------------------------------------------- Theorem 1: product densities

#: Floor of the equivariant proposal's metric ``T_x = max(|x|, eps)``. Sample-by-sample
#: invariance holds for coordinates with ``|x_i| >= eps`` at both x and Dx. Exact zeros (e.g.
#: zero-initialised biases) get ``T = eps``, which pulls the geometric mean down and widens
#: the proposal on every other coordinate: mask such leaves out, or raise ``eps``, when the
#: effective sample size is poor.
DEFAULT_EPS = 1e-6

# (sign, log|t|) pairs at which log_f is probed when a product density is built.
_PROBE_SIGNS = (1.0, 1.0, 1.0, -1.0, -1.0, -1.0)
_PROBE_LOGS = (-1.0, 0.0, 1.0, -1.0, 0.0, 1.0)


def _check_log_f(log_f: Any) -> None:
    """Raise a clear error unless ``log_f`` maps scalar (sign, log|t|) pairs to scalars that
    are never NaN or +inf at the probes and finite at one of them at least (−inf is allowed:
    it means f = 0 there)."""
    if not callable(log_f):
        raise TypeError(
            f"log_f={log_f!r}: must be a callable log_f(sign, log_abs_prod) returning "
            "log f(sign·exp(log_abs_prod))"
        )
    probes = list(zip(_PROBE_SIGNS, _PROBE_LOGS))
    try:
        # Evaluated eagerly even when the sampler is built inside a jit trace.
        with jax.ensure_compile_time_eval():
            out = jax.vmap(log_f)(
                jnp.asarray(_PROBE_SIGNS, jnp.float32), jnp.asarray(_PROBE_LOGS, jnp.float32)
            )
    except Exception as err:
        raise TypeError(
            f"log_f={log_f!r}: calling log_f(sign, log_abs_prod) on scalar probes failed; it "
            "must be a JAX-traceable function of two scalars"
        ) from err
    if jnp.shape(out) != (len(probes),):
        raise ValueError(
            f"log_f={log_f!r}: must return one scalar per (sign, log_abs_prod) pair, got shape "
            f"{jnp.shape(out)[1:]}"
        )
    vals = [float(x) for x in np.asarray(out, np.float64)]
    bad = [(p, x) for p, x in zip(probes, vals) if math.isnan(x) or x == math.inf]
    if bad:
        raise ValueError(
            f"log_f={log_f!r}: returned non-finite values at (sign, log_abs_prod) probes "
            f"{bad}; log f may be -inf where f = 0, never NaN or +inf"
        )
    if not any(math.isfinite(x) for x in vals):
        raise ValueError(
            f"log_f={log_f!r}: is -inf (f = 0) at every probe {probes}; the measure is zero"
        )


@dataclasses.dataclass(frozen=True)
class _FrozenGroups:
    """Group ids in a hashable form: the pytree structure and, per leaf, either an int (the
    whole leaf is one group) or ``(shape, flat ids)``."""

    treedef: Any
    leaves: tuple[Any, ...]

    def leaf_ids(self, like: PyTree, perturbed: tuple[bool, ...]) -> list[np.ndarray | None]:
        """Per leaf of ``like``: the flat group id of every coordinate, or None if the leaf
        is not perturbed.

        Raises:
          ValueError: if the structure or a leaf's shape does not match ``like``.
        """
        leaves, treedef = jax.tree_util.tree_flatten(like)
        if treedef != self.treedef:
            raise ValueError(
                f"groups: its structure {self.treedef} does not match the params structure "
                f"{treedef}; pass a pytree of int group ids shaped like params"
            )
        out: list[np.ndarray | None] = []
        for i, (x, g, p) in enumerate(zip(leaves, self.leaves, perturbed)):
            shape = tuple(jnp.shape(x))
            if isinstance(g, int):
                ids = np.full(math.prod(shape), g, np.int64)
            elif g[0] != shape:
                raise ValueError(
                    f"groups: leaf {i} has shape {g[0]}, but the params leaf has shape {shape}; "
                    "give an int (one group for the whole leaf) or ids of the leaf's shape"
                )
            else:
                ids = np.asarray(g[1], np.int64)
            out.append(ids if p else None)
        return out


def _freeze_groups(groups: Any) -> _FrozenGroups | None:
    if groups is None:
        return None
    if isinstance(groups, _FrozenGroups):
        return groups
    leaves, treedef = jax.tree_util.tree_flatten(groups)
    frozen: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, bool) or not (
            isinstance(leaf, (int, np.integer))
            or jnp.issubdtype(getattr(leaf, "dtype", np.float64), jnp.integer)
        ):
            raise ValueError(
                f"groups: leaf {leaf!r} is not an int or an integer array; groups are static "
                "int group ids, one per parameter coordinate (or one int per leaf)"
            )
        arr = np.asarray(leaf)
        if arr.ndim == 0:
            frozen.append(int(arr))
        else:
            frozen.append((arr.shape, tuple(int(i) for i in arr.reshape(-1))))
    return _FrozenGroups(treedef, tuple(frozen))


def _segment_sum(x: jax.Array, ids: np.ndarray, num_groups: int) -> jax.Array:
    """Sum the trailing (flattened) coordinates of ``x`` of shape ``(num, ...)`` per group:
    returns ``(num, num_groups)``."""
    flat = jnp.reshape(x, (x.shape[0], -1)).T
    return jax.ops.segment_sum(flat, jnp.asarray(ids), num_groups).T


@dataclasses.dataclass(frozen=True)
class ProductDensity(Sampler):
    """``dμ(v) = ∏_g f(∏_{i∈g} v_i) dv`` (Theorem 1), by importance sampling from the
    equivariant proposal ``v = σ T_x z / gm_g(T_x)``, z ~ N(0, I). See :func:`product_density`.

    Attributes:
      log_f: ``log_f(sign, log_abs_prod) -> log f(sign·exp(log_abs_prod))``.
      scale: σ, the proposal's standard deviation in the equivariant coordinates.
      groups: frozen group ids, or None (one group: all perturbed coordinates).
      eps: the floor of ``T_x = max(|x|, eps)``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> mu = phipsimu.mu.product_density(lambda s, la: -jnp.exp(2 * la))  # f(t) = exp(−t²)
      >>> mu.scale, mu.eps, mu.groups
      (1.0, 1e-06, None)
      >>> x, d = jnp.array([4.0, 0.25]), jnp.array([0.5, 2.0])  # det D = 1
      >>> v, log_w = mu.sample(jax.random.key(0), x, 3)
      >>> v_d, log_w_d = mu.sample(jax.random.key(0), d * x, 3)
      >>> bool(jnp.allclose(v_d, d * v)), bool(jnp.allclose(log_w_d, log_w))  # equivariant
      (True, True)
    """

    log_f: Any = None
    scale: float = 1.0
    groups: Any = None
    eps: float = DEFAULT_EPS
    _sign_free: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_log_f(self.log_f)
        object.__setattr__(self, "scale", _checks.real("scale", self.scale, lo=0.0, strict=True))
        object.__setattr__(self, "eps", _checks.real("eps", self.eps, lo=0.0, strict=True))
        object.__setattr__(self, "groups", _freeze_groups(self.groups))
        # Decided once, eagerly (also when built inside a jit trace), so it stays static.
        with jax.ensure_compile_time_eval():
            logs = jnp.asarray(_PROBE_LOGS, jnp.float32)
            plus = jax.vmap(self.log_f)(jnp.ones_like(logs), logs)
            minus = jax.vmap(self.log_f)(-jnp.ones_like(logs), logs)
            object.__setattr__(self, "_sign_free", bool(np.all(np.asarray(plus == minus))))

    def symmetric(self, like: PyTree) -> bool:
        """v → −v flips the sign of a group's product when the group has odd size, so the
        measure is symmetric when every group is even-sized or ``log_f`` ignores the sign
        (checked at the probes when the sampler is built)."""
        if self._sign_free:
            return True
        _, sizes = self.group_index(like, self.perturbed(like))
        return bool(np.all(sizes % 2 == 0))

    def group_index(self, like: PyTree, perturbed: tuple[bool, ...]) -> tuple[list, np.ndarray]:
        """Per perturbed leaf, its coordinates' group index in ``0..G−1`` (None for leaves
        that are not perturbed), and the size of each of the G groups (static numpy)."""
        if self.groups is None:
            leaves = jax.tree_util.tree_leaves(like)
            ids = [
                np.zeros(int(np.prod(jnp.shape(x))), np.int64) if p else None
                for x, p in zip(leaves, perturbed)
            ]
        else:
            ids = self.groups.leaf_ids(like, perturbed)
        labels = np.unique(np.concatenate([i for i in ids if i is not None]))
        index = [None if i is None else np.searchsorted(labels, i) for i in ids]
        sizes = np.bincount(
            np.concatenate([i for i in index if i is not None]), minlength=len(labels)
        )
        return index, sizes

    def _draw(self, key, like, num, perturbed, d):
        index, sizes = self.group_index(like, perturbed)
        num_groups = len(sizes)
        dtype = _tree.float_dtype(like, perturbed)
        z = _tree.random_like(key, like, perturbed, num, _normal)
        leaves_x = jax.tree_util.tree_leaves(like)
        leaves_z, treedef = jax.tree_util.tree_flatten(z)

        # log T_x and its per-group mean (the log geometric mean), in log space so that
        # products over many coordinates never under- or overflow.
        log_t = [
            None if ids is None else jnp.log(jnp.maximum(jnp.abs(x), self.eps)).astype(dtype)
            for x, ids in zip(leaves_x, index)
        ]
        sum_log_t = sum(
            jax.ops.segment_sum(jnp.reshape(lt, (-1,)), jnp.asarray(ids), num_groups)
            for lt, ids in zip(log_t, index)
            if ids is not None
        )
        log_gm = sum_log_t / jnp.asarray(sizes, dtype)

        v_leaves = []
        for zl, lt, ids in zip(leaves_z, log_t, index):
            if ids is None:
                v_leaves.append(zl)
                continue
            rel = jnp.exp(lt - jnp.reshape(log_gm[jnp.asarray(ids)], lt.shape))
            v_leaves.append((self.scale * rel * zl).astype(zl.dtype))
        v = jax.tree_util.tree_unflatten(treedef, v_leaves)

        # ∏_{i∈g} v_i = σ^{n_g} ∏_{i∈g} z_i exactly, because ∏_{i∈g} T_i / gm_g = 1: the
        # products, and so the weights, do not depend on x at all.
        active = [(zl.astype(dtype), ids) for zl, ids in zip(leaves_z, index) if ids is not None]
        log_abs = sum(_segment_sum(jnp.log(jnp.abs(zl)), ids, num_groups) for zl, ids in active)
        log_abs = log_abs + jnp.asarray(sizes, dtype) * math.log(self.scale)
        num_neg = sum(
            _segment_sum((zl < 0).astype(jnp.int32), ids, num_groups) for zl, ids in active
        )
        sign = (1 - 2 * (num_neg % 2)).astype(dtype)
        log_f = jax.vmap(self.log_f)(sign.reshape(-1), log_abs.reshape(-1))
        log_density = jnp.sum(jnp.reshape(log_f, (num, num_groups)).astype(dtype), axis=1)

        # q(v) = N(σz; 0, σ²I) · |det ∂v/∂(σz)|⁻¹ and det = ∏_g ∏_{i∈g} T_i/gm_g = 1, so
        # log(dμ/dq) = Σ_g log f(∏_g v) + ‖z‖²/2 + (d/2)·log(2πσ²).
        sq = _tree.batched_sq_norm(z, perturbed).astype(dtype)
        log_w = log_density + 0.5 * sq + 0.5 * d * math.log(2.0 * math.pi * self.scale**2)
        return v, log_w


def product_density(
    log_f: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    scale: float = 1.0,
    groups: Any = None,
    eps: float = DEFAULT_EPS,
    mask: Any = None,
) -> ProductDensity:
    """The measure ``dμ(v) = f(∏ᵢ vᵢ) ∏ᵢ dvᵢ`` of Theorem 1, optionally grouped.

    .. math::
       d\\mu(v) = \\prod_{g} f\\Big(\\prod_{i \\in g} v_i\\Big) \\prod_i dv_i

    Sampled by importance sampling with the **equivariant proposal** (docs/conventions.md,
    "Equivariant proposal")

    .. math::
       v_i = \\sigma\\, \\frac{T_i}{\\mathrm{gm}_{g(i)}(T)}\\, z_i, \\quad z \\sim N(0, I),
       \\quad T = \\max(|x|, \\epsilon), \\quad
       \\mathrm{gm}_g(T) = \\exp\\Big(\\frac{1}{n_g} \\sum_{i \\in g} \\log T_i\\Big),

    where x are the current parameters (``like`` in :meth:`Sampler.sample`) and ``n_g`` the
    size of group g. The map z ↦ v has Jacobian ``det = 1`` within every group and keeps
    every group's product (``∏_g v = σ^{n_g} ∏_g z``), so the log-weights

    .. math::
       \\log w = \\sum_g \\log f\\Big(\\prod_{i\\in g} v_i\\Big) + \\frac{\\|z\\|^2}{2}
       + \\frac d2 \\log(2\\pi\\sigma^2)

    are exact and independent of x. Consequence: for every positive diagonal D with
    ``det D_g = 1`` in every group and ``L(Dx) = L(x)``, ``H(Dx) = D⁻¹H(x)D⁻¹`` and
    ``v(Dx) = D v(x)``, so the same key gives the same quadratic forms, weights and estimate
    at x and Dx, sample by sample up to float rounding (for coordinates with ``|x_i| >= eps``).
    With sign flips in D the equality holds in distribution only when f is even.

    Everything runs in log space: ``log_f`` receives the sign and ``log|∏ v|`` of each group's
    product, which for many coordinates would under- or overflow as a number.

    Why groups: with one group over d coordinates, ``log|∏v|`` is a sum of d terms of mean
    ≈ −0.64 + log σ, so for large d the product is essentially always ≈ 0 (or huge), f acts
    as the constant f(0), and μ degenerates to a multiple of Lebesgue measure (the
    determinant, 0 on any zero-loss manifold). Small groups keep f effective. The price:
    invariance only under rescalings with det = 1 *within each group*.

    Args:
      log_f: ``log_f(sign, log_abs_prod) -> log f(sign · exp(log_abs_prod))``, a
        JAX-traceable function of two scalars. Checked when built: it must return a scalar
        and never NaN or +inf at a few probe points (−inf, i.e. f = 0, is allowed).
      scale: σ > 0, the proposal's standard deviation in the equivariant coordinates. A
        poorly matched σ shows as a small ``Estimate.ess``.
      groups: None (one group: all perturbed coordinates), or a pytree shaped like the
        params whose leaves are int group ids: an int (the whole leaf is one group) or an
        integer array of the leaf's shape. Ids of leaves that are not perturbed are ignored.
      eps: floor of ``T = max(|x|, eps)`` (default :data:`DEFAULT_EPS` = 1e-6), so exact
        zeros in x do not make the proposal degenerate.
      mask: which leaves to perturb.

    Returns:
      a :class:`ProductDensity` sampler.

    Raises:
      TypeError / ValueError: on a bad ``log_f``, ``scale``, ``eps`` or ``groups`` (here);
      ValueError naming ``groups`` when sampling params whose structure or leaf shapes do
      not match them.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> mu = phipsimu.mu.product_density(lambda s, la: -jnp.exp(2 * la))  # f(t) = exp(−t²)
      >>> v, log_w = mu.sample(jax.random.key(0), jnp.array([4.0, 0.25]), 3)
      >>> v.shape, log_w.shape
      ((3, 2), (3,))

    Reference: Tahmasebi et al., Theorem 1 (eq. 8); docs/conventions.md, "Theorem 1".
    """
    return ProductDensity(mask=mask, log_f=log_f, scale=scale, groups=groups, eps=eps)
