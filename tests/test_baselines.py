"""The baseline transforms (Frob-SAM, random-perturbation SAM) against their formulas, and
``sharpness_aware`` against ``jax.grad`` of the wrapped loss.

The transforms keep ``jax.random.PRNGKey(seed)`` in their state and split it every step:
``state_key, step_key = jax.random.split(state_key)``; the perturbations of a step are
``measure.mu.sample(step_key, params, num_samples)``. The references reproduce those keys and
draw through the public samplers, then differentiate a formula written out here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import init_mlp, mlp_loss

import phipsimu

BX = jax.random.normal(jax.random.key(1), (6, 3))
BY = jax.random.normal(jax.random.key(2), (6, 2))


def make_params(dtype=jnp.float32):
    params = init_mlp(jax.random.key(0), [3, 4, 2])
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def value_fn(p):
    return mlp_loss(p, BX.astype(p[0]["w"].dtype), BY.astype(p[0]["w"].dtype))


def step_keys(seed, steps):
    """The key each of the first ``steps`` updates uses."""
    state_key, out = jax.random.PRNGKey(seed), []
    for _ in range(steps):
        state_key, key = jax.random.split(state_key)
        out.append(key)
    return out


def flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def shift(params, rho, v):
    return jax.tree_util.tree_map(lambda p, d: p + rho * d, params, v)


def run_steps(tx, params, steps):
    """``steps`` updates at the same params (incoming updates = ∇L), jitted."""
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=value_fn))
    grads, state, outs = jax.grad(value_fn)(params), tx.init(params), []
    for _ in range(steps):
        out, state = update(grads, state, params)
        outs.append(out)
    return grads, outs


def test_frobenius_sam_is_the_gradient_of_the_scaled_unbiased_variance():
    rho, num, lam, seed = 0.05, 5, 0.3, 7
    with jax.enable_x64(True):
        params = make_params(jnp.float64)
        tx = phipsimu.frobenius_sam(rho=rho, num_samples=num, lam=lam, seed=seed)
        grads, outs = run_steps(tx, params, 2)
        for key, out in zip(step_keys(seed, 2), outs):
            v, _ = phipsimu.mu.gaussian().sample(key, params, num)

            def frob(p, v):
                # Frob-SAM: λ/(2ρ²)·Var_v L(x + ρv), unbiased sample variance
                losses = jax.vmap(lambda vi: value_fn(shift(p, rho, vi)))(v)
                return lam / (2 * rho**2) * jnp.var(losses, ddof=1)

            expected = flat(grads) + flat(jax.jit(jax.grad(frob))(params, v))
            assert flat(out).dtype == np.float64
            np.testing.assert_allclose(flat(out), expected, rtol=1e-8, atol=1e-11)
        # the two steps drew different perturbations
        assert np.max(np.abs(flat(outs[0]) - flat(outs[1]))) > 1e-6


def test_random_sam_is_the_mean_gradient_at_sphere_perturbations():
    rho, num, seed = 0.1, 6, 3
    with jax.enable_x64(True):
        params = make_params(jnp.float64)
        _, outs = run_steps(phipsimu.random_sam(rho=rho, num_samples=num, seed=seed), params, 2)
        for key, out in zip(step_keys(seed, 2), outs):
            v, _ = phipsimu.mu.sphere().sample(key, params, num)
            grads = jax.vmap(lambda vi: jax.grad(value_fn)(shift(params, rho, vi)))(v)
            expected = np.mean(np.asarray(jax.vmap(flat)(grads)), axis=0)
            np.testing.assert_allclose(flat(out), expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize(
    "measure", [phipsimu.measures.trace(), phipsimu.measures.eigen_moment(2)], ids=lambda m: m.name
)
def test_sharpness_aware_equals_grad_of_the_wrapped_loss(measure, antithetic):
    rho, num, strength, seed = 0.1, 4, 0.8, 5
    params = make_params()
    kw = {"rho": rho, "num_samples": num, "strength": strength, "antithetic": antithetic}
    tx = phipsimu.sharpness_aware(measure, seed=seed, **kw)
    _, outs = run_steps(tx, params, 2)
    obj = jax.jit(
        jax.grad(lambda p, key: phipsimu.sharpness_aware_loss(value_fn, measure, **kw)(p, key=key))
    )
    for key, out in zip(step_keys(seed, 2), outs):
        np.testing.assert_allclose(flat(out), flat(obj(params, key)), rtol=1e-5, atol=1e-6)


def test_nan_loss_with_the_determinant_is_skipped_or_nan():
    """At the minimum of a strictly convex loss every Δ > 0 and the update is finite; a NaN
    loss, everywhere or only at some perturbed points, makes every coordinate NaN with
    ``skip_nonfinite=False`` and, by default, returns the incoming gradient and counts the step."""
    curv = jnp.array([1.0, 2.0, 3.0])

    def convex(p):
        return 0.5 * jnp.sum(curv * p**2) + jnp.sum(p**4)

    params, num = jnp.zeros(3), 4
    measure = phipsimu.measures.determinant(scale=1.0)
    v, _ = measure.mu.sample(step_keys(0, 1)[0], params, num)
    assert 0 < int(jnp.sum(v[:, 0] > 0)) < num  # the partly-NaN loss hits some probes only
    grads = jax.grad(convex)(params) + 0.5  # nonzero, so "returned unchanged" is visible
    fns = {
        "clean": convex,
        "everywhere": lambda p: convex(p) * jnp.nan,
        "partly": lambda p: jnp.where(p[0] > 0, jnp.nan, convex(p)),
    }
    for skip in (False, True):
        tx = phipsimu.sharpness_aware(measure, rho=0.1, num_samples=num, skip_nonfinite=skip)
        out = {
            name: jax.jit(lambda g, s, p, fn=fn, tx=tx: tx.update(g, s, p, value_fn=fn))(
                grads, tx.init(params), params
            )
            for name, fn in fns.items()
        }
        clean, clean_state = out["clean"]
        assert np.all(np.isfinite(clean)) and not np.allclose(clean, grads)
        assert int(optax.tree.get(clean_state, "nonfinite_count")) == 0
        for name in ("everywhere", "partly"):
            updates, state = out[name]
            if skip:
                np.testing.assert_array_equal(updates, grads)
                assert int(optax.tree.get(state, "nonfinite_count")) == 1
            else:
                assert np.all(np.isnan(updates)), name
    skipping = phipsimu.sharpness_aware(phipsimu.measures.determinant(), rho=0.1, num_samples=num)
    kept = skipping.update(grads, skipping.init(params), params, value_fn=fns["partly"])[0]
    np.testing.assert_array_equal(kept, grads)
