"""The MLP initialisation the benchmarks share (scripts import it from their own folder)."""

import jax
import jax.numpy as jnp
import numpy as np


def init_mlp(key, sizes, gain=1.0):
    """Dense layers ``{"w", "b"}`` with weights ~ N(0, gain/fan_in) and zero biases."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append(
            {
                "w": jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(gain / fan_in),
                "b": jnp.zeros(fan_out),
            }
        )
    return params
