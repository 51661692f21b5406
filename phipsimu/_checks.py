"""Validation of user input at construction time, with messages that name the parameter,
the value and what is allowed. Traced values (inside jit or ``optax.inject_hyperparams``)
cannot be inspected and are passed through."""

from __future__ import annotations

import math
from typing import Any

import jax


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def real(name: str, value: Any, *, lo: float, strict: bool, allow_array: bool = True) -> Any:
    """A finite real number ``> lo`` (``strict``) or ``>= lo``; concrete arrays are checked,
    traced arrays passed through."""
    if is_traced(value) and allow_array:
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
    return value


def integer(name: str, value: Any, *, lo: int) -> int:
    """A Python int ``>= lo`` (a static shape parameter: arrays are not accepted)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r}: must be an int >= {lo}")
    return value
