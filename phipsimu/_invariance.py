"""Invariance tools: function-preserving rescalings of networks, the volume factor det D of a
diagonal rescaling, and ``check_invariance``, which compares a measure at x and at T(x).

Theory (docs/conventions.md, sections "Theorem 1" and "Adaptive metric"): if ``L(Dx) = L(x)`` for a
positive diagonal D then ``H(Dx) = D⁻¹H(x)D⁻¹``. Measures with a product density μ
(``invariant_gaussian``, the determinant) are invariant when det D = 1; adaptive measures
(``adaptive=True``) for every D when ``eta = 0`` (with ``eta > 0`` only approximately: the
metric ``|x| + eta`` does not scale with D); the trace and λ_max in general for none.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phipsimu import _checks, _diagnostics, _estimate, _measure, _tree

PyTree = Any

#: Largest |Σ log factors| accepted as "product 1" by :func:`rescale_layers`.
PRODUCT_TOL = 1e-6


def _check_factor(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be a real number > 0, not a bool")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={value!r}: must be a real number > 0") from None
    if not (math.isfinite(x) and x > 0):
        raise ValueError(
            f"{name}={value!r}: must be finite and > 0 (positive homogeneity, "
            "relu(c·z) = c·relu(z), holds for c > 0 only)"
        )
    return x


def rescale_layers(params: Sequence[PyTree], factors: Sequence[Any]) -> list[PyTree]:
    """Multiply every floating leaf of layer ℓ by ``factors[ℓ]``; the factors' product is 1.

    .. math::
       (W_1, \\dots, W_n) \\mapsto (a_1 W_1, \\dots, a_n W_n), \\qquad \\prod_\\ell a_\\ell = 1

    For a bias-free network of positively homogeneous activations (ReLU, leaky ReLU, linear)
    the output is multiplied by ``∏ a_ℓ = 1``: the function, and the loss, are unchanged.
    The induced D has ``det D = ∏ a_ℓ^{size_ℓ}``, which is 1 when all layers have the same
    number of parameters (equal square layers), so Theorem 1 applies then; otherwise use
    :func:`volume_factor`. Biases would need the cumulative products of the factors: use
    :func:`rescale_neurons` for nets with biases.

    Args:
      params: a sequence of layers, each a pytree (e.g. ``{"w": W}`` or just ``W``).
      factors: one positive real per layer (concrete values, not traced), with product 1
        up to ``|Σ log a_ℓ| <= 1e-6``.

    Returns:
      a list of layers of the same structure and dtypes.

    Raises:
      TypeError / ValueError: when params is not a sequence, the number of factors differs
      from the number of layers, a factor is not a finite positive real, or the product is
      not 1.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> net = [{"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2))}]
      >>> out = phipsimu.symmetries.rescale_layers(net, [4.0, 0.25])
      >>> float(out[0]["w"][0, 0]), float(out[1]["w"][0, 0])
      (4.0, 0.25)
    """
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params: must be a list or tuple of layers, got {type(params).__name__}")
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"factors={factors!r}: must be a sequence of one positive real per layer")
    if len(factors) != len(params):
        raise ValueError(
            f"factors={factors!r}: {len(factors)} factors for {len(params)} layers; give one "
            "per layer"
        )
    if not any(_checks.is_traced(a) for a in factors):
        logs = [math.log(_check_factor(f"factors[{i}]", a)) for i, a in enumerate(factors)]
        if abs(math.fsum(logs)) > PRODUCT_TOL:
            raise ValueError(
                f"factors={factors!r}: their product is {math.exp(math.fsum(logs))!r}, must be "
                "1; a bias-free positively homogeneous network multiplies its output by the "
                "product"
            )

    def scale_layer(layer: PyTree, a: Any) -> PyTree:
        return jax.tree_util.tree_map(
            lambda x: (a * x).astype(x.dtype) if _tree.is_float_leaf(x) else x, layer
        )

    return [scale_layer(layer, a) for layer, a in zip(params, factors)]


def _check_mlp(params: Any) -> None:
    if not isinstance(params, (list, tuple)) or not params:
        raise TypeError(
            'params: must be a non-empty list of layers {"w": (fan_in, fan_out), "b": (fan_out,)}'
        )
    for i, layer in enumerate(params):
        if not isinstance(layer, dict) or "w" not in layer or jnp.ndim(layer["w"]) != 2:
            raise ValueError(
                f'params[{i}]: must be a dict with a 2-D "w" of shape (fan_in, fan_out) and '
                'optionally "b" of shape (fan_out,)'
            )
        fan_out = jnp.shape(layer["w"])[1]
        if "b" in layer and jnp.shape(layer["b"]) != (fan_out,):
            raise ValueError(
                f'params[{i}]["b"]: has shape {jnp.shape(layer["b"])}, expected ({fan_out},)'
            )
        if i > 0 and jnp.shape(layer["w"])[0] != jnp.shape(params[i - 1]["w"])[1]:
            raise ValueError(
                f'params[{i}]["w"]: fan_in {jnp.shape(layer["w"])[0]} does not match the '
                f"previous layer's fan_out {jnp.shape(params[i - 1]['w'])[1]}"
            )


def rescale_neurons(params: Sequence[dict], layer: int, factors: Any) -> list[dict]:
    """Rescale the hidden units of one layer of a dense MLP without changing its function.

    .. math::
       W_\\ell[:, j] \\mathrel{*}= c_j, \\quad b_\\ell[j] \\mathrel{*}= c_j, \\quad
       W_{\\ell+1}[j, :] \\mathrel{/}= c_j

    For a positively homogeneous activation σ (ReLU, leaky ReLU: ``σ(cz) = cσ(z)`` for c > 0)
    unit j's output is multiplied by c_j and the next layer divides it back. The induced D
    has ``det D = ∏_j c_j^(fan_in + 1 − fan_out)`` (the +1 only with a bias; docs/conventions.md,
    "Theorem 1"), so it is volume-preserving only in special cases: see :func:`volume_factor`.

    Args:
      params: a list of layers ``{"w": (fan_in, fan_out), "b": (fan_out,)}`` ("b" optional)
        applied as ``h ↦ σ(h @ w + b)``.
      layer: index ℓ of the layer whose output units are rescaled; ``0 <= ℓ < len(params) − 1``
        (the last layer's units are the network's outputs).
      factors: positive scale per unit, shape ``(fan_out_ℓ,)``, or a scalar for all units.
        Concrete values are checked to be finite and > 0; traced values are passed through.

    Returns:
      a new list of layers; other layers and keys are shared with ``params``.

    Raises:
      TypeError / ValueError: on a malformed MLP, a bad ``layer`` index or bad ``factors``.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> net = [{"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, {"w": jnp.ones((3, 1))}]
      >>> out = phipsimu.symmetries.rescale_neurons(net, 0, jnp.array([2.0, 1.0, 0.5]))
      >>> out[1]["w"][:, 0].tolist()
      [0.5, 1.0, 2.0]
    """
    _check_mlp(params)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(params) - 1:
        raise ValueError(
            f"layer={layer!r}: must be an int in [0, {len(params) - 1}); the units of the last "
            "layer are the network's outputs, rescaling them changes the function"
        )
    fan_out = jnp.shape(params[layer]["w"])[1]
    c = jnp.asarray(factors)
    if c.ndim == 0:
        c = jnp.broadcast_to(c, (fan_out,))
    if c.shape != (fan_out,):
        raise ValueError(
            f"factors: shape {c.shape} does not match the {fan_out} units of layer {layer}; "
            f"give shape ({fan_out},) or a scalar"
        )
    if not _checks.is_traced(c):
        arr = np.asarray(c, np.float64)
        if not np.all(np.isfinite(arr) & (arr > 0)):
            raise ValueError(
                f"factors={factors!r}: must be finite and > 0 (positive homogeneity holds "
                "for c > 0 only)"
            )
    out = list(params)
    cur, nxt = dict(params[layer]), dict(params[layer + 1])
    cur["w"] = (cur["w"] * c[None, :]).astype(cur["w"].dtype)
    if "b" in cur:
        cur["b"] = (cur["b"] * c).astype(cur["b"].dtype)
    nxt["w"] = (nxt["w"] / c[:, None]).astype(nxt["w"].dtype)
    out[layer], out[layer + 1] = cur, nxt
    return out


class VolumeFactor(NamedTuple):
    """``det D`` of a diagonal rescaling x ↦ Dx.

    Attributes:
      value: ``det D`` (may over- or underflow for large models; use ``log_value``).
      log_value: ``log|det D| = Σᵢ log|Dᵢᵢ|``, summed leaf by leaf.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> vf = phipsimu.symmetries.volume_factor(jnp.ones(2), lambda x: x * jnp.array([2.0, 3.0]))
      >>> round(float(vf.value), 4), round(float(vf.log_value), 4)  # det D = 6, log 6
      (6.0, 1.7918)
    """

    value: jax.Array
    log_value: jax.Array


def _diagonal(params: PyTree, transform: Callable[[PyTree], PyTree], perturbed: Sequence[bool]):
    """The diagonal of D as leaves (None for leaves not perturbed) if ``transform`` acts on
    ``params`` as a diagonal linear map, else None."""
    ones = jax.tree_util.tree_map(
        lambda x: jnp.ones_like(x) if _tree.is_float_leaf(x) else x, params
    )
    diag = transform(ones)
    image = transform(params)
    structure: Any = jax.tree_util.tree_structure(diag)
    if structure != jax.tree_util.tree_structure(params):
        return None
    out: list[Any] = []
    for x, dx, tx, p in zip(
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(diag),
        jax.tree_util.tree_leaves(image),
        perturbed,
    ):
        if not p:
            out.append(None)
            continue
        if jnp.shape(dx) != jnp.shape(x) or jnp.shape(tx) != jnp.shape(x):
            return None
        # A diagonal linear map sends x to D·x with D its image of the ones.
        if not np.allclose(np.asarray(tx), np.asarray(dx * x), rtol=1e-5, atol=0.0):
            return None
        out.append(dx)
    return out


def volume_factor(
    params: PyTree, transform: Callable[[PyTree], PyTree], *, mask: Any = None
) -> VolumeFactor:
    """``det D`` of the diagonal rescaling ``transform`` (x ↦ Dx), in log space.

    D is read off as ``transform(ones)`` and checked against ``transform(params) = D·params``.
    Theorem 1 applies when ``det D = 1`` over the perturbed coordinates (the ones in the
    measure's ``mask``); otherwise ``det H(Dx) = det(H(x)) / det(D)²`` and product-density
    measures change, while adaptive measures (``adaptive=True``) do not when ``eta = 0``
    (with ``eta > 0`` they change too, by an amount that grows with eta and with D).

    .. math:: \\log|\\det D| = \\sum_i \\log|D_{ii}|

    Args:
      params: the parameters x (concrete values).
      transform: ``params -> params``, a diagonal linear map such as
        ``lambda p: rescale_neurons(p, 0, c)``.
      mask: restrict to the coordinates a measure perturbs (as in ``phipsimu.mu``).

    Returns:
      :class:`VolumeFactor` ``(value, log_value)``; value is ``sign · exp(log_value)``.

    Raises:
      ValueError: if ``transform`` is not a diagonal linear map at ``params`` (e.g. a
      permutation) or changes the structure.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> net = [{"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, {"w": jnp.ones((3, 1))}]
      >>> vf = phipsimu.symmetries.volume_factor(
      ...     net, lambda p: phipsimu.symmetries.rescale_neurons(p, 0, 2.0))
      >>> round(float(vf.value), 3)  # ∏_j c^(fan_in + 1 − fan_out) = (2²)³
      64.0
    """
    _checks.function("transform", transform, "params -> params")
    perturbed = _tree.perturbed_leaves(params, mask)
    diag = _diagonal(params, transform, perturbed)
    if diag is None:
        raise ValueError(
            "transform: is not a diagonal rescaling x -> D·x at these params (checked as "
            "transform(params) == transform(ones)·params); volume_factor needs a diagonal D"
        )
    dtype = _tree.float_dtype(params, perturbed)
    log_abs = sum(
        (jnp.sum(jnp.log(jnp.abs(d.astype(dtype)))) for d in diag if d is not None),
        jnp.zeros((), dtype),
    )
    negatives = sum(int(np.sum(np.asarray(d) < 0)) for d in diag if d is not None)
    sign = -1.0 if negatives % 2 else 1.0
    return VolumeFactor(sign * jnp.exp(log_abs), log_abs)


class InvarianceReport(NamedTuple):
    """What :func:`check_invariance` found.

    Attributes:
      loss, transformed_loss: ``L(x)`` and ``L(T(x))``.
      loss_preserved: whether they agree (``|ΔL| <= loss_atol + loss_rtol·max|L|``). When
        False the transform is not a symmetry of this loss; ``invariant`` is then False
        whatever the estimates say, and a warning was issued.
      estimate, transformed_estimate: the :class:`phipsimu.Estimate` at x and at T(x), from
        the same key.
      ratio: ``S(T(x)) / S(x)`` (from the log values where both are finite).
      z: ``(S(T(x)) − S(x)) / sqrt(se² + se'²)`` (log scale for log-space measures). Both
        estimates share a key and are positively correlated, so ``|z|`` understates the
        evidence: a large ``|z|`` shows the measure changed, a small one proves nothing.
      volume_factor: ``det D`` over the measure's perturbed coordinates when the transform
        is a diagonal rescaling, else None.
      invariant: True only when the loss is preserved and the two estimates agree to
        ``rtol`` (the same probes gave the same value: invariance sample by sample).
      verdict: one of ``"invariant"``, ``"not invariant"`` (``|z| > z_max``),
        ``"inconclusive"`` (different, but within z_max standard errors: raise
        num_samples), ``"loss changed"``, ``"divergent"`` (an estimate carries
        ``Status.DIVERGENT``: its integral is provably infinite, so there is no finite
        measure to compare, however equal the two zeros), ``"undefined"`` (an estimate is
        NaN).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda x: (x[0] * x[1] - 1.0) ** 2  # Example 1: L(Dx) = L(x), D = diag(c, 1/c)
      >>> rep = phipsimu.check_invariance(
      ...     loss, phipsimu.measures.trace(), jnp.array([1.0, 1.0]),
      ...     lambda x: x * jnp.array([2.0, 0.5]), key=jax.random.key(0))
      >>> bool(rep.loss_preserved), round(float(rep.volume_factor.value), 4)  # det D = 1
      (True, 1.0)
      >>> # Tr(H)/d = x₁² + x₂² on the manifold: the exact ratio is (4 + 1/4)/(1 + 1) = 2.125;
      >>> # this is the ratio of two Monte Carlo estimates (default num_samples, same probes)
      >>> round(float(rep.ratio), 4), rep.invariant, rep.verdict
      (2.0736, False, 'not invariant')
    """

    loss: jax.Array
    transformed_loss: jax.Array
    loss_preserved: bool
    estimate: _measure.Estimate
    transformed_estimate: _measure.Estimate
    ratio: jax.Array
    z: jax.Array
    volume_factor: VolumeFactor | None
    invariant: bool
    verdict: str


def check_invariance(
    loss_fn: Callable[..., jax.Array],
    measure: _measure.Measure | None,
    params: PyTree,
    transform: Callable[[PyTree], PyTree],
    *args: Any,
    key: jax.Array,
    num_samples: int = 1024,
    chunk_size: int | None = None,
    adaptive: bool = False,
    eta: float = 0.0,
    rtol: float = 1e-4,
    loss_rtol: float = 1e-5,
    loss_atol: float = 1e-6,
    z_max: float = 4.0,
    estimator: Callable[..., _measure.Estimate] | None = None,
) -> InvarianceReport:
    """Is the measure S invariant under ``transform`` on this model? One call, two estimates.

    Evaluates ``L`` and :func:`phipsimu.sharpness` at x = ``params`` and at T(x) =
    ``transform(params)`` with the **same key**, so a measure that is invariant sample by
    sample (Theorem 1 with the equivariant proposal, or the adaptive metric) gives the same
    number up to float rounding, and any other measure shows its change directly.

    .. math:: \\text{ratio} = S(T(x)) / S(x), \\qquad
       z = \\frac{S(T(x)) - S(x)}{\\sqrt{\\mathrm{se}^2 + \\mathrm{se}'^2}}

    Runs eagerly (it compares values in Python and may warn); the estimator inside is jitted.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      measure: a :class:`phipsimu.Measure` (None with ``estimator``).
      params: the parameters x.
      transform: ``params -> params``, e.g. ``lambda p: rescale_neurons(p, 0, c)``.
      *args: passed to ``loss_fn`` (the batch).
      key: PRNG key, used for both estimates.
      num_samples, chunk_size, adaptive, eta: as in :func:`phipsimu.sharpness`.
      rtol: the two estimates "agree" when ``|ratio − 1| <= rtol`` (float32 rounding of the
        same probes at x and T(x) is ~1e-6 relative; default 1e-4).
      loss_rtol, loss_atol: tolerance for ``L(T(x)) == L(x)``.
      z_max: ``|z|`` above which the verdict is "not invariant".
      estimator: instead of a measure (then ``measure=None``), any estimator with the
        estimators' calling convention ``(params, *args, key) -> Estimate``, e.g.
        ``phipsimu.average_sharpness(loss_fn, rho=0.05, num_samples=64, adaptive=True)``
        or :func:`phipsimu.worst_case_sharpness` (whose NaN stderr leaves only the
        ``rtol`` comparison); ``num_samples``, ``chunk_size``, ``adaptive`` and ``eta`` are
        then the estimator's own and must be left at their defaults.

    Returns:
      an :class:`InvarianceReport`.

    Raises:
      TypeError / ValueError: on bad arguments, or a ``transform`` that changes the pytree
      structure, shapes or dtypes of ``params``.

    Warns:
      UserWarning: when ``transform`` changes the loss (it is not a symmetry of this loss).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda x: (x[0] * x[1] - 1.0) ** 2  # Example 1
      >>> rep = phipsimu.check_invariance(
      ...     loss, phipsimu.measures.trace(), jnp.array([1.0, 1.0]),
      ...     lambda x: x * jnp.array([2.0, 0.5]), key=jax.random.key(0), adaptive=True)
      >>> rep.verdict
      'invariant'
    """
    est_fn: Callable[..., _measure.Estimate]
    if estimator is None:
        if measure is None:
            raise ValueError("measure=None: give a phipsimu.Measure, or an estimator=...")
        est_fn = _estimate.sharpness(
            loss_fn,
            measure,
            num_samples=num_samples,
            chunk_size=chunk_size,
            adaptive=adaptive,
            eta=eta,
        )
    else:
        _checks.function("estimator", estimator, "(params, *args, key) -> Estimate")
        if measure is not None:
            raise ValueError(f"measure={measure!r}: give a measure or an estimator=..., not both")
        given = dict(num_samples=num_samples, chunk_size=chunk_size, adaptive=adaptive, eta=eta)
        defaults = dict(num_samples=1024, chunk_size=None, adaptive=False, eta=0.0)
        for name, value in given.items():
            if value != defaults[name]:
                raise ValueError(
                    f"{name}={value!r}: with estimator=... it is the estimator's own; leave it "
                    f"at its default {defaults[name]!r}"
                )
        est_fn = estimator
    _checks.function("transform", transform, "params -> params")
    _checks.check_key(key)
    rtol = _checks.real("rtol", rtol, lo=0.0, strict=True)
    loss_rtol = _checks.real("loss_rtol", loss_rtol, lo=0.0, strict=False)
    loss_atol = _checks.real("loss_atol", loss_atol, lo=0.0, strict=False)
    z_max = _checks.real("z_max", z_max, lo=0.0, strict=True)

    new_params = transform(params)
    old_struct: Any = jax.tree_util.tree_structure(params)
    new_struct = jax.tree_util.tree_structure(new_params)
    if new_struct != old_struct:
        raise ValueError(
            f"transform: changed the params structure from {old_struct} to {new_struct}"
        )
    for i, (a, b) in enumerate(
        zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new_params))
    ):
        if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise ValueError(
                f"transform: changed leaf {i} from {jnp.result_type(a)}{list(jnp.shape(a))} to "
                f"{jnp.result_type(b)}{list(jnp.shape(b))}"
            )

    loss = jnp.asarray(loss_fn(params, *args))
    new_loss = jnp.asarray(loss_fn(new_params, *args))
    l0, l1 = float(loss), float(new_loss)
    loss_preserved = bool(
        math.isfinite(l0)
        and math.isfinite(l1)
        and abs(l1 - l0) <= loss_atol + loss_rtol * max(abs(l0), abs(l1))
    )
    if not loss_preserved:
        warnings.warn(
            f"check_invariance: transform changes the loss ({l0!r} -> {l1!r}), so it is not "
            "a symmetry of this loss and the comparison says nothing about invariance",
            UserWarning,
            stacklevel=2,
        )

    jitted = jax.jit(est_fn)
    e0 = jitted(params, *args, key=key)
    e1 = jitted(new_params, *args, key=key)

    v0, v1 = float(e0.value), float(e1.value)
    lv0, lv1 = float(e0.log_value), float(e1.log_value)
    if math.isfinite(lv0) and math.isfinite(lv1):
        ratio = math.exp(lv1 - lv0)
    else:
        ratio = v1 / v0 if v0 != 0 else (1.0 if v1 == 0 else math.inf)
    log_space = measure is not None and measure.log_space
    if log_space:
        se = math.hypot(float(e0.stderr) / v0, float(e1.stderr) / v1) if v0 and v1 else math.nan
        diff = lv1 - lv0
    else:
        se = math.hypot(float(e0.stderr), float(e1.stderr))
        diff = v1 - v0
    if diff == 0:
        z = 0.0
    elif se > 0:
        z = diff / se
    else:
        z = math.copysign(math.inf, diff) if not math.isnan(diff) else math.nan

    try:
        vf = volume_factor(params, transform, mask=None if measure is None else measure.mu.mask)
    except ValueError:  # not a diagonal rescaling (a permutation, say): no det D to report
        vf = None

    undefined = any(math.isnan(x) for x in (v0, v1))
    # two provably infinite integrals (S = 0 at both points) agree, but say nothing about
    # invariance: the measure is undefined there, and the verdict says so
    divergent = any(int(e.status) & _diagnostics.Status.DIVERGENT for e in (e0, e1))
    agree = not undefined and (v0 == v1 or abs(ratio - 1.0) <= rtol)
    if not loss_preserved:
        verdict = "loss changed"
    elif divergent:
        verdict = "divergent"
    elif undefined:
        verdict = "undefined"
    elif agree:
        verdict = "invariant"
    elif abs(z) > z_max:
        verdict = "not invariant"
    else:
        verdict = "inconclusive"
    dtype = e0.value.dtype
    return InvarianceReport(
        loss=loss,
        transformed_loss=new_loss,
        loss_preserved=loss_preserved,
        estimate=e0,
        transformed_estimate=e1,
        ratio=jnp.asarray(ratio, dtype),
        z=jnp.asarray(z, dtype),
        volume_factor=vf,
        invariant=verdict == "invariant",
        verdict=verdict,
    )
