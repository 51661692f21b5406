"""The model zoo (benchmarks/zoo.py, flax nnx) through every transform and estimator, the
semantics of stateful layers (BatchNorm statistics, dropout keys, bf16), and flax models
passed where their arrays belong.

Semantics (docs/guides/flax.md, "What the perturbed passes see"): the perturbed passes never change
the BatchNorm running statistics, which are those of the clean pass at x (``has_aux=True``
returns them from there; the transforms' recipe takes them from the caller's own clean
pass); every pass of one step uses the dropout key the loss is given, the clean one and the
perturbed ones alike (as SAM implementations do)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import phipsimu
from benchmarks import zoo

TREE = jax.tree_util


def flat(tree):
    """A pytree's leaves as one float64 vector (ravel order)."""
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in TREE.tree_leaves(tree)])


def shift(params, v, scale):
    return TREE.tree_map(lambda p, d: p + scale * d, params, v)


def row(v, i):
    return TREE.tree_map(lambda a: a[i], v)


# ---------------------------------------------------------------- bad input (fast: no compile)


class _Tiny(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        self.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.bn(self.dense(x), use_running_average=False)


def _tiny():
    model = _Tiny()
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

    def train_loss(p, s, x):
        m = nnx.merge(graphdef, p, s, copy=True)
        return jnp.mean(m(x) ** 2), nnx.state(m, nnx.BatchStat)

    return model, params, state, x, train_loss


def _entry_points(loss):
    """Every way params reach the library: objective, transforms, estimator, operator."""
    measure = phipsimu.measures.trace()
    key = jax.random.key(0)
    obj = phipsimu.sharpness_aware_loss(loss, measure, rho=0.05, num_samples=2)
    est = phipsimu.sharpness(loss, measure, num_samples=2)
    hvp = phipsimu.hvp(loss)

    def transform(tx):
        def call(p, x):
            return tx.update(p, tx.init(p), p, value_fn=lambda q: loss(q, x))

        return call

    return {
        "sharpness_aware_loss": lambda p, x: obj(p, x, key=key),
        "sharpness_aware": transform(phipsimu.sharpness_aware(measure, rho=0.05, num_samples=2)),
        "sam": transform(phipsimu.sam(rho=0.05)),
        "sharpness": lambda p, x: est(p, x, key=key),
        "hvp": lambda p, x: hvp(p, p, x),
    }


def test_nnx_module_or_its_whole_state_as_params_is_a_clear_error():
    model, _, state, x, train_loss = _tiny()
    loss = lambda p, x: train_loss(p, state, x)[0]  # noqa: E731
    for call in _entry_points(loss).values():
        with pytest.raises(
            TypeError, match=r"params: is the flax module _Tiny.*docs/guides/flax\.md"
        ):
            call(model, x)
        # the whole state: the BatchNorm statistics would be perturbed and trained
        with pytest.raises(TypeError, match=r"\['bn'\]\['mean'\] is an nnx BatchStat.*flax\.md"):
            call(nnx.state(model), x)
        with pytest.raises(TypeError, match=r"params: got a flax linen variables dict"):
            call({"params": {"w": jnp.ones(3)}, "batch_stats": {"mean": jnp.ones(3)}}, x)


def test_loss_returning_batchnorm_statistics_without_has_aux_is_a_clear_error():
    _, params, state, x, train_loss = _tiny()
    loss = lambda p, x: train_loss(p, state, x)  # noqa: E731  (loss, new statistics)
    calls = _entry_points(loss)
    for name in ("sharpness_aware_loss", "sharpness_aware", "sam"):
        with pytest.raises(ValueError, match=r"returns a tuple \(float32\[\], State of 2 arr"):
            calls[name](params, x)
        with pytest.raises(ValueError, match=r"pass has_aux=True \(docs/guides/flax\.md\)"):
            calls[name](params, x)
    for name in ("sharpness", "hvp"):  # no aux there: the loss alone
        with pytest.raises(ValueError, match=r"return the loss alone.*\(docs/guides/flax\.md\)"):
            calls[name](params, x)
    # the recipe (params = the nnx.Param state) passes the checks
    obj = phipsimu.sharpness_aware_loss(
        loss, phipsimu.measures.trace(), rho=0.05, num_samples=2, has_aux=True
    )
    out = jax.eval_shape(lambda p: obj(p, x, key=jax.random.key(0)), params)
    assert TREE.tree_structure(out[1]) == TREE.tree_structure(state)
    # RNG state next to the params (a module that keeps its dropout Rngs) is held fixed
    with_rngs = (params, nnx.state(nnx.Dropout(0.1, rngs=nnx.Rngs(0))))
    obj = phipsimu.sharpness_aware_loss(
        lambda p, x: loss(p[0], x),
        phipsimu.measures.trace(),
        rho=0.05,
        num_samples=2,
        has_aux=True,
    )
    jax.eval_shape(lambda p: obj(p, x, key=jax.random.key(0)), with_rngs)


# ---------------------------------------------------------------- the zoo itself


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_is_pure_and_its_modes_differ(name):
    m = zoo.build(name)
    x, y = m.batch
    key = jax.random.key(1)
    loss, grads = jax.jit(jax.value_and_grad(m.loss))(m.params, x, y)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(flat(grads)))
    assert TREE.tree_structure(grads) == TREE.tree_structure(m.params)
    (train, new_state), _ = jax.jit(jax.value_and_grad(m.train_loss, has_aux=True))(
        m.params, m.state, x, y, key
    )
    evaluated = jax.jit(m.eval_loss)(m.params, m.state, x, y)
    assert TREE.tree_structure(new_state) == TREE.tree_structure(m.state)
    if name == "resnet18":  # BatchNorm: running statistics move, eval mode uses them
        assert len(TREE.tree_leaves(m.state)) == 40
        assert np.max(np.abs(flat(new_state) - flat(m.state))) > 1e-3
        assert abs(float(evaluated) - float(train)) > 1e-3
    if name in ("transformer", "vit"):  # dropout: the key matters in train mode only
        other = jax.jit(m.train_loss)(m.params, m.state, x, y, jax.random.key(2))[0]
        assert abs(float(other) - float(train)) > 1e-4
        np.testing.assert_allclose(
            jax.jit(m.eval_loss)(m.params, m.state, x, y), evaluated, rtol=0, atol=0
        )
    # the same model twice from the same seed: the same arrays
    again = zoo.build(name)
    np.testing.assert_array_equal(flat(again.params), flat(m.params))


@pytest.mark.slow
def test_benchmark_sizes():
    """ResNet-18 ≈ 11M parameters on 32×32×3 inputs, the transformer ≈ 10M (shapes only)."""
    counts = {
        name: zoo.num_params(jax.eval_shape(lambda n=name: zoo.build(n, "bench").params))
        for name in ("resnet18", "transformer", "mlp")
    }
    assert counts == {"resnet18": 11_173_962, "transformer": 10_893_568, "mlp": 85_002}


# ---------------------------------------------------------------- every transform and estimator


def _gnvp_reference(m, params, v, x, y):
    """Jᵀ ∇²ℓ J v from jax.jvp / jax.vjp of the network and jax.hessian of the output loss."""
    logits, jv = jax.jvp(lambda p: m.apply(p, x), (params,), (v,))
    h_out = jax.hessian(lambda o: m.output_loss(o, y))(logits)
    hjv = jnp.tensordot(h_out, jv, axes=jv.ndim)
    return jax.vjp(lambda p: m.apply(p, x), params)[1](hjv)[0]


@pytest.mark.slow
# the vit's blocks are the transformer's; the cnn is here for the unrolled strategy (a small
# program with convolutions, see phipsimu/_execution.py), the resnet18 for the looped one
@pytest.mark.parametrize("name", [n for n in zoo.NAMES if n != "vit"])
def test_zoo_through_every_transform_and_estimator(name):
    m = zoo.build(name)
    x, y = m.batch
    params = m.params
    measure = phipsimu.measures.trace()
    key = jax.random.key(3)
    rho, lr = 0.05, 0.1

    # sharpness_aware in a chain, jitted; its step equals jax.grad of the eq. 10 loss
    tx = optax.chain(phipsimu.sharpness_aware(measure, rho=rho, num_samples=4), optax.sgd(lr))

    @jax.jit
    def step(params, opt_state):
        value_fn = lambda p: m.loss(p, x, y)  # noqa: E731
        updates, opt_state = tx.update(
            jax.grad(value_fn)(params), opt_state, params, value_fn=value_fn
        )
        return updates, opt_state

    opt_state = tx.init(params)
    updates, opt_state = step(params, opt_state)
    assert float(opt_state[0].nonfinite_count) == 0
    # the transform's first step draws with the second half of split(key(seed=0))
    step_key = jax.random.split(jax.random.key_data(jax.random.key(0)))[1]
    obj = phipsimu.sharpness_aware_loss(m.loss, measure, rho=rho, num_samples=4)
    grad = jax.jit(jax.grad(obj))(params, x, y, key=step_key)
    assert np.all(np.isfinite(flat(grad)))
    scale = np.max(np.abs(flat(grad)))
    np.testing.assert_allclose(flat(updates), -lr * flat(grad), rtol=0, atol=1e-5 * lr * scale)

    # sam against optax.contrib.sam, one step: in float32 the BatchNorm ResNet amplifies
    # rounding step after step (max difference 4e-6, 1e-5, 3e-4 over three steps, while
    # float64 agrees to 1e-12 after three), so later steps compare rounding, not SAM
    ours = optax.chain(phipsimu.sam(rho=rho), optax.sgd(lr))
    ref = optax.contrib.sam(
        optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True
    )

    @jax.jit
    def both(p_ours, s_ours, p_ref, s_ref):
        value_fn = lambda p: m.loss(p, x, y)  # noqa: E731
        u, s_ours = ours.update(jax.grad(value_fn)(p_ours), s_ours, p_ours, value_fn=value_fn)
        grad_fn = lambda p, _: jax.grad(m.loss)(p, x, y)  # noqa: E731
        r, s_ref = ref.update(jax.grad(value_fn)(p_ref), s_ref, p_ref, grad_fn=grad_fn)
        return optax.apply_updates(p_ours, u), s_ours, optax.apply_updates(p_ref, r), s_ref

    p_ours = p_ref = params
    s_ours, s_ref = ours.init(params), ref.init(params)
    p_ours, s_ours, p_ref, s_ref = both(p_ours, s_ours, p_ref, s_ref)
    np.testing.assert_allclose(flat(p_ours), flat(p_ref), rtol=0, atol=1e-5)
    assert np.max(np.abs(flat(p_ours) - flat(params))) > 1e-3  # they moved

    # sharpness (trace measure): finite, with its standard error
    est = jax.jit(phipsimu.sharpness(m.loss, measure, num_samples=8))(params, x, y, key=key)
    assert np.isfinite(float(est.value)) and float(est.stderr) > 0

    # HVP against forward-over-reverse written here; GGN-vp against jvp / hessian / vjp
    v = row(measure.mu.sample(key, params, 1)[0], 0)
    hv = jax.jit(phipsimu.hvp(m.loss))(params, v, x, y)
    hv_ref = jax.jit(lambda p, v: jax.jvp(lambda q: jax.grad(m.loss)(q, x, y), (p,), (v,))[1])(
        params, v
    )
    scale = np.max(np.abs(flat(hv_ref)))
    np.testing.assert_allclose(flat(hv), flat(hv_ref), rtol=0, atol=1e-4 * scale)
    ggn = phipsimu.curvature.gauss_newton(m.apply, m.output_loss)
    gv = jax.jit(ggn.matvec)(params, v, x, y)
    gv_ref = jax.jit(lambda p, v: _gnvp_reference(m, p, v, x, y))(params, v)
    scale = np.max(np.abs(flat(gv_ref)))
    np.testing.assert_allclose(flat(gv), flat(gv_ref), rtol=0, atol=1e-4 * scale)


# ---------------------------------------------------------------- stateful layers


@pytest.mark.slow
def test_batchnorm_statistics_are_those_of_the_clean_pass():
    """ResNet-18: the statistics the eq. 10 loss (has_aux=True) and the transforms' recipe
    return are those of a plain train-mode forward at x, not of any perturbed pass."""
    m = zoo.build("resnet18")
    x, y = m.batch
    params, state = m.params, m.state
    dropout_key, key = jax.random.key(1), jax.random.key(2)
    measure = phipsimu.measures.trace()
    rho = 0.5  # large enough that a perturbed pass's statistics differ visibly
    clean = jax.jit(m.train_loss)(params, state, x, y, dropout_key)[1]

    obj = phipsimu.sharpness_aware_loss(m.train_loss, measure, rho=rho, num_samples=4, has_aux=True)
    (_, aux), _ = jax.jit(jax.value_and_grad(obj, has_aux=True))(
        params, state, x, y, dropout_key, key=key
    )

    def recipe(tx):
        @jax.jit
        def step(params, state, opt_state):
            value_fn = lambda p: m.train_loss(p, state, x, y, dropout_key)  # noqa: E731
            (_, new_state), grads = jax.value_and_grad(value_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params, value_fn=value_fn)
            return new_state, (updates, opt_state.nonfinite_count)

        return step(params, state, tx.init(params))

    sa, sa_step = recipe(phipsimu.sharpness_aware(measure, rho=rho, num_samples=4, has_aux=True))
    sam, sam_step = recipe(phipsimu.sam(rho=rho, has_aux=True))
    for updates, nonfinite in (sa_step, sam_step):
        assert int(nonfinite) == 0 and np.all(np.isfinite(flat(updates)))
    for got in (aux, sa, sam):
        assert TREE.tree_structure(got) == TREE.tree_structure(clean)
        np.testing.assert_allclose(flat(got), flat(clean), rtol=1e-6, atol=1e-7)

    # the test can fail: a perturbed pass's statistics are far from the clean ones, and the
    # running statistics moved away from their initial values
    v = row(measure.mu.sample(key, params, 1)[0], 0)
    perturbed = jax.jit(m.train_loss)(shift(params, v, rho), state, x, y, dropout_key)[1]
    assert np.max(np.abs(flat(perturbed) - flat(clean))) > 1e-3
    assert np.max(np.abs(flat(clean) - flat(state))) > 1e-3


@pytest.mark.slow
def test_every_pass_of_a_step_uses_the_dropout_key_it_is_given():
    """Transformer with dropout: the eq. 10 loss is L(x; k) + ρ² mean 2(L(x + ρvᵢ; k) −
    L(x; k))/ρ² with the one key k the loss is given, and SAM's perturbed loss is
    L(x + ρg/‖g‖; k), both rebuilt here from the public draws."""
    m = zoo.build("transformer")
    x, y = m.batch
    params = m.params
    dropout_key, key = jax.random.key(7), jax.random.key(3)
    rho, num = 0.1, 4
    measure = phipsimu.measures.trace()

    def loss(p, x, y, k):
        return m.train_loss(p, m.state, x, y, k)[0]

    jloss = jax.jit(loss)
    obj = phipsimu.sharpness_aware_loss(loss, measure, rho=rho, num_samples=num)
    value = float(jax.jit(obj)(params, x, y, dropout_key, key=key))
    v, log_w = measure.mu.sample(key, params, num)
    base = float(jloss(params, x, y, dropout_key))

    def rebuilt(keys):
        w = np.exp(np.asarray(log_w, np.float64))
        li = [float(jloss(shift(params, row(v, i), rho), x, y, keys[i])) for i in range(num)]
        return base + rho**2 * np.mean(w * 2 * (np.asarray(li) - base) / rho**2)

    tol = 2e-5  # ~40 float32 roundings of L ≈ 3.5, summed over the differences
    assert abs(value - rebuilt([dropout_key] * num)) <= tol
    # the test can fail: fresh dropout keys in the perturbed passes give another value
    fresh = [jax.random.fold_in(dropout_key, i + 1) for i in range(num)]
    assert abs(value - rebuilt(fresh)) > 100 * tol

    # SAM: the perturbed pass at x + ρ g/‖g‖ with the same key
    tx = phipsimu.sam(rho=rho)
    g = jax.jit(jax.grad(loss))(params, x, y, dropout_key)
    _, sam_state = jax.jit(
        lambda p, g: tx.update(g, tx.init(p), p, value_fn=lambda q: loss(q, x, y, dropout_key))
    )(params, g)
    norm = np.sqrt(np.sum(flat(g) ** 2))
    eps = TREE.tree_map(lambda a: rho * a / norm, g)
    want = float(jloss(shift(params, eps, 1.0), x, y, dropout_key))
    assert abs(float(sam_state.perturbed_loss) - want) <= tol
    other = float(jloss(shift(params, eps, 1.0), x, y, fresh[0]))
    assert abs(float(sam_state.perturbed_loss) - other) > 100 * tol


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "transformer"])
def test_bfloat16_agrees_with_float32_within_the_estimates_stderr(name):
    """bf16 parameters, inputs and activations against float32 at the same point (the bf16
    parameters cast up, exactly), with the same key (the same draws, so the difference is
    rounding alone). The sharpness-aware part of the eq. 10 gradient (its gradient minus
    ∇L(x), each in its own dtype) differs from float32's by less than the float32
    estimator's own standard deviation (the root of its summed per-coordinate variances, over
    8 keys); the whole gradient by less than that plus the error of the plain bf16 gradient
    ∇L(x), which bf16 training without SAM has too (on the transformer that error, 0.076,
    is most of the whole difference, 0.095, against a standard deviation of 0.082);
    ``sharpness`` (trace) by less than the float32 estimate's stderr. With every layer
    pinned to bf16 (``compute_dtype=jnp.bfloat16``) perturbations below bf16's spacing
    vanish and the ResNet misses the first bound (4.5 standard deviations off)."""
    low = zoo.build(name, dtype=jnp.bfloat16)
    ref = zoo.build(name)
    params = TREE.tree_map(lambda a: a.astype(jnp.float32), low.params)
    x, y = low.batch
    x32 = x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
    measure = phipsimu.measures.trace()
    key = jax.random.key(5)

    def grads_fn(m):
        """(eq. 10 gradient, ∇L(x)) in the model's dtype."""
        obj = phipsimu.sharpness_aware_loss(m.loss, measure, rho=0.05, num_samples=4)
        return jax.jit(lambda p, x, k: (jax.grad(obj)(p, x, y, key=k), jax.grad(m.loss)(p, x, y)))

    f32, f16 = grads_fn(ref), grads_fn(low)
    got, plain16 = f16(low.params, x, key)
    assert all(a.dtype == jnp.bfloat16 for a in TREE.tree_leaves(got))
    want, plain32 = (flat(t) for t in f32(params, x32, key))
    got, plain16 = flat(got), flat(plain16)
    spread = np.stack([flat(f32(params, x32, jax.random.key(100 + r))[0]) for r in range(8)])
    sd = np.sqrt(np.sum(np.var(spread, axis=0, ddof=1)))
    assert np.linalg.norm((got - plain16) - (want - plain32)) <= sd
    assert np.linalg.norm(got - want) <= sd + np.linalg.norm(plain16 - plain32)

    est32 = jax.jit(phipsimu.sharpness(ref.loss, measure, num_samples=64))(params, x32, y, key=key)
    est16 = jax.jit(phipsimu.sharpness(low.loss, measure, num_samples=64))(
        low.params, x, y, key=key
    )
    assert abs(float(est16.value) - float(est32.value)) <= float(est32.stderr)
