"""The one calling convention: every estimator takes a loss function or a curvature operator,
and is called as ``(params, *args, key, batches=None)``. Given an operator and swept over
equal batches it gives the one-batch result on the concatenated data; given
``curvature.hessian(loss)`` it gives what the loss gives. (The dataset sweep of the Hessian is
checked estimator by estimator in test_estimate, test_spectral and test_trace; the sweep
machinery is the same for every operator.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_mlp, mlp_apply, mlp_loss, mse, split_batches

import phipsimu
from phipsimu import _curvature, curvature

ESTIMATORS = {
    "sharpness": lambda c: phipsimu.sharpness(c, phipsimu.measures.trace(), num_samples=4),
    "sharpness_determinant": lambda c: phipsimu.sharpness(
        c, phipsimu.measures.determinant(), num_samples=4, check_iterations=4
    ),
    "exact_sharpness": lambda c: phipsimu.exact_sharpness(c, phipsimu.measures.frobenius()),
    "top_eigenvalues": lambda c: phipsimu.top_eigenvalues(c, 2, num_iterations=6),
    "power_iteration": lambda c: phipsimu.power_iteration(c, num_iterations=5),
    "log_determinant": lambda c: phipsimu.log_determinant(
        c, damping=1.0, num_samples=2, num_iterations=4
    ),
    "trace_function": lambda c: phipsimu.trace_function(
        c, jnp.square, num_samples=2, num_iterations=4
    ),
    "spectral_density": lambda c: phipsimu.spectral_density(
        c, num_samples=2, num_iterations=4, grid_size=8
    ),
    "hutchinson": lambda c: phipsimu.hessian_trace(c, num_samples=4),
    "hutch++": lambda c: phipsimu.hessian_trace(c, num_samples=6, method="hutch++"),
    "xtrace": lambda c: phipsimu.hessian_trace(c, num_samples=4, method="xtrace"),
    "hessian_diagonal": lambda c: phipsimu.hessian_diagonal(c, num_samples=3),
}


@pytest.fixture(scope="module")
def data():
    params = init_mlp(jax.random.key(0), [3, 4, 2])
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jax.random.normal(jax.random.key(2), (8, 2))
    return params, x, y, split_batches(x, y, [4, 4])


def _numbers(result):
    """Every array of a result (an Estimate, EigenResult, SpectralDensity), flattened."""
    leaves = jax.tree.leaves(result)  # including the sample counts (arrays once jitted)
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_takes_an_operator_and_batches(data, name):
    params, x, y, batches = data
    fn = ESTIMATORS[name](curvature.gauss_newton(mlp_apply, mse))
    key = jax.random.key(0)
    one = jax.jit(fn)(params, x, y, key=key)
    swept = fn(params, key=key, batches=batches)
    np.testing.assert_allclose(_numbers(swept), _numbers(one), rtol=2e-4, atol=1e-6)


def test_a_loss_means_its_hessian(data):
    params, x, y, _ = data
    assert _curvature.as_operator(mlp_loss) == curvature.hessian(mlp_loss)
    fn = ESTIMATORS["hessian_diagonal"]
    from_loss = fn(mlp_loss)(params, x, y, key=jax.random.key(0))
    from_op = fn(curvature.hessian(mlp_loss))(params, x, y, key=jax.random.key(0))
    np.testing.assert_array_equal(_numbers(from_op), _numbers(from_loss))
