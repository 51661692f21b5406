"""Scaling out: every transform gives the single-device answer on the global batch under pmap,
shard_map (default and relaxed checks) and sharded jit. The multi-device checks run in a
subprocess with 8 simulated CPU devices (tests/parallel_check.py), so this process keeps one
device; the bad-input checks run here."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import phipsimu

HERE = pathlib.Path(__file__).resolve().parent


def run_check(*checks: str, devices: int = 8) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(HERE / "parallel_check.py"), *checks],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in result.stdout
    return result.stdout


def test_transforms_match_single_device_on_8_devices():
    out = run_check("transforms")
    for mode in ("pmap device 7", "shard_map check_vma=True", "check_vma=False", "sharded jit"):
        for name in ("sam", "asam", "frobenius_sam", "random_sam", "determinant"):
            assert f"ok {name} {mode}" in out


def loss(p, x):
    return jnp.mean((x @ p) ** 2)


@pytest.mark.parametrize(
    "tx",
    [
        phipsimu.sam(rho=0.1, axis_name="batch"),
        phipsimu.sharpness_aware(
            phipsimu.measures.trace(), rho=0.1, num_samples=2, axis_name="batch"
        ),
    ],
)
def test_unbound_axis_name_is_a_clear_error(tx):
    p, x = jnp.ones(3), jnp.ones((4, 3))
    state = tx.init(p)
    g = jax.grad(loss)(p, x)
    with pytest.raises(ValueError, match=r"axis_name='batch': this axis is not bound"):
        jax.jit(lambda: tx.update(g, state, p, value_fn=lambda q: loss(q, x)))()


def test_axis_name_must_be_a_str():
    with pytest.raises(TypeError, match=r"axis_name=3: must be a str"):
        phipsimu.sam(rho=0.1, axis_name=3)
    with pytest.raises(TypeError, match=r"axis_name=\('a',\): must be a str"):
        phipsimu.random_sam(rho=0.1, num_samples=2, axis_name=("a",))
