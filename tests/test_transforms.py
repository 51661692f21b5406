"""optax transformations: a contract suite every transform passes (modelled on optax's
``contrib/_common_test.py``), SAM against ``optax.contrib.sam``, ASAM by hand, Example 1's
drift, NaN behaviour, data parallelism and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import example1, init_mlp, mlp_loss

import phipsimu

X = jax.random.normal(jax.random.key(10), (16, 3))
Y = jax.random.normal(jax.random.key(11), (16, 2))

TRANSFORMS = {
    "sharpness_aware_trace": lambda **kw: phipsimu.sharpness_aware(
        phipsimu.measures.trace(), rho=0.05, num_samples=4, **kw
    ),
    "sharpness_aware_eigen2_adaptive_antithetic": lambda **kw: phipsimu.sharpness_aware(
        phipsimu.measures.eigen_moment(2),
        rho=0.05,
        num_samples=4,
        adaptive=True,
        antithetic=True,
        **kw,
    ),
    "sam": lambda **kw: phipsimu.sam(rho=0.05, **kw),
    "asam": lambda **kw: phipsimu.sam(rho=0.5, eta=0.01, adaptive=True, **kw),
    "frobenius_sam": lambda **kw: phipsimu.frobenius_sam(rho=0.05, num_samples=4, lam=0.1, **kw),
    "random_sam": lambda **kw: phipsimu.random_sam(rho=0.05, num_samples=4, **kw),
}


def make_params(dtype=jnp.float32):
    params = init_mlp(jax.random.key(0), [3, 4, 2])
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def make_step(tx, max_traces=None):
    def step(params, state):
        value_fn = lambda p: mlp_loss(p, X.astype(p[0]["w"].dtype), Y.astype(p[0]["w"].dtype))  # noqa: E731
        grads = jax.grad(value_fn)(params)
        updates, state = tx.update(grads, state, params, value_fn=value_fn, unknown_arg=1.0)
        return optax.apply_updates(params, updates), state

    if max_traces is not None:
        chex.clear_trace_counter()
        step = chex.assert_max_traces(step, n=max_traces)
    return jax.jit(step)


def structure_and_dtypes(tree):
    return jax.tree_util.tree_structure(tree), [
        (jnp.shape(x), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(tree)
    ]


@pytest.mark.parametrize("name", list(TRANSFORMS))
class TestContract:
    def test_chain_jit_no_recompilation_stable_state(self, name):
        tx = optax.chain(TRANSFORMS[name](), optax.sgd(0.1))
        params = make_params()
        state = tx.init(params)
        step = make_step(tx, max_traces=1)  # a second trace (recompilation) raises
        before = structure_and_dtypes(state)
        loss0 = float(mlp_loss(params, X, Y))
        for _ in range(5):
            params, state = step(params, state)
        assert structure_and_dtypes(state) == before
        assert float(mlp_loss(params, X, Y)) < loss0
        assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
    def test_float32_and_float64(self, name, dtype):
        """The transform's own updates keep the params' dtype (``optax.apply_updates`` would
        cast them back and hide a wrong one)."""
        with jax.enable_x64(dtype == jnp.float64):
            tx = TRANSFORMS[name]()
            params = make_params(dtype)
            value_fn = lambda p: mlp_loss(p, X.astype(dtype), Y.astype(dtype))  # noqa: E731
            grads = jax.grad(value_fn)(params)
            updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=value_fn))(
                grads, tx.init(params), params
            )
            assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(updates))

    def test_inject_hyperparams(self, name):
        """An injected rho is the rho the update uses: with the built-in value the update is
        the plain transform's, and changing it changes the update."""
        if name.startswith("sam") or name == "asam":
            factory = optax.inject_hyperparams(phipsimu.sam)
            kwargs = dict(adaptive=name == "asam", eta=0.01 if name == "asam" else 0.0)
            inner = factory(rho=0.05, **kwargs)
            plain = phipsimu.sam(rho=0.05, **kwargs)
        else:
            factory = optax.inject_hyperparams(phipsimu.sharpness_aware)
            inner = factory(phipsimu.measures.trace(), rho=0.05, num_samples=4)
            plain = phipsimu.sharpness_aware(phipsimu.measures.trace(), rho=0.05, num_samples=4)
        params = make_params()
        value_fn = lambda p: mlp_loss(p, X, Y)  # noqa: E731
        grads = jax.grad(value_fn)(params)
        update = jax.jit(
            lambda tx, s: tx.update(grads, s, params, value_fn=value_fn)[0], static_argnums=0
        )
        state = inner.init(params)
        injected = update(inner, state)
        want = update(plain, plain.init(params))
        flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])  # noqa: E731
        # float32: a traced rho rounds differently from a constant one
        np.testing.assert_allclose(flat(injected), flat(want), rtol=1e-5, atol=1e-7)
        state.hyperparams["rho"] = jnp.asarray(0.1)
        changed = update(inner, state)
        assert np.max(np.abs(flat(changed) - flat(want))) > 1e-4 * np.max(np.abs(flat(want)))

    def test_multi_steps(self, name):
        tx = optax.MultiSteps(optax.chain(TRANSFORMS[name](), optax.sgd(0.1)), every_k_schedule=2)
        params = make_params()
        state = tx.init(params)
        step = make_step(tx)
        p1, state = step(params, state)
        np.testing.assert_array_equal(p1[0]["w"], params[0]["w"])  # accumulating
        p2, state = step(p1, state)
        assert not np.array_equal(p2[0]["w"], params[0]["w"])

    def test_state_survives_numpy_round_trip(self, name):
        tx = optax.chain(TRANSFORMS[name](), optax.sgd(0.1))
        step = make_step(tx)
        params = make_params()
        state = tx.init(params)
        params, state = step(params, state)
        restored = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), state)
        a, b = (params, state), (params, restored)
        for _ in range(3):
            a = step(*a)
            b = step(*b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(x, y)

    def test_missing_and_bad_value_fn(self, name):
        tx = TRANSFORMS[name]()
        params = make_params()
        state = tx.init(params)
        with pytest.raises(TypeError, match="value_fn"):
            tx.update(params, state, params)
        with pytest.raises(ValueError, match="value_fn"):
            tx.update(params, state, params, value_fn=lambda p: p[0]["w"])


def test_sam_matches_optax_contrib_sam_on_an_mlp():
    lr, rho = 0.1, 0.05
    ours = optax.chain(phipsimu.sam(rho=rho), optax.sgd(lr))
    ref = optax.contrib.sam(
        optax.sgd(lr),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    p_ours = p_ref = make_params()
    s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
    step_ours = make_step(ours)

    @jax.jit
    def step_ref(params, state):
        grads = jax.grad(mlp_loss)(params, X, Y)
        grad_fn = lambda p, _: jax.grad(mlp_loss)(p, X, Y)  # noqa: E731
        updates, state = ref.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    for _ in range(50):
        p_ours, s_ours = step_ours(p_ours, s_ours)
        p_ref, s_ref = step_ref(p_ref, s_ref)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(p_ref))
    )
    assert diff <= 1e-5


def test_asam_matches_the_formula():
    rho, eta = 0.5, 0.01
    params = make_params()
    g = jax.grad(mlp_loss)(params, X, Y)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    gf = jax.flatten_util.ravel_pytree(g)[0]
    t = jnp.abs(flat) + eta
    eps = rho * t**2 * gf / jnp.linalg.norm(t * gf)
    expected = jax.grad(mlp_loss)(unravel(flat + eps), X, Y)
    tx = phipsimu.sam(rho=rho, eta=eta, adaptive=True)
    out, _ = tx.update(g, tx.init(params), params, value_fn=lambda p: mlp_loss(p, X, Y))
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(out)[0],
        jax.flatten_util.ravel_pytree(expected)[0],
        rtol=1e-5,
        atol=1e-7,
    )


def test_sam_rho_zero_is_exactly_the_base_optimizer():
    params = make_params()
    tx = optax.chain(phipsimu.sam(rho=0.0), optax.sgd(0.1))
    base = optax.sgd(0.1)
    p1, _ = make_step(tx)(params, tx.init(params))
    p2, _ = make_step(base)(params, base.init(params))
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_zero_gradient_gives_finite_updates(name):
    tx = TRANSFORMS[name]()
    params = {"w": jnp.zeros(3)}
    value_fn = lambda p: jnp.sum(p["w"] ** 4)  # noqa: E731  (gradient and Hessian 0 at 0)
    out, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params, value_fn=value_fn)
    assert np.all(np.isfinite(out["w"]))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_nan_loss_gives_nan_updates_and_apply_if_finite_skips(name):
    params = make_params()

    def value_fn(p):
        return mlp_loss(p, X, Y) * jnp.nan

    tx = TRANSFORMS[name]()
    grads = jax.grad(value_fn)(params)
    out, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=value_fn))(
        grads, tx.init(params), params
    )
    assert np.all(np.isnan(jax.flatten_util.ravel_pytree(out)[0]))
    safe = optax.apply_if_finite(optax.chain(tx, optax.sgd(0.1)), max_consecutive_errors=5)
    updates, state = jax.jit(lambda g, s, p: safe.update(g, s, p, value_fn=value_fn))(
        grads, safe.init(params), params
    )
    new = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert int(state.notfinite_count) == 1


def run_example1(tx, start, steps):
    params = jnp.array(start)
    state = tx.init(params)

    def body(carry, _):
        p, s = carry
        g = jax.grad(example1)(p)
        u, s = tx.update(g, s, p, value_fn=example1)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(body, (params, state), None, length=steps)
    return np.asarray(params)


@pytest.mark.parametrize("start", [(2.0, 0.5), (4.0, 0.25)])
def test_example1_trace_objective_drifts_to_balanced_point_adaptive_does_not(start):
    """Trace preset: GD drifts along Γ to |x₁| = |x₂|. Adaptive: the objective is exactly
    invariant under (x₁, x₂) → (kx₁, x₂/k), so gradient flow conserves the balancedness
    x₁² − x₂² (the symmetry's conserved quantity) and has no preferred point on Γ; GD
    conserves it up to O(lr) (measured 1.5–1.7% at lr = 0.01, 3.1–4.6% at lr = 0.02)."""
    rho = 0.3

    def tx(adaptive):
        return optax.chain(
            phipsimu.sharpness_aware(
                phipsimu.measures.trace(),
                rho=rho,
                num_samples=8,
                antithetic=True,
                adaptive=adaptive,
            ),
            optax.sgd(0.01),
        )

    plain = run_example1(tx(False), start, 6000)
    adaptive = run_example1(tx(True), start, 6000)
    balance0 = start[0] ** 2 - start[1] ** 2
    assert abs(plain[0] / plain[1] - 1.0) < 0.1
    assert abs(plain[0] ** 2 - plain[1] ** 2) < 0.02 * balance0
    assert abs((adaptive[0] ** 2 - adaptive[1] ** 2) / balance0 - 1.0) < 0.03
    assert adaptive[0] / adaptive[1] > 0.9 * start[0] / start[1]
    # off Γ the adaptive trace is 2(x₁x₂)², so the minimiser of (p − 1)² + ρ²·2p² has
    # product p = 1/(1 + 2ρ²): the bias acts across the orbits, never along them
    assert abs(adaptive[0] * adaptive[1] - 1 / (1 + 2 * rho**2)) < 0.03


@pytest.mark.parametrize("sync", [True, False])
def test_data_parallel_sam_axis_name(sync):
    """Two shards under vmap(axis_name): replicas agree; with sync=True the step equals SAM
    on the full batch (equal shard sizes, so the pmean of shard gradients is the full one)."""
    params = make_params()
    xs, ys = X.reshape(2, 8, 3), Y.reshape(2, 8, 2)
    tx = phipsimu.sam(rho=0.05, axis_name="data", sync=sync)

    def shard_step(x, y):
        value_fn = lambda p: mlp_loss(p, x, y)  # noqa: E731
        g = jax.grad(value_fn)(params)  # local: sync=True pmeans it before normalising
        out, _ = tx.update(g, tx.init(params), params, value_fn=value_fn)
        return out

    out = jax.jit(jax.vmap(shard_step, axis_name="data"))(xs, ys)
    flat = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(out)
    np.testing.assert_allclose(flat[0], flat[1], rtol=1e-6)
    single = phipsimu.sam(rho=0.05)
    full, _ = single.update(
        jax.grad(mlp_loss)(params, X, Y),
        single.init(params),
        params,
        value_fn=lambda p: mlp_loss(p, X, Y),
    )
    full = jax.flatten_util.ravel_pytree(full)[0]
    if sync:
        np.testing.assert_allclose(flat[0], full, rtol=1e-4, atol=1e-6)
    else:
        assert not np.allclose(flat[0], full, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # fast-suite time; runs in the slow suite
@pytest.mark.parametrize("sync", [True, False])
def test_data_parallel_sharpness_aware_perturbations(sync):
    """sync=True: every replica draws the same perturbation; sync=False (m-sharpness):
    per-replica draws. Replicas with identical data reveal which."""
    params = make_params()
    tx = phipsimu.sharpness_aware(
        phipsimu.measures.trace(), rho=0.05, num_samples=2, axis_name="d", sync=sync
    )

    def shard(_):
        value_fn = lambda p: mlp_loss(p, X, Y)  # noqa: E731
        g = jax.grad(value_fn)(params)
        out, _ = tx.update(g, tx.init(params), params, value_fn=value_fn)
        return jax.flatten_util.ravel_pytree(out)[0]

    out = jax.jit(jax.vmap(shard, axis_name="d"))(jnp.arange(2))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)  # pmean-ed: replicas agree
    ref = phipsimu.sharpness_aware(phipsimu.measures.trace(), rho=0.05, num_samples=2)
    g = jax.grad(mlp_loss)(params, X, Y)
    single, _ = ref.update(g, ref.init(params), params, value_fn=lambda p: mlp_loss(p, X, Y))
    single = jax.flatten_util.ravel_pytree(single)[0]
    assert np.allclose(out[0], single, rtol=1e-5, atol=1e-7) == sync


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_integer_leaves_are_held_fixed(name):
    """A step counter in the params: never perturbed, never differentiated, its update
    passes through; the float leaves get the same update as without it."""
    tx = TRANSFORMS[name]()
    params = make_params()
    with_int = {"net": params, "step": jnp.array(3, jnp.int32)}

    def value_fn(p):
        return mlp_loss(p["net"], X, Y)

    grads = {"net": jax.grad(mlp_loss)(params, X, Y), "step": jnp.zeros((), jnp.int32)}
    out, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=value_fn))(
        grads, tx.init(with_int), with_int
    )
    ref, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=lambda q: mlp_loss(q, X, Y)))(
        grads["net"], tx.init(params), params
    )
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 0
    for a, b in zip(jax.tree_util.tree_leaves(out["net"]), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


class TestBadInput:
    @pytest.mark.parametrize(
        ("factory", "match"),
        [
            (lambda: phipsimu.sam(rho=-0.1), "rho=-0.1"),
            (lambda: phipsimu.sam(rho=0.1, eta=-1.0), "eta=-1.0"),
            (lambda: phipsimu.sam(rho=0.1, axis_name=3), "axis_name=3"),
            (
                lambda: phipsimu.sharpness_aware(
                    phipsimu.measures.trace(), rho=-0.5, num_samples=2
                ),
                "rho=-0.5",
            ),
            (
                lambda: phipsimu.sharpness_aware(phipsimu.measures.trace(), rho=0.1, num_samples=0),
                "num_samples=0",
            ),
            (
                lambda: phipsimu.sharpness_aware(
                    phipsimu.measures.trace(), rho=0.1, num_samples=3, antithetic=True
                ),
                "num_samples=3",
            ),
            (
                lambda: phipsimu.sharpness_aware(
                    phipsimu.measures.trace(), rho=0.1, num_samples=2, strength=-1.0
                ),
                "strength=-1.0",
            ),
            (lambda: phipsimu.frobenius_sam(rho=0.1, num_samples=1, lam=1.0), "num_samples=1"),
            (lambda: phipsimu.frobenius_sam(rho=0.1, num_samples=4, lam=-1.0), "lam"),
            (lambda: phipsimu.random_sam(rho=-1.0, num_samples=4), "rho=-1.0"),
            (
                lambda: phipsimu.sharpness_aware(
                    phipsimu.measures.trace(), rho=0.1, num_samples=2, seed=1.5
                ),
                "seed=1.5",
            ),
        ],
    )
    def test_construction_errors(self, factory, match):
        with pytest.raises((ValueError, TypeError), match=match):
            factory()
