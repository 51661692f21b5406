"""Validation of user input, written once: messages name the parameter, the value and what
is allowed (``rho=-1.0: must be a finite number > 0``). Traced values (inside jit or
``optax.inject_hyperparams``) cannot be inspected and are passed through."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (its value is unknown until run time)."""
    return isinstance(value, jax.core.Tracer)


def real(name: str, value: Any, *, lo: float, strict: bool) -> Any:
    """A finite real number ``> lo`` (``strict``) or ``>= lo``, returned as a float; a traced
    value is returned as it is."""
    if is_traced(value):
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}={value!r}: must be a real number, not a bool")
    dtype = getattr(value, "dtype", None)
    is_number = isinstance(value, (int, float, np.integer, np.floating))
    is_scalar_array = (
        dtype is not None
        and getattr(value, "shape", None) == ()
        and (
            jax.numpy.issubdtype(dtype, jax.numpy.integer)
            or jax.numpy.issubdtype(dtype, jax.numpy.floating)
        )
    )
    if not (is_number or is_scalar_array):
        raise TypeError(f"{name}={value!r}: must be a real number")
    x = float(value)
    op = ">" if strict else ">="
    if not math.isfinite(x) or (x <= lo if strict else x < lo):
        raise ValueError(f"{name}={value!r}: must be a finite number {op} {lo}")
    return x


def integer(name: str, value: Any, *, lo: int, allow_none: bool = False) -> int | None:
    """An int ``>= lo`` (a static size), or None if allowed, returned as a Python int. NumPy
    integers and concrete 0-d integer arrays (as ``optax.inject_hyperparams`` passes them)
    are accepted; traced values are not (a size must be known when the code is traced)."""
    if allow_none and value is None:
        return None
    extra = " or None" if allow_none else ""
    if is_traced(value):
        raise TypeError(
            f"{name}: must be a static int{extra}, got a traced value; with "
            f"optax.inject_hyperparams pass static_args=({name!r},)"
        )
    dtype = getattr(value, "dtype", None)
    ok = isinstance(value, (int, np.integer)) or (
        dtype is not None
        and getattr(value, "shape", None) == ()
        and jax.numpy.issubdtype(dtype, jax.numpy.integer)
    )
    if isinstance(value, (bool, np.bool_)) or not ok or int(value) < lo:
        raise ValueError(f"{name}={value!r}: must be an int >= {lo}{extra}")
    return int(value)


def function(name: str, value: Any, what: str) -> Any:
    """A callable, described by ``what`` in the error (e.g. ``loss_fn(params, *args)``)."""
    if not callable(value):
        raise TypeError(f"{name}={value!r}: must be a callable {what}")
    return value


def seed(name: str, value: Any) -> Any:
    """A PRNG seed: an int in ``[0, 2**63)``, or an integer array (as injected by
    ``optax.inject_hyperparams``); traced values pass."""
    if is_traced(value):
        return value
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(value, "shape", None) == ():
        if jax.numpy.issubdtype(dtype, jax.numpy.integer) and 0 <= int(value) < 2**63:
            return value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 0 <= value < 2**63:
            return value
    raise ValueError(f"{name}={value!r}: must be an int with 0 <= {name} < 2**63")


@functools.cache
def _raw_key_shape(impl: str) -> tuple[int, ...]:
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape


def raw_key_shape() -> tuple[int, ...]:
    """The shape of a raw ``uint32`` key of the default PRNG implementation
    (``jax_default_prng_impl``: ``(2,)`` for threefry, ``(4,)`` for rbg)."""
    return _raw_key_shape(str(jax.config.jax_default_prng_impl))  # type: ignore[attr-defined]


def check_key(key: Any, name: str = "key") -> None:
    """Raise a clear error unless ``key`` is a single JAX PRNG key: a typed key of any
    implementation, or a raw ``uint32`` key of the default implementation."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if jax.numpy.shape(key) == ():
            return
    elif dtype == jax.numpy.uint32 and jax.numpy.shape(key) == raw_key_shape():
        return
    raise TypeError(
        f"{name}={key!r}: must be a single JAX PRNG key, from jax.random.key(seed) or "
        "jax.random.PRNGKey(seed)"
    )


FLAX_RECIPE = "docs/guides/flax.md"


def _flax_base(obj: Any, base: str) -> bool:
    """Whether ``obj``'s class derives from flax's class named ``base`` (``Module``,
    ``Variable``, ``Param``), found by name so that phipsimu never imports flax."""
    return any(c.__name__ == base and c.__module__.startswith("flax.") for c in type(obj).__mro__)


def _is_flax_node(obj: Any) -> bool:
    return _flax_base(obj, "Module") or _flax_base(obj, "Variable")


def check_flax(params: Any, name: str = "params") -> None:
    """Raise a clear error for a flax model passed where only its trainable arrays belong:
    a flax module (nnx modules are pytrees whose leaves include the BatchNorm statistics,
    which would be perturbed and trained), an ``nnx.State`` holding variables other than
    ``nnx.Param`` (and RNG state, held fixed), or a linen ``variables`` dict
    (``{"params": ..., "batch_stats": ...}``)."""
    if isinstance(params, Mapping) and "params" in params and "batch_stats" in params:
        raise TypeError(
            f"{name}: got a flax linen variables dict with keys {sorted(params)}; pass "
            "variables['params'] as params and apply the model with "
            "{'params': params, 'batch_stats': ...} inside the loss (" + FLAX_RECIPE + ")"
        )
    nodes = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_flax_node)
    for path, node in nodes:
        where = f"{name}: leaf {jax.tree_util.keystr(path)} is" if path else f"{name}: is"
        if _flax_base(node, "Module"):
            raise TypeError(
                f"{where} the flax module {type(node).__name__}, not its "
                "trainable arrays; split it once with `graphdef, params, state = "
                "nnx.split(model, nnx.Param, ...)`, pass params, and rebuild the model in "
                "the loss with `nnx.merge(graphdef, params, state)`; for a linen module pass "
                "variables['params'] (" + FLAX_RECIPE + ")"
            )
        # RNG state (typed keys, integer counts) is never perturbed: held fixed, as any key
        allowed = _flax_base(node, "Param") or _flax_base(node, "RngState")
        if _flax_base(node, "Variable") and not allowed:
            raise TypeError(
                f"{where} an nnx {type(node).__name__}, not an nnx.Param; "
                "only trainable parameters may be perturbed: split the model with "
                "`graphdef, params, state = nnx.split(model, nnx.Param, ...)` and pass "
                "params, keeping state (e.g. BatchNorm statistics) out (" + FLAX_RECIPE + ")"
            )


def check_params(params: Any, name: str = "params") -> None:
    """Raise a clear error for params leaves that cannot be perturbed and are not plainly
    fixed: Python floats (which would silently never be perturbed), non-array leaves such
    as the functions inside an equinox module, and flax models or non-trainable flax state
    (:func:`check_flax`). Arrays of any dtype, Python ints and bools pass (non-floating
    leaves are held fixed)."""
    check_flax(params, name)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        where = jax.tree_util.keystr(path) or "(root)"
        if isinstance(leaf, float):
            raise TypeError(
                f"{name}: leaf {where} is the Python float {leaf!r}; it would never be "
                "perturbed; make it an array (jnp.asarray) to include it, or move it out of "
                "the params"
            )
        if getattr(leaf, "dtype", None) is None and not isinstance(leaf, (bool, int)):
            raise TypeError(
                f"{name}: leaf {where} is {leaf!r}, not an array; pass only the arrays, e.g. "
                "for an equinox module `p, static = eqx.partition(model, eqx.is_inexact_array)`"
                " and rebuild it in the loss with `eqx.combine(p, static)`"
            )


def describe(out: Any) -> str:
    """A short description of a function's abstract output: ``float32[]`` for an array, the
    type and number of arrays for another pytree, never the whole (possibly huge) repr."""
    if isinstance(out, tuple):
        return "(" + ", ".join(describe(o) for o in out) + ")"
    if hasattr(out, "shape") and hasattr(out, "dtype"):
        return f"{out.dtype}{list(out.shape)}"
    return f"{type(out).__name__} of {len(jax.tree_util.tree_leaves(out))} arrays"


def tuple_loss_message(name: str, out: tuple, has_aux_option: bool) -> str:
    """The error for a loss that returns a tuple where a scalar is expected."""
    if has_aux_option:
        fix = (
            "if it is (loss, aux), e.g. a flax model's loss and its new BatchNorm "
            "statistics, pass has_aux=True"
        )
    else:
        fix = (
            "return the loss alone, e.g. a flax model's loss without its new BatchNorm "
            "statistics (train mode, statistics dropped)"
        )
    return f"{name}: returns a tuple {describe(out)}, not a scalar loss; {fix} ({FLAX_RECIPE})"


def check_scalar_loss(
    loss_fn: Any, params: Any, args: tuple, name: str = "loss_fn", has_aux_option: bool = False
) -> None:
    """Raise a clear error unless ``loss_fn(params, *args)`` is a real floating-point scalar
    (checked on shapes only, with ``jax.eval_shape``); a tuple gets a message pointing to
    ``has_aux=True`` where the caller has that option."""
    out = jax.eval_shape(loss_fn, params, *args)
    if isinstance(out, tuple):
        raise ValueError(tuple_loss_message(name, out, has_aux_option))
    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    if shape != () or dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise ValueError(
            f"{name}: must return a real floating-point scalar, got {out!r}; "
            "reduce the loss over the batch (e.g. jnp.mean) before returning it"
        )


def flag(name: str, value: Any) -> bool:
    """A Python bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be a bool")
    return value


def flags(**named: Any) -> None:
    """:func:`flag` on each keyword argument, named by its keyword."""
    for name, value in named.items():
        flag(name, value)
