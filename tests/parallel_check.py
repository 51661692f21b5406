"""Data-parallel checks, run by tests/test_parallel.py in a subprocess with 8 simulated CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) so the rest of the suite keeps
one device. ``python tests/parallel_check.py`` runs every check and prints one line per check;
it exits non-zero at the first mismatch.

Every check compares against the single-device answer on the global batch.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--worker" not in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import phipsimu

AXIS = "data"
BATCH = 16
TOL = 2e-5


def init_mlp(key, sizes=(3, 4, 2)):
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, k1, k2 = jax.random.split(key, 3)
        params.append(
            {
                "w": jax.random.normal(k1, (fan_in, fan_out)) / np.sqrt(fan_in),
                "b": 0.1 * jax.random.normal(k2, (fan_out,)),
            }
        )
    return params


def model(params, x):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def loss(params, x, y):
    return jnp.mean((model(params, x) - y) ** 2)


def data():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (BATCH, 3)), jax.random.normal(ky, (BATCH, 2))


def transforms(axis_name):
    """Every transform of the library, by name, with ``axis_name``."""
    ms = phipsimu.measures
    kw = {"rho": 0.05, "num_samples": 4, "axis_name": axis_name}
    return {
        "sam": phipsimu.sam(rho=0.05, axis_name=axis_name),
        "asam": phipsimu.sam(rho=0.05, adaptive=True, eta=0.01, axis_name=axis_name),
        "trace": phipsimu.sharpness_aware(ms.trace(), **kw),
        "frobenius": phipsimu.sharpness_aware(ms.frobenius(), **kw),
        "eigen_moment2": phipsimu.sharpness_aware(ms.eigen_moment(2), **kw),
        "determinant": phipsimu.sharpness_aware(ms.determinant(), **kw),
        "invariant_gaussian": phipsimu.sharpness_aware(ms.invariant_gaussian(), **kw),
        "trace_adaptive_antithetic": phipsimu.sharpness_aware(
            ms.trace(), adaptive=True, antithetic=True, **kw
        ),
        "frobenius_sam": phipsimu.frobenius_sam(strength=1.0, **kw),
        "random_sam": phipsimu.random_sam(**kw),
    }


#: Presets whose ψ is undefined where a perturbation lowers the loss: checked at a zero-loss
#: minimum (targets produced by the model itself), where every perturbed loss is larger.
AT_MINIMUM = ("determinant", "invariant_gaussian")


def step(tx, params, state, x, y):
    """One update as a user writes it: gradient of the (local) loss, then the transform."""
    grads = jax.grad(loss)(params, x, y)
    return tx.update(grads, state, params, value_fn=lambda p: loss(p, x, y))


def step_all(txs, params, states, x, y, y_min):
    """``step`` for every transform (one compilation for all of them)."""
    return {
        name: step(tx, params, states[name], x, y_min if name in AT_MINIMUM else y)[0]
        for name, tx in txs.items()
    }


def assert_close(name, got, want, tol=TOL):
    got = jax.tree_util.tree_map(np.asarray, got)
    want = jax.tree_util.tree_map(np.asarray, want)
    err = max(
        float(np.max(np.abs(g - w))) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )
    scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
    if not np.isfinite(scale):
        raise AssertionError(f"{name}: the reference is not finite; pick a finite check")
    ok = err <= tol * max(1.0, scale)
    print(f"{'ok ' if ok else 'BAD'} {name}: max |diff| {err:.2e} (scale {scale:.2f})")
    if not ok:
        raise AssertionError(f"{name}: max |diff| {err:.3g} > {tol} x {max(1.0, scale):.3g}")


def replicas(tree):
    """The per-device copies (leading axis) -> a list of trees."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree_util.tree_map(lambda a, i=i: np.asarray(a)[i], tree) for i in range(n)]


def check_transforms(mesh):
    n = mesh.size
    params = init_mlp(jax.random.key(0))
    x, y = data()
    y_min = model(params, x)
    single, mapped = transforms(None), transforms(AXIS)
    states = {name: tx.init(params) for name, tx in single.items()}
    want = jax.jit(lambda *a: step_all(single, *a))(params, states, x, y, y_min)

    def compare(mode, got):
        for name in want:
            assert_close(f"{name} {mode}", got[name], want[name])

    # pmap: per-device gradients of the local loss.
    shards = [a.reshape(n, -1, a.shape[-1]) for a in (x, y, y_min)]
    out = jax.pmap(lambda *a: step_all(mapped, *a), axis_name=AXIS, in_axes=(None, None, 0, 0, 0))(
        params, states, *shards
    )
    for k, r in enumerate(replicas(out)):
        compare(f"pmap device {k}", r)

    # shard_map, with JAX's varying-value checks on and off.
    sharded = [jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in (x, y, y_min)]
    for check_vma in (True, False):

        def body(*a):
            return jax.tree_util.tree_map(lambda t: t[None], step_all(mapped, *a))

        fn = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
            out_specs=P(AXIS),
            check_vma=check_vma,
        )
        out = jax.jit(fn)(params, states, *sharded)
        for k, r in enumerate(replicas(out)):
            compare(f"shard_map check_vma={check_vma} device {k}", r)

    # jit with the batch sharded: no axis_name.
    got = jax.jit(lambda *a: step_all(single, *a))(params, states, *sharded)
    compare("sharded jit", got)


def main():
    mesh = jax.make_mesh((len(jax.devices()),), (AXIS,), (jax.sharding.AxisType.Auto,))
    checks = sys.argv[1:] or ["transforms"]
    for c in checks:
        globals()[f"check_{c}"](mesh)
    print("all checks passed")


if __name__ == "__main__":
    main()
