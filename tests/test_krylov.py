"""The Krylov kernels on a bound operator, against numpy: Lanczos builds an orthonormal basis
with ``T = QᵀAQ`` (also after breakdown), and the definiteness certificate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_spd

import phipsimu
from phipsimu import _curvature, _krylov, curvature


def _bound(a: np.ndarray):
    """``A`` as a bound operator on a flat vector of size d."""
    mat = jnp.asarray(a, jnp.float32)
    op = curvature.linear_operator(lambda p, v: mat @ v)
    params = jnp.zeros(a.shape[0])
    return _curvature.bind(op, params, (), None, (True,), 1), params


def test_lanczos_basis_is_orthonormal_and_tridiagonalises():
    a = random_spd(2, 12, -1.0, 3.0)
    bound, _ = _bound(a)
    v0 = [jax.random.normal(jax.random.key(0), (1, 12))]
    s = jax.jit(lambda v: _krylov.lanczos(bound, v, 8))(v0)
    q = np.asarray(s.basis[0][0, :8], np.float64)  # rows q_0..q_7
    np.testing.assert_allclose(q @ q.T, np.eye(8), atol=1e-5)
    t = np.asarray(_krylov.tridiagonal(s.alpha[0], s.beta[0]), np.float64)
    np.testing.assert_allclose(q @ a @ q.T, t, atol=1e-4)
    theta, _ = _krylov.ritz(s)
    lam = np.linalg.eigvalsh(a)
    assert lam[0] - 1e-5 <= float(theta[0]) and float(theta[-1]) <= lam[-1] + 1e-5


def test_lanczos_breakdown_gives_exact_eigenvalues():
    """H = I + e₁e₁ᵀ has two distinct eigenvalues: the Krylov space is invariant after two
    steps and Lanczos restarts; Ritz values must stay inside the spectrum {1, 2}."""

    def loss(p):
        return 0.5 * jnp.sum(p**2) + 0.5 * p[0] ** 2

    eig = phipsimu.top_eigenvalues(loss, 3, num_iterations=6)(jnp.ones(6), key=jax.random.key(0))
    np.testing.assert_allclose(eig.value, [2.0, 1.0, 1.0], rtol=1e-6)
    logdet = phipsimu.log_determinant(loss, num_samples=3, num_iterations=6)(
        jnp.ones(6), key=jax.random.key(0)
    )
    np.testing.assert_allclose(logdet.value, np.log(2.0), rtol=1e-5)


@pytest.mark.parametrize(
    ("diag", "indefinite", "singular"),
    [([1.0, 2.0, 3.0, 4.0], False, False), ([0.0, 2.0, 3.0, 4.0], False, True),
     ([-0.5, 2.0, 3.0, 4.0], True, False)],
)  # fmt: skip
def test_definiteness_certificate(diag, indefinite, singular):
    bound, _ = _bound(np.diag(diag))
    v0 = [jnp.ones((1, 4))]
    got = _krylov.definiteness(bound, v0, 4, jnp.float32)
    assert (bool(got[0]), bool(got[1])) == (indefinite, singular)


def test_power_iteration_kernel_converges_to_the_dominant_pair():
    a = np.diag([3.0, 1.0, 0.5, 0.2])
    bound, _ = _bound(a)
    s = _krylov.power(bound, [jnp.ones((1, 4))], 40)
    np.testing.assert_allclose(s.theta, [3.0], rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.asarray(s.vector[0][0])), [1, 0, 0, 0], atol=1e-6)
    assert phipsimu.power_iteration  # the estimator front-end lives in _spectral
