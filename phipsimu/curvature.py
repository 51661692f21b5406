"""Curvature operators: every estimator accepts one in place of a loss function.

* ``hessian(loss_fn)``: ``∇²L`` (what a plain loss function means);
* ``gauss_newton(apply_fn, output_loss)``: the generalised Gauss–Newton ``Jᵀ∇²ℓJ`` (the Fisher
  for softmax cross-entropy), positive semi-definite;
* ``linear_operator(matvec)``: your own symmetric matrix-vector product;
* ``data_parallel(operator, axis_name)``: the global-batch operator from per-device shards
  (inside ``pmap``/``shard_map``).

Each is a frozen, hashable :class:`Operator` with ``matvec(params, v, *args)``,
``quadratic_forms(params, v, *args)`` and ``dense(params, *args)``, all taking ``batches=`` and
``mask=``.

Execution: with ``chunk_size=None`` probes are evaluated :data:`DEFAULT_CHUNK` at a time on CPU
and, on GPU/TPU, as many at once as fit :data:`ACCELERATOR_CHUNK_BYTES` (:func:`default_chunk`).

Example:
  >>> import jax, jax.numpy as jnp, phipsimu
  >>> a = jnp.array([[2.0, 1.0], [1.0, 2.0]])  # eigenvalues 3 and 1
  >>> op = phipsimu.curvature.linear_operator(lambda p, v: a @ v)
  >>> eig = phipsimu.top_eigenvalues(op, 2)(jnp.zeros(2), key=jax.random.key(0))
  >>> [round(float(x), 4) for x in eig.value]
  [3.0, 1.0]
"""

from phipsimu._curvature import (
    Curvature,
    DataParallel,
    GaussNewton,
    Hessian,
    LinearOperator,
    Operator,
    data_parallel,
    gauss_newton,
    hessian,
    linear_operator,
)
from phipsimu._execution import ACCELERATOR_CHUNK_BYTES, DEFAULT_CHUNK, default_chunk

__all__ = [
    "ACCELERATOR_CHUNK_BYTES",
    "DEFAULT_CHUNK",
    "Curvature",
    "DataParallel",
    "GaussNewton",
    "Hessian",
    "LinearOperator",
    "Operator",
    "data_parallel",
    "default_chunk",
    "gauss_newton",
    "hessian",
    "linear_operator",
]
