"""The (φ, ψ, μ)-sharpness-aware loss: eq. (10) of the paper with the factor of docs/conventions.md,
section "Eq. (10)".

.. math::
   L_{(\\phi,\\psi,\\mu)}(x) = L(x) + s\\,\\rho^2\\,
   \\phi\\Big(\\frac1m\\sum_i w_i\\,\\psi\\Big(\\frac{2(L(x+\\rho v_i) - L(x))}{\\rho^2}\\Big)\\Big)

With the factor 2 the leading term of ``(L_(φ,ψ,μ) − L)/ρ²`` at a minimum is S(x; φ, ψ, μ)
itself (the paper's eq. (10) without it converges to ``φ(∫ψ(½vᵀHv)dμ)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from phipsimu import _checks, _curvature, _execution, _measure, _parallel, _tree

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

    Draw i comes from the key and i alone and is made inside the chunk loop, so the memory of
    the term and of its gradient holds one chunk of draws and activations, whatever
    ``num_samples``. Without ``sample_axis`` the gradient is taken in one pass
    (:func:`_one_pass`; two with a vector ψ); with it each chunk is recomputed in the
    backward pass (``jax.checkpoint``). docs/conventions.md, section "Eq. (10)".

    With ``sample_axis`` each device along that axis evaluates its block of the draws (the
    same draws as on one device: each device draws its own rows from the key); the
    perturbed losses are gathered in sample order before ψ and φ, and the term is
    ``pmean``-ed over the axis, so its gradient, ``pmean``-ed over the axis, is the
    single-device gradient under ``pmap`` and ``shard_map`` (either ``check_vma``).

    Perturbed leaves narrower than float32 are cast to float32 first (:func:`_tree.widen`):
    the points ``x + ρv_i`` are formed and the losses evaluated in float32, and the term's
    gradient comes back in each leaf's dtype. ``base`` must then be ``value_fn`` at those
    float32 copies (:func:`base_loss`), or the differences carry the 16-bit loss's
    rounding. docs/conventions.md, section "Low precision".
    """
    _measure.check_measure(measure)
    _checks.real("rho", rho, lo=0.0, strict=False)
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
    signs = (1.0, -1.0) if antithetic else (1.0,)
    # with a scalar ψ each sample's gradient enters the term's gradient with a weight known
    # from that sample alone (up to one common factor), so one pass gives the gradient; a
    # vector ψ needs the mean first (two passes)
    one_pass = jax.eval_shape(measure.psi, jax.ShapeDtypeStruct((), jnp.float32)).shape == ()

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
        # 16-bit params: x + ρv rounded to the params' dtype leaves most coordinates of a
        # small perturbation where they were, and the loss differences drown in rounding;
        # the perturbed points are formed and evaluated from float32 copies instead
        params = _tree.widen(params, perturbed)
        size, indices = draws, jnp.arange(draws)
        if sample_axis is not None:
            size, start = _parallel.sample_block(sample_axis, draws, what)
            indices = start + jnp.arange(size)
        probe = _execution.leaf_bytes(_tree.active(params, perturbed))
        chunk = _execution.chunk_for(chunk_size, size, probe)
        reduction = _Reduction(measure, antithetic, d)

        def losses_at(
            p: PyTree, value: Callable[[PyTree], jax.Array], i: jax.Array
        ) -> tuple[jax.Array, jax.Array]:
            # draw i from the key alone, inside the chunk loop: memory holds one chunk
            draw = measure.mu.draw_at(key, p, i[None], adaptive=adaptive)
            v = draw.v
            if adaptive:
                v = _curvature.metric_probes(p, v, eta, draw.perturbed)
            v = jax.tree_util.tree_map(lambda a: a[0], v)
            out = jnp.stack([value(_tree.add_scale(p, sign * rho, v)) for sign in signs])
            return out, draw.log_weight[0]

        if sample_axis is None:
            return _one_pass(
                lambda p, i: losses_at(p, value_fn, i),
                params,
                base,
                (rho, strength),
                reduction,
                indices,
                chunk,
                one_pass,
            )

        def sampled(i: jax.Array) -> tuple[jax.Array, jax.Array]:
            return losses_at(params, value_fn, i)

        if chunk is not None:
            # reverse mode keeps only each chunk's indices and recomputes its losses, so
            # the gradient's memory does not grow with the number of chunks
            sampled = jax.checkpoint(sampled, prevent_cse=False)
        out, log_w = _execution.chunked_map(sampled, indices, chunk)
        if sample_axis is not None:
            out = _parallel.gather_samples(out, sample_axis)
            log_w = _parallel.gather_samples(log_w, sample_axis)
        value, losses = reduction.finish(out, log_w, base, rho, strength)
        return _parallel.pmean(value, sample_axis), losses

    return term


@dataclasses.dataclass(frozen=True)
class _Reduction:
    """From the perturbed losses ``out`` (shape ``(m, 1)``, or ``(m, 2)`` for antithetic pairs
    at ``x ± ρv``), their log-weights and the base loss to the term ``s·ρ² φ(mean w ψ(Δ))``,
    with the partial derivatives the one-pass gradient needs. ρ and s are arguments, not
    fields, so they may be traced (``optax.inject_hyperparams``). Differences, ψ, the mean and
    φ run in the accumulation dtype (float32 for 16-bit losses)."""

    measure: _measure.Measure
    antithetic: bool
    d: int

    def unit(self) -> jax.Array:
        """``(ρ²/2)·∂Δ/∂out`` for one sample (its entries sum to 1)."""
        return jnp.array([0.5, 0.5] if self.antithetic else [1.0])

    def delta(self, wide: jax.Array, base_wide: jax.Array, rho: Any) -> jax.Array:
        """``Δ = 2(L(x + ρv) − L(x))/ρ²``, or the symmetric difference for a pair; the
        losses are subtracted before any scaling, so nearby losses keep their digits.

        At ρ = 0 (a warm-up schedule under ``optax.inject_hyperparams``) the term
        ``s·ρ²·φ(…)`` is defined as exactly 0: Δ is then the constant 1 (finite ψ for every
        preset, no 0/0), so the term and its gradient are 0, not NaN."""
        diff = (wide - base_wide) * self.unit().astype(wide.dtype)
        live = rho != 0
        scale = 2.0 / jnp.where(live, rho, 1.0) ** 2
        return jnp.where(live, jnp.sum(diff, axis=-1) * scale, 1.0).astype(wide.dtype)

    def finish(
        self, out: jax.Array, log_w: jax.Array, base: jax.Array, rho: Any, s: Any
    ) -> tuple[jax.Array, jax.Array]:
        """``(term, perturbed losses)``; the losses are those at ``x + ρv_i`` then (with
        antithetic pairs) those at ``x − ρv_i``."""
        acc = accumulation_dtype(log_w.dtype, base.dtype)
        delta = self.delta(out.astype(acc), base.astype(acc), rho)
        r = _measure.reduce(self.measure, delta, log_w.astype(acc), self.d, with_stats=False)
        return s * rho**2 * r.value.astype(base.dtype), out.T.reshape(-1)

    def local(
        self, wide: jax.Array, log_w: jax.Array, base_wide: jax.Array, rho: Any
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """For one sample: its exponent ``ℓ = log w + log ψ(Δ)`` in log space (else 0), and
        ``ρ²/2`` times the partials of its contribution (``ℓ``, else ``w ψ(Δ)``) in its
        perturbed losses, its log-weight and the base loss. The factor ``ρ²/2`` keeps the
        cotangents that enter the loss's backward pass O(1) for any ρ (``2/ρ²`` overflows
        float16 at ρ < 0.006); :meth:`outer` puts it back."""
        delta = self.delta(wide, base_wide, rho)
        # at ρ = 0 the term is the constant 0 (see delta): no sample has a partial
        live = (rho != 0).astype(wide.dtype) if _checks.is_traced(rho) else float(rho != 0)
        unit = self.unit().astype(wide.dtype) * live
        half = rho**2 / 2.0
        if self.measure.log_space:
            ell, dell = jax.value_and_grad(self.measure.log_psi)(delta)  # type: ignore[arg-type]
            return ell + log_w, dell * unit, jnp.full_like(log_w, half), -dell * live
        psi, dpsi = jax.value_and_grad(self.measure.psi)(delta)
        w = jnp.exp(log_w)
        return jnp.zeros_like(log_w), w * dpsi * unit, w * psi * half, -w * dpsi * live

    def outer(
        self,
        wide: jax.Array,
        log_w: jax.Array,
        base_wide: jax.Array,
        total: jax.Array,
        rho: Any,
        s: Any,
    ) -> jax.Array:
        """The factor every sample's partials (as :meth:`local` scales them) share:
        ``(2/ρ²)·∂ term/∂ contribution_i``; in log space ``∂ term/∂ℓ_i`` is ``(ρ²/2)`` times
        ``factor · exp(ℓ_i − shift)``, with ``total = Σ exp(ℓ_i − shift)``."""
        measure, m = self.measure, wide.shape[0]
        delta = self.delta(wide, base_wide, rho)
        if measure.log_space:
            ell = log_w + measure.log_psi(delta)  # type: ignore[misc]
            log_mean = jax.scipy.special.logsumexp(ell) - math.log(m)
            log_value, dlog = jax.value_and_grad(lambda t: measure.apply_log_phi(t, self.d))(
                log_mean
            )
            return 2.0 * s * jnp.exp(log_value) * dlog / total

        def phi(t: jax.Array) -> jax.Array:
            if measure.phi_unbiased is not None:
                return measure.phi_unbiased(t, m)
            return measure.apply_phi(t, self.d)

        mean = jnp.mean(jnp.exp(log_w) * jax.vmap(measure.psi)(delta))
        return 2.0 * s * jax.grad(phi)(mean) / m


def base_loss(
    measure: _measure.Measure, value_fn: Callable[[PyTree], jax.Array], params: PyTree
) -> jax.Array | None:
    """``L(x)`` for the term's differences when ``params`` has perturbed leaves narrower than
    float32: ``value_fn`` at their float32 copies (as the term evaluates its perturbed
    points); None otherwise (the caller's own ``L(x)`` is the one)."""
    perturbed = measure.mu.perturbed(params)
    if not _tree.is_narrow(params, perturbed):
        return None
    return value_fn(_tree.widen(params, perturbed))


def accumulation_dtype(log_weight: Any, base: Any) -> Any:
    """The dtype of the differences, ψ, the mean and φ: float32 at least (16-bit losses)."""
    return jnp.promote_types(jnp.promote_types(log_weight, base), jnp.float32)


def _one_pass(
    losses_at: Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array]],
    params: PyTree,
    base: jax.Array,
    hyper: tuple[Any, Any],
    reduction: _Reduction,
    indices: jax.Array,
    chunk: int | None,
    scalar: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The term with a reverse-mode rule that makes one pass over the samples (two with a
    vector ψ, ``scalar=False``).

    Differentiated as written, the chunked term recomputes each chunk's losses in the
    backward pass (``jax.checkpoint``). The rule here evaluates each perturbed loss together
    with its gradient in the forward pass and adds that gradient, weighted by the sample's
    partial derivative, into one running sum: memory holds one chunk and one gradient, and
    the cost is one gradient per sample. In log space the weights are ``exp(ℓ_i − running
    max)``, rescaled whenever the maximum grows. Everything ``losses_at`` captures (the key,
    the caller's batch, ρ) is hoisted out of its traced program into explicit inputs of the
    rule, so gradients with respect to the batch are exact too. Inputs that are not being
    differentiated get no running sum. The term itself is not differentiable in ρ or the
    strength (``NotImplementedError``).

    With a vector ψ (Frobenius) a sample's weight ``∂term/∂out_i`` depends on the mean over
    all samples (φ's gradient at it), so the forward pass first evaluates the perturbed
    losses alone (O(m) scalars), takes every sample's weight from the reduction's own
    gradient, and then makes the pass that adds each sample's gradient, weighted, into the
    running sum: the cost of the rematerialised map (m losses, then m gradients), with one
    chunk and one gradient in memory.
    """
    leaves = jax.tree_util.tree_leaves(params)
    # Under shard_map's checks, a term that varies across devices (per-device losses, as
    # with m-sharpness) is differentiated with respect to per-device copies of the params:
    # each sample's gradient must meet its device's own weights before the sum over devices
    # (in bwd). The program is traced with the params typed that way, as it is evaluated.
    axes = _parallel.union_axes((jax.eval_shape(losses_at, params, indices[0]), base, leaves))
    lifted = _execution.lift(losses_at, _vary_all(params, axes), indices[0])
    acc = accumulation_dtype(lifted.shape[1].dtype, base.dtype)
    consts, n = lifted.consts, len(leaves)

    def sample(flat: list, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        # ``losses_at`` with everything it captures (the key, the caller's batch, ρ) as
        # explicit inputs ``flat[n:]``, after the param leaves ``flat[:n]``
        return lifted.call(flat[n:], _vary_all(flat[:n], axes), i)

    def primal(flat: list, base_: jax.Array, hyper_: tuple, indices_: jax.Array) -> tuple:
        out, log_w = _execution.chunked_map(lambda i: sample(flat, i), indices_, chunk)
        return reduction.finish(out, log_w, base_, *hyper_)

    def fwd(flat: list, base_: Any, hyper_: tuple, indices_: Any) -> tuple:
        if any(h.perturbed for h in hyper_):
            raise NotImplementedError(
                "rho, strength: differentiated (traced under jax.grad), but the "
                "sharpness-aware term is not differentiable in its hyperparameters; pass "
                "them through jax.lax.stop_gradient"
            )
        hyper_vals = [h.value for h in hyper_]
        rho, s = hyper_vals
        # only the floating-point inputs being differentiated get a running sum
        wanted = [x.perturbed and jnp.issubdtype(x.value.dtype, jnp.inexact) for x in flat]
        flat = [x.value for x in flat]
        diff = [x for x, w in zip(flat, wanted) if w]
        diff_at = [j for j, w in enumerate(wanted) if w]
        base_ = base_.value
        base_wide = base_.astype(acc)

        def with_diff(new: list) -> list:
            it = iter(new)
            return [next(it) if w else x for x, w in zip(flat, wanted)]

        for j, (x, w) in enumerate(zip(flat, wanted)):
            if w and j >= n and not axes <= _parallel.varying_axes(x):
                raise NotImplementedError(
                    "the sharpness-aware term varies across devices along "
                    f"{sorted(axes)}, and one of the arguments it is differentiated in is "
                    "not: its gradient would sum the devices before their weights apply. "
                    "Differentiate in the params, or type that argument as varying "
                    "(jax.lax.pcast(..., to='varying'); jax.lax.pvary before JAX 0.8.2)"
                )
        # per-device copies of the params (see above): no sum over devices per sample
        diff = [_parallel.vary_along(x, axes) if j < n else x for x, j in zip(diff, diff_at)]

        zeros = [jnp.zeros(x.shape, jnp.promote_types(x.dtype, acc)) for x in diff]
        if not scalar:
            return _two_pass(flat, wanted, with_diff, diff, zeros, base_, hyper_vals, indices_)

        def one(i: jax.Array) -> tuple:
            (out, log_w), vjp_fn = jax.vjp(lambda xs: sample(with_diff(xs), i), diff)
            wide, lw = out.astype(acc), log_w.astype(acc)
            ell, ct_out, ct_lw, ct_base = reduction.local(wide, lw, base_wide, rho)
            # a weight that varies across devices on an output that does not (a constant
            # log-weight beside per-device losses): the sum over devices is its cotangent
            cts = [
                _parallel.sum_to(c.astype(y.dtype), _parallel.varying_axes(y))
                for c, y in ((ct_out, out), (ct_lw, log_w))
            ]
            (grads,) = vjp_fn(tuple(cts))
            return (out, log_w), ell, grads, ct_base

        def block(carry: tuple, idx: jax.Array) -> tuple:
            sums, top, total, base_sum = carry
            ys, ell, grads, ct_base = jax.vmap(one)(idx)
            new_top = jnp.maximum(top, jnp.max(ell))
            shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
            keep, e = jnp.exp(top - shift), jnp.exp(ell - shift)
            sums = [a * keep + jnp.tensordot(e, g.astype(a.dtype), 1) for a, g in zip(sums, grads)]
            return (sums, new_top, total * keep + e.sum(), base_sum * keep + e @ ct_base), ys

        start = (zeros, jnp.array(-jnp.inf, acc), jnp.zeros((), acc), jnp.zeros((), acc))
        if _parallel.union_axes((flat, base_, hyper_vals, indices_.value)):
            start = _settle_carry(block, start, indices_.value[:chunk])
        (sums, _, total, base_sum), (out, log_w) = _execution.fold(
            block, start, indices_.value, chunk
        )
        factor = reduction.outer(out.astype(acc), log_w.astype(acc), base_wide, total, rho, s)
        value, losses = reduction.finish(out, log_w, base_, rho, s)
        it = iter(sums)
        sums = [next(it) if w else None for w in wanted]
        return (value, losses), (sums, factor * base_sum, factor)

    def _two_pass(
        flat: list,
        wanted: list,
        with_diff: Callable,
        diff: list,
        zeros: list,
        base_: jax.Array,
        hyper_vals: list,
        indices_: Any,
    ) -> tuple:
        """:func:`fwd` for a vector ψ: the losses, every sample's weight, then the sum of
        the weighted gradients (residuals as ``fwd``'s, with factor 1)."""
        rho, s = hyper_vals
        positions = jnp.arange(indices_.value.shape[0])

        def losses(carry: tuple, pos: jax.Array) -> tuple:
            return carry, jax.vmap(lambda i: sample(flat, i))(indices_.value[pos])

        _, (out, log_w) = _execution.fold(losses, (), positions, chunk)
        (value, losses_), weights = jax.vjp(
            lambda o, lw, b: reduction.finish(o, lw, b, rho, s), out, log_w, base_
        )
        ct_out, ct_lw, base_grad = weights((jnp.ones_like(value), jnp.zeros_like(losses_)))

        def one(i: jax.Array, c_out: jax.Array, c_lw: jax.Array) -> list:
            (y_out, y_lw), vjp_fn = jax.vjp(lambda xs: sample(with_diff(xs), i), diff)
            cts = [
                _parallel.sum_to(c.astype(y.dtype), _parallel.varying_axes(y))
                for c, y in ((c_out, y_out), (c_lw, y_lw))
            ]
            return vjp_fn(tuple(cts))[0]

        def block(carry: tuple, pos: jax.Array) -> tuple:
            grads = jax.vmap(one)(indices_.value[pos], ct_out[pos], ct_lw[pos])
            return ([a + jnp.sum(g.astype(a.dtype), 0) for a, g in zip(carry[0], grads)],), None

        start: tuple = (zeros,)
        if _parallel.union_axes((flat, base_, hyper_vals, indices_.value, ct_out)):
            start = _settle_carry(block, start, positions[:chunk])
        (sums,), _ = _execution.fold(block, start, positions, chunk)
        it = iter(sums)
        sums = [next(it) if w else None for w in wanted]
        factor = jnp.ones((), jnp.promote_types(base_grad.dtype, jnp.float32))
        return (value, losses_), (sums, base_grad, factor)

    def bwd(res: tuple, cts: tuple) -> tuple:
        sums, base_grad, factor = res
        ct = cts[0]
        if isinstance(ct, jax.custom_derivatives.SymbolicZero):
            return None, None, None, None
        scale = ct.astype(factor.dtype) * factor
        # per-device sums are summed over the devices along which their input does not vary
        grads = [
            None if a is None else _parallel.sum_to((scale * a).astype(t), v)
            for a, t, v in zip(sums, dtypes, vmas)
        ]
        ct_base = _parallel.sum_to((ct * base_grad).astype(base.dtype), base_vma)
        return grads, ct_base, None, None

    flat0 = leaves + consts
    dtypes = [jnp.result_type(x) for x in flat0]
    vmas = [_parallel.varying_axes(x) for x in flat0]
    base_vma = _parallel.varying_axes(base)
    rule = jax.custom_vjp(primal)
    rule.defvjp(fwd, bwd, symbolic_zeros=True)
    value, losses = rule(flat0, base, hyper, indices)
    return value, jax.lax.stop_gradient(losses)


def _vary_all(tree: PyTree, axes: frozenset) -> PyTree:
    return jax.tree_util.tree_map(lambda x: _parallel.vary_along(x, axes), tree)


def _settle_carry(block: Callable, carry: Any, idx: jax.Array) -> Any:
    """``carry`` typed as varying along every ``shard_map`` axis that one ``block`` adds to
    it (the running sums become per-device when a device's own weights enter them), so a
    scan's carry keeps one type. Values unchanged; typing an unvarying value as varying would
    make the final sum over devices count it N times, so only what ``block`` adds."""
    while True:
        out = jax.eval_shape(block, carry, idx)[0]
        grown = jax.tree_util.tree_map(
            lambda c, o: _parallel.vary_along(c, _parallel.varying_axes(o)), carry, out
        )
        same = all(
            _parallel.varying_axes(a) == _parallel.varying_axes(b)
            for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(grown))
        )
        if same:
            return carry
        carry = grown


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

    The sharpness term has its own reverse-mode rule (one pass over the samples;
    docs/conventions.md, section "Eq. (10)"): ``jax.grad``, ``jax.value_and_grad`` and
    ``jax.vjp`` work, also with respect to the arguments after ``params`` and nested, and so
    does ``jax.hessian`` (forward over the reverse rule); forward mode applied to the
    objective itself (``jax.jvp``, ``jax.jacfwd``) raises, and the objective is not
    differentiable in ``rho`` or ``strength``. A vector ψ (the Frobenius preset) takes
    two passes (the losses, then the weighted gradients). Forward mode still works with
    ``sample_axis``.

    Args:
      loss_fn: ``loss_fn(params, *args)`` returning a scalar, or ``(scalar, aux)`` with
        ``has_aux=True``.
      measure: a :class:`phipsimu.Measure`; its sampler draws the perturbations.
      rho: perturbation radius ρ >= 0. At ρ = 0 the sharpness term is defined as exactly 0
        (no division by ρ²), so the objective is L(x) and its gradient ∇L(x): a warm-up
        schedule from 0 under ``optax.inject_hyperparams`` is fine, also with ρ traced.
      num_samples: perturbations m per evaluation (even with ``antithetic``).
      strength: s >= 0, the weight of the sharpness term.
      antithetic: pair each v with −v and use ``(L(x+ρv) + L(x−ρv) − 2L(x))/ρ²``: the
        first-order term cancels exactly. For linear ψ and φ and a symmetric μ this has the
        same expectation as the paper's objective (less variance); for nonlinear ψ or φ it
        differs where ∇L ≠ 0 (away from minima), and has the same ρ → 0 limit at minima.
        Assumes μ and its proposal are symmetric under v → −v.
      adaptive: perturb as ``x + ρ T_x v`` with ``T_x = |x| + eta`` (ASAM's metric): the
        limit becomes S measured on ``T_x H T_x``, invariant to rescaling symmetries when
        ``eta = 0``; with ``eta > 0`` only approximately (on a digits MLP rescaling neurons
        moved the adaptive trace by +5.6% at eta = 0.01 and +56% at eta = 0.1,
        docs/guides/invariance.md).
        ``jax.grad`` differentiates through ``T_x`` (the exact gradient of this objective,
        which keeps it exactly invariant; ASAM instead holds its perturbation fixed).
      eta: the metric floor (>= 0).
      chunk_size: perturbed losses evaluated at once (``vmap`` inside a chunked ``lax.map``;
        under ``jax.grad`` each chunk's gradients are summed as it goes, or, with
        ``sample_axis``, each chunk is recomputed, so memory does not grow with
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
        perturbed = _tree.perturbed_leaves(params, measure.mu.mask)
        _parallel.check_whole(params, perturbed, (axis_name, sample_axis))
        if has_aux:
            out = jax.eval_shape(loss_fn, params, *args)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(
                    f"loss_fn: with has_aux=True must return (loss, aux), got "
                    f"{_checks.describe(out)}"
                )
            _checks.check_scalar_loss(lambda *a: loss_fn(*a)[0], params, args)
            base, aux = loss_fn(params, *args)

            def value_fn(p):
                return loss_fn(p, *args)[0]
        else:
            _checks.check_scalar_loss(loss_fn, params, args, has_aux_option=True)
            base = loss_fn(params, *args)

            def value_fn(p):
                return loss_fn(p, *args)

        if axis_name is not None:
            _parallel.axis_size(axis_name)
            base = jax.lax.pmean(base, axis_name)
            value_fn = _parallel.global_value_fn(value_fn, axis_name)
        wide = base_loss(measure, value_fn, params)
        total = base + term(value_fn, params, base if wide is None else wide, key)[0]
        return (total, aux) if has_aux else total

    return objective
