"""product_density (Theorem 1) and its equivariant proposal: exact log-weights against scipy,
known integrals, sample-by-sample equivariance, groups, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

import phipsimu


def gauss_log_f(sign, log_abs):
    return -jnp.exp(2.0 * log_abs)  # f(t) = exp(−t²)


def flat(v, num):
    return np.concatenate(
        [np.reshape(np.asarray(x, np.float64), (num, -1)) for x in jax.tree_util.tree_leaves(v)],
        axis=1,
    )


def test_log_weight_is_log_f_of_products_minus_proposal_log_density():
    """log(dμ/dq)(v) = Σ_g log f(∏_g v) − log q(v), q = N(0, σ² diag(T/gm)²) from scipy, the
    products taken of v itself (so the Jacobian and ∏v = σ^n ∏z are checked, not assumed)."""
    with jax.enable_x64(True):
        params = {"a": jnp.array([3.0, 0.5, -2.0]), "b": jnp.array([[0.1, 4.0]])}
        groups = {"a": np.array([0, 0, 1]), "b": np.array([[1, 7]])}
        sigma, num = 0.8, 50
        mu = phipsimu.mu.product_density(gauss_log_f, scale=sigma, groups=groups)
        v, log_w = mu.sample(jax.random.key(0), params, num)
        x = np.abs(np.r_[3.0, 0.5, -2.0, 0.1, 4.0])
        gid = np.r_[0, 0, 1, 1, 7]
        rel = np.empty(5)
        for g in np.unique(gid):
            rel[gid == g] = x[gid == g] / np.exp(np.mean(np.log(x[gid == g])))
        vf = flat(v, num)
        log_q = scipy.stats.multivariate_normal(np.zeros(5), np.diag((sigma * rel) ** 2)).logpdf(vf)
        log_f = sum(-(np.prod(vf[:, gid == g], axis=1) ** 2) for g in np.unique(gid))
        np.testing.assert_allclose(log_w, log_f - log_q, rtol=1e-10)


@pytest.mark.parametrize("x", [[3.0], [0.01], [-7.0]])
def test_one_dimensional_integral(x):
    # d = 1: ∫ exp(−v²) dv = √π whatever x is (the proposal is N(0, σ²) since T/gm = 1)
    mu = phipsimu.mu.product_density(gauss_log_f, scale=0.7)
    _, log_w = mu.sample(jax.random.key(1), jnp.array(x), 4000)
    w = np.exp(np.asarray(log_w, np.float64))
    assert abs(w.mean() - math.sqrt(math.pi)) < 4 * w.std(ddof=1) / math.sqrt(w.size)


def test_groups_of_one_give_a_product_of_one_dimensional_integrals():
    # groups {0}, {1}: μ = exp(−v₁²)exp(−v₂²) dv, total mass π
    mu = phipsimu.mu.product_density(gauss_log_f, groups=jnp.array([0, 1]))
    _, log_w = mu.sample(jax.random.key(2), jnp.array([5.0, 0.1]), 4000)
    w = np.exp(np.asarray(log_w, np.float64))
    assert abs(w.mean() - math.pi) < 4 * w.std(ddof=1) / math.sqrt(w.size)


def test_equivariance_same_key_under_det_one_rescaling():
    params = {"a": jnp.array([1.5, -0.3, 2.0]), "b": jnp.array(0.7)}
    d = {"a": jnp.array([4.0, 0.5, 0.25]), "b": jnp.array(2.0)}  # det D = 1
    mu = phipsimu.mu.product_density(gauss_log_f, scale=1.3)
    v0, w0 = mu.sample(jax.random.key(3), params, 20)
    v1, w1 = mu.sample(jax.random.key(3), jax.tree_util.tree_map(jnp.multiply, d, params), 20)
    np.testing.assert_array_equal(w0, w1)  # the weights depend on the key only
    dv0 = jax.tree_util.tree_map(jnp.multiply, d, v0)
    for a, b in zip(jax.tree_util.tree_leaves(dv0), jax.tree_util.tree_leaves(v1)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_groups_need_det_one_within_each_group():
    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    d_groupwise = jnp.array([2.0, 0.5, 3.0, 1 / 3])  # det 1 in {0,1} and in {2,3}
    d_global = jnp.array([2.0, 2.0, 0.5, 0.5])  # det 1 overall only
    mu = phipsimu.mu.product_density(gauss_log_f, groups=np.array([0, 0, 1, 1]))
    v0, _ = mu.sample(jax.random.key(4), x, 10)
    v1, _ = mu.sample(jax.random.key(4), d_groupwise * x, 10)
    np.testing.assert_allclose(d_groupwise * v0, v1, rtol=1e-5)
    v2, _ = mu.sample(jax.random.key(4), d_global * x, 10)
    assert not np.allclose(d_global * v0, v2, rtol=1e-2)
    # one group: the global rescaling is a symmetry of the proposal too
    single = phipsimu.mu.product_density(gauss_log_f)
    u0, _ = single.sample(jax.random.key(4), x, 10)
    u2, _ = single.sample(jax.random.key(4), d_global * x, 10)
    np.testing.assert_allclose(d_global * u0, u2, rtol=1e-5)


def test_floor_eps_keeps_zeros_finite_and_large_eps_is_a_fixed_proposal():
    x = jnp.array([0.0, 2.0, 0.5])
    v, log_w = phipsimu.mu.product_density(gauss_log_f).sample(jax.random.key(5), x, 8)
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(log_w))
    # eps above every |x_i|: T = eps·1, gm = eps, v = σz whatever x is
    fixed = phipsimu.mu.product_density(gauss_log_f, eps=100.0)
    g, _ = phipsimu.mu.gaussian().sample(jax.random.key(5), x, 8)
    np.testing.assert_allclose(fixed.sample(jax.random.key(5), x, 8)[0], g, rtol=1e-6)


def test_mask_int_leaves_jit_and_hashable():
    params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.5]), "step": jnp.array(3)}
    groups = {"w": 0, "b": 1, "step": 0}
    mu = phipsimu.mu.product_density(
        gauss_log_f, groups=groups, mask={"w": True, "b": False, "step": False}
    )
    assert mu.dim(params) == 2
    v, log_w = mu.sample(jax.random.key(6), params, 4)
    assert not np.any(v["b"]) and not np.any(v["step"]) and v["step"].dtype == jnp.int32
    v_jit, log_w_jit = jax.jit(lambda k, p: mu.sample(k, p, 4))(jax.random.key(6), params)
    np.testing.assert_allclose(v_jit["w"], v["w"], rtol=1e-6)
    np.testing.assert_allclose(log_w_jit, log_w, rtol=1e-6)
    same = phipsimu.mu.product_density(
        gauss_log_f, groups=groups, mask={"w": True, "b": False, "step": False}
    )
    assert mu == same and hash(mu) == hash(same)


def test_invariant_gaussian_presets_compare_equal():
    assert phipsimu.measures.invariant_gaussian() == phipsimu.measures.invariant_gaussian()
    assert phipsimu.measures.invariant_gaussian(scale=2.0) != phipsimu.measures.invariant_gaussian()


class TestBadInput:
    @pytest.mark.parametrize(
        ("log_f", "error", "match"),
        [
            ("exp", TypeError, "log_f='exp': must be a callable"),
            (lambda s, la: jnp.nan * la, ValueError, "log_f=.*non-finite"),
            (lambda s, la: jnp.where(s > 0, jnp.inf, 0.0), ValueError, "log_f=.*non-finite"),
            (lambda s, la: jnp.full((), -jnp.inf), ValueError, "log_f=.*-inf"),
            (lambda s, la: jnp.stack([s, la]), ValueError, "log_f=.*one scalar"),
            (lambda s: s, TypeError, "log_f=.*probes failed"),
        ],
    )
    def test_log_f(self, log_f, error, match):
        with pytest.raises(error, match=match):
            phipsimu.mu.product_density(log_f)

    def test_log_f_minus_inf_where_f_vanishes_is_allowed(self):
        positive_only = lambda s, la: jnp.where(s > 0, -jnp.exp(2 * la), -jnp.inf)  # noqa: E731
        phipsimu.mu.product_density(positive_only)

    @pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"eps": -1.0}, {"eps": float("nan")}])
    def test_scale_and_eps(self, kwargs):
        (name,) = kwargs
        with pytest.raises(ValueError, match=f"{name}="):
            phipsimu.mu.product_density(gauss_log_f, **kwargs)

    def test_groups_not_ints(self):
        with pytest.raises(ValueError, match="groups"):
            phipsimu.mu.product_density(gauss_log_f, groups={"a": jnp.zeros(2)})

    def test_groups_structure_mismatch(self):
        mu = phipsimu.mu.product_density(gauss_log_f, groups={"a": 0})
        with pytest.raises(ValueError, match="groups: its structure"):
            mu.sample(jax.random.key(0), {"a": jnp.ones(2), "b": jnp.ones(1)}, 2)

    def test_groups_leaf_shape_mismatch(self):
        mu = phipsimu.mu.product_density(gauss_log_f, groups={"a": np.array([0, 1, 1])})
        with pytest.raises(ValueError, match="groups: leaf 0 has shape"):
            mu.sample(jax.random.key(0), {"a": jnp.ones(2)}, 2)


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    num_groups=st.integers(1, 3),
    seed=st.integers(0, 2**30),
)
def test_property_equivariance_under_random_groupwise_det_one_rescalings(sizes, num_groups, seed):
    rng = np.random.default_rng(seed)
    params = {
        f"p{i}": jnp.asarray(rng.uniform(0.1, 3.0, n) * rng.choice([-1, 1], n), jnp.float32)
        for i, n in enumerate(sizes)
    }
    groups = {k: rng.integers(0, num_groups, x.shape) for k, x in params.items()}
    # a random positive rescaling with det 1 in every group: log-factors centred per group
    logs = {k: rng.normal(0.0, 1.0, x.shape) for k, x in params.items()}
    gid = np.concatenate([groups[k] for k in params])
    all_logs = np.concatenate([logs[k] for k in params])
    means = {g: all_logs[gid == g].mean() for g in np.unique(gid)}
    d = {
        k: jnp.asarray(np.exp(logs[k] - np.vectorize(means.get)(groups[k])), jnp.float32)
        for k in params
    }
    mu = phipsimu.mu.product_density(gauss_log_f, groups=groups)
    v0, w0 = mu.sample(jax.random.key(seed), params, 3)
    v1, w1 = mu.sample(jax.random.key(seed), jax.tree_util.tree_map(jnp.multiply, d, params), 3)
    np.testing.assert_array_equal(w0, w1)
    np.testing.assert_allclose(
        flat(jax.tree_util.tree_map(jnp.multiply, d, v0), 3), flat(v1, 3), rtol=2e-5
    )
