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
    """A gradient of 300 per coordinate over 1000 coordinates: ‖g‖² = 9·10⁷ overflows float16;
    the SAM step must still move to x + ρg/‖g‖ as in float32, and keep the dtype."""

    def loss(p):
        return jnp.sum(300.0 * p + 0.5 * p.astype(jnp.float32) ** 2).astype(p.dtype) / 100

    outs = []
    for dt in (jnp.float32, dtype):
        p = jnp.full(1000, 1.0, dt)
        tx = phipsimu.sam(rho=50.0)
        u, _ = tx.update(jax.grad(loss)(p), tx.init(p), p, value_fn=loss)
        assert u.dtype == dt
        outs.append(np.asarray(u, np.float32))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-2)
    assert outs[0][0] > 3.0 + 0.5 * 1.0 / 100 * 1.5  # moved: (300 + p + ρ/√d)/100 ≈ 3.0258


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
