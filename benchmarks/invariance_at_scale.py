"""Adaptive measures under function-preserving rescalings at network scale.

A bias-free ReLU MLP 64-256-256-10 (d = 84,480, float32) trained briefly on scikit-learn's
bundled digits (full batch, Adam). For ``adaptive=True`` trace and eigen_moment(2) with
``eta`` in {0, 0.01, 0.1}, prints ``S(T(x))/S(x) − 1`` with the same fixed key, for
``T`` = ``rescale_neurons`` (both hidden layers, factors e^U(−1, 1) per unit) and
``rescale_layers`` (factors 4, 1/2, 1/2), and the relative change of the loss. With
``eta = 0`` the adaptive measures see the same matrix ``T_x H T_x`` at x and T(x), so only
float32 rounding remains; ``eta > 0`` breaks the invariance.

    python benchmarks/invariance_at_scale.py [--num-samples 32] [--steps 100]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import phipsimu
from phipsimu import examples, symmetries


def apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"])
    return x @ params[-1]["w"]


def loss(params, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y))


def train(params, x, y, steps):
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    data = examples.load_dataset("digits")
    x, y = jnp.asarray(data.x_train, jnp.float32), jnp.asarray(data.y_train)
    params = [
        {"w": layer["w"]} for layer in examples.init_mlp(jax.random.key(0), [64, 256, 256, 10])
    ]
    params = train(params, x, y, args.steps)
    d = sum(p.size for p in jax.tree.leaves(params))

    rng = np.random.default_rng(0)
    neurons = symmetries.rescale_neurons(params, 0, np.exp(rng.uniform(-1, 1, 256)))
    neurons = symmetries.rescale_neurons(neurons, 1, np.exp(rng.uniform(-1, 1, 256)))
    layers = symmetries.rescale_layers(params, [4.0, 0.5, 0.5])
    transforms = {"rescale_neurons": neurons, "rescale_layers": layers}

    base_loss = float(loss(params, x, y))
    print(f"d = {d}, float32, loss {base_loss:.4f}, {args.num_samples} probes, key 0")
    for name, moved in transforms.items():
        rel = float(loss(moved, x, y)) / base_loss - 1
        print(f"{name}: loss change {rel:+.1e}")
    print("measure | eta | transform | S(x) ± stderr | S(T(x))/S(x) − 1 | status")
    key = jax.random.key(0)
    for mname, measure in [
        ("trace", phipsimu.measures.trace()),
        ("eigen_moment(2)", phipsimu.measures.eigen_moment(2)),
    ]:
        for eta in (0.0, 0.01, 0.1):
            fn = jax.jit(
                phipsimu.sharpness(
                    loss, measure, num_samples=args.num_samples, adaptive=True, eta=eta
                )
            )
            start = time.perf_counter()
            e0 = fn(params, x, y, key=key)
            for tname, moved in transforms.items():
                e1 = fn(moved, x, y, key=key)
                change = float(e1.value) / float(e0.value) - 1
                status = f"{int(e0.status)}/{int(e1.status)}"
                print(
                    f"{mname} | {eta} | {tname} | {float(e0.value):.4g} ± "
                    f"{float(e0.stderr):.2g} | {100 * change:+.3g}% | {status}"
                )
            print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
