"""``phipsimu demo``: train a small MLP on scikit-learn's bundled digits five ways (SGD, SAM,
ASAM, the trace-(φ, ψ, μ) objective and the adaptive-trace (φ, ψ, μ) objective) with the same
seed and budget, then compare accuracy, loss and sharpness (Tr(H)/d, λ_max, adaptive trace),
and save a figure.

Uses only the public API, as a user would.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import phipsimu

BASE_LR = 0.05
BATCH = 64


def load_digits(seed: int) -> tuple[np.ndarray, ...]:
    """Digits (1,797 8×8 images shipped with scikit-learn), scaled to [0, 1]; a stratified-free
    random 75/25 train/test split fixed by ``seed``."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the install
        raise SystemExit("phipsimu demo needs scikit-learn: pip install -e '.[examples]'") from err
    data = _load()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.75 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        params.append({"w": w, "b": jnp.zeros(fan_out)})
    return params


def mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y))


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
    seconds_per_step: float


def train(
    tx: optax.GradientTransformation,
    params: Any,
    data: tuple[np.ndarray, ...],
    steps: int,
    seed: int,
    progress: Callable[[int], None],
) -> Result:
    xtr, ytr = data[0], data[1]

    @jax.jit
    def step(params, state, x, y):
        def value_fn(p):
            return cross_entropy(p, x, y)

        loss, grads = jax.value_and_grad(value_fn)(params)
        updates, state = tx.update(grads, state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    rng = np.random.default_rng(seed)  # the same batches for every method
    batches = [rng.choice(len(xtr), BATCH, replace=False) for _ in range(steps)]
    losses = []
    params, state, loss = step(params, state, xtr[batches[0]], ytr[batches[0]])  # compiles
    losses.append(float(loss))
    t0 = time.perf_counter()
    for i in range(1, steps):
        idx = batches[i]
        params, state, loss = step(params, state, xtr[idx], ytr[idx])
        losses.append(loss)
        progress(i + 1)
    jax.block_until_ready(params)
    elapsed = (time.perf_counter() - t0) / max(steps - 1, 1)
    return Result([float(x) for x in losses], params, elapsed)


def bar(name: str, total: int) -> Callable[[int], None]:
    def show(i: int) -> None:
        if i % max(1, total // 40) and i != total:
            return
        done = int(30 * i / total)
        sys.stderr.write(f"\r{name:<9}[{'#' * done}{'.' * (30 - done)}] {i}/{total}")
        if i == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def sharpness_probes(num_samples: int) -> Callable[..., dict]:
    """Sharpness of the full training loss, with standard errors. The estimators are built
    and jitted once and reused for every method (same shapes, no recompilation)."""
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
            "lambda_max": (float(eig.value[0]), float(eig.residual[0])),
            "adaptive": (float(a.value), float(a.stderr)),
        }

    return run


def plot(results: dict, table: dict, out: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    window = max(1, steps // 25)
    for name, res in results.items():
        smooth = np.convolve(res.losses, np.ones(window) / window, mode="valid")
        axes[0].plot(np.arange(len(smooth)) + window, smooth, label=name)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title(f"training loss (moving average of {window})")
    axes[0].legend()
    names = list(table)
    for ax, (key, title) in zip(
        axes[1:],
        [
            ("trace", "Tr(H)/d ± 2 s.e."),
            ("lambda_max", "λ_max (Lanczos) ± residual"),
            ("adaptive", "adaptive Tr(T H T)/d ± 2 s.e."),
        ],
    ):
        vals = [table[n][key][0] for n in names]
        errs = [table[n][key][1] * (2 if key != "lambda_max" else 1) for n in names]
        ax.bar(names, vals, yerr=errs, color=[f"C{i}" for i in range(len(names))], capsize=4)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def demo(
    steps: int, seed: int, out: str, names: Sequence[str], num_samples: int, probes: int
) -> int:
    data = load_digits(seed)
    xtr, ytr, xte, yte = data
    params0 = init_mlp(jax.random.key(seed), [64, 32, 10])
    d = sum(p.size for p in jax.tree_util.tree_leaves(params0))
    print(
        f"digits: {len(xtr)} train / {len(xte)} test images; MLP 64-32-10 (d = {d}); "
        f"{steps} steps of batch {BATCH}, SGD(lr={BASE_LR}, momentum=0.9) inside every method"
    )
    available = methods(num_samples)
    results, table = {}, {}
    for name in names:
        results[name] = train(available[name], params0, data, steps, seed, bar(name, steps))
    sgd_time = results["sgd"].seconds_per_step if "sgd" in results else None
    print(
        f"\n{'method':<9}{'test acc':>9}{'train loss':>11}{'Tr(H)/d':>21}"
        f"{'λ_max':>21}{'adaptive trace':>21}{'time/step':>10}"
    )
    probe = sharpness_probes(probes)
    key = jax.random.key(seed + 1)  # the same probes for every method
    for name, res in results.items():
        acc = float(jnp.mean(jnp.argmax(mlp(res.params, xte), -1) == yte))
        train_loss = float(cross_entropy(res.params, xtr, ytr))
        table[name] = probe(res.params, xtr, ytr, key)
        rel = f"{res.seconds_per_step / sgd_time:.2f}x" if sgd_time else "n/a"
        cells = "".join(f"{f'{v:.4g} ± {e:.2g}':>21}" for v, e in table[name].values())
        print(f"{name:<9}{acc:>9.3f}{train_loss:>11.4f}{cells}{rel:>10}")
    print(
        f"(± is the Monte Carlo standard error over {probes} probes; for λ_max the Lanczos "
        "residual bound. time/step is relative to SGD.)"
    )
    plot(results, table, out, steps)
    print(f"figure: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phipsimu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a digits MLP five ways and compare their sharpness")
    p.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="phipsimu_demo.png", help="where to write the figure")
    p.add_argument(
        "--methods",
        default="sgd,sam,asam,trace,adaptive",
        help="comma-separated subset of sgd,sam,asam,trace,adaptive",
    )
    p.add_argument("--num-samples", type=int, default=4, help="perturbations per step")
    p.add_argument("--probes", type=int, default=128, help="probes per sharpness estimate")
    p.add_argument("--quick", action="store_true", help="under 30 s: 150 steps, 32 probes")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.probes = 150, 32
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = ("sgd", "sam", "asam", "trace", "adaptive")
    bad = [m for m in names if m not in known]
    if bad or not names:
        parser.error(f"--methods={args.methods!r}: choose from {','.join(known)}")
    if args.steps < 2:
        parser.error(f"--steps={args.steps}: must be >= 2")
    if args.num_samples < 2 or args.num_samples % 2:
        parser.error(f"--num-samples={args.num_samples}: must be even and >= 2 (antithetic)")
    if args.probes < 2:
        parser.error(f"--probes={args.probes}: must be >= 2")
    return demo(args.steps, args.seed, args.out, names, args.num_samples, args.probes)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
