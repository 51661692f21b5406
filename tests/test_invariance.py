"""Scale invariance (docs/conventions.md, sections "Theorem 1" and "Adaptive metric"): Example 1
along its zero-loss manifold, ReLU MLPs under layer- and neuron-wise rescalings, the symmetry
toolkit, check_invariance, property tests and bad input.

References nobody here wrote: closed forms from docs/conventions.md, dense ``jax.hessian`` with
numpy's ``eigvalsh``/``slogdet``, and 2-D quadrature on a numpy grid. Monte Carlo bounds are 4 of
the estimator's own standard errors with a fixed key. "Same key ⇒ same estimate" checks use rtol
1e-4: float32 rounding of the same probes at x and Dx is ~1e-6 relative.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import example1
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import phipsimu
from phipsimu import Status, symmetries

KS = [1.0, 2.0, 4.0, 10.0]


def on_manifold(k):
    return jnp.array([k, 1.0 / k])


def dense_hessian64(loss, params, *args, transform=None):
    """Dense Hessian in float64 from jax.hessian (the reference for det-type checks), at
    params or, with ``transform``, at transform(params) computed in float64 too (rescaling
    float32 weights rounds them, which breaks L(Dx) = L(x) at the 1e-6 level)."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        if transform is not None:
            p64 = transform(p64)
        a64 = [jnp.asarray(a, jnp.float64) for a in args]
        flat, unravel = ravel_pytree(p64)
        h = jax.hessian(lambda z: loss(unravel(z), *a64))(flat)
        return np.asarray(h), np.asarray(flat)


def quadrature_invariant_gaussian(h, half_width=12.0, step=0.01):
    """∫∫ exp(−½vᵀHv − (v₁v₂)²) dv on a numpy grid (the integrand is smooth and decays at
    least like exp(−c‖v‖²) off the null line and like exp(−s⁴/4) along it)."""
    s = np.arange(-half_width, half_width, step)
    a, b = np.meshgrid(s, s, indexing="ij")
    q = h[0, 0] * a * a + 2 * h[0, 1] * a * b + h[1, 1] * b * b
    return float(np.exp(-0.5 * q - (a * b) ** 2).sum() * step * step)


class TestExample1:
    """L = x₁²x₂² − 2x₁x₂ + 1 along Γ = {(k, 1/k)}: D = diag(k, 1/k) has det 1, L(Dx) = L(x)."""

    def test_trace_and_lambda_max_change_along_the_manifold(self):
        traces, lam_max = [], []
        for k in KS:
            exact = phipsimu.exact_sharpness(example1, phipsimu.measures.trace())(on_manifold(k))
            traces.append(float(exact.value))
            lam_max.append(np.linalg.eigvalsh(dense_hessian64(example1, on_manifold(k))[0])[-1])
        # docs/conventions.md, "Example 1": ½Tr H = x₁² + x₂², and on Γ the eigenvalues of H
        # are (0, 2x₁² + 2x₂²)
        ref = [k**2 + k**-2 for k in KS]
        np.testing.assert_allclose(traces, ref, rtol=1e-5)
        np.testing.assert_allclose(lam_max, 2 * np.array(ref), rtol=1e-10)
        assert np.all(np.diff(traces) > 1.0) and np.all(np.diff(lam_max) > 2.0)
        rep = phipsimu.check_invariance(
            example1,
            phipsimu.measures.trace(),
            on_manifold(1.0),
            lambda x: x * jnp.array([4.0, 0.25]),
            key=jax.random.key(0),
            num_samples=256,
        )
        assert rep.loss_preserved and rep.verdict == "not invariant" and not rep.invariant
        assert float(rep.ratio) > 5.0  # Tr H: 2 at (1,1), 16.06 at (4, ¼)

    def test_determinant_is_invariant_and_zero_on_the_manifold(self):
        for k in KS:
            exact = phipsimu.exact_sharpness(example1, phipsimu.measures.determinant())(
                on_manifold(k)
            )
            assert float(exact.value) == 0.0 and float(exact.log_value) == -np.inf

    @pytest.mark.parametrize(
        ("measure", "ref"),
        [
            # T_x H T_x has eigenvalues (0, 4) on Γ ("Adaptive metric"): Tr/d = 2,
            # (Tr² + 2Tr(H²))/(d(d+2)) = (16 + 32)/8 = 6, ‖·‖_F² = 16.
            (phipsimu.measures.trace(), 2.0),
            (phipsimu.measures.eigen_moment(2), 6.0),
            (phipsimu.measures.frobenius(), 16.0),
        ],
        ids=["trace", "eigen_moment_2", "frobenius"],
    )
    def test_adaptive_measures_do_not_change(self, measure, ref):
        key = jax.random.key(7)
        fn = jax.jit(phipsimu.sharpness(example1, measure, num_samples=2000, adaptive=True))
        ests = [fn(on_manifold(k), key=key) for k in KS]
        for k, est in zip(KS, ests):
            exact = phipsimu.exact_sharpness(example1, measure, adaptive=True)(on_manifold(k))
            np.testing.assert_allclose(exact.value, ref, rtol=1e-4)
            np.testing.assert_allclose(est.value, ests[0].value, rtol=1e-4)  # same key
        assert abs(float(ests[0].value) - ref) < 4 * float(ests[0].stderr)

    def test_invariant_gaussian_is_invariant_finite_and_matches_quadrature(self):
        num = 20_000
        fn = jax.jit(
            phipsimu.sharpness(example1, phipsimu.measures.invariant_gaussian(), num_samples=num)
        )
        ests = {k: fn(on_manifold(k), key=jax.random.key(1)) for k in KS}
        ref = {
            k: quadrature_invariant_gaussian(dense_hessian64(example1, on_manifold(k))[0])
            for k in (1.0, 2.0)
        }
        # docs/conventions.md, "Theorem 1", quotes ≈ 3.40 (importance sampling); quadrature
        # gives 3.3970 at both points
        assert abs(ref[1.0] - 3.400) < 0.005 and abs(ref[2.0] - ref[1.0]) < 1e-6
        for est in ests.values():
            assert np.isfinite(float(est.value)) and np.isfinite(float(est.log_value))
            np.testing.assert_allclose(est.value, ests[1.0].value, rtol=1e-4)
            # S = 1/∫ψ dμ: compare the integral, error by the delta method (se_I = I·se_S/S)
            integral = math.exp(-float(est.log_value))
            se = integral * float(est.stderr / est.value)
            assert 0 < se < 0.01 * integral
            assert abs(integral - ref[1.0]) < 4 * se
            # ESS with the equivariant proposal does not collapse along Γ (measured: 63%)
            assert float(est.ess) > 0.5 * num

    def test_fixed_proposal_collapses_where_the_equivariant_one_does_not(self):
        num = 20_000
        # eps above every |x_i| makes T = eps·I, i.e. the fixed proposal v ~ N(0, I)
        fixed = phipsimu.measures.invariant_gaussian(eps=100.0)
        equi = phipsimu.measures.invariant_gaussian()
        for measure, lo, hi in ((fixed, 0.0, 0.02), (equi, 0.5, 1.0)):
            est = phipsimu.sharpness(example1, measure, num_samples=num)(
                on_manifold(10.0), key=jax.random.key(2)
            )
            assert lo * num < float(est.ess) < hi * num  # fixed: 0.2% of the draws


# ---------------------------------------------------------------- ReLU MLPs


def relu_net(params, x):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer.get("b", 0.0))
    return h @ params[-1]["w"] + params[-1].get("b", 0.0)


def relu_loss(params, x, y):
    return jnp.mean((relu_net(params, x) - y) ** 2)


def init_relu(seed, sizes, bias):
    keys = jax.random.split(jax.random.key(seed), 2 * len(sizes))
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = {"w": jax.random.normal(keys[2 * i], (a, b)) / np.sqrt(a)}
        if bias:
            layer["b"] = 0.3 * jax.random.normal(keys[2 * i + 1], (b,))
        params.append(layer)
    return params


def batch(seed, n_in, n_out, num=16):
    kx, ky = jax.random.split(jax.random.key(100 + seed))
    return jax.random.normal(kx, (num, n_in)), jax.random.normal(ky, (num, n_out))


class TestBiasFreeSquareMLP:
    """3 layers of 3×3 weights, no biases (d = 27): layer rescaling with product 1 multiplies
    each layer's 9 weights by aᵢ, det D = (a₁a₂a₃)⁹ = 1."""

    FACTORS = (3.0, 0.4, 1 / 1.2)

    @pytest.fixture
    def setup(self):
        params = init_relu(0, [3, 3, 3, 3], bias=False)
        x, y = batch(0, 3, 3)
        return params, x, y, (lambda p: symmetries.rescale_layers(p, self.FACTORS))

    def test_volume_preserving_and_det_invariant(self, setup):
        params, x, y, transform = setup
        new = transform(params)
        np.testing.assert_allclose(relu_loss(new, x, y), relu_loss(params, x, y), rtol=1e-6)
        vf = symmetries.volume_factor(params, transform)
        assert abs(float(vf.log_value)) < 1e-5
        h0, x0 = dense_hessian64(relu_loss, params, x, y)
        h1, x1 = dense_hessian64(relu_loss, params, x, y, transform=transform)
        d = x1 / x0
        np.testing.assert_allclose(h1, h0 / np.outer(d, d), rtol=1e-6, atol=1e-10)
        s0, ld0 = np.linalg.slogdet(h0)
        s1, ld1 = np.linalg.slogdet(h1)
        assert s0 == s1 and abs(ld1 - ld0) < 1e-6
        # Away from a minimum this Hessian is indefinite: the determinant *measure*
        # ∫exp(−½vᵀHv)dv diverges, and phipsimu says so with NaN at both points.
        assert np.linalg.eigvalsh(h0)[0] < 0
        det = phipsimu.exact_sharpness(relu_loss, phipsimu.measures.determinant())
        assert np.isnan(float(det(params, x, y).value)) and np.isnan(float(det(new, x, y).value))

    @pytest.mark.parametrize(
        ("measure", "adaptive", "verdict"),
        [
            # H is indefinite here with more negative eigenvalues than groups: the integral
            # is infinite at both points (S = 0), which is not invariance (it said so before
            # the divergent verdict)
            (phipsimu.measures.invariant_gaussian(), False, "divergent"),
            (phipsimu.measures.invariant_gaussian(scale=0.3), False, "divergent"),
            (phipsimu.measures.trace(), True, "invariant"),
            (phipsimu.measures.trace(), False, "not invariant"),
        ],
        ids=["invariant_gaussian", "invariant_gaussian_0.3", "adaptive_trace", "trace"],
    )
    def test_measures(self, setup, measure, adaptive, verdict):
        params, x, y, transform = setup
        rep = phipsimu.check_invariance(
            relu_loss,
            measure,
            params,
            transform,
            x,
            y,
            key=jax.random.key(3),
            num_samples=256,
            adaptive=adaptive,
        )
        assert rep.loss_preserved and rep.verdict == verdict
        assert abs(float(rep.volume_factor.log_value)) < 1e-5
        if verdict == "divergent":
            assert rep.estimate.status & rep.transformed_estimate.status & Status.DIVERGENT
            assert not rep.invariant
        if verdict == "invariant":
            assert abs(float(rep.ratio) - 1.0) < 1e-4
        if measure.name == "trace" and not adaptive:
            # reference: the exact traces differ by far more than the Monte Carlo error
            exact = phipsimu.exact_sharpness(relu_loss, measure)
            ratio = float(exact(transform(params), x, y).value / exact(params, x, y).value)
            assert abs(float(rep.ratio) / ratio - 1) < 0.3 and ratio > 2.0


class TestNeuronRescalingWithBiases:
    """2→3→2 ReLU MLP with biases; hidden unit j: incoming weights and bias × c_j, outgoing
    weights ÷ c_j. det D = ∏ c_j^(fan_in + 1 − fan_out) = ∏ c_j (docs/conventions.md,
    "Theorem 1"), ≠ 1 here."""

    C = np.array([1.7, 0.45, 3.1])

    @pytest.fixture
    def setup(self):
        params = init_relu(3, [2, 3, 2], bias=True)
        x, y = batch(3, 2, 2)
        return params, x, y, (lambda p: symmetries.rescale_neurons(p, 0, jnp.asarray(self.C)))

    def test_loss_and_volume_factor(self, setup):
        params, x, y, transform = setup
        l0, l1 = relu_loss(params, x, y), relu_loss(transform(params), x, y)
        assert abs(float(l1 - l0)) <= 1e-6 * abs(float(l0))
        vf = symmetries.volume_factor(params, transform)
        np.testing.assert_allclose(vf.value, np.prod(self.C ** (2 + 1 - 2)), rtol=1e-5)
        assert abs(float(vf.value) - 1.0) > 1.0

    def test_adaptive_trace_invariant_plain_trace_not(self, setup):
        params, x, y, transform = setup
        kwargs = {"key": jax.random.key(4), "num_samples": 256}
        rep = phipsimu.check_invariance(
            relu_loss, phipsimu.measures.trace(), params, transform, x, y, adaptive=True, **kwargs
        )
        assert rep.verdict == "invariant" and rep.invariant
        rep = phipsimu.check_invariance(
            relu_loss, phipsimu.measures.trace(), params, transform, x, y, **kwargs
        )
        assert rep.verdict == "not invariant"

    def test_determinant_scales_by_volume_factor_to_the_minus_two(self, setup):
        params, x, y, transform = setup
        new = transform(params)
        # Full Hessian, as an algebraic determinant (numpy): det H(Dx) = det H(x) / det(D)².
        vf = symmetries.volume_factor(params, transform)
        h0, _ = dense_hessian64(relu_loss, params, x, y)
        h1, _ = dense_hessian64(relu_loss, params, x, y, transform=transform)
        (s0, ld0), (s1, ld1) = np.linalg.slogdet(h0), np.linalg.slogdet(h1)
        assert s0 == s1
        np.testing.assert_allclose(ld1 - ld0, -2 * float(vf.log_value), rtol=1e-5)
        # The determinant *measure* needs a positive-definite H, which the full Hessian of a
        # ReLU net with ≥ 2 hidden units never is (its continuous symmetries give null or
        # negative directions). Restricted to the first layer (weights and biases, the mask),
        # the network is piecewise linear, so that block of H is the Gauss–Newton matrix:
        # positive definite with enough data. H_SS(Dx) = D_S⁻¹ H_SS(x) D_S⁻¹ still holds, so
        # the measure scales by volume_factor(mask)⁻² with det D_S = ∏ c_j^(fan_in + 1).
        mask = [{"w": True, "b": True}, {"w": False, "b": False}]
        det = phipsimu.exact_sharpness(relu_loss, phipsimu.measures.determinant(mask=mask))
        e0, e1 = det(params, x, y), det(new, x, y)
        assert np.isfinite(float(e0.log_value)) and np.isfinite(float(e1.log_value))
        vf_mask = symmetries.volume_factor(params, transform, mask=mask)
        np.testing.assert_allclose(vf_mask.value, np.prod(self.C ** (2 + 1)), rtol=1e-5)
        np.testing.assert_allclose(
            float(e1.log_value - e0.log_value), -2 * float(vf_mask.log_value), rtol=1e-4
        )


def test_grouped_product_density_on_per_neuron_groups():
    """2→3→2 bias-free: group j = {W₁[:, j], W₂[j, :]} has det c_j^(2−2) = 1 for any c."""
    params = init_relu(5, [2, 3, 2], bias=False)
    x, y = batch(5, 2, 2)
    groups = [{"w": np.tile(np.arange(3), (2, 1))}, {"w": np.tile(np.arange(3)[:, None], (1, 2))}]
    measure = phipsimu.measures.invariant_gaussian(groups=groups)
    rep = phipsimu.check_invariance(
        relu_loss,
        measure,
        params,
        lambda p: symmetries.rescale_neurons(p, 0, jnp.array([2.5, 0.3, 1.7])),
        x,
        y,
        key=jax.random.key(5),
        num_samples=256,
    )
    # H has 5 negative eigenvalues and there are 3 groups: the integral is infinite at both
    # points (S = 0, DIVERGENT); the verdict was "invariant" on the two zeros
    assert abs(float(rep.volume_factor.log_value)) < 1e-5
    assert rep.estimate.status == rep.transformed_estimate.status
    assert rep.estimate.status & Status.DIVERGENT and rep.verdict == "divergent"


# ---------------------------------------------------------------- check_invariance: flags


def test_transform_that_changes_the_loss_is_flagged_loudly():
    with pytest.warns(UserWarning, match="changes the loss"):
        rep = phipsimu.check_invariance(
            example1,
            phipsimu.measures.trace(),
            jnp.array([1.0, 1.0]),
            lambda x: 2.0 * x,
            key=jax.random.key(0),
            num_samples=16,
            adaptive=True,  # T_x H T_x happens to agree here; the verdict must still say no
        )
    assert not rep.loss_preserved and not rep.invariant and rep.verdict == "loss changed"


def test_permutation_has_no_volume_factor_and_nan_is_undefined():
    x = jnp.array([1.0, 0.5])  # off Γ; swapping coordinates preserves Example 1's loss
    rep = phipsimu.check_invariance(
        example1,
        phipsimu.measures.trace(),
        x,
        lambda p: p[::-1],
        key=jax.random.key(0),
        num_samples=64,
    )
    assert rep.loss_preserved and rep.volume_factor is None
    with pytest.raises(ValueError, match="transform: is not a diagonal"):
        symmetries.volume_factor(x, lambda p: p[::-1])
    # indefinite H: the determinant estimate is NaN, never reported as invariant
    rep = phipsimu.check_invariance(
        lambda p: p[0] ** 2 - p[1] ** 2,
        phipsimu.measures.determinant(),
        x,
        lambda p: -p,
        key=jax.random.key(0),
        num_samples=16,
    )
    assert rep.verdict == "undefined" and not rep.invariant


class TestBadInput:
    def test_check_invariance_arguments(self):
        args = (example1, phipsimu.measures.trace(), jnp.ones(2))
        with pytest.raises(ValueError, match=r"eta=-1\.0"):
            phipsimu.check_invariance(*args, lambda p: p, key=jax.random.key(0), eta=-1.0)
        with pytest.raises(TypeError, match="transform"):
            phipsimu.check_invariance(*args, "flip", key=jax.random.key(0))
        with pytest.raises(TypeError, match="key"):
            phipsimu.check_invariance(*args, lambda p: p, key=0)
        with pytest.raises(ValueError, match=r"rtol=0\.0"):
            phipsimu.check_invariance(*args, lambda p: p, key=jax.random.key(0), rtol=0.0)
        with pytest.raises(ValueError, match="transform: changed leaf 0"):
            phipsimu.check_invariance(*args, lambda p: p[:1], key=jax.random.key(0))
        with pytest.raises(ValueError, match="transform: changed the params structure"):
            phipsimu.check_invariance(*args, lambda p: {"x": p}, key=jax.random.key(0))

    def test_rescale_layers(self):
        net = [{"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2))}]
        with pytest.raises(ValueError, match=r"product is 2\.0, must be 1"):
            symmetries.rescale_layers(net, [4.0, 0.5])
        with pytest.raises(ValueError, match="2 layers"):
            symmetries.rescale_layers(net, [1.0])
        with pytest.raises(ValueError, match=r"factors\[0\]=-2.0"):
            symmetries.rescale_layers(net, [-2.0, -0.5])
        with pytest.raises(TypeError, match="params"):
            symmetries.rescale_layers(net[0], [1.0, 1.0])

    def test_rescale_neurons(self):
        net = init_relu(0, [2, 3, 1], bias=True)
        with pytest.raises(ValueError, match="layer=1"):
            symmetries.rescale_neurons(net, 1, 2.0)
        with pytest.raises(ValueError, match="factors: shape"):
            symmetries.rescale_neurons(net, 0, jnp.ones(2))
        with pytest.raises(ValueError, match="factors="):
            symmetries.rescale_neurons(net, 0, jnp.array([1.0, 0.0, 1.0]))
        with pytest.raises(ValueError, match=r'params\[1\]\["w"\]: fan_in'):
            symmetries.rescale_neurons([net[0], {"w": jnp.ones((2, 1))}], 0, 2.0)


# ---------------------------------------------------------------- property tests

_SQUARE_FNS = {}


def _square_fns(measure_name):
    """Jitted estimators built once, so hypothesis examples of equal shapes reuse the
    compilation."""
    if measure_name not in _SQUARE_FNS:
        measure, adaptive = {
            "invariant_gaussian": (phipsimu.measures.invariant_gaussian(), False),
            "adaptive_trace": (phipsimu.measures.trace(), True),
        }[measure_name]
        _SQUARE_FNS[measure_name] = jax.jit(
            phipsimu.sharpness(relu_loss, measure, num_samples=32, adaptive=adaptive)
        )
    return _SQUARE_FNS[measure_name]


@settings(max_examples=12, deadline=None)
@given(
    depth=st.integers(2, 3),
    width=st.integers(2, 3),
    log_factors=st.lists(st.floats(-1.5, 1.5), min_size=2, max_size=2),
    seed=st.integers(0, 1000),
)
def test_property_layer_rescaling_of_random_square_nets(depth, width, log_factors, seed):
    params = init_relu(seed, [width] * (depth + 1), bias=False)
    x, y = batch(seed, width, width)
    logs = [*log_factors[: depth - 1], 0.0]
    logs[-1] = -sum(logs[:-1])  # product 1
    new = symmetries.rescale_layers(params, [math.exp(a) for a in logs])
    np.testing.assert_allclose(relu_loss(new, x, y), relu_loss(params, x, y), rtol=1e-5)
    key = jax.random.key(seed)
    for name in ("invariant_gaussian", "adaptive_trace"):
        e0, e1 = _square_fns(name)(params, x, y, key=key), _square_fns(name)(new, x, y, key=key)
        np.testing.assert_allclose(e1.log_value, e0.log_value, rtol=1e-4, atol=1e-4)


_NEURON_FN = jax.jit(
    phipsimu.sharpness(relu_loss, phipsimu.measures.trace(), num_samples=32, adaptive=True)
)


@settings(max_examples=15, deadline=None)
@given(
    log_c=st.lists(st.floats(-2.0, 2.0), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
)
def test_property_neuron_rescaling_adaptive_trace_and_volume(log_c, seed):
    params = init_relu(seed, [3, 4, 2], bias=True)
    x, y = batch(seed, 3, 2)
    c = np.exp(np.array(log_c))
    transform = lambda p: symmetries.rescale_neurons(p, 0, jnp.asarray(c, jnp.float32))  # noqa: E731
    new = transform(params)
    np.testing.assert_allclose(relu_loss(new, x, y), relu_loss(params, x, y), rtol=1e-5)
    key = jax.random.key(seed)
    np.testing.assert_allclose(
        _NEURON_FN(new, x, y, key=key).value, _NEURON_FN(params, x, y, key=key).value, rtol=1e-4
    )
    vf = symmetries.volume_factor(params, transform)
    np.testing.assert_allclose(vf.log_value, (3 + 1 - 2) * np.sum(log_c), rtol=1e-4, atol=1e-5)
