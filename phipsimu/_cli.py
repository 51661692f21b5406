"""``phipsimu demo``: train a small MLP on scikit-learn's bundled digits data and measure its
sharpness with several (φ, ψ, μ) presets, each against the dense-Hessian closed form.

Uses only the public API, as a user would.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import phipsimu


def load_digits(seed: int) -> tuple[np.ndarray, ...]:
    """Digits (1,797 8×8 images shipped with scikit-learn), scaled to [0, 1], 80/20 split."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the install
        raise SystemExit("phipsimu demo needs scikit-learn: pip install -e '.[examples]'") from err
    data = _load()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
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


def demo(steps: int, seed: int, hidden: int, num_samples: int) -> int:
    xtr, ytr, xte, yte = load_digits(seed)
    params = init_mlp(jax.random.key(seed), [64, hidden, 10])
    tx = optax.sgd(0.5, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(cross_entropy)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.choice(len(xtr), 128, replace=False)
        params, opt_state, loss = step(params, opt_state, xtr[idx], ytr[idx])
        if (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps:
            print(f"\rtraining  step {i + 1:5d}/{steps}  batch loss {float(loss):.4f}", end="")
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    acc = float(jnp.mean(jnp.argmax(mlp(params, xte), -1) == yte))
    train_loss = float(cross_entropy(params, xtr, ytr))
    d = sum(p.size for p in jax.tree_util.tree_leaves(params))
    print(f"MLP 64-{hidden}-10, d = {d}: test accuracy {acc:.3f}, train loss {train_loss:.4f}")
    print(f"\nSharpness of the full training loss ({num_samples} probes, HVP Monte Carlo)")
    print(f"{'measure':<16}{'estimate':>14}{'stderr':>12}{'dense exact':>14}{'z':>8}")
    presets = {
        "trace": phipsimu.measures.trace(),
        "eigen_moment_2": phipsimu.measures.eigen_moment(2),
        "frobenius": phipsimu.measures.frobenius(),
        "adaptive trace": phipsimu.measures.trace(),
    }
    key = jax.random.key(seed + 1)
    for name, measure in presets.items():
        adaptive = name.startswith("adaptive")
        est = jax.jit(
            phipsimu.sharpness(cross_entropy, measure, num_samples=num_samples, adaptive=adaptive)
        )(params, xtr, ytr, key=key)
        ref = phipsimu.exact_sharpness(cross_entropy, measure, adaptive=adaptive)(params, xtr, ytr)
        z = (float(est.value) - float(ref.value)) / float(est.stderr)
        print(
            f"{name:<16}{float(est.value):>14.6g}{float(est.stderr):>12.3g}"
            f"{float(ref.value):>14.6g}{z:>8.2f}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phipsimu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a small MLP on digits and measure its sharpness")
    p.add_argument("--steps", type=int, default=500, help="SGD steps (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=32, help="hidden width (default 32)")
    p.add_argument("--num-samples", type=int, default=256, help="Monte Carlo probes")
    p.add_argument("--quick", action="store_true", help="a few seconds: 100 steps, 64 probes")
    args = parser.parse_args(argv)
    for name in ("steps", "hidden", "num_samples"):
        if getattr(args, name) < (2 if name == "num_samples" else 1):
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
    if args.quick:
        args.steps, args.num_samples, args.hidden = 100, 64, 16
    return demo(args.steps, args.seed, args.hidden, args.num_samples)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
