"""Version guards: the one place where phipsimu bridges JAX releases (floors: .ci/floors.txt).

Each guard names the JAX release that introduced the newer API; on a newer JAX the newer API
is used as is. Remove a guard once the floor passes that release.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.core
import jax.extend.core

# `jax.lax.pcast(x, axes, to=...)` and `jax.lax.all_gather(..., to=...)` arrived in JAX 0.8.2;
# before, the same operations were `jax.lax.pvary(x, axes)` and `jax.lax.all_gather_invariant`.
HAS_PCAST = hasattr(jax.lax, "pcast")
# the older names, untyped: each JAX release's stubs know only its own
_old_lax: Any = jax.lax
_old_core: Any = jax.core


def pcast_varying(x: Any, axes: Any) -> Any:
    """``x`` typed as varying along ``axes`` (a name or a tuple of names; no communication):
    ``jax.lax.pcast(x, axes, to="varying")``, ``jax.lax.pvary`` before JAX 0.8.2."""
    if HAS_PCAST:
        return jax.lax.pcast(x, axes, to="varying")
    return _old_lax.pvary(x, axes)  # JAX < 0.8.2


def all_gather_tiled(x: jax.Array, axis_name: str, invariant: bool) -> jax.Array:
    """``jax.lax.all_gather(x, axis_name, tiled=True)``, typed as the same on every device
    (``to="invarying"``) when ``invariant``; ``jax.lax.all_gather_invariant`` before JAX
    0.8.2."""
    if HAS_PCAST:
        to = "invarying" if invariant else "varying"
        return jax.lax.all_gather(x, axis_name, tiled=True, to=to)
    if invariant:  # JAX < 0.8.2
        return _old_lax.all_gather_invariant(x, axis_name, tiled=True)
    return jax.lax.all_gather(x, axis_name, tiled=True)


def varying_of(aval: Any) -> frozenset:
    """The axes along which an abstract value (``jax.typeof``, ``ShapeDtypeStruct``) is typed
    as varying: its ``manual_axis_type.varying`` where it has one (JAX 0.10), else its ``vma``
    (which a ``ShapeDtypeStruct`` leaves ``None`` outside ``shard_map`` in JAX 0.8)."""
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", None) or ())


# `jax.extend.core.subjaxprs` is exported from JAX 0.10 on; before, `jax.core.subjaxprs`.
subjaxprs: Callable[[Any], Iterator[Any]] = (
    getattr(jax.extend.core, "subjaxprs", None) or _old_core.subjaxprs
)
