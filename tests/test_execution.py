"""The execution layer's estimator cache: the same configuration gives the same estimator,
and configurations that only compare equal across types do not."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import phipsimu
from phipsimu import _execution


def loss(p):
    return jnp.sum(p[0] ** 2) + jnp.sum(p[1] ** 2)


def test_same_configuration_same_estimator_and_types_kept_apart():
    build = phipsimu.hessian_trace
    a = build(loss, num_samples=4, mask=(True, False))
    assert build(loss, num_samples=4, mask=(True, False)) is a
    # equal as containers, different leaf types: a separate entry, validated on its own
    assert build(loss, num_samples=4, mask=(1, 0)) is not a
    assert build(loss, num_samples=4, mask={"a": True}) is build(
        loss, num_samples=4, mask={"a": True}
    )
    assert build(loss, num_samples=4, mask=None) is not a


# ---------------------------------------------------------------- the strategy policy


def conv_loss(params, x, y):
    """A two-layer convolutional net on 4×4 single-channel images, cross-entropy."""
    h = jax.lax.conv_general_dilated(
        x, params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    logits = jax.nn.relu(h).reshape(x.shape[0], -1) @ params["w"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def conv_problem():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "k": jax.random.normal(k1, (3, 3, 1, 2)) / 3.0,
        "w": jax.random.normal(k2, (32, 3)) / 6.0,
    }
    x = jax.random.normal(k3, (6, 4, 4, 1))
    return params, x, jnp.arange(6) % 3


def test_policy_unrolls_convolutions_on_cpu_up_to_the_limits(monkeypatch):
    params, x, y = conv_problem()
    conv = lambda: jax.make_jaxpr(jax.grad(conv_loss))(params, x, y)  # noqa: E731
    dense = lambda: jax.make_jaxpr(jax.grad(loss))([jnp.ones(2), jnp.ones(3)])  # noqa: E731
    assert "conv_general_dilated" in _execution.primitives(conv())
    assert _execution.unroll_for(4, conv)
    assert _execution.unroll_for(_execution.UNROLL_MAX, conv)
    assert not _execution.unroll_for(_execution.UNROLL_MAX + 1, conv)
    assert not _execution.unroll_for(4, dense)
    assert not _execution.unroll_for(4, None)
    # a program too large to unroll m times (compile time) stays in the loop
    monkeypatch.setattr(_execution, "UNROLL_EQUATIONS", 3 * _execution.size(conv()))
    assert _execution.unroll_for(3, conv)
    assert not _execution.unroll_for(4, conv)


def strategy_results(monkeypatch, measure, configs, estimators):
    """Per ``(force, chunk)`` configuration: the eq. 10 gradient and, with ``estimators``,
    ``sharpness`` and ``hessian_trace`` on the conv net, all with the same key."""
    params, x, y = conv_problem()
    key = jax.random.key(3)
    meas = getattr(phipsimu.measures, measure)()
    results = {}
    for force, chunk in configs:
        monkeypatch.setattr(_execution, "_FORCE", force)
        objective = phipsimu.sharpness_aware_loss(
            conv_loss, meas, rho=0.1, num_samples=5, chunk_size=chunk
        )
        out = [jax.jit(jax.grad(objective))(params, x, y, key=key)]
        if estimators:
            est = jax.jit(phipsimu.sharpness(conv_loss, meas, num_samples=5, chunk_size=chunk))
            hutch = phipsimu.hessian_trace(conv_loss, num_samples=5, chunk_size=chunk)
            e = est(params, x, y, key=key)
            out += [e.value, e.stderr, jax.jit(hutch)(params, x, y, key=key).value]
        results[force, chunk] = out
    return results


def assert_same(results):
    first = next(iter(results.values()))
    for name, got in results.items():
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(first)):
            # float32 rounding of a gradient, amplified 2/ρ² = 200 times by the term's
            # differences: a few 1e-5 of the leaf's scale (other draws would differ by O(1))
            scale = float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(a, b, rtol=0, atol=5e-5 * scale, err_msg=str(name))


def test_same_key_same_gradient_looped_or_unrolled(monkeypatch):
    # draw i comes from the key and i alone, so the loop shape changes only rounding: a loop
    # over chunks of 2 (a partial one last) against the policy's choice here (straight-line
    # code: the program has a convolution)
    assert_same(strategy_results(monkeypatch, "trace", (("loop", 2), (None, None)), False))


@pytest.mark.slow
@pytest.mark.parametrize("measure", ["trace", "frobenius"])
def test_same_key_same_numbers_under_every_strategy(monkeypatch, measure):
    configs = (("loop", 2), ("loop", None), ("unroll", 2), (None, None))
    assert_same(strategy_results(monkeypatch, measure, configs, True))
