"""Measure triples, the shared reduction, and the presets' spectral closed forms.

The closed forms are checked against formulas computed here with numpy (docs/conventions.md, section
"Table 1 presets"), so the references are not our own code.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import phipsimu
from phipsimu import _measure


def sphere_moment_reference(a: np.ndarray, n: int) -> float:
    """E_sphere[(vᵀAv)ⁿ] for n = 1, 2, 3 from the Gaussian moments ("Table 1 presets")."""
    d = a.shape[0]
    t1, t2, t3 = (np.trace(np.linalg.matrix_power(a, k)) for k in (1, 2, 3))
    gauss = {1: t1, 2: t1**2 + 2 * t2, 3: t1**3 + 6 * t1 * t2 + 8 * t3}[n]
    return gauss / math.prod(d + 2 * j for j in range(n))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sphere_moment_closed_form(n):
    rng = np.random.default_rng(n)
    b = rng.normal(size=(5, 5))
    a = b + b.T  # symmetric, indefinite
    eigs = jnp.asarray(np.linalg.eigvalsh(a))
    np.testing.assert_allclose(
        _measure.sphere_moment(eigs, n), sphere_moment_reference(a, n), rtol=1e-5
    )


def test_sphere_moment_against_monte_carlo_on_the_sphere():
    """E_sphere[(vᵀHv)²] = (Tr² + 2Tr(H²))/(d(d+2)) checked by plain numpy MC (4 SE)."""
    rng = np.random.default_rng(0)
    a = np.diag(rng.uniform(0.5, 3.0, 4))
    g = rng.normal(size=(200_000, 4))
    v = g / np.linalg.norm(g, axis=1, keepdims=True)
    q2 = np.einsum("ij,jk,ik->i", v, a, v) ** 2
    se = q2.std(ddof=1) / math.sqrt(len(q2))
    assert abs(q2.mean() - sphere_moment_reference(a, 2)) < 4 * se


def test_presets_are_hashable_and_equal_when_rebuilt():
    for factory in (
        phipsimu.measures.trace,
        phipsimu.measures.determinant,
        phipsimu.measures.frobenius,
        lambda: phipsimu.measures.eigen_moment(2),
    ):
        assert factory() == factory()
        hash(factory())


def test_measure_validation():
    with pytest.raises(TypeError, match="mu"):
        phipsimu.Measure(lambda t: t, lambda t: t, "sphere")
    with pytest.raises(TypeError, match="phi"):
        phipsimu.Measure(1.0, lambda t: t, phipsimu.mu.sphere())
    with pytest.raises(ValueError, match="log_psi"):
        phipsimu.Measure(lambda t: t, lambda t: t, phipsimu.mu.sphere(), log_psi=jnp.log)
    with pytest.raises(ValueError, match="n=0"):
        phipsimu.measures.eigen_moment(0)
    with pytest.raises(ValueError, match=r"n=1\.5"):
        phipsimu.measures.eigen_moment(1.5)


def test_reduce_linear_path_stderr_is_delta_method():
    """φ(t) = t²: stderr = |2ȳ|·sd(y)/√m."""
    measure = phipsimu.Measure(lambda t: t**2, lambda t: t, phipsimu.mu.sphere())
    t = jnp.array([1.0, 2.0, 3.0, 6.0])
    r = _measure.reduce(measure, t, jnp.zeros(4), d=4)
    mean = 3.0
    np.testing.assert_allclose(r.value, mean**2)
    np.testing.assert_allclose(r.stderr, 2 * mean * np.std(t, ddof=1) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(r.ess, 4.0, rtol=1e-6)


def test_reduce_log_space_matches_linear_path():
    """The determinant's log-space reduction equals φ(mean w ψ) computed directly."""
    det = phipsimu.measures.determinant()
    t = jnp.array([0.5, 1.0, 2.0], jnp.float32)
    lw = jnp.array([0.1, -0.3, 0.7], jnp.float32)
    r = _measure.reduce(det, t, lw, d=3)
    direct = (2 * np.pi) ** 3 / np.mean(np.exp(lw) * np.exp(-t / 2)) ** 2
    np.testing.assert_allclose(r.value, direct, rtol=1e-5)
    np.testing.assert_allclose(r.log_value, np.log(direct), rtol=1e-5)


def test_determinant_log_space_does_not_overflow():
    """d = 2000: (2π)^d overflows float32, log_value stays finite and exact."""
    det = phipsimu.measures.determinant()
    t = jnp.full((4,), 2000.0)
    lw = 1000.0 * jnp.log(2 * jnp.pi) + jnp.full((4,), 1000.0)
    r = _measure.reduce(det, t, lw, d=2000)
    # mean w ψ = (2π)^1000 e^1000 e^-1000 → log S = 2000 log 2π − 2·1000 log 2π = 0
    np.testing.assert_allclose(r.log_value, 0.0, atol=1e-2)
    assert np.isfinite(r.log_value)


def test_determinant_spectral_meaning():
    log_spec = phipsimu.measures.determinant().log_spectral
    assert float(log_spec(jnp.array([1.0, 2.0]))) == pytest.approx(math.log(2.0))
    assert float(log_spec(jnp.array([0.0, 2.0]))) == -np.inf
    assert np.isnan(float(log_spec(jnp.array([-1.0, 2.0]))))
