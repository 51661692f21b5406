"""Curvature operators: the only module that differentiates twice.

An operator is a symmetric matrix ``C(x)`` over the perturbed parameter coordinates, given by
two primitives on one batch of data (``args``):

* the matrix-vector product ``Cv``;
* the quadratic form ``vᵀCv`` (for the Hessian the second directional derivative
  ``d²/dt² L(x + tv)`` at t = 0, forward-over-forward, about one gradient per probe where a
  vmapped forward-over-reverse product costs 2–3, ``python -m benchmarks``).

Operators here: :func:`hessian` (``∇²L``), :func:`gauss_newton` (``Jᵀ∇²ℓJ``) and
:func:`linear_operator` (a user's own matvec). All are frozen, hashable dataclasses, so they can
be closed over or passed as static arguments of ``jax.jit``. Every estimator accepts one in
place of a loss function (a loss function means its Hessian).

This module also owns the dataset sweep (``batches=``: the operator of the dataset mean loss as
the batch-size-weighted mean of per-batch operators) and the adaptive metric ``T_x = |x| + η``.
How many probes run at once is the execution layer's decision (:mod:`phipsimu._execution`).
Only floating-point (and unmasked) leaves are differentiated; the others are held fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from phipsimu import _checks, _execution, _parallel, _tree

PyTree = Any


#: Largest number of perturbed coordinates the dense paths accept by default
#: (``exact_sharpness``, ``hessian_diagonal(exact=True)``). A dense float32 matrix of this size
#: takes 64 MiB and its eigendecomposition a few seconds on CPU.
#:
#: Example:
#:   >>> import phipsimu
#:   >>> phipsimu.MAX_DENSE_DIM, phipsimu.MAX_DENSE_DIM**2 * 4 / 2**20  # d, MiB in float32
#:   (4096, 64.0)
MAX_DENSE_DIM = 4096


class Restricted(NamedTuple):
    """An operator on one batch, as functions of one vector given as the list of perturbed
    leaves: ``matvec(v) -> Cv`` (same list structure) and ``quad(v) -> vᵀCv``."""

    matvec: Callable[[list], list]
    quad: Callable[[list], jax.Array]


@dataclasses.dataclass(frozen=True)
class Operator:
    """A symmetric curvature operator ``C(x; args)`` over the perturbed leaves of the params.

    Subclasses implement :meth:`restrict` (and may override :meth:`check` and
    :meth:`dense_matrix`). The public methods work on pytrees shaped like the params: the
    product is zero on leaves that are not perturbed (integer leaves, or leaves a ``mask``
    excludes). With ``batches`` (a list of batches, or a zero-argument callable returning a
    fresh iterable; a tuple batch is unpacked into the operator's ``args``), C is the operator
    of the dataset mean loss: the batch-size-weighted mean of the per-batch operators.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> op = phipsimu.curvature.hessian(lambda p: jnp.sum(p**3))  # ∇²L = diag(6x)
      >>> params = jnp.array([1.0, 2.0])
      >>> op.dense(params).tolist()
      [[6.0, 0.0], [0.0, 12.0]]
      >>> op.matvec(params, jnp.array([1.0, 1.0])).tolist()
      [6.0, 12.0]
      >>> probes = jnp.array([[1.0, 0.0], [1.0, 1.0]])  # vᵢᵀCvᵢ for each row
      >>> op.quadratic_forms(params, probes).tolist()
      [6.0, 18.0]
    """

    def check(self, params: PyTree, args: tuple) -> None:
        """Raise a clear error when the operator cannot be evaluated on ``(params, *args)``."""

    def restrict(self, params: PyTree, perturbed: _tree.Perturbed, args: tuple) -> Restricted:
        """The operator on one batch, restricted to the perturbed leaves."""
        raise NotImplementedError

    def dense_matrix(self, params: PyTree, perturbed: _tree.Perturbed, args: tuple) -> jax.Array:
        """The dense ``(d, d)`` matrix over the perturbed coordinates (``ravel_pytree``
        order), from d matrix-vector products with the identity's columns."""
        flat, unravel = ravel_pytree(_tree.active(params, perturbed))
        mv = self.restrict(params, perturbed, args).matvec
        eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
        return jax.vmap(lambda e: ravel_pytree(mv(unravel(e)))[0])(eye)

    # ------------------------------------------------------------ public, pytree level

    def matvec(
        self, params: PyTree, v: PyTree, *args: Any, batches: Any = None, mask: Any = None
    ) -> PyTree:
        """``C v``, shaped like ``params`` (zero on leaves that are not perturbed).

        Args:
          params: the parameters x.
          v: a pytree shaped like ``params``.
          *args: the operator's data arguments (none with ``batches``).
          batches: sweep a dataset instead (see the class docs); call eagerly then.
          mask: which leaves the operator acts on (a pytree of bools or a callable; None for
            every floating-point leaf).
        """
        _checks.check_flax(params)
        perturbed = _tree.perturbed_leaves(params, mask)
        vs = _tree.active(v, perturbed)
        if batches is None:
            self.check(params, args)
            out = self.restrict(params, perturbed, args).matvec(vs)
        else:
            _check_sweep(batches, args)
            vs1 = [x[None] for x in vs]
            out = dataset_mean(
                lambda *b: _jit_matvecs(self, tuple(perturbed), 1, params, vs1, b), batches
            )
            out = [x[0] for x in out]
        return _tree.unsplit(params, perturbed, out)

    def quadratic_forms(
        self,
        params: PyTree,
        v: PyTree,
        *args: Any,
        batches: Any = None,
        mask: Any = None,
        chunk_size: int | None = None,
    ) -> jax.Array:
        """``vᵢᵀ C vᵢ`` for every probe ``vᵢ`` (the leading axis of every leaf of ``v``).

        ``chunk_size`` probes are evaluated at a time (``vmap`` inside a chunked
        ``lax.map``); None uses :func:`default_chunk`. Other arguments as in :meth:`matvec`.
        """
        _checks.integer("chunk_size", chunk_size, lo=1, allow_none=True)
        _checks.check_flax(params)
        perturbed = _tree.perturbed_leaves(params, mask)
        return bind(self, params, args, batches, perturbed, chunk_size).quad(
            _tree.active(v, perturbed)
        )

    def dense(self, params: PyTree, *args: Any, batches: Any = None, mask: Any = None):
        """The dense ``(d, d)`` matrix over the perturbed coordinates, in ``ravel_pytree``
        order of the perturbed leaves (small d only: d matrix-vector products, d² numbers)."""
        _checks.check_flax(params)
        perturbed = _tree.perturbed_leaves(params, mask)
        return dense(self, params, args, batches, perturbed)


#: What every estimator takes as its first argument: ``loss_fn(params, *args) -> scalar`` (its
#: Hessian is meant) or a curvature :class:`Operator`.
#:
#: Example:
#:   >>> import jax, jax.numpy as jnp, phipsimu
#:   >>> loss = lambda p: jnp.sum(p**2)  # ∇²L = 2I
#:   >>> for c in (loss, phipsimu.curvature.hessian(loss)):  # the same operator
#:   ...     est = phipsimu.hessian_trace(c, num_samples=2)(jnp.ones(3), key=jax.random.key(0))
#:   ...     print(est.value)
#:   6.0
#:   6.0
Curvature = Union[Callable[..., jax.Array], Operator]  # noqa: UP007 (an alias the API reference can name)


def _match_varying(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` typed as varying along every ``shard_map`` axis some leaf of ``like`` varies
    along (values unchanged; ``tree`` itself outside ``shard_map``'s checks)."""
    axes = _parallel.union_axes(like)
    if not axes:
        return tree
    return jax.tree_util.tree_map(lambda x: _parallel.vary_along(x, axes), tree)


def as_operator(loss_fn: Any) -> Operator:
    """An estimator's first argument as an operator: an :class:`Operator` as it is, a loss
    function as its Hessian.

    Raises:
      TypeError: for anything else.
    """
    if isinstance(loss_fn, Operator):
        return loss_fn
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args) or a phipsimu.curvature operator")
    return Hessian(loss_fn)


# ---------------------------------------------------------------- the Hessian


@dataclasses.dataclass(frozen=True)
class Hessian(Operator):
    """``∇²L(x)`` of ``loss_fn(params, *args)``; see :func:`hessian`.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> loss = lambda p, x: 0.5 * jnp.sum((x * p) ** 2)  # ∇²L = diag(x²)
      >>> op = phipsimu.curvature.hessian(loss)
      >>> op == phipsimu.curvature.hessian(loss), op.loss_fn is loss  # frozen, hashable
      (True, True)
      >>> op.dense(jnp.ones(2), jnp.array([1.0, 3.0])).tolist()
      [[1.0, 0.0], [0.0, 9.0]]
    """

    loss_fn: Callable[..., jax.Array]

    def check(self, params: PyTree, args: tuple) -> None:
        _checks.check_scalar_loss(self.loss_fn, params, args)

    def _restricted_loss(self, params, perturbed, args):
        active, merge = _tree.split(params, perturbed)
        return (lambda a: self.loss_fn(merge(a), *args)), active

    def restrict(self, params: PyTree, perturbed: _tree.Perturbed, args: tuple) -> Restricted:
        # The loss L(x) comes out of every product as a by-product (the primal of the inner
        # derivative, at no extra cost) and a non-finite L makes the result NaN: the curvature
        # of a model linear in its params never reads the targets, so a NaN target would
        # otherwise give finite curvature at a NaN loss.
        f, active = self._restricted_loss(params, perturbed, args)

        def grad_and_loss(a: list) -> tuple[list, jax.Array]:
            value, g = jax.value_and_grad(f)(a)
            return g, value

        def matvec(v: list) -> list:
            _, hv, value = jax.jvp(grad_and_loss, (active,), (v,), has_aux=True)
            return nan_unless_finite(value, hv)

        def quad(v: list) -> jax.Array:
            def directional(a: list) -> tuple[jax.Array, jax.Array]:
                value, dv = jax.jvp(f, (a,), (v,))
                return dv, value

            # the primal typed like the probes (under shard_map's checks, probes drawn per
            # device vary where the params do not): JAX's derivative rules combine the two
            # without the casts its array functions insert
            primal = _match_varying(active, v)
            _, q, value = jax.jvp(directional, (primal,), (v,), has_aux=True)
            return nan_unless_finite(value, q)

        return Restricted(matvec, quad)

    def dense_matrix(self, params: PyTree, perturbed: _tree.Perturbed, args: tuple) -> jax.Array:
        f, active = self._restricted_loss(params, perturbed, args)
        flat, unravel = ravel_pytree(active)

        def loss(z: jax.Array) -> tuple[jax.Array, jax.Array]:
            value = f(unravel(z))
            return value, value

        h, value = jax.jacfwd(jax.jacrev(loss, has_aux=True), has_aux=True)(flat)
        return nan_unless_finite(value, h)


def nan_unless_finite(loss: jax.Array, out: Any) -> Any:
    """``out`` (any pytree), or NaN in every entry when ``loss`` is not finite: a product or
    quadratic form at a NaN or infinite loss is not a curvature (``Status.NONFINITE_LOSS``)."""
    finite = jnp.isfinite(loss)
    return jax.tree_util.tree_map(lambda x: jnp.where(finite, x, jnp.nan).astype(x.dtype), out)


def hessian(loss_fn: Callable[..., jax.Array]) -> Hessian:
    """The Hessian ``∇²L(x)`` of ``loss_fn`` with respect to its first argument.

    Products are forward-over-reverse (``jax.jvp`` of ``jax.grad``); quadratic forms
    ``vᵀ∇²Lv`` are second directional derivatives (forward-over-forward, about one gradient
    each). This is what every estimator uses when given a loss function.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.

    Returns:
      a :class:`Hessian` operator (frozen, hashable).

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> h = phipsimu.curvature.hessian(lambda p: jnp.sum(p**3))
      >>> h.matvec(jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0]))
      Array([6., 0.], dtype=float32)
    """
    _checks.function("loss_fn", loss_fn, "loss_fn(params, *args)")
    return Hessian(loss_fn)


def hvp(loss_fn: Callable[..., jax.Array]) -> Callable[..., PyTree]:
    """The Hessian-vector product of ``loss_fn`` with respect to its first argument.

    .. math:: (x, v) \\mapsto \\nabla^2 L(x)\\, v

    Forward-over-reverse (``jax.jvp`` of ``jax.grad``). Leaves of ``params`` that are not
    floating point are not differentiated; the product is zero there. The same as
    ``phipsimu.curvature.hessian(loss_fn).matvec``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.

    Returns:
      ``hvp_fn(params, v, *args) -> Hv``, a pure, jit-able function; ``v`` and ``Hv`` are
      shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> loss = lambda p: jnp.sum(p**3)
      >>> phipsimu.hvp(loss)(jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0]))
      Array([6., 0.], dtype=float32)
    """
    return hessian(loss_fn).matvec


# ---------------------------------------------------------------- Gauss–Newton


@dataclasses.dataclass(frozen=True)
class GaussNewton(Operator):
    """``Jᵀ∇²ℓJ`` for ``loss = output_loss(apply_fn(params, x), *targets)``; see
    :func:`gauss_newton`.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> apply_fn = lambda p, x: (x @ p) ** 2  # fₖ = pₖ² for x = I
      >>> mse = lambda out, y: 0.5 * jnp.sum((out - y) ** 2)
      >>> ggn = phipsimu.curvature.gauss_newton(apply_fn, mse)
      >>> params, x, y = jnp.ones(2), jnp.eye(2), jnp.zeros(2)
      >>> ggn.dense(params, x, y).tolist()  # JᵀJ, J = diag(2pₖ)
      [[4.0, 0.0], [0.0, 4.0]]
      >>> hess = phipsimu.curvature.hessian(lambda p, x, y: mse(apply_fn(p, x), y))
      >>> hess.dense(params, x, y).tolist()  # + Σₖ (fₖ − yₖ)∇²fₖ = 2I: the residual's term
      [[6.0, 0.0], [0.0, 6.0]]
    """

    apply_fn: Callable[..., Any]
    output_loss: Callable[..., jax.Array]

    def check(self, params: PyTree, args: tuple) -> None:
        if len(args) < 1:
            raise ValueError(
                "args: the Gauss-Newton operator is called with (x, *targets), the inputs of "
                "apply_fn(params, x) and the targets of output_loss(outputs, *targets); got none"
            )
        x, *targets = args
        out = jax.eval_shape(self.apply_fn, params, x)
        _checks.check_scalar_loss(
            lambda o, *t: self.output_loss(o, *t), out, tuple(targets), name="output_loss"
        )

    def restrict(self, params: PyTree, perturbed: _tree.Perturbed, args: tuple) -> Restricted:
        x, *targets = args
        active, merge = _tree.split(params, perturbed)
        outputs, jvp = jax.linearize(lambda a: self.apply_fn(merge(a), x), active)
        vjp = jax.linear_transpose(jvp, active)

        def ell(o: PyTree) -> jax.Array:
            return self.output_loss(o, *targets)

        # as for the Hessian, the output loss is a by-product that turns the result NaN when
        # it is not finite (a NaN target leaves Jᵀ∇²ℓJ finite for the squared error)
        def grad_and_loss(o: PyTree) -> tuple[PyTree, jax.Array]:
            value, g = jax.value_and_grad(ell)(o)
            return g, value

        def matvec(v: list) -> list:
            u = jvp(v)
            _, hu, value = jax.jvp(grad_and_loss, (outputs,), (u,), has_aux=True)
            return nan_unless_finite(value, vjp(hu)[0])

        def quad(v: list) -> jax.Array:
            if _parallel.union_axes(v) - _parallel.union_axes(active):
                # probes that vary where the params do not (drawn per device under
                # shard_map's checks) cannot enter the program linearised at the params:
                # one jvp at the params typed like the probes instead
                out, u = jax.jvp(
                    lambda a: self.apply_fn(merge(a), x), (_match_varying(active, v),), (v,)
                )
            else:
                out, u = outputs, jvp(v)

            def directional(o: PyTree) -> tuple[jax.Array, jax.Array]:
                value, du = jax.jvp(ell, (o,), (u,))
                return du, value

            _, q, value = jax.jvp(directional, (out,), (u,), has_aux=True)
            return nan_unless_finite(value, q)

        return Restricted(matvec, quad)


def gauss_newton(
    apply_fn: Callable[..., Any], output_loss: Callable[..., jax.Array]
) -> GaussNewton:
    """The generalised Gauss–Newton matrix ``G = Jᵀ ∇²ℓ J``.

    For ``L(x) = ℓ(f(x; inputs), targets)`` with network outputs ``f = apply_fn(params,
    inputs)`` and ``J = ∂f/∂x``, ``∇²L = Jᵀ∇²ℓJ + Σₖ (∂ℓ/∂fₖ) ∇²fₖ``; G keeps the first term. It
    is positive semi-definite whenever ℓ is convex in the outputs (squared error, softmax
    cross-entropy), so log-determinants and the determinant measure are defined everywhere
    (with damping where G is singular), unlike the Hessian of a network away from a minimum.
    G equals ∇²L when f is linear in x (linear least squares) or at zero residual. For the
    softmax cross-entropy, ``∇²ℓ = diag(p) − ppᵀ`` is the Fisher information of the model's
    categorical distribution, so G is the (true) Fisher information matrix.

    No Jacobian is materialised: ``Gv = Jᵀ(∇²ℓ(Jv))`` is one ``jvp`` of f (linearised once per
    batch), an output-space Hessian-vector product of ℓ and one transpose (``vjp``); the
    quadratic form ``vᵀGv = (Jv)ᵀ∇²ℓ(Jv)`` needs only the ``jvp`` and a forward-over-forward
    second derivative of ℓ in output space.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (any pytree of outputs).
      output_loss: ``output_loss(outputs, *targets) -> scalar``, the loss of the outputs,
        reduced over the batch (e.g. the mean cross-entropy).

    Returns:
      a :class:`GaussNewton` operator (frozen, hashable); estimators given it are called
      with ``args = (inputs, *targets)``, or with ``batches`` of ``(inputs, *targets)``.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> apply_fn = lambda p, x: x @ p
      >>> mse = lambda out, y: 0.5 * jnp.mean((out - y) ** 2)
      >>> ggn = phipsimu.curvature.gauss_newton(apply_fn, mse)
      >>> x, y = jnp.eye(2), jnp.zeros(2)
      >>> ggn.matvec(jnp.ones(2), jnp.array([1.0, 0.0]), x, y)
      Array([0.5, 0. ], dtype=float32)

    Reference: Schraudolph, "Fast curvature matrix-vector products for second-order gradient
    descent", Neural Computation 14(7), 2002; Martens, "New insights and perspectives on the
    natural gradient method", JMLR 21, 2020.
    """
    _checks.function("apply_fn", apply_fn, "apply_fn(params, inputs)")
    _checks.function("output_loss", output_loss, "output_loss(outputs, *targets)")
    return GaussNewton(apply_fn, output_loss)


# ---------------------------------------------------------------- a user's matvec


@dataclasses.dataclass(frozen=True)
class LinearOperator(Operator):
    """A user's symmetric operator given by its matvec; see :func:`linear_operator`.

    Example:
      >>> import jax.numpy as jnp, phipsimu
      >>> hvp = phipsimu.hvp(lambda p: jnp.sum(p**4) / 12)  # ∇²L = diag(x²)
      >>> damped = phipsimu.curvature.linear_operator(lambda p, v: hvp(p, v) + 0.5 * v)
      >>> damped.dense(jnp.array([1.0, 2.0])).tolist()  # ∇²L + 0.5·I
      [[1.5, 0.0], [0.0, 4.5]]
    """

    matvec_fn: Callable[..., PyTree]
    quadratic_form_fn: Callable[..., jax.Array] | None = None

    def restrict(self, params: PyTree, perturbed: _tree.Perturbed, args: tuple) -> Restricted:
        def matvec(v: list) -> list:
            full = _tree.unsplit(params, perturbed, v)
            out = self.matvec_fn(params, full, *args)
            _check_matvec_output(out, full)
            return _tree.active(out, perturbed)

        quadratic_form_fn = self.quadratic_form_fn
        if quadratic_form_fn is None:

            def quad(v: list) -> jax.Array:
                return _tree.vdot(v, matvec(v))

        else:

            def quad(v: list) -> jax.Array:
                full = _tree.unsplit(params, perturbed, v)
                return quadratic_form_fn(params, full, *args)

        return Restricted(matvec, quad)


def _shapes(tree: PyTree) -> str:
    return str(jax.tree_util.tree_map(lambda x: tuple(jnp.shape(x)), tree))


def _check_matvec_output(out: PyTree, v: PyTree) -> None:
    """A user's ``matvec(params, v, *args)`` must return a pytree shaped like ``v`` (the
    params): same structure, same leaf shapes (static, checked while tracing)."""
    want: Any = jax.tree_util.tree_structure(v)
    got: Any = jax.tree_util.tree_structure(out)
    same = got == want and all(
        jnp.shape(a) == jnp.shape(b)
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(v))
    )
    if not same:
        raise ValueError(
            "matvec: must return Cv shaped like params (and v); expected structure "
            f"{want} with leaf shapes {_shapes(v)}, got structure {got} with leaf shapes "
            f"{_shapes(out)}"
        )


def linear_operator(
    matvec: Callable[..., PyTree],
    *,
    quadratic_form: Callable[..., jax.Array] | None = None,
) -> LinearOperator:
    """A curvature operator from your own matrix-vector product (a damped Hessian, an
    empirical Fisher, a preconditioned operator, ...).

    Args:
      matvec: ``matvec(params, v, *args) -> Cv`` with ``v`` and ``Cv`` shaped like
        ``params``; C must be symmetric and linear in v. ``v`` is zero on leaves that are
        not perturbed; ``Cv`` is read on the perturbed leaves only.
      quadratic_form: optional ``quadratic_form(params, v, *args) -> vᵀCv`` when cheaper than
        a product; by default ``vᵀ(Cv)``.

    Returns:
      a :class:`LinearOperator` (frozen, hashable; two built from the same functions are
      equal, so jitted estimators do not recompile).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> op = phipsimu.curvature.linear_operator(lambda p, v: 2.0 * v)
      >>> est = phipsimu.hessian_trace(op, num_samples=4)(jnp.ones(3), key=jax.random.key(0))
      >>> float(est.value)
      6.0
    """
    _checks.function("matvec", matvec, "matvec(params, v, *args)")
    if quadratic_form is not None:
        _checks.function("quadratic_form", quadratic_form, "quadratic_form(params, v, *args)")
    return LinearOperator(matvec, quadratic_form)


# ---------------------------------------------------------------- data parallel


@dataclasses.dataclass(frozen=True)
class DataParallel(Operator):
    """The operator of the global batch from per-device shards; see :func:`data_parallel`.

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p, x: 0.5 * jnp.mean((x @ p) ** 2)  # ∇²L = XᵀX/n
      >>> op = phipsimu.curvature.data_parallel(loss, "data")
      >>> shards = jnp.array([[[1.0, 0.0]], [[0.0, 2.0]]])  # two devices, one row each
      >>> dense = jax.vmap(lambda x: op.dense(jnp.ones(2), x), axis_name="data")(shards)
      >>> dense[0].tolist()  # on every device: the global batch's diag(1, 4)/2
      [[0.5, 0.0], [0.0, 2.0]]
    """

    operator: Operator
    axis_name: str

    def check(self, params: PyTree, args: tuple) -> None:
        _parallel.axis_size(self.axis_name)
        self.operator.check(params, args)

    def restrict(self, params: PyTree, perturbed: _tree.Perturbed, args: tuple) -> Restricted:
        # Params typed as varying: each device differentiates its own shard's loss (under
        # shard_map's checks JAX would otherwise sum the gradient over devices).
        axis = self.axis_name
        local = self.operator.restrict(_parallel.to_varying(params, axis), perturbed, args)

        def matvec(v: list) -> list:
            return jax.lax.pmean(local.matvec(_parallel.to_varying(v, axis)), axis)

        def quad(v: list) -> jax.Array:
            return jax.lax.pmean(local.quad(_parallel.to_varying(v, axis)), axis)

        return Restricted(matvec, quad)

    def dense_matrix(self, params: PyTree, perturbed: _tree.Perturbed, args: tuple) -> jax.Array:
        local = self.operator.dense_matrix(
            _parallel.to_varying(params, self.axis_name), perturbed, args
        )
        return jax.lax.pmean(local, self.axis_name)


def data_parallel(operator: Any, axis_name: str) -> DataParallel:
    """The curvature operator of the global batch when each device holds one shard of it.

    Inside ``jax.pmap`` / ``jax.shard_map`` / ``jax.vmap`` over ``axis_name``, every product
    and quadratic form of ``operator`` on the device's shard is averaged over the axis
    (``pmean``), so an estimator given this operator returns, on every device, its
    single-device answer on the global batch (equal shards; docs/conventions.md, section
    "Scaling out"). The probes are the same on every device (same key). Under plain
    ``jax.jit`` with sharded data no wrapper is needed.

    Args:
      operator: a loss function ``loss_fn(params, *args)`` (its Hessian) or an operator.
      axis_name: the data axis (a str); it must be bound where the estimator runs.

    Returns:
      a :class:`DataParallel` operator (frozen, hashable).

    Example:
      >>> import jax, jax.numpy as jnp, phipsimu
      >>> loss = lambda p, x: jnp.mean((x @ p) ** 2)
      >>> op = phipsimu.curvature.data_parallel(loss, "data")
      >>> est = phipsimu.hessian_trace(op, num_samples=4)
      >>> x = jnp.stack([jnp.eye(3), 2.0 * jnp.eye(3)])  # two devices, three rows each
      >>> out = jax.vmap(lambda xs: est(jnp.ones(3), xs, key=jax.random.key(0)).value,
      ...                axis_name="data")(x)
      >>> [round(float(t), 4) for t in out]  # Tr H of the global batch, (2/6)·(3 + 12)
      [5.0, 5.0]

      (Each shard alone has trace 2 and 8.)
    """
    if not isinstance(axis_name, str):
        raise TypeError(f"axis_name={axis_name!r}: must be a str (the name of the data axis)")
    return DataParallel(as_operator(operator), axis_name)


# ---------------------------------------------------------------- blocks of probes


def matvecs(
    op: Operator,
    params: PyTree,
    perturbed: _tree.Perturbed,
    args: tuple,
    vs: list,
    chunk: int | None,
) -> list:
    """``C vᵢ`` for a block of vectors (perturbed leaves with a leading axis), ``chunk`` at a
    time (None: :func:`default_chunk`; a chunk as large as the block is a plain ``vmap``)."""
    mv = op.restrict(params, perturbed, args).matvec
    return _execution.chunked_map(mv, vs, _execution.chunk_of(chunk, vs))


def quadratic_forms(
    op: Operator,
    params: PyTree,
    perturbed: _tree.Perturbed,
    args: tuple,
    vs: list,
    chunk: int | None,
) -> jax.Array:
    """``vᵢᵀ C vᵢ`` for a block of vectors; under ``vmap`` the primal pass is shared by all
    probes in a chunk. ``chunk`` as in :func:`matvecs`."""
    quad = op.restrict(params, perturbed, args).quad
    return _execution.chunked_map(quad, vs, _execution.chunk_of(chunk, vs))


def forms_of_draws(
    bound: Bound,
    make: Callable[[jax.Array], tuple[list, Any]],
    indices: jax.Array,
    chunk: int | None,
) -> tuple[jax.Array, Any]:
    """``(q, extra)`` with ``q_j = v_jᵀ C v_j`` for the probes ``v_j, extra_j = make(indices[j])``
    (``v_j`` the list of perturbed leaves, ``extra_j`` any per-probe pytree).

    On one batch the probes are made inside the chunk loop, ``chunk`` at a time (None:
    :func:`default_chunk`), so memory holds one chunk of probes, not all of them. A dataset
    sweep makes them all first (each sweep evaluates every probe on one batch)."""
    num = indices.shape[0]
    if bound.one is None:
        vs, extra = jax.vmap(make)(indices)
        return bound.quad(vs), extra
    one = bound.one

    def body(i: jax.Array) -> tuple[jax.Array, Any]:
        v, extra = make(i)
        return one(v), extra

    return _execution.chunked_map(
        body, indices, _execution.chunk_for(chunk, num, _execution.leaf_bytes(bound.active))
    )


_jit_matvecs = jax.jit(
    lambda op, perturbed, chunk, params, vs, args: matvecs(op, params, perturbed, args, vs, chunk),
    static_argnums=(0, 1, 2),
)
_jit_quadratic_forms = jax.jit(
    lambda op, perturbed, chunk, params, vs, args: quadratic_forms(
        op, params, perturbed, args, vs, chunk
    ),
    static_argnums=(0, 1, 2),
)
_jit_dense = jax.jit(
    lambda op, perturbed, params, args: op.dense_matrix(params, perturbed, args),
    static_argnums=(0, 1),
)


# ---------------------------------------------------------------- dataset sweeps
#
# The Hessian of the dataset's mean loss is the batch-size-weighted mean of the batches'
# Hessians (and likewise for Gauss–Newton), so products and quadratic forms are accumulated as
# Σ n_b·C_b v / Σ n_b. The sweep is a Python loop (a data loader is not traceable); the
# per-batch work is jitted once per operator, mask and batch shape (module-level jits).


def check_batches(batches: Any) -> None:
    """Raise a clear error unless ``batches`` can be swept more than once.

    Accepted: a re-iterable collection (list, tuple, any iterable whose ``iter()`` is a fresh
    iterator) or a zero-argument callable returning a fresh iterable (``lambda: loader``).
    """
    if callable(batches):
        return
    try:
        it = iter(batches)
    except TypeError as err:
        raise TypeError(
            f"batches={batches!r}: must be an iterable of batches or a zero-argument callable "
            "that returns one"
        ) from err
    if it is batches:
        raise TypeError(
            f"batches={batches!r}: a one-shot iterator (e.g. a generator) can be swept only "
            "once, but curvature estimators sweep the data once per matrix-vector product; "
            "pass a list, or a zero-argument callable returning a fresh iterable "
            "(e.g. lambda: iter(loader))"
        )


def _check_sweep(batches: Any, args: tuple) -> None:
    if args:
        raise ValueError(
            f"args: with batches=..., every loss_fn argument comes from the batch; got {len(args)} "
            "extra positional argument(s) (close over constants in loss_fn instead)"
        )
    check_batches(batches)


def batch_args(batch: Any) -> tuple:
    """A tuple batch is unpacked into ``loss_fn(params, *batch)``; anything else (a dict, an
    array) is passed as the single argument ``loss_fn(params, batch)``."""
    return batch if isinstance(batch, tuple) else (batch,)


def batch_weight(batch: Any) -> int:
    """The number of examples in ``batch``: the leading dimension of its first array leaf
    with at least one axis."""
    for leaf in jax.tree_util.tree_leaves(batch):
        shape = jnp.shape(leaf)
        if len(shape) >= 1:
            return int(shape[0])
    raise ValueError(
        "batches: a batch has no array with a leading batch axis, so its size (the weight of "
        "its Hessian in the dataset mean) is unknown"
    )


def dataset_mean(fn: Callable[..., Any], batches: Any) -> Any:
    """``Σ_b n_b fn(*batch_b) / Σ_b n_b`` over one sweep of ``batches``.

    With ``fn`` a per-batch product or quadratic form of a loss that is the *mean* over its
    batch, this is the product (quadratic form) of the mean loss over the whole dataset, also
    when the last batch is smaller.

    Raises:
      ValueError: if the sweep yields no batch, or a batch has no examples.
    """
    iterable = batches() if callable(batches) else batches
    total = 0
    acc = None
    for batch in iterable:
        n = batch_weight(batch)
        if n < 1:
            raise ValueError("batches: a batch has leading dimension 0 (no examples)")
        out = fn(*batch_args(batch))
        if acc is None:
            acc = jax.tree_util.tree_map(lambda o, n=n: n * o, out)
        else:
            acc = jax.tree_util.tree_map(lambda a, o, n=n: a + n * o, acc, out)
        total += n
    if acc is None:
        raise ValueError(
            "batches: the iterable yielded no batch; a dataset curvature needs at least one"
        )
    return jax.tree_util.tree_map(lambda a: (a / total).astype(a.dtype), acc)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        del n

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str) -> Any:
    """A tqdm bar over ``total`` dataset sweeps when ``enabled`` and tqdm is installed;
    otherwise a no-op with the same ``update``/``close`` methods (tqdm is optional)."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        import warnings

        warnings.warn("progress=True: tqdm is not installed, no progress bar", stacklevel=3)
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit="sweep")


# ---------------------------------------------------------------- bound operators


class Bound(NamedTuple):
    """An operator bound to params, data and the perturbed leaves: what the Krylov kernels
    and the estimators run on. ``matvec`` and ``quad`` take a block of vectors (perturbed
    leaves with a leading axis). ``host`` is True for a dataset sweep (Python-driven, per-batch
    work jitted), where algorithms run their outer loops in Python; otherwise everything is
    traceable. ``active`` holds the perturbed leaves of the params; ``one`` is the quadratic
    form of a single vector (None for a dataset sweep)."""

    matvec: Callable[[list], list]
    quad: Callable[[list], jax.Array]
    host: bool
    active: list
    one: Callable[[list], jax.Array] | None = None


def bind(
    op: Operator,
    params: PyTree,
    args: tuple,
    batches: Any,
    perturbed: _tree.Perturbed,
    chunk: int | None,
    bar: Any = None,
) -> Bound:
    """``op`` on one batch (``args``) or swept over ``batches`` (then ``args`` must be empty);
    ``bar.update(1)`` after every sweep.

    Raises:
      ValueError / TypeError: no perturbed leaf; a bad loss; args with batches; an empty or
      one-shot batch iterable.
    """
    perturbed = tuple(perturbed)
    active = _tree.active(params, perturbed)
    if not active:
        raise ValueError(
            "params: no leaf is perturbed (no floating-point leaves, or the mask excludes all)"
        )
    if batches is None:
        op.check(params, args)
        return Bound(
            lambda vs: matvecs(op, params, perturbed, args, vs, chunk),
            lambda vs: quadratic_forms(op, params, perturbed, args, vs, chunk),
            False,
            active,
            op.restrict(params, perturbed, args).quad,
        )
    _check_sweep(batches, args)
    bar = _NoProgress() if bar is None else bar

    def matvec(vs: list) -> list:
        out = dataset_mean(lambda *b: _jit_matvecs(op, perturbed, chunk, params, vs, b), batches)
        bar.update(1)
        return out

    def quad(vs: list) -> jax.Array:
        out = dataset_mean(
            lambda *b: _jit_quadratic_forms(op, perturbed, chunk, params, vs, b), batches
        )
        bar.update(1)
        return out

    return Bound(matvec, quad, True, active)


def dense(
    op: Operator, params: PyTree, args: tuple, batches: Any, perturbed: _tree.Perturbed
) -> jax.Array:
    """The dense ``(d, d)`` matrix of ``op`` over the perturbed coordinates, on one batch or
    as the weighted mean over ``batches``."""
    perturbed = tuple(perturbed)
    if batches is None:
        op.check(params, args)
        return op.dense_matrix(params, perturbed, args)
    _check_sweep(batches, args)
    return dataset_mean(lambda *b: _jit_dense(op, perturbed, params, b), batches)


# ---------------------------------------------------------------- the adaptive metric


def metric_probes(params: PyTree, v: PyTree, eta: Any, perturbed: _tree.Perturbed) -> PyTree:
    """Probes in the adaptive metric, ``T_x v`` with ``T_x = |x| + eta`` (ASAM's metric;
    docs/conventions.md, "Adaptive metric"); ``v`` has a leading sample axis. Differentiable
    in ``params``."""
    # Only the perturbed leaves: the others of ``v`` are zeros already, and may sit next to
    # leaves (PRNG keys) that admit no arithmetic.
    vs, merge = _tree.split(v, perturbed)
    t = adaptive_metric(params, eta, perturbed)
    return merge([(vi * ti).astype(vi.dtype) for vi, ti in zip(vs, t)])


def adaptive_metric(params: PyTree, eta: Any, perturbed: _tree.Perturbed) -> list:
    """``T_x = |x| + eta`` on the perturbed leaves, as a list aligned with them (ASAM's
    metric; docs/conventions.md, "Adaptive metric")."""
    return [(jnp.abs(x) + eta).astype(x.dtype) for x in _tree.active(params, perturbed)]


def metric_bound(bound: Bound, params: PyTree, eta: Any, perturbed: _tree.Perturbed) -> Bound:
    """``bound`` in the adaptive metric: the operator ``T_x C T_x`` (``T_x = |x| + eta``)."""
    return congruence(bound, adaptive_metric(params, eta, perturbed))


def congruence(bound: Bound, t: list) -> Bound:
    """The operator ``T C T`` for the diagonal ``T`` given as leaves aligned with the
    perturbed ones (the adaptive metric, or the invariant certificate's ``max(|x|, eps)``)."""

    def scaled(vs: list) -> list:
        return [(v * ti).astype(v.dtype) for v, ti in zip(vs, t)]

    one = bound.one
    return Bound(
        lambda vs: scaled(bound.matvec(scaled(vs))),
        lambda vs: bound.quad(scaled(vs)),
        bound.host,
        bound.active,
        None if one is None else lambda v: one(scaled(v)),
    )
