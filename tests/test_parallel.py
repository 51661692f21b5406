"""Scaling out: every transform gives the single-device answer on the global batch under pmap,
shard_map (default and relaxed checks) and sharded jit. The multi-device checks run in a
subprocess with 8 simulated CPU devices (tests/parallel_check.py), so this process keeps one
device; the bad-input checks run here."""

import os
import pathlib
import socket
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


#: shard_map with JAX's default checks returns the equal outputs with out_specs=P(), so it is
#: checked once; without them, per device.
MODES = (
    "pmap device 7",
    "shard_map check_vma=True out_specs=P()",
    "shard_map check_vma=False device 7",
    "sharded jit",
)


@pytest.fixture(scope="module")
def eight_devices() -> str:
    """One subprocess with 8 simulated devices runs every multi-device check."""
    return run_check(
        "transforms", "m_sharpness", "estimators", "recipes", "fsdp", "fsdp_shard_map", "samples"
    )


@pytest.mark.slow
def test_transforms_match_single_device_on_8_devices(eight_devices):
    """num_samples=8, two chunks: the chunked loop runs under every mode."""
    for mode in MODES:
        for name in (
            "sam",
            "asam",
            "trace",
            "frobenius",
            "frobenius_sam",
            "random_sam",
            "determinant",
            "eigen_moment2",
        ):
            assert f"ok {name} {mode}" in eight_devices


@pytest.mark.slow
def test_m_sharpness_matches_pmap_on_8_devices(eight_devices):
    """sync=False: per-device perturbations and gradients, the same update on every device,
    under shard_map (either check) as under pmap; sync=True is the single-device update."""
    names = ("sam", "asam", "frobenius", "trace", "random_sam")
    for name in names:
        assert f"ok sync=False {name} pmap device 7 = device 0" in eight_devices
        assert f"ok sync=False {name} shard_map check_vma=True = pmap" in eight_devices
        assert f"ok sync=False {name} shard_map check_vma=False device 7 = pmap" in eight_devices
        assert f"ok sync=True {name} shard_map check_vma=True" in eight_devices


@pytest.mark.slow
def test_m_sharpness_with_model_sharded_params(eight_devices):
    """shard_map over the data axis, params sharded along a model axis left to the compiler."""
    for name in ("sam", "trace", "random_sam"):
        assert f"ok sync=False {name} shard_map model-sharded params = pmap" in eight_devices
        assert f"ok sync=False {name} model-sharded shardings kept" in eight_devices


@pytest.mark.slow
def test_params_split_by_hand_inside_shard_map_are_refused(eight_devices):
    """Manual FSDP (params split along a second axis inside shard_map) is a clear error naming
    the leaf for every transform and the objective, not shard-local norms and draws."""
    for name in ("sam", "asam", "trace", "frobenius_sam", "random_sam", "objective"):
        assert f"ok {name} params split by hand inside shard_map: clear error" in eight_devices
    assert "ok masked-out leaves split by hand are accepted" in eight_devices


@pytest.mark.slow
def test_objective_and_estimators_match_single_device_on_8_devices(eight_devices):
    """num_samples beyond one chunk: every chunked estimator path runs."""
    for mode in MODES:
        for name in (
            "sharpness_aware_loss frobenius",
            "sharpness_aware_loss trace",
            "sharpness frobenius",
            "sharpness trace",
            "hessian_trace hutchinson",
            "hessian_trace hutch++",
            "hessian_trace xtrace",
            "hessian_diagonal",
            "log_determinant",
            "trace_function",
            "spectral_density",
            "top_eigenvalues",
        ):
            assert f"ok {name} {mode}" in eight_devices


@pytest.mark.slow
def test_scaling_guide_recipes_match_single_device_on_8_devices(eight_devices):
    for name in ("sharded jit", "shard_map", "pmap device 7"):
        assert f"ok guide {name}" in eight_devices


@pytest.mark.slow
def test_fsdp_params_stay_sharded_on_8_devices(eight_devices):
    for name in ("sam", "asam", "frobenius", "random_sam"):
        assert f"ok {name} fsdp:" in eight_devices
        assert f"ok {name} fsdp shardings kept" in eight_devices


@pytest.mark.slow
def test_samples_sharded_over_8_devices_match_one_device(eight_devices):
    """The same key gives the same perturbations and answer with m/8 of them per device."""
    for mode in MODES[:3]:
        for name in ("trace", "frobenius", "random_sam antithetic", "sharpness_aware_loss"):
            assert f"ok samples {name} {mode}" in eight_devices
        assert f"ok samples sharpness {mode}" in eight_devices
        assert f"ok samples sharpness gauss_newton {mode}" in eight_devices
    assert "ok samples: num_samples not divisible is a clear error" in eight_devices


def test_unbound_sample_axis_is_a_clear_error():
    est = phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=4, sample_axis="s")
    with pytest.raises(ValueError, match=r"sample_axis='s': this axis is not bound"):
        est(jnp.ones(3), jnp.ones((4, 3)), key=jax.random.key(0))


def test_sample_axis_must_be_a_str():
    with pytest.raises(TypeError, match=r"sample_axis=1: must be a str"):
        phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=4, sample_axis=1)
    with pytest.raises(TypeError, match=r"sample_axis=1: must be a str"):
        phipsimu.random_sam(rho=0.1, num_samples=4, sample_axis=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process():
    """Two processes (one CPU device each, gloo collectives) train with the scaling guide's
    several hosts recipe; each compares the result with its own single-device run on the whole
    batch."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "parallel_check.py"), "--worker", str(i), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            outs.append(out)
            assert proc.returncode == 0, out[-3000:] + err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, out in enumerate(outs):
        assert f"ok multihost process {i} of 2" in out


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


def test_data_parallel_operator_unbound_axis():
    op = phipsimu.curvature.data_parallel(loss, "data")
    est = phipsimu.hessian_trace(op, num_samples=2)
    with pytest.raises(ValueError, match=r"axis_name='data': this axis is not bound"):
        est(jnp.ones(3), jnp.ones((4, 3)), key=jax.random.key(0))
    obj = phipsimu.sharpness_aware_loss(
        loss, phipsimu.measures.trace(), rho=0.1, num_samples=2, axis_name="data"
    )
    with pytest.raises(ValueError, match=r"axis_name='data': this axis is not bound"):
        obj(jnp.ones(3), jnp.ones((4, 3)), key=jax.random.key(0))


def test_axis_name_must_be_a_str():
    with pytest.raises(TypeError, match=r"axis_name=3: must be a str"):
        phipsimu.sam(rho=0.1, axis_name=3)
    with pytest.raises(TypeError, match=r"axis_name=\('a',\): must be a str"):
        phipsimu.random_sam(rho=0.1, num_samples=2, axis_name=("a",))
    with pytest.raises(TypeError, match=r"axis_name=None: must be a str"):
        phipsimu.curvature.data_parallel(loss, None)
