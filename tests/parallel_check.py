"""Data-parallel checks, run by tests/test_parallel.py in a subprocess with 8 simulated CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) so the rest of the suite keeps
one device. ``python tests/parallel_check.py`` runs every check and prints one line per check;
it exits non-zero at the first mismatch.

Every check compares against the single-device answer on the global batch.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

if __name__ == "__main__" and "--worker" not in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# The script's own directory (tests/) is first on sys.path, so the suite's fixtures import.
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import phipsimu

AXIS = "data"
BATCH = 16
TOL = 2e-5
#: Perturbations and probes per estimate: two chunks of the CPU default chunk size (4), so
#: every chunked path runs (one chunk is a plain vmap).
NUM = 8


def init_mlp(key, sizes=(3, 4, 2)):
    """The suite's small tanh MLP (tests/conftest.py), 3-4-2 unless told otherwise."""
    return conftest.init_mlp(key, sizes)


model = conftest.mlp_apply


def loss(params, x, y):
    return jnp.mean((model(params, x) - y) ** 2)


def data():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (BATCH, 3)), jax.random.normal(ky, (BATCH, 2))


def transforms(axis_name):
    """Every transform of the library, by name, with ``axis_name``."""
    ms = phipsimu.measures
    # more perturbations than the CPU default chunk of 4: the chunked loop runs
    kw = {"rho": 0.05, "num_samples": NUM, "axis_name": axis_name}
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
        "frobenius_sam": phipsimu.frobenius_sam(lam=1.0, **kw),
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
    print(f"{'ok' if ok else 'BAD'} {name}: max |diff| {err:.2e} (scale {scale:.2f})")
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
    in_specs = (P(), P(), P(AXIS), P(AXIS), P(AXIS))
    # with JAX's checks the updates are typed as equal on every device: out_specs=P()
    fn = jax.shard_map(lambda *a: step_all(mapped, *a), mesh=mesh, in_specs=in_specs, out_specs=P())
    compare("shard_map check_vma=True out_specs=P()", jax.jit(fn)(params, states, *sharded))

    def body(*a):
        return jax.tree_util.tree_map(lambda t: t[None], step_all(mapped, *a))

    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(AXIS), check_vma=False)
    out = jax.jit(fn)(params, states, *sharded)
    for k, r in enumerate(replicas(out)):
        compare(f"shard_map check_vma=False device {k}", r)

    # jit with the batch sharded: no axis_name.
    got = jax.jit(lambda *a: step_all(single, *a))(params, states, *sharded)
    compare("sharded jit", got)


def estimators(loss_fn, axis_name):
    """The objective's gradient and the estimators, as a function of (params, x, y, key)."""
    ms = phipsimu.measures
    op = loss_fn if axis_name is None else phipsimu.curvature.data_parallel(loss_fn, axis_name)
    objectives = {
        name: phipsimu.sharpness_aware_loss(
            loss_fn, m, rho=0.05, num_samples=NUM, axis_name=axis_name
        )
        for name, m in [("frobenius", ms.frobenius()), ("trace", ms.trace())]
    }
    krylov = {"num_samples": NUM, "num_iterations": 4}
    est = {
        "sharpness frobenius": phipsimu.sharpness(op, ms.frobenius(), num_samples=NUM),
        "sharpness trace": phipsimu.sharpness(op, ms.trace(), num_samples=NUM),
        "hessian_trace hutchinson": phipsimu.hessian_trace(op, num_samples=NUM),
        "hessian_trace hutch++": phipsimu.hessian_trace(op, num_samples=12, method="hutch++"),
        "hessian_trace xtrace": phipsimu.hessian_trace(op, num_samples=NUM, method="xtrace"),
        "hessian_diagonal": phipsimu.hessian_diagonal(op, num_samples=NUM),
        "log_determinant": phipsimu.log_determinant(op, damping=1.0, **krylov),
        "trace_function": phipsimu.trace_function(op, jnp.exp, **krylov),
        "spectral_density": phipsimu.spectral_density(op, grid_size=8, **krylov),
        "top_eigenvalues": phipsimu.top_eigenvalues(op, 2, num_iterations=6),
    }

    def run(params, x, y, key):
        out = {}
        for name, obj in objectives.items():
            value, grad = jax.value_and_grad(obj)(params, x, y, key=key)
            # the user's pmean, as for any loss under pmap (the identity on unvarying values)
            out[f"sharpness_aware_loss {name}"] = (
                value,
                grad if axis_name is None else jax.lax.pmean(grad, axis_name),
            )
        for name, e in est.items():
            r = e(params, x, y, key=key)
            if name == "top_eigenvalues":
                r = r.value
            elif name == "spectral_density":
                r = (r.density, r.stderr)
            else:
                r = (r.value, r.stderr)
            out[name] = r
        return out

    return run


def check_estimators(mesh):
    n = mesh.size
    params = init_mlp(jax.random.key(0))
    x, y = data()
    key = jax.random.key(3)
    want = jax.jit(estimators(loss, None))(params, x, y, key)

    def compare(mode, got):
        for name in want:
            assert_close(f"{name} {mode}", got[name], want[name])

    shards = [a.reshape(n, -1, a.shape[-1]) for a in (x, y)]
    out = jax.pmap(estimators(loss, AXIS), axis_name=AXIS, in_axes=(None, 0, 0, None))(
        params, *shards, key
    )
    for k in (0, n - 1):
        compare(f"pmap device {k}", replicas(out)[k])
    sharded = [jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in (x, y)]
    # With JAX's checks the outputs must be typed as equal on every device: out_specs=P()
    # (a global-batch answer typed as varying would fail to leave shard_map).
    fn = jax.shard_map(
        estimators(loss, AXIS),
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS), P()),
        out_specs=P(),
    )
    compare("shard_map check_vma=True out_specs=P()", jax.jit(fn)(params, *sharded, key))
    run = estimators(loss, AXIS)
    fn = jax.shard_map(
        lambda *a: jax.tree_util.tree_map(lambda t: t[None], run(*a)),
        mesh=mesh,
        in_specs=(P(), P(AXIS), P(AXIS), P()),
        out_specs=P(AXIS),
        check_vma=False,
    )
    out = replicas(jax.jit(fn)(params, *sharded, key))
    for k in (0, n - 1):
        compare(f"shard_map check_vma=False device {k}", out[k])
    compare("sharded jit", jax.jit(estimators(loss, None))(params, *sharded, key))


def check_fsdp(mesh):
    """Params split across devices leaf by leaf (FSDP style) under jit: the same updates as on
    one device, and every update keeps its parameter's sharding (no leaf is gathered)."""
    model = jax.sharding.Mesh(mesh.devices, ("model",), (jax.sharding.AxisType.Auto,))
    params = init_mlp(jax.random.key(0), sizes=(3, 8, 2))
    specs = [{"w": P(None, "model"), "b": P("model")}, {"w": P("model", None), "b": P()}]
    sharded = jax.device_put(
        params, jax.tree_util.tree_map(lambda s: NamedSharding(model, s), specs)
    )
    x, y = data()
    txs = {name: tx for name, tx in transforms(None).items() if name in FSDP_TRANSFORMS}
    states = {name: tx.init(params) for name, tx in txs.items()}
    run = jax.jit(lambda *a: step_all(txs, *a))
    want = run(params, states, x, y, y)
    got = run(sharded, states, x, y, y)
    for name in txs:
        assert_close(f"{name} fsdp", got[name], want[name])
        for u, p in zip(jax.tree.leaves(got[name]), jax.tree.leaves(sharded)):
            if not u.sharding.is_equivalent_to(p.sharding, u.ndim):
                raise AssertionError(
                    f"{name} fsdp: update sharded as {u.sharding}, param as {p.sharding}"
                )
        print(f"ok {name} fsdp shardings kept")


FSDP_TRANSFORMS = ("sam", "asam", "frobenius", "random_sam")


def sample_sharded(sample_axis):
    """Sample-sharded transforms, objective gradient and estimator, as a function of
    (params, states, x, y, key); the batch is the same on every device."""
    ms = phipsimu.measures
    kw = {"rho": 0.05, "num_samples": 16, "sample_axis": sample_axis}
    # chunk_size=1: each device's block of 2 runs the chunked loop, with sample indices that
    # vary across devices and captured values that do not
    txs = {
        "trace": phipsimu.sharpness_aware(ms.trace(), chunk_size=1, **kw),
        "frobenius": phipsimu.sharpness_aware(ms.frobenius(), adaptive=True, **kw),
        "random_sam antithetic": phipsimu.random_sam(antithetic=True, **kw),
    }
    obj = phipsimu.sharpness_aware_loss(loss, ms.frobenius(), chunk_size=1, **kw)
    est = phipsimu.sharpness(
        loss, ms.frobenius(), num_samples=16, chunk_size=1, sample_axis=sample_axis
    )
    ggn = phipsimu.curvature.gauss_newton(model, conftest.mse)
    est_ggn = phipsimu.sharpness(
        ggn, ms.trace(), num_samples=16, chunk_size=1, sample_axis=sample_axis
    )

    def run(params, states, x, y, key):
        out = {}
        for name, tx in txs.items():
            update, state = step(tx, params, states[name], x, y)
            out[name] = (update, state.perturbed_losses, state.sharpness_term)
        value, grad = jax.value_and_grad(obj)(params, x, y, key=key)
        out["sharpness_aware_loss"] = (
            value,
            grad if sample_axis is None else jax.lax.pmean(grad, sample_axis),
        )
        e = est(params, x, y, key=key)
        out["sharpness"] = (e.value, e.stderr)
        e = est_ggn(params, x, y, key=key)
        out["sharpness gauss_newton"] = (e.value, e.stderr)
        return out

    return run, txs


def check_samples(mesh):
    """Perturbations spread over 8 devices: the same draws and answer as on one device."""
    n = mesh.size
    params = init_mlp(jax.random.key(0))
    x, y = data()
    key = jax.random.key(5)
    run1, txs = sample_sharded(None)
    states = {name: tx.init(params) for name, tx in txs.items()}
    want = jax.jit(run1)(params, states, x, y, key)
    runs, _ = sample_sharded("samples")
    samples = jax.sharding.Mesh(mesh.devices, ("samples",), (jax.sharding.AxisType.Auto,))

    def compare(mode, got):
        for name in want:
            assert_close(f"samples {name} {mode}", got[name], want[name])

    # pmap needs one mapped argument: the device index, unused
    pmapped = jax.pmap(lambda i, *a: runs(*a), axis_name="samples", in_axes=(0,) + (None,) * 5)
    out = pmapped(jnp.arange(n), params, states, x, y, key)
    compare("pmap device 7", replicas(out)[n - 1])
    # with JAX's checks, values equal on every device are typed so: out_specs=P()
    fn = jax.shard_map(runs, mesh=samples, in_specs=P(), out_specs=P())
    compare("shard_map check_vma=True out_specs=P()", jax.jit(fn)(params, states, x, y, key))
    fn = jax.shard_map(
        lambda *a: jax.tree_util.tree_map(lambda t: t[None], runs(*a)),
        mesh=samples,
        in_specs=P(),
        out_specs=P("samples"),
        check_vma=False,
    )
    out = replicas(jax.jit(fn)(params, states, x, y, key))
    for k in (0, n - 1):
        compare(f"shard_map check_vma=False device {k}", out[k])
    bad = phipsimu.sharpness(loss, phipsimu.measures.trace(), num_samples=12, sample_axis="samples")
    try:
        jax.pmap(lambda i: bad(params, x, y, key=key).value, axis_name="samples")(jnp.arange(n))
    except ValueError as err:
        assert "num_samples=12: the 12 perturbations must split evenly over the 8 devices" in str(
            err
        ), err
        print("ok samples: num_samples not divisible is a clear error")
    else:
        raise AssertionError("num_samples=12 on 8 devices: no error")


def m_sharpness_transforms(**kw):
    ms = phipsimu.measures
    return {
        "sam": phipsimu.sam(rho=0.5, **kw),
        "asam": phipsimu.sam(rho=0.5, adaptive=True, eta=0.01, **kw),
        "frobenius": phipsimu.sharpness_aware(ms.frobenius(), rho=0.05, num_samples=NUM, **kw),
        "trace": phipsimu.sharpness_aware(ms.trace(), rho=0.05, num_samples=NUM, **kw),
        "random_sam": phipsimu.random_sam(rho=0.05, num_samples=NUM, **kw),
    }


def check_m_sharpness(mesh):
    """sync=False (m-sharpness): per-device perturbations and gradients, replicas still equal.
    pmap gives each device the gradient of its own loss, so its update is the documented
    m-sharpness; shard_map (either check_vma) must give the same. With sync=True the same
    transforms give the single-device update (checked against it here too, and differing
    from sync=False, so the comparison can tell them apart)."""
    n = mesh.size
    params = init_mlp(jax.random.key(0))
    x, y = data()
    runs = {}
    for sync in (False, True):
        txs = m_sharpness_transforms(axis_name=AXIS, sync=sync)
        states = {name: tx.init(params) for name, tx in txs.items()}
        runs[sync] = (lambda *a, txs=txs: step_all(txs, *a, a[-1]), states)
    shards = [a.reshape(n, -1, a.shape[-1]) for a in (x, y)]
    run, states = runs[False]
    pmapped = jax.pmap(run, axis_name=AXIS, in_axes=(None, None, 0, 0))(params, states, *shards)
    reps = replicas(pmapped)
    for name in reps[0]:
        for k in range(1, n):
            assert_close(
                f"sync=False {name} pmap device {k} = device 0", reps[k][name], reps[0][name], 1e-6
            )
    want = reps[0]
    sharded = [jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in (x, y)]
    in_specs = (P(), P(), P(AXIS), P(AXIS))
    for sync in (False, True):
        run, states = runs[sync]
        got = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=P()))(
            params, states, *sharded
        )
        if sync:
            single = m_sharpness_transforms()
            states1 = {name: tx.init(params) for name, tx in single.items()}
            ref = jax.jit(lambda *a, t=single: step_all(t, *a, a[-1]))(params, states1, x, y)
            for name in got:
                assert_close(f"sync=True {name} shard_map check_vma=True", got[name], ref[name])
                diff = max(
                    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(jax.tree.leaves(ref[name]), jax.tree.leaves(want[name]))
                )
                assert diff > 1e-3, f"{name}: sync=True and sync=False agree ({diff:.2g})"
            continue
        for name in got:
            assert_close(
                f"sync=False {name} shard_map check_vma=True = pmap", got[name], want[name]
            )
        fn = jax.shard_map(
            lambda *a, run=run: jax.tree_util.tree_map(lambda t: t[None], run(*a)),
            mesh=mesh,
            in_specs=in_specs,
            out_specs=P(AXIS),
            check_vma=False,
        )
        out = replicas(jax.jit(fn)(params, states, *sharded))
        for k, r in ((0, out[0]), (n - 1, out[n - 1])):
            for name in r:
                assert_close(
                    f"sync=False {name} shard_map check_vma=False device {k} = pmap",
                    r[name],
                    want[name],
                )


def check_fsdp_shard_map(mesh):
    """shard_map over the data axis alone of a (data 4, model 2) mesh, params sharded along
    the model axis (left to the compiler): sync=False gives pmap's m-sharpness update on 4
    devices, and every update keeps its parameter's sharding."""
    mesh2 = jax.make_mesh((4, 2), (AXIS, "model"), (jax.sharding.AxisType.Auto,) * 2)
    params = init_mlp(jax.random.key(0), sizes=(3, 8, 2))
    specs = [{"w": P(None, "model"), "b": P("model")}, {"w": P("model", None), "b": P()}]
    sharded = jax.device_put(
        params, jax.tree_util.tree_map(lambda s: NamedSharding(mesh2, s), specs)
    )
    x, y = data()
    txs = {
        name: tx
        for name, tx in m_sharpness_transforms(axis_name=AXIS, sync=False).items()
        if name in ("sam", "trace", "random_sam")
    }
    states = {name: tx.init(params) for name, tx in txs.items()}

    def run(*a):
        return step_all(txs, *a, a[-1])

    shards = [a.reshape(4, -1, a.shape[-1]) for a in (x, y)]
    want = replicas(
        jax.pmap(run, axis_name=AXIS, in_axes=(None, None, 0, 0), devices=jax.devices()[:4])(
            params, states, *shards
        )
    )[0]
    xs, ys = [jax.device_put(a, NamedSharding(mesh2, P(AXIS))) for a in (x, y)]
    fn = jax.shard_map(
        run, mesh=mesh2, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=P(), axis_names={AXIS}
    )
    got = jax.jit(fn)(sharded, states, xs, ys)
    for name in txs:
        assert_close(
            f"sync=False {name} shard_map model-sharded params = pmap", got[name], want[name]
        )
        for u, p in zip(jax.tree.leaves(got[name]), jax.tree.leaves(sharded)):
            if not u.sharding.is_equivalent_to(p.sharding, u.ndim):
                raise AssertionError(f"{name}: update sharded as {u.sharding}, not {p.sharding}")
        print(f"ok sync=False {name} model-sharded shardings kept")

    # Params split by hand along the model axis inside shard_map (manual FSDP): each device
    # would perturb and normalise its shard alone, so every transform and the objective
    # refuse them with an error naming the leaf (they silently used shard-local norms).
    def gather(q):
        return jax.tree_util.tree_map(
            lambda v, s: (
                jax.lax.all_gather(v, "model", axis=list(s).index("model"), tiled=True)
                if "model" in s
                else v
            ),
            q,
            specs,
        )

    objective = phipsimu.sharpness_aware_loss(
        lambda q, x, y: loss(gather(q), x, y),
        phipsimu.measures.trace(),
        rho=0.05,
        num_samples=4,
        axis_name=AXIS,
    )
    cases = {
        **{
            name: lambda p, x, y, tx=tx: tx.update(
                jax.grad(lambda q: loss(gather(q), x, y))(p),
                tx.init(p),
                p,
                value_fn=lambda q: loss(gather(q), x, y),
            )[0]
            for name, tx in transforms(AXIS).items()
        },
        "objective": lambda p, x, y: jax.grad(objective)(p, x, y, key=jax.random.key(0)),
    }
    for name, case in cases.items():
        fn = jax.shard_map(case, mesh=mesh2, in_specs=(specs, P(AXIS), P(AXIS)), out_specs=specs)
        try:
            jax.jit(fn).trace(sharded, xs, ys)
        except ValueError as e:
            if "split along the shard_map axis ['model']" not in str(e):
                raise
            print(f"ok {name} params split by hand inside shard_map: clear error")
        else:
            raise AssertionError(f"{name}: params split by hand inside shard_map were accepted")
    # Leaves split by hand but masked out are not perturbed (their updates pass through), so
    # a transform perturbing only the unsplit leaf accepts them (traced only: the updates'
    # types along the model axis are the user's gather's business, not checked here).
    only_b = [{"w": False, "b": False}, {"w": False, "b": True}]
    tx = phipsimu.sam(rho=0.05, axis_name=AXIS, mask=only_b)

    def masked(p, x, y):
        value_fn = lambda q: loss(gather(q), x, y)  # noqa: E731
        tx.update(jax.grad(value_fn)(p), tx.init(p), p, value_fn=value_fn)
        return ()

    fn = jax.shard_map(masked, mesh=mesh2, in_specs=(specs, P(AXIS), P(AXIS)), out_specs=())
    jax.jit(fn).trace(sharded, xs, ys)
    print("ok masked-out leaves split by hand are accepted")


def guide_blocks():
    """The python blocks of docs/guides/scaling.md: the step, sharded jit,
    shard_map/pmap, several hosts."""
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs/guides/scaling.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 4, f"docs/guides/scaling.md: expected 4 python blocks, got {len(blocks)}"
    return blocks


def numpy_setup(seed=0):
    """Params and the global batch as numpy arrays (no JAX call: the multi-host worker must
    initialise jax.distributed first)."""
    rng = np.random.default_rng(seed)
    params = [
        {
            "w": rng.normal(size=(3, 4)).astype(np.float32) / np.sqrt(3),
            "b": np.zeros(4, np.float32),
        },
        {"w": rng.normal(size=(4, 2)).astype(np.float32) / 2, "b": np.zeros(2, np.float32)},
    ]
    x = rng.normal(size=(BATCH, 3)).astype(np.float32)
    y = rng.normal(size=(BATCH, 2)).astype(np.float32)
    return params, x, y


def reference(ns, params, x, y):
    """The single-device step on the global batch with the scaling guide's own step."""
    tx = optax.chain(
        phipsimu.sharpness_aware(ns["measure"], rho=0.05, num_samples=4), optax.sgd(0.1)
    )
    return jax.jit(ns["make_step"](tx))(params, tx.init(params), x, y)[0]


def check_recipes(mesh):
    step, jit_block, spmd_block, _ = guide_blocks()
    params, x, y = numpy_setup()
    ns = {"jax": jax, "jnp": jnp, "phipsimu": phipsimu, "loss": loss}
    ns.update(params=params, x=x, y=y)
    exec(step, ns)
    want = reference(ns, params, x, y)
    exec(jit_block, ns)
    assert_close("guide sharded jit", ns["params_jit"], want)
    exec(spmd_block, ns)
    assert_close("guide shard_map", ns["params_shard_map"], want)
    for k, r in enumerate(replicas(ns["params_pmap"])):
        assert_close(f"guide pmap device {k}", r, want)


def worker(process_id, port, num_processes=2):
    """One process of the multi-host run (one CPU device each, gloo collectives)."""
    step, _, _, hosts_block = guide_blocks()
    params, x, y = numpy_setup()
    rows = BATCH // num_processes
    ns = {"jax": jax, "jnp": jnp, "phipsimu": phipsimu, "loss": loss, "params": params}
    ns.update(NamedSharding=NamedSharding, P=P)  # imported by the sharded-jit block
    ns.update(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        x_local=x[process_id * rows : (process_id + 1) * rows],
        y_local=y[process_id * rows : (process_id + 1) * rows],
    )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    exec(step, ns)
    exec(hosts_block, ns)
    assert jax.process_count() == num_processes and jax.device_count() == num_processes
    got = jax.tree_util.tree_map(np.asarray, ns["params_hosts"])  # replicated: addressable
    want = reference(ns, params, x, y)  # this process alone, on the whole batch
    assert_close(f"multihost process {process_id} of {num_processes}", got, want)


def main():
    if "--worker" in sys.argv:
        _, _, process_id, port = sys.argv
        worker(int(process_id), int(port))
        print("all checks passed")
        return
    mesh = jax.make_mesh((len(jax.devices()),), (AXIS,), (jax.sharding.AxisType.Auto,))
    checks = sys.argv[1:] or ["transforms"]
    for c in checks:
        globals()[f"check_{c}"](mesh)
    print("all checks passed")


if __name__ == "__main__":
    main()
