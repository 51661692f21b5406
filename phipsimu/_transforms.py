"""optax gradient transformations: the (φ, ψ, μ)-sharpness-aware update and the baselines
SAM, ASAM, Frob-SAM and random-perturbation SAM.

All take the loss through the keyword-only extra argument ``value_fn(params) -> scalar``
(the optax line-search convention), or ``value_fn(params) -> (scalar, aux)`` with
``has_aux=True`` (aux is ignored), and ignore other extra arguments::

    tx = optax.chain(phipsimu.sharpness_aware(phipsimu.measures.trace(), rho=0.05,
                                              num_samples=4), optax.sgd(0.1))
    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, batch))

Non-finite values: with ``skip_nonfinite=True`` (default) a step whose perturbed loss or
sharpness-aware gradient is not finite returns the incoming updates unchanged (the clean
gradient) and increments ``nonfinite_count`` in the state; this is the guard that works,
since ``optax.apply_if_finite`` around the chain only sees the incoming, finite gradient. With
``skip_nonfinite=False`` such a step gives non-finite updates: put ``optax.apply_if_finite``
*after* the transform, ``optax.chain(phipsimu.sam(...), optax.apply_if_finite(base, n))``.
A NaN incoming gradient is passed on as it is, in both modes (``sharpness_aware`` also
counts that step in ``nonfinite_count``, since its update uses the incoming gradient).

Which leaves: floating-point array leaves of ``params`` (restricted by ``mask``) are
perturbed and receive the sharpness-aware update; the other leaves (ints, bools, PRNG keys,
masked-out leaves) are held fixed and their incoming updates pass through.

Metrics: the states (:class:`SamState`, :class:`SharpnessAwareState`) hold the last step's
losses and the count of non-finite steps; they never change the updates. Read them with
``optax.tree.get(state, "nonfinite_count")``.

Data parallel (docs/conventions.md, section "Scaling out"): under ``jax.jit`` with the batch
sharded by a ``NamedSharding`` no argument is needed. Inside ``jax.pmap``, ``jax.shard_map``
(with or without ``check_vma``) or ``jax.vmap`` with a named axis, pass ``axis_name`` and, on
each device, the gradient JAX gives for the local loss (``jax.grad(value_fn)(params)``) with
``value_fn`` the local loss. ``sync=True`` (default) returns the single-device update on the
global batch on every device: the incoming gradients are averaged, the perturbations are the
same on every device, and the loss at each perturbed point is averaged over devices *before*
any nonlinear φ or ψ is applied. ``sync=False`` keeps the sharpness term per device
(m-sharpness: each device draws its own perturbations and measures its own shard); the
updates are averaged, so replicas stay equal (the same updates as under ``pmap``; under
``shard_map``'s default checks the gradient JAX gives for the local loss is the sum over
devices, so ``sam`` recomputes each device's own gradient there: one more gradient per
step). Params must be replicated along ``axis_name``. They may be sharded along other mesh
axes that the compiler partitions (``jax.jit`` with a ``NamedSharding``, or ``shard_map``
over the data axis alone, ``axis_names={"data"}``), where every leaf keeps its full shape;
not split by hand inside ``shard_map``, where a device sees only its shard of a leaf and
norms and draws would be those of the shard: under ``shard_map``'s default checks such a
leaf (typed as varying along another axis) raises a ``ValueError`` naming it; with
``check_vma=False`` it cannot be detected. The metrics in the state are averaged over
devices too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from phipsimu import _checks, _measure, _objective, _parallel, _tree

PyTree = Any


class SamState(NamedTuple):
    """State of :func:`sam`: metrics of the last step (they never change the updates).

    Attributes:
      perturbed_loss: ``value_fn`` at the adversarial point ``x + ε``.
      epsilon_norm: ``‖ε‖`` (ρ for SAM unless the gradient is 0).
      nonfinite_count: int32, the number of steps so far whose perturbed loss or gradient
        was not finite (with ``skip_nonfinite=True`` they returned the incoming updates).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: jnp.sum(p**2)
      >>> tx = phipsimu.sam(rho=0.05)
      >>> params = jnp.array([3.0, 4.0])
      >>> _, state = tx.update(jax.grad(loss)(params), tx.init(params), params, value_fn=loss)
      >>> round(float(state.perturbed_loss), 4)  # L(x + ε) = 3.03² + 4.04²
      25.5025
      >>> round(float(state.epsilon_norm), 4), int(state.nonfinite_count)
      (0.05, 0)
    """

    perturbed_loss: jax.Array
    epsilon_norm: jax.Array
    nonfinite_count: jax.Array


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware` (and :func:`frobenius_sam`, :func:`random_sam`).

    Attributes:
      rng_key: the PRNG key for the next step's perturbations (raw ``uint32`` key data of
        the default implementation, so it survives a numpy round trip).
      loss: last step's ``value_fn(params)``.
      perturbed_losses: last step's ``value_fn(params + ρv_i)``, shape ``(num_samples,)``
        (with ``antithetic``, the ``+ρv_i`` losses then the ``−ρv_i`` ones).
      sharpness_term: last step's ``s·ρ²·φ(…)``, the term whose gradient was added.
      nonfinite_count: int32, steps so far whose sharpness term or gradient was not finite
        (with ``skip_nonfinite=True`` they returned the incoming updates).
      unresolved_count: int32, steps so far whose finite-difference curvatures
        ``2(L(x + ρv_i) − L(x))/ρ²`` were not resolved by the losses' precision (some
        difference within 100 roundoffs of the losses, so more than 1% rounding error) while
        the measure is nonlinear, so the update's weights were rounding noise. Use a larger
        ``rho`` (or float64). Never counted for the trace measure (``random_sam``), whose
        weights do not depend on the curvatures.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: jnp.sum(p**2)
      >>> tx = phipsimu.sharpness_aware(
      ...     phipsimu.measures.trace(), rho=0.1, num_samples=4, antithetic=True)
      >>> params = jnp.array([3.0, 4.0])
      >>> @jax.jit
      ... def step(params, state):
      ...     return tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
      >>> _, state = step(params, tx.init(params))
      >>> round(float(state.loss), 4), state.perturbed_losses.shape  # L(x), L(x ± ρvᵢ)
      (25.0, (4,))
      >>> # s·ρ²·mean 2(L(x + ρv) − L(x))/ρ² over ±v on the unit sphere: ρ²·vᵀHv = 0.01·2
      >>> round(float(state.sharpness_term), 4)
      0.02
      >>> int(state.nonfinite_count), int(state.unresolved_count)
      (0, 0)
    """

    rng_key: jax.Array
    loss: jax.Array
    perturbed_losses: jax.Array
    sharpness_term: jax.Array
    nonfinite_count: jax.Array
    unresolved_count: jax.Array


# ---------------------------------------------------------------- checks


_MASKED_NODE_MESSAGE = (
    "params: holds optax.MaskedNode placeholders, so this transform runs inside "
    "optax.masked, where the masked-out parameters are missing and the loss cannot be "
    "evaluated; pass the mask to the transform instead (mask=...): it perturbs only the "
    "masked-in leaves and passes the others' updates through"
)


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _check_params(params: PyTree, name: str = "params") -> None:
    """Raise a clear error for params these transforms cannot handle: missing, optax.masked
    placeholders, Python floats (which would silently never be perturbed) and non-array
    leaves such as the functions of an equinox module."""
    if params is None:
        raise ValueError(f"{name}: required by this transformation (pass the current params)")
    if any(map(_is_masked_node, jax.tree_util.tree_leaves(params, is_leaf=_is_masked_node))):
        raise ValueError(_MASKED_NODE_MESSAGE.replace("params", name, 1))
    _checks.check_params(params, name)


def _check_updates(updates: PyTree, params: PyTree, perturbed: tuple[bool, ...]) -> None:
    """``updates`` must be shaped like ``params`` (same structure, same shapes on the leaves
    this transform changes), or one leaf's term would land on another."""
    if any(map(_is_masked_node, jax.tree_util.tree_leaves(updates, is_leaf=_is_masked_node))):
        raise ValueError(_MASKED_NODE_MESSAGE.replace("params", "updates", 1))
    u_def: Any = jax.tree_util.tree_structure(updates)
    p_def = jax.tree_util.tree_structure(params)
    if u_def != p_def:
        raise ValueError(
            f"updates: structure {u_def} does not match the params structure {p_def}; pass "
            "updates (the gradient) shaped like params"
        )
    paths = jax.tree_util.tree_leaves_with_path(params)
    for (path, p), u, f in zip(paths, jax.tree_util.tree_leaves(updates), perturbed):
        if f and jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"updates: leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(u)}, the "
                f"params leaf has shape {jnp.shape(p)}; pass updates shaped like params"
            )


def _check_state(state: Any, expected: type, transform: str) -> None:
    """``state`` must be what this transform's ``init`` returned (inside ``optax.chain``,
    ``inject_hyperparams`` or ``MultiSteps`` the wrappers pass it on unchanged)."""
    if not isinstance(state, expected):
        raise TypeError(
            f"state: got {type(state).__name__} ({state!r:.200}); {transform}'s update expects "
            f"the {expected.__name__} returned by its own init (tx.init(params)), not another "
            "transformation's state"
        )


def _loss_fn(value_fn: Any, params: PyTree, has_aux: bool) -> Callable[[PyTree], jax.Array]:
    """``value_fn`` as a function returning the scalar loss (checked on shapes only)."""
    if value_fn is None:
        raise TypeError(
            "value_fn: missing; call tx.update(updates, state, params, "
            "value_fn=lambda p: loss(p, batch))"
        )
    if not callable(value_fn):
        raise TypeError(f"value_fn={value_fn!r}: must be a callable params -> scalar loss")
    out = jax.eval_shape(value_fn, params)
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                f"value_fn: with has_aux=True must return (loss, aux), got {_checks.describe(out)}"
            )
        out = out[0]
    elif isinstance(out, tuple):
        raise ValueError(_checks.tuple_loss_message("value_fn", out, has_aux_option=True))
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"value_fn: must return a real floating-point scalar loss, got {out!r}")
    return (lambda p: value_fn(p)[0]) if has_aux else value_fn


def _check_mask(mask: Any) -> Any:
    if mask is None or callable(mask):
        return mask
    leaves = jax.tree_util.tree_leaves(mask)
    if not leaves or not all(isinstance(b, bool) for b in leaves):
        raise TypeError(
            f"mask={mask!r}: must be None, a pytree of Python bools shaped like params (as in "
            "optax.masked) or a callable params -> such a pytree"
        )
    return mask


def _perturbed(params: PyTree, mask: Any) -> tuple[bool, ...]:
    perturbed = _tree.perturbed_leaves(params, mask)
    if not any(perturbed):
        raise ValueError(
            "params: no leaf is perturbed (no floating-point array leaves, or mask= excludes "
            "all of them)"
        )
    return perturbed


# ---------------------------------------------------------------- shared step plumbing


def _metric_dtype(params: PyTree) -> jnp.dtype:
    """Metrics are kept in the params' widest float dtype, at least float32 (stable across
    steps, so the state's dtypes never change)."""
    return jnp.promote_types(_tree.float_dtype(params), jnp.float32)


def _all_finite(values: list) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(v)) for v in values]))


def _emit(
    updates: PyTree,
    perturbed: tuple[bool, ...],
    new_active: list,
    ok: jax.Array,
    skip_nonfinite: bool,
) -> PyTree:
    """``updates`` with ``new_active`` on the perturbed leaves (in the updates' dtypes); with
    ``skip_nonfinite`` and ``ok`` false, ``updates`` unchanged. Selected, never blended, so a
    NaN in the discarded branch cannot leak."""
    old, merge = _tree.split(updates, perturbed)
    new = [n.astype(u.dtype) for u, n in zip(old, new_active)]
    if skip_nonfinite:
        new = [jnp.where(ok, n, u) for u, n in zip(old, new)]
    return merge(new)


def _count(count: jax.Array, ok: jax.Array) -> jax.Array:
    return jnp.where(ok, count, optax.safe_int32_increment(count))


def _restrict(measure: _measure.Measure, mask: Any) -> _measure.Measure:
    """The measure with its sampler perturbing only leaves that both its own mask and the
    transform's ``mask`` select."""
    if mask is None:
        return measure
    inner = measure.mu.mask

    def both(params: PyTree) -> PyTree:
        a = _tree.perturbed_leaves(params, mask)
        b = _tree.perturbed_leaves(params, inner)
        treedef = jax.tree_util.tree_structure(params)
        return jax.tree_util.tree_unflatten(treedef, [x and y for x, y in zip(a, b)])

    return dataclasses.replace(measure, mu=dataclasses.replace(measure.mu, mask=both))


# ---------------------------------------------------------------- transforms


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
    sample_axis: str | None = None,
    mask: Any = None,
    skip_nonfinite: bool = True,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Add the gradient of the (φ, ψ, μ) sharpness term (eq. 10) to the incoming updates.

    .. math:: u \\leftarrow u + s\\,\\nabla_x\\,\\rho^2\\phi\\Big(\\frac1m\\sum_i w_i
       \\psi\\big(2(L(x+\\rho v_i)-L(x))/\\rho^2\\big)\\Big)

    ``updates`` must be ``∇L(x)``, the gradient of ``value_fn`` at ``params`` (as for
    ``optax.contrib.sam``); the result is then the gradient of
    :func:`phipsimu.sharpness_aware_loss`. The term depends on ``L(x)`` through every
    difference, and that part of its gradient, ``∂term/∂L(x)·∇L(x)``, reuses the incoming
    updates (without ``axis_name`` or ``sample_axis``), so a step costs the caller's gradient,
    one loss value and one gradient per perturbation. Perturbations are drawn from
    ``measure.mu`` with a key kept in the state (split every step).

    Args:
      measure: a :class:`phipsimu.Measure`.
      rho, num_samples, strength, antithetic, adaptive, eta, chunk_size: as in
        :func:`phipsimu.sharpness_aware_loss`. Under ``optax.inject_hyperparams``,
        ``num_samples`` is fixed by ``init`` (it sets the state's shapes).
      seed: seed of the perturbation key, ``0 <= seed < 2**63``.
      axis_name, sync: data-parallel behaviour (module docs).
      sample_axis: spread the perturbations over this mapped axis (``shard_map``/``pmap``):
        each device evaluates ``num_samples/N`` of the same draws as one device, and every
        device returns the single-device update (as in
        :func:`phipsimu.sharpness_aware_loss`).
      mask: which leaves are perturbed and get the sharpness term's gradient (a pytree of
        bools shaped like params, or a callable ``params -> mask``, as in ``optax.masked``),
        on top of ``measure.mu``'s own mask; the other leaves' updates pass through.
      skip_nonfinite: return the incoming updates for a step whose sharpness term or its
        gradient is not finite (counted in ``nonfinite_count``).
      has_aux: ``value_fn`` returns ``(loss, aux)``; aux is ignored.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`SharpnessAwareState`; ``update(updates, state, params, *, value_fn,
      **extra_args)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, phipsimu
      >>> tx = optax.chain(phipsimu.sharpness_aware(
      ...     phipsimu.measures.trace(), rho=0.05, num_samples=4), optax.sgd(0.1))
      >>> loss = lambda p: jnp.sum(p**2)
      >>> params = jnp.ones(3)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     return tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
      >>> updates, state = step(params, state)
      >>> int(optax.tree.get(state, "nonfinite_count"))
      0
    """
    _checks.flags(
        antithetic=antithetic,
        adaptive=adaptive,
        sync=sync,
        skip_nonfinite=skip_nonfinite,
        has_aux=has_aux,
    )
    mask = _check_mask(mask)
    measure = _restrict(_measure.check_measure(measure), mask)
    _checks.seed("seed", seed)
    _parallel.check_axis_name("axis_name", axis_name)

    def build(n: int) -> Callable:
        return _objective.sharpness_term(
            measure,
            rho=rho,
            num_samples=n,
            strength=strength,
            antithetic=antithetic,
            adaptive=adaptive,
            eta=eta,
            chunk_size=chunk_size,
            sample_axis=sample_axis,
        )

    # optax.inject_hyperparams turns an int num_samples into a hyperparameter that is traced
    # inside jit; its value is then read from the state, whose perturbed_losses has one entry
    # per sample (fixed by init, where the value is concrete).
    static_n = (
        None
        if _checks.is_traced(num_samples)
        else _checks.integer("num_samples", num_samples, lo=1)
    )
    term = None if static_n is None else build(static_n)
    linear = measure.is_linear()

    def init_fn(params: PyTree) -> SharpnessAwareState:
        if static_n is None:
            raise TypeError(
                "num_samples: traced when init was called; call init outside jit, or pass "
                "static_args=('num_samples',) to optax.inject_hyperparams"
            )
        dtype = _metric_dtype(params)
        zero = jnp.zeros((), dtype)
        return SharpnessAwareState(
            rng_key=jax.random.key_data(jax.random.key(seed)),
            loss=zero,
            perturbed_losses=jnp.zeros((static_n,), dtype),
            sharpness_term=zero,
            nonfinite_count=jnp.zeros((), jnp.int32),
            unresolved_count=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        _check_state(state, SharpnessAwareState, "sharpness_aware")
        _check_params(params)
        perturbed = _perturbed(params, mask)
        _parallel.check_whole(params, perturbed, (axis_name, sample_axis))
        _check_updates(updates, params, perturbed)
        loss_fn = _loss_fn(value_fn, params, has_aux)
        step_term = term if term is not None else build(state.perturbed_losses.shape[0])
        rng_key, key = jax.random.split(state.rng_key)
        incoming = _tree.active(updates, perturbed)
        loss = loss_fn
        if axis_name is not None:
            _parallel.axis_size(axis_name)
            incoming = _parallel.mean_gradient(incoming, jax.eval_shape(loss_fn, params), axis_name)
            if sync:
                # The global loss at every point, before φ and ψ see it.
                loss = _parallel.global_value_fn(loss_fn, axis_name)
            else:
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

        _, merge = _tree.split(params, perturbed)
        # 16-bit leaves are perturbed and differentiated as float32 copies (the term's own
        # rule, docs/conventions.md "Low precision"); the gradient is added in float32
        x = _tree.active(_tree.widen(params, perturbed), perturbed)
        narrow = _tree.is_narrow(params, perturbed)

        def objective(active: list, base: jax.Array) -> tuple[jax.Array, jax.Array]:
            value, losses = step_term(loss, merge(active), base, key)
            # pmean of a per-device term (sync=False) or of the same global term (sync=True):
            # its gradient, pmean-ed below, is the global one in every mode.
            return _parallel.pmean(value, axis_name), losses

        if axis_name is None and sample_axis is None and not narrow:
            # The term's derivative through L(x) is ∂term/∂L(x) · ∇L(x), and ∇L(x) is the
            # incoming gradient: no second gradient at x, only the loss value. (With 16-bit
            # params the incoming gradient carries the 16-bit loss's rounding, which the
            # term's differences of gradients would amplify: L(x) is differentiated below.)
            base = loss(params)
            (value, losses), (grad, base_grad) = jax.value_and_grad(
                objective, argnums=(0, 1), has_aux=True
            )(x, base)
            grad = [g + (base_grad * u).astype(g.dtype) for g, u in zip(grad, incoming)]
        else:

            def both(active: list) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
                base = loss(merge(active))
                value, losses = objective(active, base)
                return value, (base, losses)

            (value, (base, losses)), grad = jax.value_and_grad(both, has_aux=True)(x)
        grad, base, losses = _parallel.pmean((grad, base, losses), axis_name)
        grad = _parallel.pmean(grad, sample_axis)
        ok = _all_finite([value, *grad])
        new = _emit(
            updates,
            perturbed,
            [(u + g).astype(u.dtype) for u, g in zip(incoming, grad)],
            ok,
            skip_nonfinite,
        )
        dtype = state.loss.dtype
        return new, SharpnessAwareState(
            rng_key=rng_key,
            loss=base.astype(dtype),
            perturbed_losses=losses.astype(dtype),
            sharpness_term=value.astype(dtype),
            nonfinite_count=_count(state.nonfinite_count, ok),
            unresolved_count=state.unresolved_count
            + (0 if linear else _unresolved(losses, base, antithetic, rho).astype(jnp.int32)),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unresolved(losses: jax.Array, base: jax.Array, antithetic: bool, rho: Any) -> jax.Array:
    """Whether some finite difference of the perturbed losses is within 100 roundoffs of the
    losses themselves (its relative rounding error above 1%): the curvature it gives is noise.
    ``losses`` as the term returns them (``+ρv_i`` then ``−ρv_i`` with ``antithetic``). Never
    at ρ = 0, where the term is defined as 0 (a warm-up from 0)."""
    eps = jnp.finfo(losses.dtype).eps
    if antithetic:
        plus, minus = jnp.split(losses, 2)
        diff = plus + minus - 2.0 * base
        size = jnp.abs(plus) + jnp.abs(minus) + 2.0 * jnp.abs(base)
    else:
        diff = losses - base
        size = jnp.abs(losses) + jnp.abs(base)
    return jnp.any(jnp.abs(diff) <= 100.0 * eps * size) & (rho != 0)


def sam(
    *,
    rho: float,
    eta: float = 0.0,
    adaptive: bool = False,
    axis_name: str | None = None,
    sync: bool = True,
    mask: Any = None,
    skip_nonfinite: bool = True,
    has_aux: bool = False,
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
      mask: which leaves are perturbed and get the gradient at ``x + ε`` (a pytree of bools
        shaped like params, or a callable ``params -> mask``); ‖g‖ is taken over them only,
        and the other leaves' updates pass through.
      skip_nonfinite: return the incoming updates for a step whose perturbed loss or
        gradient is not finite (counted in ``nonfinite_count``).
      has_aux: ``value_fn`` returns ``(loss, aux)``; aux is ignored.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SamState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, phipsimu
      >>> loss = lambda p: jnp.sum(p**2)
      >>> params = jnp.array([3.0, 4.0])  # g = 2x = (6, 8), ‖g‖ = 10
      >>> tx = phipsimu.sam(rho=0.05)
      >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, value_fn=loss)
      >>> [round(float(u), 4) for u in updates]  # ∇L(x + ε), ε = 0.05·g/‖g‖ = (0.03, 0.04)
      [6.06, 8.08]
      >>> tx = optax.chain(phipsimu.sam(rho=0.05), optax.sgd(0.1))  # SAM with SGD
      >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, value_fn=loss)
      >>> [round(float(u), 4) for u in updates]
      [-0.606, -0.808]
    """
    _checks.real("rho", rho, lo=0.0, strict=False)
    _checks.real("eta", eta, lo=0.0, strict=False)
    _checks.flags(adaptive=adaptive, sync=sync, skip_nonfinite=skip_nonfinite, has_aux=has_aux)
    mask = _check_mask(mask)
    _parallel.check_axis_name("axis_name", axis_name)

    def init_fn(params: PyTree) -> SamState:
        zero = jnp.zeros((), _metric_dtype(params))
        return SamState(zero, zero, jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        _check_state(state, SamState, "sam")
        _check_params(params)
        perturbed = _perturbed(params, mask)
        _parallel.check_whole(params, perturbed, (axis_name,))
        _check_updates(updates, params, perturbed)
        loss_fn = _loss_fn(value_fn, params, has_aux)
        x, merge = _tree.split(params, perturbed)
        g = _tree.active(updates, perturbed)
        if axis_name is not None:
            _parallel.axis_size(axis_name)
            if sync:
                g = _parallel.mean_gradient(g, jax.eval_shape(loss_fn, params), axis_name)
            else:
                g = _parallel.device_gradient(g, lambda a: loss_fn(merge(a)), x, axis_name)
        if adaptive:
            t = [jnp.abs(xi) + eta for xi in x]
            tg = _tree.mul(t, g)
            direction = _tree.mul(t, tg)
            norm = jnp.sqrt(_tree.sq_norm(tg))
            eps_norm = jnp.sqrt(_tree.sq_norm(direction))
        else:
            direction = g
            norm = jnp.sqrt(_tree.sq_norm(g))
            eps_norm = norm
        # ‖g‖ = 0 only when g = 0: dividing 0 by 1 gives ε = 0; NaN stays NaN (NaN > 0 is
        # false, so the numerator's NaN propagates).
        safe = jnp.where(norm > 0, norm, jnp.ones_like(norm))
        adv = _tree.add_scale(x, rho / safe, direction)
        if axis_name is None:
            perturbed_loss, grad = jax.value_and_grad(lambda a: loss_fn(merge(a)))(adv)
        elif sync:
            loss = _parallel.global_value_fn(loss_fn, axis_name)
            perturbed_loss, grad = jax.value_and_grad(lambda a: loss(merge(a)))(adv)
        else:
            perturbed_loss, grad = _parallel.local_value_and_grad(
                lambda a: loss_fn(merge(a)), adv, axis_name
            )
        grad, perturbed_loss, eps_norm = _parallel.pmean(
            (grad, perturbed_loss, rho / safe * eps_norm), axis_name
        )
        ok = _all_finite([perturbed_loss, *grad])
        new = _emit(updates, perturbed, grad, ok, skip_nonfinite)
        dtype = state.perturbed_loss.dtype
        return new, SamState(
            perturbed_loss=perturbed_loss.astype(dtype),
            epsilon_norm=eps_norm.astype(dtype),
            nonfinite_count=_count(state.nonfinite_count, ok),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def frobenius_sam(
    *,
    rho: float,
    num_samples: int,
    lam: float,
    seed: int = 0,
    antithetic: bool = False,
    axis_name: str | None = None,
    sync: bool = True,
    sample_axis: str | None = None,
    mask: Any = None,
    skip_nonfinite: bool = True,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Frob-SAM: add the gradient of ``λ/(2ρ²)·Var_v L(x + ρv)``, v ~ N(0, I).

    Frob-SAM's weight is its own parameter, ``lam`` (λ), not ``strength``: ``strength`` is s,
    the weight of the eq. (10) term, in every function that takes it. The Frobenius preset in
    eq. (10) gives ``ρ²·s·½·Var[2(L(x+ρv) − L(x))/ρ²] = (2s/ρ²)·Var_v L(x+ρv)``, so
    ``frobenius_sam(lam=λ)`` is ``sharpness_aware(measures.frobenius(), strength=λ/4)``.
    The variance is the unbiased sample variance (needs ``num_samples >= 2``). Its leading
    term at a minimum is ``λ/4 · ρ² · ‖H‖_F²``.

    Args:
      lam: Frob-SAM's λ >= 0, the weight of ``Var_v L(x + ρv)/(2ρ²)``. The other arguments
        are as in :func:`sharpness_aware`.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: 0.5 * (p[0] ** 2 + 2.0 * p[1] ** 2)  # H = diag(1, 2), ‖H‖_F² = 5
      >>> tx = phipsimu.frobenius_sam(rho=0.1, num_samples=8, lam=1.0)
      >>> params = jnp.zeros(2)  # a minimum
      >>> @jax.jit
      ... def step(params, state):
      ...     return tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
      >>> _, state = step(params, tx.init(params))
      >>> # a Monte Carlo estimate of λ/4·ρ²·‖H‖_F² = 0.0125 from 8 perturbations
      >>> round(float(state.sharpness_term), 4)
      0.0091
    """
    _checks.real("lam", lam, lo=0.0, strict=False)
    return sharpness_aware(
        _measure.frobenius(),
        rho=rho,
        num_samples=num_samples,
        strength=lam / 4.0,
        antithetic=antithetic,
        seed=seed,
        axis_name=axis_name,
        sync=sync,
        sample_axis=sample_axis,
        mask=mask,
        skip_nonfinite=skip_nonfinite,
        has_aux=has_aux,
    )


def random_sam(
    *,
    rho: float,
    num_samples: int,
    seed: int = 0,
    antithetic: bool = False,
    axis_name: str | None = None,
    sync: bool = True,
    sample_axis: str | None = None,
    mask: Any = None,
    skip_nonfinite: bool = True,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Random-perturbation (average-direction) SAM: the gradient of
    ``L_AVG(x) = E_{v ~ Uniform(S^{d−1})} L(x + ρv)`` (the paper's eq. 3).

    Implemented as the trace preset with strength ½: ``L + ρ²·½·mean 2(L(x+ρv) − L(x))/ρ²
    = mean L(x+ρv)``, so with ``updates = ∇L`` the output is ``mean_i ∇L(x + ρv_i)``. Its
    explicit bias is Tr(H)/d (Wen et al.). Other arguments as in :func:`sharpness_aware`.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: jnp.sum(p**2)  # ∇L(x + ρv) = 2x + 2ρv
      >>> tx = phipsimu.random_sam(rho=0.1, num_samples=4, antithetic=True)
      >>> params = jnp.array([3.0, 4.0])
      >>> @jax.jit
      ... def step(params, state):
      ...     return tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
      >>> updates, _ = step(params, tx.init(params))
      >>> [round(float(u), 4) for u in updates]  # the pairs ±v cancel: mean ∇L(x ± ρv) = 2x
      [6.0, 8.0]
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
        sample_axis=sample_axis,
        mask=mask,
        skip_nonfinite=skip_nonfinite,
        has_aux=has_aux,
    )
