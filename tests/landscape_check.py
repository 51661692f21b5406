"""The loss surface spread over 8 simulated devices (a mesh axis) against one device: run by
tests/test_landscape.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; prints "all checks passed"."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from phipsimu import landscape


def loss(params, x, y):
    hidden = jax.nn.relu(x @ params[0]["w"] + params[0]["b"])
    return jnp.mean((hidden @ params[1]["w"] - y) ** 2)


def main():
    assert jax.device_count() == 8, jax.devices()
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = [
        {"w": jax.random.normal(k1, (3, 4)), "b": jnp.zeros(4)},
        {"w": jax.random.normal(k2, (4, 2))},
    ]
    x = jax.random.normal(k3, (32, 3))
    y = jnp.sin(x[:, :2])
    dirs = landscape.random_directions(k4, params, 2)
    coords = (np.linspace(-1.0, 1.0, 4), np.linspace(-0.5, 0.5, 6))  # 24 points, 3 per device
    want = landscape.surface(loss, params, x, y, directions=dirs, coords=coords, chunk_size=2)
    mesh = jax.make_mesh((8,), ("grid",))

    def body(p, x, y, d):
        return landscape.surface(
            loss, p, x, y, directions=d, coords=coords, chunk_size=2, axis_name="grid"
        )

    for check_vma in (True, False):
        out_specs = P() if check_vma else P("grid")
        fn = jax.shard_map(
            body, mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=out_specs,
            check_vma=check_vma,
        )  # fmt: skip
        got = np.asarray(jax.jit(fn)(params, x, y, dirs))
        # check_vma=False: every device's copy of the grid, stacked along the first axis
        copies = [got] if check_vma else np.split(got, 8)
        for copy in copies:
            np.testing.assert_allclose(copy, want, rtol=1e-6, atol=1e-7)
        print(f"shard_map check_vma={check_vma}: same grid as one device")
    try:
        bad = (np.linspace(-1.0, 1.0, 3), np.linspace(-1.0, 1.0, 3))  # 9 points over 8
        jax.jit(
            jax.shard_map(
                lambda p: landscape.surface(
                    loss, p, x, y, directions=dirs, coords=bad, axis_name="grid"
                ),
                mesh=mesh,
                in_specs=P(),
                out_specs=P(),
            )
        )(params)
    except ValueError as err:
        assert "the grid's 9 points must split evenly over the 8 devices" in str(err), err
    else:
        raise AssertionError("a grid of 9 points over 8 devices did not fail")
    print("all checks passed")


if __name__ == "__main__":
    main()
