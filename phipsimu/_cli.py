"""``phipsimu demo``: train a small MLP on scikit-learn's bundled digits five ways (SGD, SAM,
ASAM, the trace-(φ, ψ, μ) objective and the adaptive-trace (φ, ψ, μ) objective) with the same
seeds and budget, then compare test accuracy (mean and 95% confidence interval over seeds),
loss and sharpness (Tr(H)/d, λ_max, adaptive trace), and save a figure.

Uses only the public API and :mod:`phipsimu.examples`, as a user would.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import phipsimu
from phipsimu import examples

BASE_LR = 0.05
BATCH = 64
SIZES = (64, 32, 10)
#: time/step: after training, every method's compiled step runs TIMING_STEPS steps in turn, in
#: TIMING_ROUNDS interleaved rounds (so a slow spell of a shared machine hits every method
#: alike); the ratio to SGD is the median over rounds of the per-round ratio.
TIMING_ROUNDS = 15
TIMING_STEPS = 50
#: How the figure and the printed key name the methods (``asam`` and ``adaptive`` are different
#: things: SAM's adaptive variant, and the (φ, ψ, μ) objective on the adaptive trace).
LABELS = {
    "sgd": "SGD",
    "sam": "SAM",
    "asam": "ASAM (adaptive SAM)",
    "trace": "(φ,ψ,μ) trace",
    "adaptive": "(φ,ψ,μ) adaptive trace",
}
STYLE = {  # colour and marker per method, distinct even in greyscale
    "sgd": ("C0", "o"),
    "sam": ("C1", "s"),
    "asam": ("C2", "^"),
    "trace": ("C3", "D"),
    "adaptive": ("C4", "v"),
}
# Two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom (then ~normal).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def cross_entropy(params: Any, x: Any, y: Any) -> jax.Array:
    return examples.cross_entropy(params, x, y)


def interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student-t confidence interval; None with one value
    (the spread is unknown, not zero)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, None
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def fmt(value: float, half: float | None, width: int = 21) -> str:
    """``value ± half``, or ``value ± n/a`` when the uncertainty is unknown (never ``± 0``)."""
    text = f"{value:.4g} ± {half:.2g}" if half is not None and half > 0 else f"{value:.4g} ± n/a"
    return f"{text:>{width}}"


def methods(num_samples: int) -> dict[str, optax.GradientTransformationExtraArgs]:
    """The five optimisers: one base (SGD with momentum) and the same learning rate.

    Random-direction radii are larger than SAM's: a random unit direction in d dimensions
    meets curvature about d times more weakly than the adversarial one, and the adaptive
    perturbation ``ρ T_x v`` is further scaled by ``|x|``."""
    base = optax.sgd(BASE_LR, momentum=0.9)
    return {
        "sgd": base,
        "sam": optax.chain(phipsimu.sam(rho=0.05), base),
        "asam": optax.chain(phipsimu.sam(rho=0.5, eta=0.01, adaptive=True), base),
        "trace": optax.chain(
            phipsimu.sharpness_aware(
                phipsimu.measures.trace(), rho=4.0, num_samples=num_samples, antithetic=True
            ),
            base,
        ),
        "adaptive": optax.chain(
            phipsimu.sharpness_aware(
                phipsimu.measures.trace(),
                rho=6.0,
                num_samples=num_samples,
                antithetic=True,
                adaptive=True,
                eta=0.01,
            ),
            base,
        ),
    }


class Result(NamedTuple):
    losses: list[float]
    params: Any
    state: Any


def progress_bar(desc: str, total: int) -> Any:
    """tqdm on a terminal; nothing in logs, pipes and CI (tqdm's ``disable=None``), and nothing
    when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the examples extra
        return None
    return tqdm(total=total, desc=desc, disable=None, leave=False, file=sys.stderr)


def make_step(tx: optax.GradientTransformation) -> Any:
    """One jitted training step (compiled once per method, reused for every seed)."""

    @jax.jit
    def step(params, state, x, y):
        def value_fn(p):
            return cross_entropy(p, x, y)

        loss, grads = jax.value_and_grad(value_fn)(params)
        updates, state = tx.update(grads, state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), state, loss

    return step


def train(
    tx: optax.GradientTransformation,
    step: Any,
    params: Any,
    split: examples.Split,
    steps: int,
    seed: int,
    desc: str,
) -> Result:
    xtr, ytr = split.x_train, split.y_train
    state = tx.init(params)
    rng = np.random.default_rng(seed)  # the same batches for every method
    batches = [rng.choice(len(xtr), BATCH, replace=False) for _ in range(steps)]
    losses = []
    bar = progress_bar(desc, steps)
    for idx in batches:
        params, state, loss = step(params, state, xtr[idx], ytr[idx])
        losses.append(loss)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return Result([float(x) for x in losses], params, state)


def time_steps(
    runs: dict[str, tuple[Any, Any, Any]],
    x: Any,
    y: Any,
    rounds: int = TIMING_ROUNDS,
    steps: int = TIMING_STEPS,
) -> dict[str, list[float]]:
    """Seconds per step of every method's compiled ``step`` (``runs``: name -> (step, params,
    state)), measured interleaved: in each round every method runs ``steps`` steps on the same
    device-resident batch, one method after another (the order reversed every other round),
    after a warm-up round that is discarded.
    Returns the per-round times, so that ratios can be taken within a round."""
    x, y = jax.device_put(x), jax.device_put(y)
    carry = {name: (params, state) for name, (_, params, state) in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(rounds + 1):
        for name in order if r % 2 else order[::-1]:  # alternate who goes first
            step = runs[name][0]
            params, state = carry[name]
            jax.block_until_ready(params)
            t0 = time.perf_counter()
            for _ in range(steps):
                params, state, _loss = step(params, state, x, y)
            jax.block_until_ready(params)
            if r > 0:  # round 0 warms up caches and dispatch paths
                seconds[name].append((time.perf_counter() - t0) / steps)
            carry[name] = (params, state)
    return seconds


def ratios_to(seconds: dict[str, list[float]], ref: str = "sgd") -> dict[str, list[float]]:
    """Per method: its time divided by ``ref``'s time in the same round, round by round."""
    return {name: [a / b for a, b in zip(times, seconds[ref])] for name, times in seconds.items()}


def sharpness_probes(num_samples: int) -> Any:
    """Sharpness of the full training loss, with standard errors. The estimators are built
    and jitted once and reused for every method and seed (same shapes, no recompilation)."""
    trace = jax.jit(
        phipsimu.sharpness(cross_entropy, phipsimu.measures.trace(), num_samples=num_samples)
    )
    adaptive = jax.jit(
        phipsimu.sharpness(
            cross_entropy,
            phipsimu.measures.trace(),
            num_samples=num_samples,
            adaptive=True,
            eta=0.01,
        )
    )
    top = jax.jit(phipsimu.top_eigenvalues(cross_entropy, 1, num_iterations=30))

    def run(params: Any, x: np.ndarray, y: np.ndarray, key: jax.Array) -> dict:
        t, a, eig = (
            trace(params, x, y, key=key),
            adaptive(params, x, y, key=key),
            top(params, x, y, key=key),
        )
        return {
            "trace": (float(t.value), float(t.stderr)),
            "lambda_max": (float(eig.value[0]), None),
            "adaptive": (float(a.value), float(a.stderr)),
        }

    return run


COLUMNS = (
    ("accuracy", "test accuracy"),
    ("trace", "Tr(H)/d"),
    ("lambda_max", "λ_max (Lanczos)"),
    ("adaptive", "adaptive Tr(T H T)/d"),
)


def summarise(runs: list[dict]) -> dict[str, tuple[float, float | None]]:
    """Mean and 95% CI over seeds; with one seed, 2 Monte Carlo standard errors where the
    estimator has one and unknown (None) otherwise."""
    out = {}
    for key, _ in COLUMNS:
        if len(runs) > 1:
            out[key] = interval([r[key][0] for r in runs])
        else:
            value, se = runs[0][key]
            out[key] = (value, None if se is None else 2 * se)
    return out


def plot(
    losses: dict,
    table: dict,
    out: str,
    steps: int,
    seeds: int,
    ratios: dict[str, list[float]] | None = None,
) -> None:
    """A 2 × 3 grid: training loss, test accuracy, time per step (relative to SGD), and the
    three sharpness measures; one colour and marker per method throughout, methods spelled
    out on every axis that lists them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), layout="constrained")
    names = list(table)
    window = max(1, steps // 25)
    ax = axes[0][0]
    for name, curves in losses.items():
        mean = np.mean(np.asarray(curves), axis=0)
        smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
        colour, marker = STYLE[name]
        ax.plot(
            np.arange(len(smooth)) + window,
            smooth,
            label=LABELS[name],
            color=colour,
            marker=marker,
            markevery=max(1, len(smooth) // 6),
            ms=5,
        )
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="training loss",
        title=f"training loss (mean of {seeds} seed(s),\nmoving average of {window} steps)",
    )
    ax.legend(fontsize=8)

    def dots(ax, values: dict[str, tuple[float, Any]], title: str, xlabel: str) -> None:
        for i, n in enumerate(names):
            value, err = values[n]
            colour, marker = STYLE[n]
            ax.errorbar(
                [value], [i], xerr=err, fmt=marker, color=colour, capsize=4, ms=7, elinewidth=1.5
            )
        ax.set_yticks(range(len(names)), [LABELS[n] for n in names])
        ax.set_ylim(len(names) - 0.5, -0.5)  # first method on top, as in the printed table
        ax.grid(axis="x", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))  # 1e-4 etc. at the end
        ax.set(title=title, xlabel=xlabel)

    band = "95% CI over seeds" if seeds > 1 else "± 2 s.e. (none where unknown)"
    panels = [(axes[0][1], COLUMNS[0]), *zip(axes[1], COLUMNS[1:])]
    for ax, (key, label) in panels:
        values = {
            n: (table[n][key][0], None if table[n][key][1] is None else [table[n][key][1]])
            for n in names
        }
        dots(ax, values, f"{label}\n({band})", label)
    ax = axes[0][2]
    if ratios:
        values = {}
        for n in names:
            q1, med, q3 = np.percentile(ratios[n], [25, 50, 75])
            values[n] = (float(med), [[med - q1], [q3 - med]])
        dots(ax, values, "time per step relative to SGD\n(median, quartiles over rounds)", "× SGD")
        ax.axvline(1.0, color="k", lw=0.5)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "time per step: needs sgd in --methods", ha="center", va="center")
    fig.savefig(out, dpi=110)
    plt.close(fig)


def demo(
    steps: int,
    seeds: int,
    seed: int,
    out: str,
    names: Sequence[str],
    num_samples: int,
    probes: int,
) -> int:
    available = methods(num_samples)
    step_fns = {name: make_step(available[name]) for name in names}
    probe = sharpness_probes(probes)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    losses: dict[str, list[list[float]]] = {n: [] for n in names}
    train_loss: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, tuple[Any, Any, Any]] = {}
    for s in range(seed, seed + seeds):
        split = examples.load_dataset("digits", seed=s)
        params0 = examples.init_mlp(jax.random.key(s), SIZES)
        if s == seed:
            d = sum(p.size for p in jax.tree_util.tree_leaves(params0))
            print(
                f"digits: {len(split.x_train)} train / {len(split.x_test)} test images; MLP "
                f"{'-'.join(map(str, SIZES))} (d = {d}); {steps} steps of batch {BATCH}, "
                f"SGD(lr={BASE_LR}, momentum=0.9) inside every method; {seeds} seed(s) "
                f"{seed}..{seed + seeds - 1} (split, initialisation and batches)"
            )
        key = jax.random.key(s + 10_000)  # the same probes for every method
        for name in names:
            tx = available[name]
            res = train(tx, step_fns[name], params0, split, steps, s, f"{name} seed {s}")
            xtr, ytr = split.x_train, split.y_train
            row = probe(res.params, xtr, ytr, key)
            acc = float(examples.accuracy(res.params, split.x_test, split.y_test))
            row["accuracy"] = (acc, None)
            runs[name].append(row)
            losses[name].append(res.losses)
            train_loss[name].append(float(cross_entropy(res.params, xtr, ytr)))
            last[name] = (step_fns[name], res.params, res.state)
    ratios = None
    if "sgd" in names:
        seconds = time_steps(last, split.x_train[:BATCH], split.y_train[:BATCH])
        ratios = ratios_to(seconds)
    table = {name: summarise(runs[name]) for name in names}
    print(
        f"\n{'method':<9}{'test acc':>21}{'train loss':>11}{'Tr(H)/d':>21}"
        f"{'λ_max':>21}{'adaptive trace':>21}{'time/step':>10}"
    )
    for name in names:
        ratio = f"{statistics.median(ratios[name]):.2f}x" if ratios else "n/a"
        cells = "".join(fmt(*table[name][key]) for key, _ in COLUMNS[1:])
        print(
            f"{name:<9}{fmt(*table[name]['accuracy'])}"
            f"{statistics.fmean(train_loss[name]):>11.4f}{cells}{ratio:>10}"
        )
    if seeds > 1:
        spread = f"the 95% confidence interval of the mean over {seeds} seeds (Student t)"
    else:
        spread = (
            f"2 Monte Carlo standard errors over {probes} probes, n/a where unknown "
            "(one seed: use --seeds for confidence intervals)"
        )
    timing = (
        f"time/step is relative to SGD: the median over {TIMING_ROUNDS} interleaved rounds "
        f"(each method runs {TIMING_STEPS} compiled steps in turn, after a warm-up round) of "
        "the ratio within a round"
        if ratios
        else "time/step needs sgd in --methods"
    )
    print(f"(± is {spread}; {timing}.)")
    print("methods: " + "; ".join(f"{n} = {LABELS[n]}" for n in names))
    plot(losses, table, out, steps, seeds, ratios)
    print(f"figure: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phipsimu", description=__doc__)
    parser.add_argument("--version", action="version", version=f"phipsimu {phipsimu.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a digits MLP five ways and compare their sharpness")
    p.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds to average over, for confidence intervals (default 3; 2 with --quick)",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--out", default="phipsimu_demo.png", help="where to write the figure")
    p.add_argument(
        "--methods",
        default="sgd,sam,asam,trace,adaptive",
        help="comma-separated subset of sgd,sam,asam,trace,adaptive",
    )
    p.add_argument("--num-samples", type=int, default=4, help="perturbations per step")
    p.add_argument("--probes", type=int, default=128, help="probes per sharpness estimate")
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: 150 steps, 2 seeds, 32 probes"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.probes = 150, 32
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = ("sgd", "sam", "asam", "trace", "adaptive")
    bad = [m for m in names if m not in known]
    if bad or not names:
        parser.error(f"--methods={args.methods!r}: choose from {','.join(known)}")
    if args.steps < 2:
        parser.error(f"--steps={args.steps}: must be >= 2")
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds}: must be >= 1")
    if args.num_samples < 2 or args.num_samples % 2:
        parser.error(f"--num-samples={args.num_samples}: must be even and >= 2 (antithetic)")
    if args.probes < 2:
        parser.error(f"--probes={args.probes}: must be >= 2")
    return demo(args.steps, args.seeds, args.seed, args.out, names, args.num_samples, args.probes)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
