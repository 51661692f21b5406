"""optax transforms in real pipelines (issue 11): non-finite perturbed losses, gradient
accumulation, masks, PRNG implementations and key leaves, misaligned updates, injected
hyperparameters, metrics in the state, ``(loss, aux)`` value functions and validation.
Each case failed (or gave a wrong number silently) before the fix."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import phipsimu

A = jnp.asarray([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])


def quad(p):
    """A small loss on {"w", "b"} that couples the two leaves (so a mask matters)."""
    return jnp.sum((A @ p["w"] + p["b"]) ** 2) + 0.1 * jnp.sum(p["w"] ** 4)


PARAMS = {"w": jnp.asarray([0.3, -0.2, 0.5]), "b": jnp.asarray([0.1, 0.0, -0.1])}

FACTORIES = {
    "sam": (phipsimu.sam, {"rho": 0.05}),
    "asam": (phipsimu.sam, {"rho": 0.5, "eta": 0.01, "adaptive": True}),
    "sharpness_aware": (
        lambda **kw: phipsimu.sharpness_aware(phipsimu.measures.trace(), **kw),
        {"rho": 0.05, "num_samples": 4},
    ),
    "frobenius_sam": (phipsimu.frobenius_sam, {"rho": 0.05, "num_samples": 4, "lam": 0.1}),
    "random_sam": (phipsimu.random_sam, {"rho": 0.05, "num_samples": 4}),
}


def make(name, **extra):
    factory, kwargs = FACTORIES[name]
    return factory(**kwargs, **extra)


def run(tx, params, value_fn, grads=None):
    grads = jax.grad(value_fn)(params) if grads is None else grads
    return tx.update(grads, tx.init(params), params, value_fn=value_fn)


def flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


# ---------------------------------------------------------------- 1. non-finite perturbed loss


def log_loss(w):
    return jnp.sum(jnp.log(w) ** 2)


W_NEAR_ZERO = jnp.asarray([1e-3, 1.0, 2.0])


@pytest.mark.parametrize("name", list(FACTORIES))
def test_nan_only_at_the_perturbed_point_never_reaches_params(name):
    """The incoming gradient is finite, the loss at w − ρ·… is NaN (log of a negative)."""
    tx = optax.chain(make(name), optax.sgd(1e-3))
    state = tx.init(W_NEAR_ZERO)
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=log_loss))(
        jax.grad(log_loss)(W_NEAR_ZERO), state, W_NEAR_ZERO
    )
    new = optax.apply_updates(W_NEAR_ZERO, updates)
    assert np.all(np.isfinite(new))
    assert int(optax.tree.get(state, "nonfinite_count")) == 1
    # the skipped step is the plain gradient step
    np.testing.assert_allclose(new, W_NEAR_ZERO - 1e-3 * jax.grad(log_loss)(W_NEAR_ZERO))


@pytest.mark.parametrize("name", ["sam", "sharpness_aware"])
def test_apply_if_finite_after_the_transform_skips_the_step(name):
    """The documented placement with skip_nonfinite=False: apply_if_finite sees the NaN."""
    tx = optax.chain(make(name, skip_nonfinite=False), optax.apply_if_finite(optax.sgd(1e-3), 3))
    updates, state = run(tx, W_NEAR_ZERO, log_loss)
    np.testing.assert_array_equal(optax.apply_updates(W_NEAR_ZERO, updates), W_NEAR_ZERO)
    assert int(optax.tree.get(state, "notfinite_count")) == 1
    assert int(optax.tree.get(state, "nonfinite_count")) == 1


# ---------------------------------------------------------------- 2. gradient accumulation


def batch_loss(x, y):
    return lambda p: jnp.mean((jnp.tanh(x @ p["w"]) + p["b"][0] - y) ** 2)


XS = jax.random.normal(jax.random.key(1), (2, 5, 3))
YS = jax.random.normal(jax.random.key(2), (2, 5))
P0 = {"w": jnp.asarray([0.3, -0.2, 0.5]), "b": jnp.asarray([0.1])}


def sam_grad(loss, p, rho):
    g = jax.grad(loss)(p)
    eps = jax.tree_util.tree_map(lambda x: rho * x / jnp.linalg.norm(flat(g)), g)
    return jax.grad(loss)(jax.tree_util.tree_map(jnp.add, p, eps))


def test_multisteps_after_sam_is_the_mean_of_micro_batch_sam_gradients():
    lr, rho = 0.1, 0.05
    tx = optax.chain(
        phipsimu.sam(rho=rho), optax.MultiSteps(optax.sgd(lr), 2).gradient_transformation()
    )
    params, state = P0, tx.init(P0)
    for i in range(2):
        loss = batch_loss(XS[i], YS[i])
        updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
        params = optax.apply_updates(params, updates)
        if i == 0:
            assert flat(updates).tolist() == [0.0] * 4  # accumulating
    g = [sam_grad(batch_loss(XS[i], YS[i]), P0, rho) for i in range(2)]
    expected = flat(P0) - lr * (flat(g[0]) + flat(g[1])) / 2
    np.testing.assert_allclose(flat(params), expected, rtol=1e-6, atol=1e-7)


def test_multisteps_around_sam_uses_only_the_last_micro_batch():
    """The other nesting, documented as wrong: the perturbation comes from the accumulated
    gradient but the gradient at x + ε from the last micro-batch alone."""
    lr, rho = 0.1, 0.05
    tx = optax.MultiSteps(optax.chain(phipsimu.sam(rho=rho), optax.sgd(lr)), 2)
    params, state = P0, tx.init(P0)
    grads = []
    for i in range(2):
        loss = batch_loss(XS[i], YS[i])
        grads.append(jax.grad(loss)(P0))
        updates, state = tx.update(grads[-1], state, params, value_fn=loss)
        params = optax.apply_updates(params, updates)
    mean = (flat(grads[0]) + flat(grads[1])) / 2
    _, unravel = jax.flatten_util.ravel_pytree(P0)
    adv = unravel(flat(P0) + rho * mean / jnp.linalg.norm(mean))
    last = jax.grad(batch_loss(XS[1], YS[1]))(adv)
    np.testing.assert_allclose(flat(params), flat(P0) - lr * flat(last), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- 3. masks


@pytest.mark.parametrize("mask", [{"w": True, "b": False}, lambda p: {"w": True, "b": False}])
def test_sam_mask_perturbs_and_updates_only_masked_leaves(mask):
    rho = 0.05
    g = jax.grad(quad)(PARAMS)
    out, _ = run(phipsimu.sam(rho=rho, mask=mask), PARAMS, quad, g)
    np.testing.assert_array_equal(out["b"], g["b"])
    adv = {"w": PARAMS["w"] + rho * g["w"] / jnp.linalg.norm(g["w"]), "b": PARAMS["b"]}
    np.testing.assert_allclose(out["w"], jax.grad(quad)(adv)["w"], rtol=1e-6)


def test_sharpness_aware_mask_restricts_the_draws_and_the_update():
    g = jax.grad(quad)(PARAMS)
    mask = {"w": True, "b": False}
    tx = phipsimu.sharpness_aware(phipsimu.measures.trace(), rho=0.05, num_samples=4, mask=mask)
    out, state = run(tx, PARAMS, quad, g)
    # the same draws from the measure's own mask; that one updates b too
    ref_tx = phipsimu.sharpness_aware(phipsimu.measures.trace(mask=mask), rho=0.05, num_samples=4)
    ref, ref_state = run(ref_tx, PARAMS, quad, g)
    np.testing.assert_array_equal(out["b"], g["b"])
    assert not np.allclose(ref["b"], g["b"])
    np.testing.assert_allclose(out["w"], ref["w"], rtol=1e-6)
    np.testing.assert_allclose(state.perturbed_losses, ref_state.perturbed_losses, rtol=1e-6)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_optax_masked_raises_pointing_to_mask(name):
    tx = optax.masked(make(name), {"w": True, "b": False})
    with pytest.raises(ValueError, match="mask="):
        run(tx, PARAMS, lambda p: jnp.sum(p["w"] ** 2))


# ---------------------------------------------------------------- 4-5. keys and leaves


def test_rbg_prng_impl_raw_keys_accepted():
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        key = jax.random.PRNGKey(0)
        assert key.shape == (4,)
        est = phipsimu.sharpness(quad, phipsimu.measures.trace(), num_samples=2)(PARAMS, key=key)
        assert np.isfinite(est.value)
        out, _ = run(make("sharpness_aware"), PARAMS, quad)
        assert np.all(np.isfinite(flat(out)))
    finally:
        jax.config.update("jax_default_prng_impl", previous)


def test_typed_keys_of_other_impls_accepted():
    est = phipsimu.sharpness(quad, phipsimu.measures.trace(), num_samples=2)
    assert np.isfinite(est(PARAMS, key=jax.random.key(0, impl="rbg")).value)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_non_float_leaves_are_held_fixed(name):
    """A typed PRNG key (as in flax.nnx state), ints, bools and float0 leaves in params."""
    params = {
        **PARAMS,
        "rng": jax.random.key(3),
        "step": jnp.asarray(2, jnp.int32),
        "on": jnp.asarray(True),
        "zero": np.zeros((), jax.dtypes.float0),
    }
    updates = {**jax.grad(quad)(PARAMS), **{k: params[k] for k in ("rng", "step", "on", "zero")}}
    out, _ = run(make(name), params, lambda p: quad({"w": p["w"], "b": p["b"]}), updates)
    assert out["rng"] is updates["rng"] and out["step"] is updates["step"]
    assert out["zero"] is updates["zero"] and out["on"] is updates["on"]
    assert np.all(np.isfinite(flat({"w": out["w"], "b": out["b"]})))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sharpness_and_loss_with_a_typed_key_leaf(adaptive):
    params = {**PARAMS, "rng": jax.random.key(3)}

    def loss(p):
        return quad({"w": p["w"], "b": p["b"]})

    kw = {"num_samples": 2, "adaptive": adaptive}
    est = phipsimu.sharpness(loss, phipsimu.measures.trace(), **kw)
    assert np.isfinite(est(params, key=jax.random.key(0)).value)
    objective = phipsimu.sharpness_aware_loss(loss, phipsimu.measures.trace(), rho=0.05, **kw)
    g = jax.grad(objective, allow_int=True)(params, key=jax.random.key(0))
    assert np.all(np.isfinite(flat({"w": g["w"], "b": g["b"]})))


@pytest.mark.parametrize(
    ("leaf", "match"),
    [(jax.nn.relu, "eqx.partition"), (0.5, "Python float")],
)
def test_function_and_python_float_leaves_rejected(leaf, match):
    params = {**PARAMS, "extra": leaf}
    for name in ("sam", "sharpness_aware"):
        tx = make(name)
        with pytest.raises(TypeError, match=match):
            tx.update(params, tx.init(PARAMS), params, value_fn=quad)
    key = jax.random.key(0)
    with pytest.raises(TypeError, match=match):
        phipsimu.sharpness(quad, phipsimu.measures.trace(), num_samples=2)(params, key=key)
    objective = phipsimu.sharpness_aware_loss(
        quad, phipsimu.measures.trace(), rho=0.05, num_samples=2
    )
    with pytest.raises(TypeError, match=match):
        objective(params, key=key)


# ---------------------------------------------------------------- 6. misaligned updates


@pytest.mark.parametrize("name", ["sam", "sharpness_aware"])
def test_misaligned_updates_rejected(name):
    tx = make(name)
    state = tx.init(PARAMS)
    wrong_structure = {"w": PARAMS["w"], "c": PARAMS["b"]}
    with pytest.raises(ValueError, match="updates: structure"):
        tx.update(wrong_structure, state, PARAMS, value_fn=quad)
    wrong_shape = {"w": PARAMS["w"][:1], "b": PARAMS["b"]}
    with pytest.raises(ValueError, match="updates: leaf"):
        tx.update(wrong_shape, state, PARAMS, value_fn=quad)


# ---------------------------------------------------------------- 7. measures inside jit


def test_measures_buildable_inside_jit():
    @jax.jit
    def f(x):
        measure = phipsimu.measures.invariant_gaussian()
        mu = phipsimu.mu.product_density(lambda s, la: -jnp.exp(2 * la))
        return mu.sample(jax.random.key(0), x, 2)[1] + measure.mu.sample(jax.random.key(0), x, 2)[1]

    assert np.all(np.isfinite(f(jnp.asarray([4.0, 0.25]))))


# ---------------------------------------------------------------- 8. inject_hyperparams


@pytest.mark.parametrize("name", list(FACTORIES))
def test_inject_hyperparams_without_static_args_and_rho_matters(name):
    factory, kwargs = FACTORIES[name]
    if name == "sharpness_aware":
        factory = phipsimu.sharpness_aware
        kwargs = {"measure": phipsimu.measures.trace(), **kwargs}
    tx = optax.inject_hyperparams(factory)(**kwargs)
    state = tx.init(PARAMS)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s):
        return tx.update(jax.grad(quad)(PARAMS), s, PARAMS, value_fn=quad)

    u1, s1 = step(state)
    state.hyperparams["rho"] = 2 * state.hyperparams["rho"]
    u2, s2 = step(state)  # same structure: no retrace
    assert not np.allclose(flat(u1), flat(u2))
    assert jax.tree_util.tree_structure(s1) == jax.tree_util.tree_structure(s2)


# ---------------------------------------------------------------- metrics, aux, dtypes


def test_sam_metrics():
    rho = 0.05
    g = jax.grad(quad)(PARAMS)
    tx = optax.chain(phipsimu.sam(rho=rho), optax.sgd(0.1))
    _, state = run(tx, PARAMS, quad, g)
    adv = jax.tree_util.tree_map(lambda p, x: p + rho * x / jnp.linalg.norm(flat(g)), PARAMS, g)
    np.testing.assert_allclose(optax.tree.get(state, "perturbed_loss"), quad(adv), rtol=1e-6)
    np.testing.assert_allclose(optax.tree.get(state, "epsilon_norm"), rho, rtol=1e-6)
    assert int(optax.tree.get(state, "nonfinite_count")) == 0


def test_sharpness_aware_metrics():
    rho, strength = 0.05, 0.7
    tx = phipsimu.sharpness_aware(
        phipsimu.measures.trace(), rho=rho, num_samples=4, strength=strength
    )
    _, state = run(tx, PARAMS, quad)
    assert state.perturbed_losses.shape == (4,)
    np.testing.assert_allclose(state.loss, quad(PARAMS), rtol=1e-6)
    # trace preset: φ, ψ identity, μ the sphere: s·ρ²·mean 2(L(x+ρv) − L(x))/ρ²
    term = strength * 2.0 * jnp.mean(state.perturbed_losses - state.loss)
    np.testing.assert_allclose(state.sharpness_term, term, rtol=1e-4)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_value_fn_with_aux(name):
    g = jax.grad(quad)(PARAMS)
    out, _ = run(make(name), PARAMS, quad, g)
    aux_out, _ = run(make(name, has_aux=True), PARAMS, lambda p: (quad(p), {"stat": 1.0}), g)
    np.testing.assert_array_equal(flat(out), flat(aux_out))
    with pytest.raises(ValueError, match="has_aux=True"):
        run(make(name), PARAMS, lambda p: (quad(p), 1.0), g)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_update_and_state_dtypes(name, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), PARAMS)
        tx = make(name)
        state = tx.init(params)
        before = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(state)]
        out, state = tx.update(jax.grad(quad)(params), state, params, value_fn=quad)
        assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(out))
        after = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(state)]
        assert after == before


# ---------------------------------------------------------------- 9. validation


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: phipsimu.sam(rho="0.1"), TypeError, "rho='0.1'"),
        (lambda: phipsimu.sam(rho=0.1, has_aux="no"), TypeError, "has_aux='no'"),
        (lambda: phipsimu.sam(rho=0.1, skip_nonfinite=1), TypeError, "skip_nonfinite=1"),
        (lambda: phipsimu.sam(rho=0.1, mask=[1, 0]), TypeError, "mask="),
        (lambda: make("sharpness_aware", antithetic="yes"), TypeError, "antithetic='yes'"),
        (lambda: make("random_sam", seed=2**64), ValueError, "seed=18446744073709551616"),
        (lambda: make("sharpness_aware", seed=-1), ValueError, "seed=-1"),
    ],
)
def test_validation(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_numpy_integer_num_samples_accepted():
    tx = phipsimu.sharpness_aware(phipsimu.measures.trace(), rho=0.05, num_samples=np.int64(4))
    assert tx.init(PARAMS).perturbed_losses.shape == (4,)


def test_errors_name_the_users_arguments():
    tx = phipsimu.sam(rho=0.1, mask={"w": False, "b": False})
    with pytest.raises(ValueError, match=r"^params: no leaf is perturbed"):
        run(tx, PARAMS, quad)
    with pytest.raises(ValueError, match=r"^params: no leaf is perturbed"):
        phipsimu.mu.sphere().sample(jax.random.key(0), {"n": jnp.arange(3)}, 2)


# ---------------------------------------------------------------- rho = 0 (warm-up), state


@pytest.mark.parametrize("name", ["sharpness_aware", "frobenius_sam", "random_sam"])
def test_rho_warm_up_from_zero_gives_the_plain_gradient(name):
    factory, kwargs = FACTORIES[name]
    if name == "sharpness_aware":
        factory = phipsimu.sharpness_aware
        kwargs = {"measure": phipsimu.measures.trace(), **kwargs}
    kwargs = {**kwargs, "rho": optax.linear_schedule(0.0, 0.05, 10)}
    tx = optax.inject_hyperparams(factory)(**kwargs)  # rejected at init before
    grads = jax.grad(quad)(PARAMS)
    updates, state = jax.jit(lambda s: tx.update(grads, s, PARAMS, value_fn=quad))(tx.init(PARAMS))
    # rho traced as 0: the term is exactly 0 (no 2/rho^2), so the updates are the gradient
    np.testing.assert_array_equal(flat(updates), flat(grads))
    assert int(optax.tree.get(state, "nonfinite_count")) == 0
    # a plain float rho = 0 is accepted as sam accepts it; a negative one is not
    plain = factory(**{**kwargs, "rho": 0.0})
    np.testing.assert_array_equal(flat(run(plain, PARAMS, quad)[0]), flat(grads))
    with pytest.raises(ValueError, match=r"rho=-0.1: must be a finite number >= 0"):
        factory(**{**kwargs, "rho": -0.1})


@pytest.mark.parametrize("name", ["sam", "sharpness_aware"])
def test_wrong_state_is_a_type_error_naming_state(name):
    tx = make(name)
    grads = jax.grad(quad)(PARAMS)
    other = make("sharpness_aware" if name == "sam" else "sam").init(PARAMS)
    for bad in [None, optax.EmptyState(), other]:
        with pytest.raises(TypeError, match=rf"state: got {type(bad).__name__} .*own init"):
            tx.update(grads, bad, PARAMS, value_fn=quad)
    # the right state passes through chain, inject_hyperparams and MultiSteps, under jit
    wrapped = optax.MultiSteps(optax.chain(make(name), optax.sgd(0.1)), every_k_schedule=2)
    state = wrapped.init(PARAMS)
    jax.jit(lambda s: wrapped.update(grads, s, PARAMS, value_fn=quad))(state)
