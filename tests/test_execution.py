"""The execution layer's estimator cache: the same configuration gives the same estimator,
and configurations that only compare equal across types do not."""

import jax.numpy as jnp

import phipsimu


def loss(p):
    return jnp.sum(p[0] ** 2) + jnp.sum(p[1] ** 2)


def test_same_configuration_same_estimator_and_types_kept_apart():
    build = phipsimu.hessian_trace
    a = build(loss, num_matvecs=4, mask=(True, False))
    assert build(loss, num_matvecs=4, mask=(True, False)) is a
    # equal as containers, different leaf types: a separate entry, validated on its own
    assert build(loss, num_matvecs=4, mask=(1, 0)) is not a
    assert build(loss, num_matvecs=4, mask={"a": True}) is build(
        loss, num_matvecs=4, mask={"a": True}
    )
    assert build(loss, num_matvecs=4, mask=None) is not a
