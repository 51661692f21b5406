"""optax gradient transformations: the (φ, ψ, μ)-sharpness-aware update and the baselines
SAM, ASAM, Frob-SAM and random-perturbation SAM.

All take the loss through the keyword-only extra argument ``value_fn(params) -> scalar``
(the optax line-search convention) and ignore other extra arguments::

    tx = optax.chain(phipsimu.sharpness_aware(phipsimu.measures.trace(), rho=0.05,
                                              num_samples=4), optax.sgd(0.1))
    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, batch))

NaN: no transform blends branches arithmetically, so a NaN loss or gradient gives NaN
updates (never silently zeroed or finite); wrap the chain in ``optax.apply_if_finite`` to
skip such steps. A finite loss with a zero gradient gives finite updates.

Data parallel (docs/conventions.md, section "Scaling out"): under ``jax.jit`` with the batch
sharded by a ``NamedSharding`` no argument is needed. Inside ``jax.pmap``, ``jax.shard_map``
(with or without ``check_vma``) or ``jax.vmap`` with a named axis, pass ``axis_name`` and, on
each device, the gradient JAX gives for the local loss (``jax.grad(value_fn)(params)``) with
``value_fn`` the local loss. ``sync=True`` (default) returns the single-device update on the
global batch on every device: the incoming gradients are averaged, the perturbations are the
same on every device, and the loss at each perturbed point is averaged over devices *before*
any nonlinear φ or ψ is applied. ``sync=False`` keeps the sharpness term per device
(m-sharpness: each device draws its own perturbations and measures its own shard); the
updates are averaged, so replicas stay equal. Params must be replicated along ``axis_name``
(they may be sharded along other mesh axes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from phipsimu import _checks, _curvature, _measure, _objective, _parallel, _tree

PyTree = Any


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware`: the PRNG key (raw ``uint32[2]``, so it survives a
    numpy round trip) for the next step's perturbations."""

    rng_key: jax.Array


def _value_fn_or_raise(value_fn: Any, params: PyTree) -> Callable[[PyTree], jax.Array]:
    if value_fn is None:
        raise TypeError(
            "value_fn: missing; call tx.update(updates, state, params, "
            "value_fn=lambda p: loss(p, batch))"
        )
    if not callable(value_fn):
        raise TypeError(f"value_fn={value_fn!r}: must be a callable params -> scalar loss")
    if params is None:
        raise ValueError("params: required by this transformation (pass the current params)")
    out = jax.eval_shape(value_fn, params)
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"value_fn: must return a real floating-point scalar loss, got {out!r}")
    return value_fn


def _on_float_leaves(
    updates: PyTree, params: PyTree, values: list, combine: Callable[[Any, Any], Any]
) -> PyTree:
    """``combine(u, g)`` on the leaves of ``updates`` whose parameter is floating point, with
    ``values`` aligned to those leaves; the other leaves (step counters, masks) pass through."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    it = iter(values)
    out = [combine(u, next(it)) if f else u for u, f in zip(leaves, _tree.perturbed_leaves(params))]
    return jax.tree_util.tree_unflatten(treedef, out)


def sharpness_aware(
    measure: _measure.Measure,
    *,
    rho: float,
    num_samples: int,
    strength: float = 1.0,
    antithetic: bool = False,
    adaptive: bool = False,
    eta: float = 0.0,
    seed: int = 0,
    chunk_size: int | None = None,
    axis_name: str | None = None,
    sync: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Add the gradient of the (φ, ψ, μ) sharpness term (eq. 10) to the incoming updates.

    .. math:: u \\leftarrow u + s\\,\\nabla_x\\,\\rho^2\\phi\\Big(\\frac1m\\sum_i w_i
       \\psi\\big(2(L(x+\\rho v_i)-L(x))/\\rho^2\\big)\\Big)

    With ``updates = ∇L(x)`` the result is the gradient of
    :func:`phipsimu.sharpness_aware_loss`. Perturbations are drawn from ``measure.mu`` with
    a key kept in the state (split every step).

    Args:
      measure: a :class:`phipsimu.Measure`.
      rho, num_samples, strength, antithetic, adaptive, eta, chunk_size: as in
        :func:`phipsimu.sharpness_aware_loss`.
      seed: seed of the perturbation key.
      axis_name, sync: data-parallel behaviour (module docs).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(updates, state, params, *,
      value_fn, **extra_args)``.
    """
    term = _objective.sharpness_term(
        measure,
        rho=rho,
        num_samples=num_samples,
        strength=strength,
        antithetic=antithetic,
        adaptive=adaptive,
        eta=eta,
        chunk_size=chunk_size,
    )
    _checks.seed("seed", seed)
    _parallel.check_axis_name("axis_name", axis_name)

    def init_fn(params: PyTree) -> SharpnessAwareState:
        del params
        return SharpnessAwareState(rng_key=jax.random.PRNGKey(seed))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        value_fn = _value_fn_or_raise(value_fn, params)
        rng_key, key = jax.random.split(state.rng_key)
        floats = _tree.perturbed_leaves(params)
        incoming = _tree.active(updates, floats)
        if axis_name is None:

            def objective(p):
                return term(value_fn, p, value_fn(p), key)

        else:
            _parallel.axis_size(axis_name)
            incoming = _parallel.mean_gradient(
                incoming, jax.eval_shape(value_fn, params), axis_name
            )
            if sync:
                # The global loss at every point, before φ and ψ see it.
                loss = _parallel.global_value_fn(value_fn, axis_name)
            else:
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
                loss = value_fn

            def objective(p):
                # pmean of a per-device term (sync=False) or of the same global term
                # (sync=True): its gradient, pmean-ed below, is the global one in every mode.
                return _parallel.pmean(term(loss, p, loss(p), key), axis_name)

        grad = _parallel.pmean(_curvature.float_grad(objective, params), axis_name)
        new = _on_float_leaves(
            updates, params, [u + g for u, g in zip(incoming, grad)], lambda u, n: n.astype(u.dtype)
        )
        return new, SharpnessAwareState(rng_key=rng_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
    *,
    rho: float,
    eta: float = 0.0,
    adaptive: bool = False,
    axis_name: str | None = None,
    sync: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """SAM and ASAM: replace the updates by the gradient at the adversarial point.

    SAM (Foret et al., 2021): ``ε = ρ g/‖g‖``; ASAM (Kwon et al., 2021, ``adaptive=True``):
    ``ε = ρ T² g/‖T g‖`` with ``T = |w| + eta``. Here ``g`` is the incoming ``updates``
    (the gradient of ``value_fn`` at ``params``) and the output is ``∇value_fn(params + ε)``.
    A zero gradient gives ``ε = 0`` (no NaN, unlike a plain ``g/‖g‖``); ``rho=0`` gives
    exactly the base optimizer's step. Chain it before the base optimizer:
    ``optax.chain(phipsimu.sam(rho=0.05), optax.sgd(0.1))``.

    Args:
      rho: radius ρ >= 0.
      eta: ASAM's floor (>= 0).
      adaptive: ASAM instead of SAM.
      axis_name, sync: data-parallel behaviour (module docs).
    """
    _checks.real("rho", rho, lo=0.0, strict=False)
    _checks.real("eta", eta, lo=0.0, strict=False)
    _parallel.check_axis_name("axis_name", axis_name)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        value_fn = _value_fn_or_raise(value_fn, params)
        floats = _tree.perturbed_leaves(params)
        x, merge = _tree.split(params, floats)
        g = _tree.active(updates, floats)
        if axis_name is not None:
            _parallel.axis_size(axis_name)
            if sync:
                g = _parallel.mean_gradient(g, jax.eval_shape(value_fn, params), axis_name)
        if adaptive:
            t = [jnp.abs(xi) + eta for xi in x]
            tg = _tree.mul(t, g)
            direction = _tree.mul(t, tg)
            norm = jnp.sqrt(_tree.sq_norm(tg))
        else:
            direction = g
            norm = jnp.sqrt(_tree.sq_norm(g))
        # ‖g‖ = 0 only when g = 0: dividing 0 by 1 gives ε = 0; NaN stays NaN (NaN > 0 is
        # false, so the numerator's NaN propagates).
        safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
        adv = _tree.add_scale(x, rho / safe, direction)
        if axis_name is None:
            grad = jax.grad(lambda a: value_fn(merge(a)))(adv)
        elif sync:
            loss = _parallel.global_value_fn(value_fn, axis_name)
            grad = jax.lax.pmean(jax.grad(lambda a: loss(merge(a)))(adv), axis_name)
        else:
            grad = _parallel.local_gradient(lambda a: value_fn(merge(a)), adv, axis_name)
            grad = jax.lax.pmean(grad, axis_name)
        new = _on_float_leaves(updates, params, grad, lambda u, n: n.astype(u.dtype))
        return new, state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def frobenius_sam(
    *,
    rho: float,
    num_samples: int,
    strength: float,
    seed: int = 0,
    antithetic: bool = False,
    axis_name: str | None = None,
    sync: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Frob-SAM: add the gradient of ``strength/(2ρ²)·Var_v L(x + ρv)``, v ~ N(0, I).

    The Frobenius preset in eq. (10) gives ``ρ²·s·½·Var[2(L(x+ρv) − L(x))/ρ²]
    = (2s/ρ²)·Var_v L(x+ρv)``, so Frob-SAM's λ = ``strength`` maps to ``s = strength/4``.
    The variance is the unbiased sample variance (needs ``num_samples >= 2``). Its leading
    term at a minimum is ``strength/4 · ρ² · ‖H‖_F²``.
    """
    _checks.real("strength", strength, lo=0.0, strict=False)
    return sharpness_aware(
        _measure.frobenius(),
        rho=rho,
        num_samples=num_samples,
        strength=strength / 4.0,
        antithetic=antithetic,
        seed=seed,
        axis_name=axis_name,
        sync=sync,
    )


def random_sam(
    *,
    rho: float,
    num_samples: int,
    seed: int = 0,
    antithetic: bool = False,
    axis_name: str | None = None,
    sync: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Random-perturbation (average-direction) SAM: the gradient of
    ``L_AVG(x) = E_{v ~ Uniform(S^{d−1})} L(x + ρv)`` (the paper's eq. 3).

    Implemented as the trace preset with strength ½: ``L + ρ²·½·mean 2(L(x+ρv) − L(x))/ρ²
    = mean L(x+ρv)``, so with ``updates = ∇L`` the output is ``mean_i ∇L(x + ρv_i)``. Its
    explicit bias is Tr(H)/d (Wen et al.).
    """
    return sharpness_aware(
        _measure.trace(),
        rho=rho,
        num_samples=num_samples,
        strength=0.5,
        antithetic=antithetic,
        seed=seed,
        axis_name=axis_name,
        sync=sync,
    )
