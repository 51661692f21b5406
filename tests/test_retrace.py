"""No recompiles: a second eager call of an estimator with the same shapes does not trace the
loss again (it reuses the estimator's compiled program); new shapes do trace again. The loss
counts its own traces (a Python side effect runs only while JAX traces it)."""

import jax
import pytest
from conftest import init_mlp, mlp_loss

import phipsimu

FACTORIES = {
    "sharpness(trace)": lambda f: phipsimu.sharpness(f, phipsimu.measures.trace(), num_samples=8),
    "sharpness(determinant)": lambda f: phipsimu.sharpness(
        f, phipsimu.measures.determinant(), num_samples=8
    ),
    "exact_sharpness(determinant)": lambda f: phipsimu.exact_sharpness(
        f, phipsimu.measures.determinant()
    ),
    "top_eigenvalues": lambda f: phipsimu.top_eigenvalues(f, k=2),
    "hessian_trace": lambda f: phipsimu.hessian_trace(f, num_samples=8),
    "hessian_diagonal": lambda f: phipsimu.hessian_diagonal(f, num_samples=4),
    "spectral_density": lambda f: phipsimu.spectral_density(f, num_samples=2, num_iterations=6),
    "per-layer blocks": lambda f: phipsimu.hessian_trace(
        f, num_samples=4, blocks=phipsimu.layer_blocks
    ),
}


def batch(n):
    return jax.random.normal(jax.random.key(1), (n, 3)), jax.random.normal(
        jax.random.key(2), (n, 2)
    )


@pytest.mark.parametrize("name", list(FACTORIES))
def test_second_eager_call_does_not_trace_again(name):
    traces = []

    def loss(p, x, y):
        traces.append(x.shape)
        return mlp_loss(p, x, y)

    fn = FACTORIES[name](loss)
    params = init_mlp(jax.random.key(0), [3, 4, 2])
    first = fn(params, *batch(6), key=jax.random.key(0))
    assert traces
    count = len(traces)
    second = fn(params, *batch(6), key=jax.random.key(1))
    assert len(traces) == count, f"{name}: traced again for the same shapes"
    jax.tree.map(lambda a, b: a.shape == b.shape or pytest.fail("shapes differ"), first, second)
    fn(params, *batch(7), key=jax.random.key(0))
    assert len(traces) > count  # new shapes: a new program (the counter does count traces)


def test_eager_calls_keep_python_argument_checks():
    est = phipsimu.sharpness(mlp_loss, phipsimu.measures.trace(), num_samples=4)
    params = init_mlp(jax.random.key(0), [3, 4, 2])
    params[0]["b"] = 0.5  # a Python float leaf would never be perturbed
    with pytest.raises(TypeError, match="Python float"):
        est(params, *batch(6), key=jax.random.key(0))
