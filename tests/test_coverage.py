"""Every preset is right within its stderr, or says it is not: over 200 fixed keys the
estimate covers an independent dense NumPy/SciPy reference (float64) within 1.96 stderr on
at least 90% of keys, or its status flags it. The nominal rate is 95%; with 200 keys the
binomial sd is 1.5%, so 90% is 3.2 sd below it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from conftest import init_mlp, mlp_apply, random_spd

import phipsimu
from phipsimu import Status

pytestmark = pytest.mark.slow  # end to end: `pytest -m slow` (.ci/run runs it)

KEYS = 200
MIN_COVERAGE = 0.90


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _quadratic(a):
    a = jnp.asarray(a, jnp.float64)
    return lambda x: 0.5 * x @ a @ x, jnp.ones(a.shape[0], jnp.float64)


def _estimates(loss, x, measure, num_samples, **kw):
    fn = phipsimu.sharpness(loss, measure, num_samples=num_samples, **kw)
    keys = jax.random.split(jax.random.key(12), KEYS)
    return jax.jit(jax.vmap(lambda k: fn(x, key=k)))(keys)


def _covered(est, exact, log=False):
    if log:  # the determinant: its stderr in log space is stderr/value
        err, se = np.asarray(est.log_value) - exact, np.asarray(est.stderr / est.value)
    else:
        err, se = np.asarray(est.value) - exact, np.asarray(est.stderr)
    return np.abs(err) <= 1.96 * se


def _sphere_moment(h, n):
    """E_sphere[(vᵀHv)ⁿ] for n = 1, 2, 3 from the Gaussian moments of gᵀHg (Isserlis)."""
    d = h.shape[0]
    t1, t2, t3 = (np.trace(np.linalg.matrix_power(h, k)) for k in (1, 2, 3))
    gauss = {1: t1, 2: t1**2 + 2 * t2, 3: t1**3 + 6 * t1 * t2 + 8 * t3}[n]
    return gauss / np.prod([d + 2 * j for j in range(n)])


H = random_spd(3, 6, low=0.3, high=4.0)
H_INDEFINITE = H - 1.5 * np.eye(6)


@pytest.mark.parametrize(
    ("name", "measure", "h", "exact", "num"),
    [
        ("trace", phipsimu.measures.trace(), H_INDEFINITE, np.trace(H_INDEFINITE) / 6, 64),
        ("eigen_moment_2", phipsimu.measures.eigen_moment(2), H, _sphere_moment(H, 2), 64),
        ("eigen_moment_3", phipsimu.measures.eigen_moment(3), H, _sphere_moment(H, 3), 256),
        ("frobenius", phipsimu.measures.frobenius(), H_INDEFINITE, np.sum(H_INDEFINITE**2), 256),
    ],
)
def test_linear_presets_cover_the_dense_reference(name, measure, h, exact, num):
    loss, x = _quadratic(h)
    est = _estimates(loss, x, measure, num)
    covered = _covered(est, exact) | (np.asarray(est.status) != 0)
    assert covered.mean() >= MIN_COVERAGE, (name, covered.mean())


@pytest.mark.parametrize(
    "diag",
    [
        [0.5, 1.0, 1.5, 2.0, 3.0],
        [0.2, 1.0, 1.0, 1.0, 1.0],  # ill-conditioned: s = 1/sqrt(mean λ) had coverage 0.66
    ],
)
def test_determinant_with_the_default_scale_covers_log_det(diag):
    loss, x = _quadratic(np.diag(diag))
    est = _estimates(loss, x, phipsimu.measures.determinant(), 1000)
    covered = _covered(est, np.sum(np.log(diag)), log=True)
    assert covered.mean() >= MIN_COVERAGE
    assert np.all(np.asarray(est.status) == 0)


def test_determinant_with_a_too_narrow_scale_is_flagged():
    # s² = 1/0.84 <= 1/(2·0.2): the weights have infinite variance and the stderr is too
    # small (coverage about 0.66); every key must say so
    diag = [0.2, 1.0, 1.0, 1.0, 1.0]
    loss, x = _quadratic(np.diag(diag))
    est = _estimates(loss, x, phipsimu.measures.determinant(scale=0.84**-0.5), 1000)
    status = np.asarray(est.status)
    covered = _covered(est, np.sum(np.log(diag)), log=True)
    assert np.all(status & Status.INFINITE_VARIANCE)
    assert (covered | (status != 0)).mean() >= MIN_COVERAGE


def _example1(x):
    return (x[0] * x[1] - 1.0) ** 2


def _example1_integral(x):
    """∫ exp(−½vᵀHv − (v₁v₂)²) dv by 2-D quadrature on the dense Hessian."""
    h = np.asarray(jax.hessian(_example1)(jnp.asarray(x)), np.float64)

    def f(v2, v1):
        v = np.array([v1, v2])
        return np.exp(-0.5 * v @ h @ v - (v1 * v2) ** 2)

    value, _ = scipy.integrate.dblquad(f, -12, 12, -12, 12, epsabs=1e-10)
    return value


def test_invariant_gaussian_covers_the_quadrature_reference():
    x = jnp.array([2.0, 0.5])
    exact = 1.0 / _example1_integral(x)
    fn = phipsimu.sharpness(_example1, phipsimu.measures.invariant_gaussian(), num_samples=256)
    keys = jax.random.split(jax.random.key(3), KEYS)
    est = jax.jit(jax.vmap(lambda k: fn(x, key=k)))(keys)
    assert _covered(est, exact).mean() >= MIN_COVERAGE


def _tanh_mlp():
    kx, ky, kp = jax.random.split(jax.random.key(7), 3)
    x, y = jax.random.normal(kx, (64, 4)), jax.random.normal(ky, (64, 3))
    params = init_mlp(kp, [4, 10, 6, 3])
    return (lambda p, x, y: jnp.mean((mlp_apply(p, x) - y) ** 2)), params, x, y


def _gaussian_moment(h, n):
    """E[(gᵀHg)ⁿ], n <= 4, from the cumulants κ = (t₁, 2t₂, 8t₃, 48t₄), tₖ = Tr(Hᵏ)."""
    t1, t2, t3, t4 = (np.trace(np.linalg.matrix_power(h, k)) for k in (1, 2, 3, 4))
    return {1: t1, 4: t1**4 + 12 * t1**2 * t2 + 32 * t1 * t3 + 12 * t2**2 + 48 * t4}[n]


@pytest.mark.parametrize("num_samples", [64, 256])
@pytest.mark.parametrize("n", [1, 4])
def test_per_key_flags_on_a_tanh_mlp(num_samples, n):
    """Issue 27: on a tanh MLP 4-10-6-3 (d = 137), eigen_moment(4) covered 0.82 at m = 64 and
    its flags (k̂ > 0.7) marked the wrong keys: unflagged keys covered 0.75. Over 400 keys
    (binomial sd 0.011 at 0.95), covered-or-flagged >= 0.93 and, where at least 50 keys are
    left unflagged, those cover >= 0.93."""
    with jax.enable_x64(False):
        loss, params, x, y = _tanh_mlp()
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        h = np.asarray(jax.hessian(lambda z: loss(unravel(z), x, y))(flat), np.float64)
        d = h.shape[0]
        exact = _gaussian_moment(h, n) / np.prod([d + 2 * j for j in range(n)])
        measure = phipsimu.measures.eigen_moment(n)
        fn = phipsimu.sharpness(loss, measure, num_samples=num_samples)
        keys = jax.random.split(jax.random.key(12), 400)
        est = jax.jit(jax.vmap(lambda k: fn(params, x, y, key=k)))(keys)
    covered = _covered(est, exact)
    flagged = np.asarray(est.status) != 0
    assert (covered | flagged).mean() >= 0.93, (covered.mean(), flagged.mean())
    if (~flagged).sum() >= 50:
        assert covered[~flagged].mean() >= 0.93, (covered[~flagged].mean(), (~flagged).sum())
