"""Validation of user input, written once: messages name the parameter, the value and what
is allowed (``rho=-1.0: must be a finite number > 0``). Traced values (inside jit or
``optax.inject_hyperparams``) cannot be inspected and are passed through."""

from __future__ import annotations

import math
from typing import Any

import jax


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (its value is unknown until run time)."""
    return isinstance(value, jax.core.Tracer)


def real(name: str, value: Any, *, lo: float, strict: bool) -> Any:
    """A finite real number ``> lo`` (``strict``) or ``>= lo``, returned as a float; a traced
    value is returned as it is."""
    if is_traced(value):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be a real number, not a bool")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={value!r}: must be a real number") from None
    op = ">" if strict else ">="
    if not math.isfinite(x) or (x <= lo if strict else x < lo):
        raise ValueError(f"{name}={value!r}: must be a finite number {op} {lo}")
    return x


def integer(name: str, value: Any, *, lo: int, allow_none: bool = False) -> int | None:
    """A Python int ``>= lo`` (a static size: arrays are not accepted), or None if allowed."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name}={value!r}: must be an int >= {lo}{extra}")
    return value


def function(name: str, value: Any, what: str) -> Any:
    """A callable, described by ``what`` in the error (e.g. ``loss_fn(params, *args)``)."""
    if not callable(value):
        raise TypeError(f"{name}={value!r}: must be a callable {what}")
    return value


def seed(name: str, value: Any) -> Any:
    """A PRNG seed: a non-negative Python int, or an integer array (as injected by
    ``optax.inject_hyperparams``); traced values pass."""
    if is_traced(value):
        return value
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(value, "shape", None) == ():
        if jax.numpy.issubdtype(dtype, jax.numpy.integer) and int(value) >= 0:
            return value
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{name}={value!r}: must be a non-negative int")


def check_key(key: Any, name: str = "key") -> None:
    """Raise a clear error unless ``key`` is a JAX PRNG key (typed or raw uint32[2])."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if jax.numpy.shape(key) == ():
            return
    elif dtype == jax.numpy.uint32 and jax.numpy.shape(key) == (2,):
        return
    raise TypeError(
        f"{name}={key!r}: must be a single JAX PRNG key, from jax.random.key(seed) or "
        "jax.random.PRNGKey(seed)"
    )


def check_scalar_loss(loss_fn: Any, params: Any, args: tuple, name: str = "loss_fn") -> None:
    """Raise a clear error unless ``loss_fn(params, *args)`` is a real floating-point scalar
    (checked on shapes only, with ``jax.eval_shape``)."""
    out = jax.eval_shape(loss_fn, params, *args)
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
