"""Theorem 2 on Example 1, measured: the trace objective's minimiser approaches (1, 1) as ρ
shrinks; the adaptive objective's does not move along Γ.

The objective is minimised with fixed probes (one key), which makes it a deterministic
function. For the trace preset its minimiser on the diagonal solves
(t² − 1)² + 2ρ²t²·c → t² ≈ 1 − ρ² (c ≈ 1 up to the probes' Monte Carlo error), so the
distance to (1, 1) shrinks like ρ², down to the probes' Monte Carlo error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import example1

import phipsimu

pytestmark = pytest.mark.slow  # end to end: `pytest -m slow` (.ci/run runs it)


def minimise(adaptive, rho, start, steps=20_000, lr=0.02):
    obj = phipsimu.sharpness_aware_loss(
        example1,
        phipsimu.measures.trace(),
        rho=rho,
        num_samples=512,
        antithetic=True,
        adaptive=adaptive,
    )
    key = jax.random.key(0)
    grad = jax.grad(lambda x: obj(x, key=key))

    def body(x, _):
        return x - lr * grad(x), None

    x, _ = jax.lax.scan(body, jnp.asarray(start, jnp.float64), None, length=steps)
    return np.asarray(x)


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def test_trace_minimiser_approaches_balanced_point(x64):
    """With fixed probes the objective's ρ → 0 minimiser is the balanced point of the Monte
    Carlo trace Tr(M H), M = mean vvᵀ over the probes: on Γ, ``H = 2 g gᵀ`` with
    ``g = (x₂, x₁)``, so at ``(t, 1/t)`` the trace is ``2(M₁₁/t² + 2M₁₂ + M₂₂t²)``, least at
    ``t⁴ = M₁₁/M₂₂``. That point is (1, 1) up to the probes' error, and the minimiser's
    distance to it shrinks with ρ."""
    # the objective's own draws: same key, same dtype (float64 here), num_samples/2 pairs
    v, _ = phipsimu.mu.sphere().sample(jax.random.key(0), jnp.zeros(2, jnp.float64), 256)
    v = np.asarray(v, np.float64)
    m11, m22 = np.mean(v[:, 0] ** 2), np.mean(v[:, 1] ** 2)
    ratio = m11 / m22  # m11 + m22 = 1: d ratio / d m11 = 4 at m11 = 1/2
    se_ratio = 4 * np.std(v[:, 0] ** 2, ddof=1) / np.sqrt(len(v))
    assert abs(ratio - 1.0) < 4 * se_ratio
    t = ratio**0.25
    dists = []
    for rho in (0.4, 0.2, 0.1):
        x = minimise(False, rho, (2.0, 0.5))
        dists.append(float(np.hypot(x[0] - t, x[1] - 1.0 / t)))
    assert dists[0] > dists[1] > dists[2]
    # t² ≈ t*²(1 − ρ²) to leading order: the distance falls about 4× per halving of ρ
    assert dists[2] < dists[0] / 8


def test_adaptive_minimiser_does_not_move_along_the_manifold(x64):
    for rho in (0.4, 0.1):
        x = minimise(True, rho, (2.0, 0.5))
        # the symmetry's conserved quantity x₁² − x₂² (3.75 at the start) is kept: no drift
        # along Γ; the point only settles across the orbits (x₁x₂ → 1/(1 + 2ρ²))
        assert abs((x[0] ** 2 - x[1] ** 2) / 3.75 - 1.0) < 0.03
        assert abs(x[0] * x[1] - 1.0 / (1.0 + 2.0 * rho**2)) < 0.02
