"""Samplers: support, masks, weights, reproducibility."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

import phipsimu

PARAMS = {
    "dense": {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)},
    "step": jnp.array(7, jnp.int32),
    "flag": jnp.array(True),
    "scale": jnp.ones((2,)),
}


def flat_float(v, num):
    leaves = [x for x in jax.tree_util.tree_leaves(v) if jnp.issubdtype(x.dtype, jnp.floating)]
    return np.concatenate([np.reshape(x, (num, -1)) for x in leaves], axis=1)


def test_sphere_unit_norm_across_leaves():
    v, log_w = phipsimu.mu.sphere().sample(jax.random.key(0), PARAMS, 50)
    norms = np.linalg.norm(flat_float(v, 50), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    # each leaf alone is not normalised: the draw is on the sphere of the whole vector
    assert np.all(np.linalg.norm(np.reshape(v["dense"]["w"], (50, -1)), axis=1) < 1.0)
    np.testing.assert_array_equal(log_w, 0.0)


def test_integer_and_bool_leaves_never_perturbed():
    for sampler in [
        phipsimu.mu.sphere(),
        phipsimu.mu.gaussian(),
        phipsimu.mu.rademacher(),
        phipsimu.mu.lebesgue(),
    ]:
        v, _ = sampler.sample(jax.random.key(1), PARAMS, 3)
        assert v["step"].dtype == jnp.int32 and v["flag"].dtype == jnp.bool_
        assert not np.any(v["step"]) and not np.any(v["flag"])
        assert sampler.dim(PARAMS) == 12 + 4 + 2


def test_mask_restricts_leaves_and_dimension():
    mask = {"dense": {"w": True, "b": False}, "step": False, "flag": False, "scale": True}
    sampler = phipsimu.mu.sphere(mask=mask)
    assert sampler.dim(PARAMS) == 14
    v, _ = sampler.sample(jax.random.key(2), PARAMS, 10)
    np.testing.assert_array_equal(v["dense"]["b"], 0.0)
    w = np.concatenate([np.reshape(v["dense"]["w"], (10, -1)), v["scale"]], axis=1)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)


def test_callable_mask():
    sampler = phipsimu.mu.gaussian(mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim == 2, p))
    assert sampler.dim(PARAMS) == 12


def test_mask_structure_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="mask"):
        phipsimu.mu.sphere(mask={"dense": True}).sample(jax.random.key(0), PARAMS, 2)
    with pytest.raises(ValueError, match="mask"):
        phipsimu.mu.sphere(mask={"a": 1})


def test_lebesgue_log_weight_is_minus_the_proposal_log_density():
    """log(dλ/dq)(v) = −log q(v) for q = N(0, σ²I); reference: scipy.stats."""
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    sigma = 0.7
    v, log_w = phipsimu.mu.lebesgue(scale=sigma).sample(jax.random.key(3), params, 20)
    flat = flat_float(v, 20)
    ref = -scipy.stats.multivariate_normal(np.zeros(5), sigma**2 * np.eye(5)).logpdf(flat)
    np.testing.assert_allclose(log_w, ref, rtol=1e-5)


def test_rademacher_and_gaussian_support():
    params = {"a": jnp.zeros(1000)}
    v, _ = phipsimu.mu.rademacher().sample(jax.random.key(4), params, 2)
    assert set(np.unique(v["a"]).tolist()) == {-1.0, 1.0}
    g, _ = phipsimu.mu.gaussian(stddev=2.0).sample(jax.random.key(5), params, 4)
    # sample std of 4000 normal draws: relative standard error ≈ 1/sqrt(2·4000) ≈ 1.1%
    assert abs(float(jnp.std(g["a"])) - 2.0) < 4 * 2.0 / math.sqrt(8000)


def test_rademacher_signs_balanced_and_uncorrelated_within_and_across_words():
    # 32 signs come from each random word: check balance and the correlation of neighbours
    # in one word (lag 1), of the same bit in neighbouring words (lag 32) and across a word
    # boundary, against their standard errors. Each statistic is a mean of n ≈ ±1 terms
    # (standard error 1/√n); 5 standard errors bound a fixed-key draw.
    leaves = {"a": jnp.zeros((37, 29)), "b": jnp.zeros(3001), "h": jnp.zeros(5, jnp.bfloat16)}
    v, _ = phipsimu.mu.rademacher().sample(jax.random.key(11), leaves, 40)
    assert v["h"].dtype == jnp.bfloat16
    for x in (np.reshape(v["a"], (40, -1)), np.asarray(v["b"])):
        assert set(np.unique(x).tolist()) == {-1.0, 1.0}
        n = x.size
        assert abs(x.mean()) < 5 / math.sqrt(n)
        for lag in (1, 31, 32, 33):
            c = (x[:, lag:] * x[:, :-lag]).mean()
            assert abs(c) < 5 / math.sqrt(x[:, lag:].size), (lag, c)
    # the draws of different samples are independent
    b = np.asarray(v["b"])
    assert abs((b[1:] * b[:-1]).mean()) < 5 / math.sqrt(b[1:].size)


def test_gaussian_entries_normal_and_uncorrelated_within_and_across_hashes():
    # Two entries come from each threefry hash, side by side along the last axis: check the
    # first four moments, the correlation of the two entries of one hash, of neighbouring
    # hashes and of distant entries, each against its standard error (5 of them), then the
    # whole distribution with scipy's Kolmogorov–Smirnov test.
    leaves = {"a": jnp.zeros((37, 29)), "b": jnp.zeros(3001), "h": jnp.zeros(5, jnp.bfloat16)}
    v, _ = phipsimu.mu.gaussian().sample(jax.random.key(12), leaves, 40)
    assert v["h"].dtype == jnp.bfloat16
    for y in (np.asarray(v["a"]), np.asarray(v["b"])):
        x = y.reshape(-1)
        n = x.size
        assert abs(x.mean()) < 5 / math.sqrt(n)
        assert abs(np.mean(x**2) - 1) < 5 * math.sqrt(2 / n)
        assert abs(np.mean(x**3)) < 5 * math.sqrt(15 / n)
        assert abs(np.mean(x**4) - 3) < 5 * math.sqrt(96 / n)
        last = y.shape[-1] - y.shape[-1] % 2
        pairs = {
            "same hash": (y[..., 0:last:2], y[..., 1:last:2]),
            "next hash": (y[..., 1 : last - 1 : 2], y[..., 2:last:2]),
            "distant": (y[..., :-20], y[..., 20:]),
        }
        for name, (p, q) in pairs.items():
            assert abs(np.mean(p * q)) < 5 / math.sqrt(p.size), name
        assert scipy.stats.kstest(x, "norm").pvalue > 1e-4
    # the draws of different samples are independent
    b = np.asarray(v["b"])
    assert abs((b[1:] * b[:-1]).mean()) < 5 / math.sqrt(b[1:].size)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_gaussian_edge_shapes_and_16_bit_draws(impl):
    # Scalars, empty leaves, a last axis of 1 and other PRNG implementations take the
    # fallback; 16-bit leaves are drawn in float32 and rounded on every path, so their
    # variance is 1 to bfloat16 precision (a bfloat16 draw from 7 mantissa bits is not).
    leaves = {
        "s": jnp.zeros(()),
        "e": jnp.zeros((0, 4)),
        "c": jnp.zeros((2000, 1), jnp.bfloat16),
        "h": jnp.zeros((1000, 4), jnp.float16),
    }
    v, _ = phipsimu.mu.gaussian().sample(jax.random.key(3, impl=impl), leaves, 8)
    for name, leaf in leaves.items():
        assert v[name].shape == (8, *leaf.shape) and v[name].dtype == leaf.dtype, name
    for name in ("c", "h"):
        x = np.asarray(v[name], np.float32).reshape(-1)
        assert abs(np.mean(x**2) - 1) < 5 * math.sqrt(2 / x.size), name
        assert np.max(np.abs(x)) > 3.0, name  # tails are not cut at a coarse grid's end


def test_same_key_same_draws_eager_and_jit_different_keys_differ():
    # Raw Gaussian draws are bit-identical; the sphere's normalisation may be fused
    # differently by XLA under jit, so it agrees to float32 rounding (a few ulps).
    g = phipsimu.mu.gaussian()
    eager_g, _ = g.sample(jax.random.key(6), PARAMS, 4)
    jit_g, _ = jax.jit(lambda k, p: g.sample(k, p, 4))(jax.random.key(6), PARAMS)
    np.testing.assert_array_equal(eager_g["dense"]["w"], jit_g["dense"]["w"])
    sampler = phipsimu.mu.sphere()
    eager, _ = sampler.sample(jax.random.key(6), PARAMS, 4)
    jitted, _ = jax.jit(lambda k, p: sampler.sample(k, p, 4))(jax.random.key(6), PARAMS)
    np.testing.assert_allclose(eager["scale"], jitted["scale"], rtol=1e-6)
    other, _ = sampler.sample(jax.random.key(7), PARAMS, 4)
    assert not np.allclose(eager["scale"], other["scale"])


def test_samplers_are_hashable_and_compare_by_value():
    mask = {"w": True, "b": False}
    assert phipsimu.mu.sphere(mask=mask) == phipsimu.mu.sphere(mask=mask)
    assert hash(phipsimu.mu.lebesgue(scale=2.0)) == hash(phipsimu.mu.lebesgue(scale=2.0))


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (phipsimu.mu.gaussian, {"stddev": 0.0}, "stddev"),
        (phipsimu.mu.lebesgue, {"scale": -1.0}, "scale"),
        (phipsimu.mu.lebesgue, {"scale": float("inf")}, "scale"),
    ],
)
def test_bad_hyperparameters(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_bad_key_and_num():
    sampler = phipsimu.mu.sphere()
    with pytest.raises(TypeError, match="key"):
        sampler.sample(0, PARAMS, 2)
    with pytest.raises(ValueError, match="num"):
        sampler.sample(jax.random.key(0), PARAMS, 0)
    with pytest.raises(ValueError, match="no leaf is perturbed"):
        sampler.sample(jax.random.key(0), {"i": jnp.arange(3)}, 2)


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    seed=st.integers(0, 2**30),
)
def test_sphere_property_any_pytree(shapes, seed):
    params = {f"p{i}": jnp.zeros(tuple(s)) for i, s in enumerate(shapes)}
    v, _ = phipsimu.mu.sphere().sample(jax.random.key(seed), params, 3)
    np.testing.assert_allclose(np.linalg.norm(flat_float(v, 3), axis=1), 1.0, rtol=1e-5)
