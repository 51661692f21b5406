"""The (φ, ψ, μ)-sharpness-aware loss: eq. (10) of the paper with the factor of docs/conventions.md,
section "Eq. (10)".

.. math::
   L_{(\\phi,\\psi,\\mu)}(x) = L(x) + s\\,\\rho^2\\,
   \\phi\\Big(\\frac1m\\sum_i w_i\\,\\psi\\Big(\\frac{2(L(x+\\rho v_i) - L(x))}{\\rho^2}\\Big)\\Big)

With the factor 2 the leading term of ``(L_(φ,ψ,μ) − L)/ρ²`` at a minimum is S(x; φ, ψ, μ)
itself (the paper's eq. (10) without it converges to ``φ(∫ψ(½vᵀHv)dμ)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from phipsimu import _checks, _curvature, _measure, _parallel, _tree

PyTree = Any


def sharpness_term(
    measure: Any,
    *,
    rho: Any,
    num_samples: Any,
    strength: Any,
    antithetic: bool,
    adaptive: bool,
    eta: Any,
    chunk_size: Any,
    sample_axis: str | None = None,
) -> Callable[
    [Callable[[PyTree], jax.Array], PyTree, jax.Array, jax.Array], tuple[jax.Array, jax.Array]
]:
    """Validate the configuration once and return ``term(value_fn, params, base, key)``, the
    weighted sharpness term ``s·ρ² φ(mean_i w_i ψ(Δ_i))`` shared by the loss and the optax
    transforms, with the perturbed losses it used: ``(value, perturbed_losses)``, the losses of
    shape ``(num_samples,)`` (with ``antithetic``, those at ``x + ρv_i`` then ``x − ρv_i``).

    ``Δ_i = 2(L(x + ρv_i) − L(x))/ρ²``, or with ``antithetic`` the symmetric difference
    ``(L(x + ρv_i) + L(x − ρv_i) − 2L(x))/ρ²`` over ``num_samples/2`` draws and their
    negations. With ``adaptive`` the perturbation is ``ρ T_x v`` with ``T_x = |x| + eta``.
    The term is differentiable in ``params`` (through the perturbed losses, ``base``, ``T_x``
    and, for equivariant proposals, the draws).

    Draw i comes from the key and i alone and is made inside the chunk loop (with
    ``jax.checkpoint`` on each chunk), so the memory of the term and of its gradient holds one
    chunk of draws and activations, whatever ``num_samples``.

    With ``sample_axis`` each device along that axis evaluates its block of the draws (the
    same draws as on one device: each device draws its own rows from the key); the
    perturbed losses are gathered in sample order before ψ and φ, and the term is
    ``pmean``-ed over the axis, so its gradient, ``pmean``-ed over the axis, is the
    single-device gradient under ``pmap`` and ``shard_map`` (either ``check_vma``).
    """
    _measure.check_measure(measure)
    _checks.real("rho", rho, lo=0.0, strict=True)
    _checks.integer("num_samples", num_samples, lo=2 if measure.phi_unbiased else 1)
    if antithetic and num_samples % 2:
        raise ValueError(
            f"num_samples={num_samples}: antithetic=True pairs each v with −v and needs an "
            "even number of samples"
        )
    if antithetic and measure.phi_unbiased is not None and num_samples < 4:
        raise ValueError(f"num_samples={num_samples}: must be >= 4 with antithetic=True here")
    _checks.real("strength", strength, lo=0.0, strict=False)
    _checks.real("eta", eta, lo=0.0, strict=False)
    _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
    _parallel.check_axis_name("sample_axis", sample_axis)
    draws = num_samples // 2 if antithetic else num_samples
    what = f"num_samples={num_samples}" + (
        " (num_samples/2 antithetic pairs)" if antithetic else ""
    )

    def term(
        value_fn: Callable[[PyTree], jax.Array], params: PyTree, base: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        if antithetic and not measure.mu.symmetric(params):
            raise ValueError(
                f"antithetic=True: the measure's sampler {type(measure.mu).__name__} is not "
                "symmetric under v -> -v on these params (its density depends on the sign "
                "of an odd-sized group's product), so pairing v with -v would change the "
                "objective"
            )
        perturbed, d = measure.mu.layout(params)
        size, indices = draws, jax.numpy.arange(draws)
        if sample_axis is not None:
            size, start = _parallel.sample_block(sample_axis, draws, what)
            indices = start + jax.numpy.arange(size)
        probe = _curvature.leaf_bytes(_tree.active(params, perturbed))
        chunk = _curvature.chunk_for(chunk_size, size, probe)
        signs = (1.0, -1.0) if antithetic else (1.0,)

        def losses_at(i: jax.Array) -> tuple[jax.Array, jax.Array]:
            # draw i from the key alone, inside the chunk loop: memory holds one chunk
            draw = measure.mu.draw_at(key, params, i[None], adaptive=adaptive)
            v = draw.v
            if adaptive:
                v = _curvature.metric_probes(params, v, eta, draw.perturbed)
            v = jax.tree_util.tree_map(lambda a: a[0], v)
            out = jax.numpy.stack(
                [value_fn(_tree.add_scale(params, sign * rho, v)) for sign in signs]
            )
            return out, draw.log_weight[0]

        if chunk is not None:
            # reverse mode keeps only each chunk's indices and recomputes its losses, so
            # the gradient's memory does not grow with the number of chunks
            losses_at = jax.checkpoint(losses_at, prevent_cse=False)
        out, log_w = _tree.chunked_map(losses_at, indices, chunk)
        if sample_axis is not None:
            out = _parallel.gather_samples(out, sample_axis)
            log_w = _parallel.gather_samples(log_w, sample_axis)
        # differences, ψ, the mean and φ in the accumulation dtype (float32 for 16-bit losses)
        acc = jax.numpy.promote_types(log_w.dtype, jax.numpy.float32)
        wide, base_wide = out.astype(acc), base.astype(acc)
        if antithetic:
            delta = (wide[:, 0] + wide[:, 1] - 2.0 * base_wide) / rho**2
            losses = jax.numpy.concatenate([out[:, 0], out[:, 1]])
        else:
            losses = out[:, 0]
            delta = 2.0 * (wide[:, 0] - base_wide) / rho**2
        r = _measure.reduce(measure, delta, log_w.astype(acc), d, with_stats=False)
        value = strength * rho**2 * r.value.astype(base.dtype)
        return _parallel.pmean(value, sample_axis), losses

    return term


def sharpness_aware_loss(
    loss_fn: Callable[..., Any],
    measure: _measure.Measure,
    *,
    rho: float,
    num_samples: int,
    strength: float = 1.0,
    antithetic: bool = False,
    adaptive: bool = False,
    eta: float = 0.0,
    chunk_size: int | None = None,
    has_aux: bool = False,
    axis_name: str | None = None,
    sample_axis: str | None = None,
) -> Callable[..., Any]:
    """The (φ, ψ, μ)-sharpness-aware loss (eq. 10, with docs/conventions.md's factor 2).

    .. math::
       L_{(\\phi,\\psi,\\mu)}(x) = L(x) + s\\,\\rho^2\\,\\phi\\Big(\\frac1m \\sum_i w_i\\,
       \\psi\\big(2(L(x+\\rho v_i)-L(x))/\\rho^2\\big)\\Big),\\quad v_i, \\log w_i \\sim \\mu

    At a minimum ``(L_(φ,ψ,μ)(x) − L(x))/ρ² → s·S(x; φ, ψ, μ)`` as ρ → 0 with error O(ρ).
    Its gradient (what ``jax.grad`` returns) is the universal-SAM update
    ``∇L + s·φ'(·)·mean_i w_i ψ'(Δ_i)·2(∇L(x+ρv_i) − ∇L(x))`` when the draws do not depend
    on x; with ``adaptive=True`` or an equivariant proposal (``mu.product_density``) the
    draws move with x and the gradient also carries ``ρ·J_iᵀ∇L(x+ρv_i)``, ``J_i = ∂v_i/∂x``
    (the exact, reparameterised gradient of the Monte Carlo objective).

    Args:
      loss_fn: ``loss_fn(params, *args)`` returning a scalar, or ``(scalar, aux)`` with
        ``has_aux=True``.
      measure: a :class:`phipsimu.Measure`; its sampler draws the perturbations.
      rho: perturbation radius ρ > 0.
      num_samples: perturbations m per evaluation (even with ``antithetic``).
      strength: s >= 0, the weight of the sharpness term.
      antithetic: pair each v with −v and use ``(L(x+ρv) + L(x−ρv) − 2L(x))/ρ²``: the
        first-order term cancels exactly. For linear ψ and φ and a symmetric μ this has the
        same expectation as the paper's objective (less variance); for nonlinear ψ or φ it
        differs where ∇L ≠ 0 (away from minima), and has the same ρ → 0 limit at minima.
        Assumes μ and its proposal are symmetric under v → −v.
      adaptive: perturb as ``x + ρ T_x v`` with ``T_x = |x| + eta`` (ASAM's metric): the
        limit becomes S measured on ``T_x H T_x``, invariant to rescaling symmetries.
        ``jax.grad`` differentiates through ``T_x`` (the exact gradient of this objective,
        which keeps it exactly invariant; ASAM instead holds its perturbation fixed).
      eta: the metric floor (>= 0).
      chunk_size: perturbed losses evaluated at once (``vmap`` inside a chunked ``lax.map``,
        each chunk rematerialised under ``jax.grad``, so memory does not grow with
        ``num_samples``); ``None``: 4 on CPU, as many as fit
        ``phipsimu.curvature.ACCELERATOR_CHUNK_BYTES`` on GPU/TPU.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux comes from the clean pass at x (as
        SAM implementations do for BatchNorm statistics).
      axis_name: data parallel inside ``jax.pmap``/``jax.shard_map`` over this axis, each
        device called with its shard of the batch: every loss (at x and at each perturbed
        point) is averaged over the axis before φ and ψ see it, so the value is the
        global-batch objective on every device (docs/conventions.md, section "Scaling
        out"). Average its gradient over the axis (``jax.lax.pmean``) as for any loss under
        ``pmap``; under ``shard_map`` with ``check_vma=True`` that ``pmean`` is the
        identity. The key must be the same on every device. ``aux`` stays per device.
      sample_axis: spread the ``num_samples`` perturbations over this mapped axis (a mesh
        axis of ``jax.shard_map``, or ``jax.pmap``'s axis): each device evaluates
        ``num_samples/N`` of them (N must divide the number of draws), the same draws as on
        one device with the same key. ``pmean`` the gradient over this axis too.

    Returns:
      ``objective(params, *args, key)`` returning the scalar (or ``(scalar, aux)``); pure,
      jit-able and differentiable with ``jax.grad`` / ``jax.value_and_grad``.

    Notes:
      Determinant preset: ψ is NaN for Δ <= 0 (the Lebesgue integral then diverges), so the
      objective is NaN wherever a perturbation lowers the loss, e.g. away from a minimum.
      On a zero-loss manifold (Example 1) det H = 0 and the Lebesgue integral of the
      perturbed loss diverges, so S = 0: in float32, rounding makes some Δ <= 0 there and
      the objective is NaN; in float64 the Monte Carlo term is finite but collapses toward
      0 as the proposal widens instead of converging. Use it only near strict minima.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p: jnp.sum(p**2)
      >>> obj = phipsimu.sharpness_aware_loss(
      ...     loss, phipsimu.measures.trace(), rho=0.05, num_samples=4)
      >>> g = jax.grad(obj)(jnp.ones(3), key=jax.random.key(0))
      >>> g.shape
      (3,)

    Reference: Tahmasebi et al., eq. (10) and Theorem 2; docs/conventions.md, "Eq. (10)".
    """
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args)")
    _parallel.check_axis_name("axis_name", axis_name)
    term = sharpness_term(
        measure,
        rho=rho,
        num_samples=num_samples,
        strength=strength,
        antithetic=antithetic,
        adaptive=adaptive,
        eta=eta,
        chunk_size=chunk_size,
        sample_axis=sample_axis,
    )

    def objective(params: PyTree, *args: Any, key: jax.Array) -> Any:
        _checks.check_key(key)
        _checks.check_params(params)
        if has_aux:
            out = jax.eval_shape(loss_fn, params, *args)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(f"loss_fn: with has_aux=True must return (loss, aux), got {out!r}")
            _checks.check_scalar_loss(lambda *a: loss_fn(*a)[0], params, args)
            base, aux = loss_fn(params, *args)

            def value_fn(p):
                return loss_fn(p, *args)[0]
        else:
            _checks.check_scalar_loss(loss_fn, params, args)
            base = loss_fn(params, *args)

            def value_fn(p):
                return loss_fn(p, *args)

        if axis_name is not None:
            _parallel.axis_size(axis_name)
            base = jax.lax.pmean(base, axis_name)
            value_fn = _parallel.global_value_fn(value_fn, axis_name)
        total = base + term(value_fn, params, base, key)[0]
        return (total, aux) if has_aux else total

    return objective
