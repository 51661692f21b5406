"""Low precision: float16/bfloat16 params against float32 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phipsimu

LOW = [jnp.float16, jnp.bfloat16]


@pytest.mark.parametrize("dtype", LOW)
def test_trace_at_large_d_does_not_overflow(dtype):
    """d = 70,000: a float16 squared probe norm overflows (65504); the sphere is normalised in
    float32. Tr(H)/d = 2 exactly for L = Σ p², whatever the probes."""
    est = phipsimu.sharpness(lambda p: jnp.sum(p**2), phipsimu.measures.trace(), num_samples=4)(
        jnp.full(70_000, 0.1, dtype), key=jax.random.key(0)
    )
    np.testing.assert_allclose(float(est.value), 2.0, rtol=1e-2)


@pytest.mark.parametrize("dtype", LOW)
def test_sam_norm_does_not_overflow(dtype):
    """A gradient of 300 per coordinate over 4 coordinates: ‖g‖² = 3.6·10⁵ overflows float16
    (an infinite norm would make ε = 0, a plain gradient step). The SAM gradient at
    x + ρg/‖g‖ is 300 + ρ/√4 per coordinate, as in float32, in the params' dtype."""

    def loss(p):
        return jnp.sum(300.0 * (p - 1) + 0.5 * (p - 1) ** 2)

    moved = []
    for dt in (jnp.float32, dtype):
        p = jnp.ones(4, dt)
        tx = phipsimu.sam(rho=20.0)
        u, _ = tx.update(jax.grad(loss)(p), tx.init(p), p, value_fn=loss)
        assert u.dtype == dt
        moved.append(np.asarray(u, np.float32) - 300.0)
    np.testing.assert_allclose(moved[0], 10.0, rtol=1e-3)
    np.testing.assert_allclose(moved[1], moved[0], rtol=0.05)


@pytest.mark.parametrize("dtype", LOW)
def test_eq10_gradient_at_small_rho_does_not_overflow(dtype):
    """At ρ = 0.004 the factor 2/ρ² = 1.25·10⁵ exceeds float16's range: the gradient of the
    eq. 10 loss must not pass it through the loss's backward pass. For the trace preset the
    gradient is ∇L(x) + (2/m)Σ(∇L(x + ρv_i) − ∇L(x)); it matches float32 to the dtype's
    precision and keeps the params' dtype."""

    def loss(p):
        return 0.5 * jnp.sum(jnp.asarray([1.0, 2.0, 3.0], p.dtype) * p**2)

    obj = phipsimu.sharpness_aware_loss(loss, phipsimu.measures.trace(), rho=0.004, num_samples=4)
    grads = []
    for dt in (jnp.float32, dtype):
        g = jax.grad(obj)(jnp.asarray([2.0, -1.0, 0.5], dt), key=jax.random.key(0))
        assert g.dtype == dt
        grads.append(np.asarray(g, np.float32))
    assert np.all(np.isfinite(grads[1]))
    np.testing.assert_allclose(grads[1], grads[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", LOW)
def test_dense_and_determinant_paths_upcast(dtype):
    a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))

    def loss(p):
        return 0.5 * p @ (a.astype(p.dtype) @ p)

    p = jnp.ones(3, dtype)
    exact = phipsimu.exact_sharpness(loss, phipsimu.measures.determinant())(p)
    np.testing.assert_allclose(float(exact.value), 6.0, rtol=1e-2)
    top = phipsimu.top_eigenvalues(loss, k=1, num_iterations=3)(p, key=jax.random.key(0))
    np.testing.assert_allclose(float(top[0][0]), 3.0, rtol=2e-2)
    mc = phipsimu.sharpness(loss, phipsimu.measures.determinant(), num_samples=8)(
        p, key=jax.random.key(0)
    )
    assert np.isfinite(float(mc.log_value))
