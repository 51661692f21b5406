"""Generalization study: sharpness-aware training under label noise, and sharpness measures as
predictors of the generalization gap before and after function-preserving rescalings.

    python benchmarks/generalization.py [--quick] --out DIR

writes ``DIR/generalization.json``, the tables of docs/study.md (``tables.md`` in DIR) and two
figures (``DIR/training.png``, ``DIR/correlation.png``); ``--from-json`` redoes the tables and
figures from an existing ``DIR/generalization.json``. The full study takes about 30 minutes on a
2-core CPU; ``--quick`` (about 2 minutes: one dataset, two noise levels, two seeds, eight
models) checks the pipeline.

Part 1, training (``"training"`` in the JSON). Bundled scikit-learn datasets (digits,
breast_cancer; :mod:`phipsimu.examples`), label noise 0 / 20 / 40 % on the training split only,
an MLP trained by SGD with momentum, with each method chained in front of the same base
optimizer: SGD, SAM, ASAM, the trace preset of eq. (10), its adaptive version, Frob-SAM and
random-perturbation SAM. Budgets are matched in gradient evaluations (at distinct points: SGD 1
per step, SAM/ASAM 2, an m-sample eq. (10) objective m + 1), so the methods take different
numbers of steps. ρ and the strength are chosen per (dataset, noise, method) by the mean
*validation* accuracy over seeds; the test split is read only for the selected configuration.
Every seed fixes the split, the noisy labels, the initialisation and the batches, the same for
all methods, so methods are compared paired over seeds (t-test on the per-seed differences,
Holm-corrected over the methods of one dataset and noise level).

Part 2, correlation (``"correlation"``). A grid of MLPs on digits (learning rate, batch size,
width, weight decay, training length); for each: the trace, λ_max and squared Frobenius norm of
the Hessian of the training loss, log det of the damped Gauss–Newton matrix, the adaptive trace
and λ_max (of ``T H T``, ``T = diag|x|``), and the scale-invariant measure of Theorem 1
(``measures.invariant_gaussian``). Kendall τ between each measure and the generalization gap
(train accuracy − test accuracy), with a bootstrap interval over models. Then every model is
rescaled by random neuron-wise factors (:func:`phipsimu.symmetries.rescale_neurons`, per layer
``Σ log c = 0`` so ``det D = 1``), which leaves its function and loss unchanged (recorded per
model), and the measures and τ are recomputed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

import phipsimu
from phipsimu import examples

METHODS = ("sgd", "sam", "asam", "trace", "adaptive_trace", "frob_sam", "random_sam")

#: gradient evaluations per step: m + 1 for the m-sample eq. (10) transforms
NUM_SAMPLES = 2
EVALS = {
    "sgd": 1,
    "sam": 2,
    "asam": 2,
    "trace": NUM_SAMPLES + 1,
    "adaptive_trace": NUM_SAMPLES + 1,
    "frob_sam": NUM_SAMPLES + 1,
    "random_sam": NUM_SAMPLES + 1,
}

#: (rho, strength) candidates (for frob_sam the second entry is Frob-SAM's λ, `lam`); None where
#: the method has no such parameter
GRIDS = {
    "sgd": [(None, None)],
    "sam": [(0.05, None), (0.1, None), (0.2, None), (0.5, None)],
    "asam": [(0.5, None), (1.0, None), (2.0, None), (5.0, None)],
    "trace": [(3.0, 1.0), (3.0, 5.0), (10.0, 1.0), (10.0, 5.0)],
    "adaptive_trace": [(15.0, 1.0), (15.0, 5.0), (40.0, 1.0), (40.0, 5.0)],
    "frob_sam": [(0.005, 0.01), (0.005, 0.05), (0.02, 0.01), (0.02, 0.05)],
    "random_sam": [(3.0, None), (5.0, None), (10.0, None), (20.0, None)],
}
ASAM_ETA = 0.01
ADAPTIVE_ETA = 0.01

FULL = {
    "datasets": ["digits", "breast_cancer"],
    "noise": [0.0, 0.2, 0.4],
    "seeds": 8,
    "grad_evals": 1800,
    "hidden": 64,
    "batch": 32,
    "lr": 0.05,
    "grid_size": None,  # all candidates
    "corr": {
        "widths": [16, 32],
        "batches": [16, 128],
        "lrs": [0.02, 0.1, 0.3],
        "wds": [0.0, 1e-3],
        "lengths": [300, 3000],
        "matvecs": 30,
        "lanczos": 30,
        "logdet_probes": 4,
        "invariant_samples": 64,
        "bootstrap": 1000,
    },
}
QUICK = {
    "datasets": ["digits"],
    "noise": [0.0, 0.4],
    "seeds": 2,
    "grad_evals": 240,
    "hidden": 32,
    "batch": 32,
    "lr": 0.05,
    "grid_size": 1,
    "corr": {
        "widths": [16],
        "batches": [32],
        "lrs": [0.05, 0.2],
        "wds": [0.0, 1e-3],
        "lengths": [50, 200],
        "matvecs": 6,
        "lanczos": 8,
        "logdet_probes": 2,
        "invariant_samples": 16,
        "bootstrap": 100,
    },
}
VAL_FRACTION = 0.2
TEST_FRACTION = 0.25
GN_DAMPING = 1e-3
RESCALE_SIGMA = 1.5  # log-factors ~ N(0, 1.5²), centred per layer: factors up to ~e^±4


# ---------------------------------------------------------------- part 1: training


def make_tx(method: str, rho, strength, seed, lr: float) -> optax.GradientTransformation:
    """The method's transform chained in front of SGD with momentum 0.9."""
    if method == "sgd":
        core = optax.identity()
    elif method == "sam":
        core = phipsimu.sam(rho=rho)
    elif method == "asam":
        core = phipsimu.sam(rho=rho, adaptive=True, eta=ASAM_ETA)
    elif method == "trace":
        core = phipsimu.sharpness_aware(
            phipsimu.measures.trace(),
            rho=rho,
            strength=strength,
            num_samples=NUM_SAMPLES,
            seed=seed,
        )
    elif method == "adaptive_trace":
        core = phipsimu.sharpness_aware(
            phipsimu.measures.trace(),
            rho=rho,
            strength=strength,
            num_samples=NUM_SAMPLES,
            adaptive=True,
            eta=ADAPTIVE_ETA,
            seed=seed,
        )
    elif method == "frob_sam":
        core = phipsimu.frobenius_sam(rho=rho, lam=strength, num_samples=NUM_SAMPLES, seed=seed)
    elif method == "random_sam":
        core = phipsimu.random_sam(rho=rho, num_samples=NUM_SAMPLES, seed=seed)
    else:
        raise ValueError(f"method={method!r}: must be one of {METHODS}")
    return optax.chain(core, optax.sgd(lr, momentum=0.9))


@functools.partial(jax.jit, static_argnames=("method", "sizes", "steps", "batch", "lr"))
def train_runs(method, sizes, steps, batch, lr, rho, strength, seed, data):
    """Train one model per (hyperparameter, run): ``rho``/``strength`` have shape (H,),
    ``seed`` and every array of ``data`` a leading run axis R. Returns accuracies (H, R)."""

    def one(rho, strength, seed, xtr, ytr, xva, yva, xte, yte):
        key = jax.random.PRNGKey(seed)
        params = examples.init_mlp(key, sizes)
        tx = make_tx(method, rho, strength, seed, lr)
        state = tx.init(params)

        def step(carry, k):
            params, state = carry
            idx = jax.random.randint(k, (batch,), 0, xtr.shape[0])
            xb, yb = xtr[idx], ytr[idx]

            def value_fn(p):
                return examples.cross_entropy(p, xb, yb)

            grads = jax.grad(value_fn)(params)
            updates, state = tx.update(grads, state, params, value_fn=value_fn)
            return (optax.apply_updates(params, updates), state), None

        keys = jax.random.split(jax.random.fold_in(key, 1), steps)
        (params, _), _ = jax.lax.scan(step, (params, state), keys)
        return examples.accuracy(params, xva, yva), examples.accuracy(params, xte, yte)

    over_runs = jax.vmap(one, in_axes=(None, None, 0, 0, 0, 0, 0, 0, 0))
    return jax.vmap(over_runs, in_axes=(0, 0, None, None, None, None, None, None, None))(
        rho, strength, seed, *data
    )


def t_interval(x: np.ndarray) -> float:
    """Half-width of the 95% t-interval of the mean."""
    n = len(x)
    return float(stats.t.ppf(0.975, n - 1) * np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired t-test p-value (1.0 when the differences are all equal)."""
    diff = np.asarray(a) - np.asarray(b)
    if np.allclose(diff, diff[0]):
        return 1.0 if diff[0] == 0 else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm–Bonferroni: which of the hypotheses are rejected at family-wise level alpha."""
    order = np.argsort(pvalues)
    reject = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        reject[i] = True
    return reject


def run_training(cfg: dict, log) -> list[dict]:
    seeds = list(range(cfg["seeds"]))
    rows = []
    for name in cfg["datasets"]:
        splits = [
            [
                examples.load_dataset(
                    name,
                    seed=s,
                    test_fraction=TEST_FRACTION,
                    val_fraction=VAL_FRACTION,
                    label_noise=p,
                )
                for s in seeds
            ]
            for p in cfg["noise"]
        ]
        flat = [sp for per_noise in splits for sp in per_noise]
        data = tuple(jnp.stack([getattr(sp, f) for sp in flat]) for f in flat[0]._fields[:6])
        seed_arr = jnp.asarray([s for _ in cfg["noise"] for s in seeds], jnp.int32)
        sizes = (flat[0].x_train.shape[1], cfg["hidden"], flat[0].num_classes)
        results = {}
        for method in METHODS:
            grid = GRIDS[method][: cfg["grid_size"]]
            rho = jnp.asarray([1.0 if r is None else r for r, _ in grid], jnp.float32)
            strength = jnp.asarray([1.0 if s is None else s for _, s in grid], jnp.float32)
            steps = cfg["grad_evals"] // EVALS[method]
            t0 = time.perf_counter()
            val, test = train_runs(
                method, sizes, steps, cfg["batch"], cfg["lr"], rho, strength, seed_arr, data
            )
            val = np.asarray(val).reshape(len(grid), len(cfg["noise"]), len(seeds))
            test = np.asarray(test).reshape(len(grid), len(cfg["noise"]), len(seeds))
            log(
                f"  {name} {method}: {len(grid)}x{seed_arr.size} runs, {steps} steps, "
                f"{time.perf_counter() - t0:.1f} s"
            )
            for j, p in enumerate(cfg["noise"]):
                best = int(np.argmax(val[:, j].mean(-1)))
                results[(p, method)] = (grid[best], steps, val[best, j], test[best, j])
        for p in cfg["noise"]:
            base = {m: results[(p, m)][3] for m in METHODS}
            comps = [m for m in METHODS if m != "sgd"]
            p_sgd = [paired_p(base[m], base["sgd"]) for m in comps]
            p_sam = [paired_p(base[m], base["sam"]) for m in comps if m != "sam"]
            sig_sgd = dict(zip(comps, holm(p_sgd)))
            sig_sam = dict(zip([m for m in comps if m != "sam"], holm(p_sam)))
            p_sgd, p_sam = (
                dict(zip(comps, p_sgd)),
                dict(zip([m for m in comps if m != "sam"], p_sam)),
            )
            for m in METHODS:
                (r, s), steps, val, test = results[(p, m)]
                rows.append(
                    {
                        "dataset": name,
                        "noise": p,
                        "method": m,
                        "rho": r,
                        "strength": s,
                        "seeds": len(seeds),
                        "test_acc_mean": float(test.mean()),
                        "test_acc_ci95": t_interval(test),
                        "grad_evals": steps * EVALS[m],
                        "steps": steps,
                        "val_acc_mean": float(val.mean()),
                        "test_acc_per_seed": [float(t) for t in test],
                        "diff_vs_sgd": None if m == "sgd" else float((test - base["sgd"]).mean()),
                        "p_vs_sgd": p_sgd.get(m),
                        "significant_vs_sgd": sig_sgd.get(m),
                        "p_vs_sam": p_sam.get(m),
                        "significant_vs_sam": sig_sam.get(m),
                    }
                )
    return rows


# ---------------------------------------------------------------- part 2: correlation


@functools.partial(jax.jit, static_argnames=("sizes", "batch", "lengths"))
def train_grid(sizes, batch, lengths, lr, wd, x, y):
    """Plain SGD with weight decay for every (lr, wd) pair (vmapped); the parameters after each
    of ``lengths`` steps (stacked: leading axes (len(lengths), len(lr)))."""

    def one(lr, wd):
        key = jax.random.PRNGKey(0)
        params = examples.init_mlp(key, sizes)
        tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
        state = tx.init(params)

        def step(carry, k):
            params, state = carry
            idx = jax.random.randint(k, (batch,), 0, x.shape[0])
            grads = jax.grad(examples.cross_entropy)(params, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        snaps, done = [], 0
        carry = (params, state)
        for i, n in enumerate(lengths):
            keys = jax.random.split(jax.random.fold_in(key, i + 1), n - done)
            carry, _ = jax.lax.scan(step, carry, keys)
            snaps.append(carry[0])
            done = n
        return jax.tree.map(lambda *a: jnp.stack(a), *snaps)

    out = jax.vmap(one)(lr, wd)
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), out)


def output_loss(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _adaptive_matvec(params, v, x, y):
    """``T H T v`` with ``T = diag|x|`` (the adaptive metric with η = 0)."""
    t = jax.tree.map(jnp.abs, params)
    hv = phipsimu.hvp(examples.cross_entropy)(params, jax.tree.map(jnp.multiply, t, v), x, y)
    return jax.tree.map(jnp.multiply, t, hv)


def make_measures(c: dict) -> dict:
    """Jitted ``params, x, y, key -> float`` for every measure (compiled once per shape)."""
    loss = examples.cross_entropy
    ggn = phipsimu.curvature.gauss_newton(examples.mlp_apply, output_loss)
    adaptive = phipsimu.curvature.linear_operator(_adaptive_matvec)
    m = c["matvecs"]
    trace = phipsimu.hessian_trace(loss, num_samples=m, method="hutch++")
    lmax = phipsimu.top_eigenvalues(loss, 1, num_iterations=c["lanczos"])
    frob = phipsimu.sharpness(loss, phipsimu.measures.frobenius(), num_samples=m)
    logdet = phipsimu.log_determinant(
        ggn, damping=GN_DAMPING, num_samples=c["logdet_probes"], num_iterations=c["lanczos"]
    )
    a_trace = phipsimu.hessian_trace(adaptive, num_samples=m, method="hutch++")
    a_lmax = phipsimu.top_eigenvalues(adaptive, 1, num_iterations=c["lanczos"])
    inv = phipsimu.sharpness(
        loss, phipsimu.measures.invariant_gaussian(), num_samples=c["invariant_samples"]
    )

    def all_measures(params, x, y, key):
        ks = jax.random.split(key, 7)
        ests = {
            "trace": trace(params, x, y, key=ks[0]),
            "lambda_max": lmax(params, x, y, key=ks[1]),
            "frobenius": frob(params, x, y, key=ks[2]),
            "logdet_gn": logdet(params, x, y, key=ks[3]),
            "adaptive_trace": a_trace(params, x, y, key=ks[4]),
            "adaptive_lambda_max": a_lmax(params, x, y, key=ks[5]),
            "invariant_log": inv(params, x, y, key=ks[6]),
        }
        values = {}
        for name, est in ests.items():
            if isinstance(est, phipsimu.EigenResult):
                values[name] = est.value[0]
                values[name + "_status"] = jnp.where(est.converged[0], 0, 1)
            else:
                values[name] = est.log_value if name == "invariant_log" else est.value
                values[name + "_status"] = est.status
        values["invariant_ess"] = ests["invariant_log"].ess
        values["invariant_pareto_k"] = ests["invariant_log"].pareto_k
        return values

    return jax.jit(all_measures)


MEASURES = (
    "trace",
    "lambda_max",
    "frobenius",
    "logdet_gn",
    "adaptive_trace",
    "adaptive_lambda_max",
    "invariant_log",
)


def random_rescaling(params, rng: np.random.Generator):
    """A function-preserving map: every hidden layer's units rescaled by ``exp(N(0, σ²))``
    factors centred to ``Σ log c = 0`` per layer (so ``det D = 1``)."""
    factors = []
    for layer in range(len(params) - 1):
        z = rng.normal(0.0, RESCALE_SIGMA, size=params[layer]["w"].shape[1])
        factors.append(jnp.asarray(np.exp(z - z.mean()), params[layer]["w"].dtype))

    def transform(p):
        for layer, c in enumerate(factors):
            p = phipsimu.symmetries.rescale_neurons(p, layer, c)
        return p

    return transform


def _floats(values: dict) -> dict:
    return {k: int(v) if k.endswith("_status") else float(v) for k, v in values.items()}


def kendall(measure: np.ndarray, gap: np.ndarray, reps: int, rng) -> tuple[float | None, list]:
    """Kendall τ over the models where the measure is finite, with a 95% percentile bootstrap
    interval (models resampled with replacement); None when fewer than 3 are finite."""
    ok = np.isfinite(measure)
    m, g = measure[ok], gap[ok]
    if len(m) < 3:
        return None, [None, None]
    tau = stats.kendalltau(m, g).statistic
    if not np.isfinite(tau):  # e.g. every finite value equal
        return None, [None, None]
    boot = []
    for _ in range(reps):
        idx = rng.integers(0, len(m), len(m))
        boot.append(stats.kendalltau(m[idx], g[idx]).statistic)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return _none_if_nan(tau), [_none_if_nan(lo), _none_if_nan(hi)]


def _none_if_nan(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _fmt_num(x) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def _fmt_tau(tau, ci) -> str:
    if tau is None:
        return "n/a"
    lo, hi = ("?" if c is None else f"{c:+.2f}" for c in ci)
    return f"{tau:+.2f} [{lo}, {hi}]"


def run_correlation(cfg: dict, log) -> tuple[list[dict], list[dict]]:
    c = cfg["corr"]
    split = examples.load_dataset("digits", seed=0, test_fraction=0.5)
    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    xt, yt = jnp.asarray(split.x_test), jnp.asarray(split.y_test)
    lr_wd = [(lr, wd) for lr in c["lrs"] for wd in c["wds"]]
    lr = jnp.asarray([a for a, _ in lr_wd], jnp.float32)
    wd = jnp.asarray([b for _, b in lr_wd], jnp.float32)
    measure_fn = make_measures(c)
    loss_fn = jax.jit(examples.cross_entropy)
    acc_fn = jax.jit(examples.accuracy)
    rng = np.random.default_rng(0)
    models = []
    for width in c["widths"]:
        sizes = (x.shape[1], width, width, split.num_classes)
        for batch in c["batches"]:
            t0 = time.perf_counter()
            snaps = train_grid(sizes, batch, tuple(c["lengths"]), lr, wd, x, y)
            t1 = time.perf_counter()
            for i, length in enumerate(c["lengths"]):
                for j, (lr_j, wd_j) in enumerate(lr_wd):
                    params = jax.tree.map(lambda a, i=i, j=j: a[i, j], snaps)
                    transform = random_rescaling(params, rng)
                    rescaled = transform(params)
                    key = jax.random.PRNGKey(len(models))
                    train_acc, test_acc = acc_fn(params, x, y), acc_fn(params, xt, yt)
                    before = measure_fn(params, x, y, key)
                    after = measure_fn(rescaled, x, y, key)
                    volume = phipsimu.symmetries.volume_factor(params, transform)
                    models.append(
                        {
                            "width": width,
                            "batch": batch,
                            "lr": lr_j,
                            "weight_decay": wd_j,
                            "steps": length,
                            "train_acc": float(train_acc),
                            "test_acc": float(test_acc),
                            "gap": float(train_acc - test_acc),
                            "loss": float(loss_fn(params, x, y)),
                            "loss_rescaled": float(loss_fn(rescaled, x, y)),
                            "test_acc_rescaled": float(acc_fn(rescaled, xt, yt)),
                            "log_det_D": float(volume.log_value),
                            "measures": _floats(before),
                            "measures_rescaled": _floats(after),
                        }
                    )
            log(
                f"  width {width} batch {batch}: train {t1 - t0:.1f} s, measures "
                f"{time.perf_counter() - t1:.1f} s"
            )
    gap = np.asarray([mo["gap"] for mo in models])
    rows = []
    for name in MEASURES:
        a = np.asarray([mo["measures"][name] for mo in models])
        b = np.asarray([mo["measures_rescaled"][name] for mo in models])
        flagged = [
            mo["measures"][name + "_status"] != 0 or mo["measures_rescaled"][name + "_status"] != 0
            for mo in models
        ]
        tau, ci = kendall(a, gap, c["bootstrap"], rng)
        tau_r, ci_r = kendall(b, gap, c["bootstrap"], rng)
        with np.errstate(invalid="ignore"):  # -inf - -inf for divergent measures
            rel = np.abs(b - a) / np.maximum(np.abs(a), 1e-30)
        rows.append(
            {
                "measure": name,
                "tau": tau,
                "tau_ci95": ci,
                "tau_rescaled": tau_r,
                "tau_rescaled_ci95": ci_r,
                "finite_models": int(np.sum(np.isfinite(a))),
                "finite_models_rescaled": int(np.sum(np.isfinite(b))),
                "flagged_models": int(np.sum(flagged)),
                "median_rel_change": float(np.median(rel[np.isfinite(rel)]))
                if np.isfinite(rel).any()
                else None,
            }
        )
    return rows, models


# ---------------------------------------------------------------- figures and main


def figures(result: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["training"]
    datasets = sorted({r["dataset"] for r in rows}, key=[r["dataset"] for r in rows].index)
    markers = "osD^vP*X"
    width = max(4.6 * len(datasets), 8.5)  # the figure title and the legend fit one panel too
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(width, 4.2), squeeze=False, layout="constrained"
    )
    for ax, name in zip(axes[0], datasets):
        for k, m in enumerate(METHODS):
            sel = [r for r in rows if r["dataset"] == name and r["method"] == m]
            xs = np.asarray([r["noise"] for r in sel]) + (k - 3) * 0.006
            ax.errorbar(
                xs,
                [r["test_acc_mean"] for r in sel],
                yerr=[r["test_acc_ci95"] for r in sel],
                marker=markers[k % len(markers)],
                ms=4,
                capsize=2,
                label=m,
            )
        ax.set_title(name)  # short: the figure's title says what is plotted
        ax.set_xlabel("label noise")
        ax.set_ylabel("test accuracy")
    fig.suptitle("Test accuracy (mean, 95% CI) at a matched gradient budget")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=4)
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)

    corr = result["correlation"]
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    pos = np.arange(len(corr))
    for off, key, label in ((-0.18, "tau", "original"), (0.18, "tau_rescaled", "rescaled")):
        tau = np.asarray([r[key] for r in corr], dtype=float)  # None -> nan
        ci = np.asarray([r[key + "_ci95"] for r in corr], dtype=float)
        ax.bar(pos + off, tau, width=0.36, label=label)
        ax.errorbar(pos + off, tau, yerr=[tau - ci[:, 0], ci[:, 1] - tau], fmt="none", c="k")
    ax.axhline(0, c="k", lw=0.5)
    ax.set_xticks(pos, [r["measure"] for r in corr], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Kendall τ with the generalization gap")
    ax.set_title("Measures as predictors, before and after function-preserving rescaling")
    ax.legend(fontsize=8)
    fig.savefig(out / "correlation.png", dpi=110)
    plt.close(fig)


def markdown_tables(result: dict) -> str:
    """The two tables of docs/study.md: test accuracy per (dataset, noise) and method (``*``:
    differs from SGD, paired over seeds, Holm-corrected 5%), and Kendall τ before / after
    rescaling."""
    rows = result["training"]
    keys = list(dict.fromkeys((r["dataset"], r["noise"]) for r in rows))
    by = {(r["dataset"], r["noise"], r["method"]): r for r in rows}
    budget = sorted({r["grad_evals"] for r in rows})
    lines = [
        f"Test accuracy (%), mean ± 95% t-interval over {rows[0]['seeds']} seeds, "
        f"{'/'.join(map(str, budget))} gradient evaluations per run; `*`: differs from SGD "
        "(paired t-test over seeds, Holm-corrected over the six methods, 5%).",
        "",
        "| dataset | noise | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for name, noise in keys:
        cells = []
        for m in METHODS:
            r = by[(name, noise, m)]
            star = "*" if r["significant_vs_sgd"] else ""
            cells.append(f"{100 * r['test_acc_mean']:.1f} ± {100 * r['test_acc_ci95']:.1f}{star}")
        lines.append(f"| {name} | {noise:.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Kendall τ between each measure and the generalization gap over "
        f"{len(result['models'])} models (95% bootstrap interval), before and after random "
        "function-preserving rescalings:",
        "",
        "| measure | τ | τ after rescaling | median relative change of the measure "
        "| models flagged / finite after rescaling |",
        "|---|---|---|---|---|",
    ]
    for r in result["correlation"]:
        lines.append(
            f"| {r['measure']} | {_fmt_tau(r['tau'], r['tau_ci95'])} | "
            f"{_fmt_tau(r['tau_rescaled'], r['tau_rescaled_ci95'])} | "
            f"{_fmt_num(r['median_rel_change'])} | {r.get('flagged_models', '–')} / "
            f"{r.get('finite_models_rescaled', '–')} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "load_average_start": list(os.getloadavg()),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small configuration (~2 min)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="redo the figures and tables from an existing DIR/generalization.json",
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        result = json.loads((out / "generalization.json").read_text())
        for row in result["correlation"]:  # older runs wrote NaN where τ is undefined
            for key in ("tau", "tau_rescaled"):
                row[key] = None if row[key] is None else _none_if_nan(row[key])
                row[key + "_ci95"] = [
                    None if c is None else _none_if_nan(c) for c in row[key + "_ci95"]
                ]
        (out / "generalization.json").write_text(json.dumps(result, indent=1))
        (out / "tables.md").write_text(markdown_tables(result))
        if not args.no_figures:
            figures(result, out)
        return result

    def log(msg):
        print(msg, flush=True)

    info = machine()
    t0 = time.perf_counter()
    log("part 1: training under label noise")
    training = run_training(cfg, log)
    t1 = time.perf_counter()
    log("part 2: measures as predictors")
    correlation, models = run_correlation(cfg, log)
    t2 = time.perf_counter()
    info["load_average_end"] = list(os.getloadavg())
    result = {
        "quick": args.quick,
        "config": {
            **{k: v for k, v in cfg.items()},
            "grids": {m: GRIDS[m][: cfg["grid_size"]] for m in METHODS},
            "num_samples": NUM_SAMPLES,
            "grad_evals_per_step": EVALS,
            "val_fraction": VAL_FRACTION,
            "test_fraction": TEST_FRACTION,
            "gn_damping": GN_DAMPING,
            "rescale_sigma": RESCALE_SIGMA,
            "asam_eta": ASAM_ETA,
            "adaptive_eta": ADAPTIVE_ETA,
        },
        "machine": info,
        "seconds": {"training": t1 - t0, "correlation": t2 - t1, "total": t2 - t0},
        "training": training,
        "correlation": correlation,
        "models": models,
    }
    (out / "generalization.json").write_text(json.dumps(result, indent=1))
    (out / "tables.md").write_text(markdown_tables(result))
    if not args.no_figures:
        figures(result, out)
    log(f"wrote {out / 'generalization.json'} in {t2 - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
