"""Step cost of the optax transforms, as ratios measured in one run (medians of repeats).

On a digits MLP (64-128-128-10, ReLU, batch 256; scikit-learn's bundled digits):

* ``sam`` step / plain SGD step, and ``sam`` step / ``optax.contrib.sam`` (opaque) step;
* ``sharpness_aware`` step with m perturbations / ((m + 1) · one gradient step), m ∈ {1, 4, 16}
  (m + 1 gradients is the minimum: one clean, m perturbed).

    python benchmarks/bench_transforms.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from _mlp import init_mlp
from sklearn.datasets import load_digits

import phipsimu


def loss(params, x, y):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def make_step(tx, style):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        if style == "value_fn":
            updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, x, y))
        elif style == "grad_fn":
            updates, state = tx.update(
                grads, state, params, grad_fn=lambda p, _: jax.grad(loss)(p, x, y)
            )
        else:
            updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def timer(tx, style, params, x, y, inner=20):
    """A compiled, warmed-up closure that returns the mean time of ``inner`` steps."""
    step = make_step(tx, style)
    state = {"p": params, "s": tx.init(params)}
    state["p"], state["s"] = step(state["p"], state["s"], x, y)
    jax.block_until_ready(state["p"])

    def run():
        p, s = state["p"], state["s"]
        t0 = time.perf_counter()
        for _ in range(inner):
            p, s = step(p, s, x, y)
        jax.block_until_ready(p)
        return (time.perf_counter() - t0) / inner

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    data = load_digits()
    x = jnp.asarray(data.data[:256] / 16.0, jnp.float32)
    y = jnp.asarray(data.target[:256])
    params = init_mlp(jax.random.key(0), [64, 128, 128, 10], gain=2.0)
    print(f"backend: {jax.default_backend()}, jax {jax.__version__}, optax {optax.__version__}")
    ref = optax.contrib.sam(
        optax.sgd(0.1),
        optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
        sync_period=2,
        opaque_mode=True,
    )
    timers = {
        "sgd": timer(optax.sgd(0.1), None, params, x, y),
        "sam": timer(optax.chain(phipsimu.sam(rho=0.05), optax.sgd(0.1)), "value_fn", params, x, y),
        "optax_sam": timer(ref, "grad_fn", params, x, y),
    }
    for m in (1, 4, 16):
        tx = optax.chain(
            phipsimu.sharpness_aware(phipsimu.measures.trace(), rho=0.05, num_samples=m),
            optax.sgd(0.1),
        )
        timers[m] = timer(tx, "value_fn", params, x, y)
    # interleave the configurations in every repeat and take medians of per-repeat ratios,
    # so load on the (shared) machine affects numerator and denominator alike
    ratios = {k: [] for k in ("sam/sgd", "sam/optax", "optax/sgd", 1, 4, 16)}
    for _ in range(args.repeats):
        t = {k: f() for k, f in timers.items()}
        ratios["sam/sgd"].append(t["sam"] / t["sgd"])
        ratios["sam/optax"].append(t["sam"] / t["optax_sam"])
        ratios["optax/sgd"].append(t["optax_sam"] / t["sgd"])
        for m in (1, 4, 16):
            ratios[m].append(t[m] / ((m + 1) * t["sgd"]))
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"sam step / SGD step:                      {med['sam/sgd']:.2f}")
    print(f"sam step / optax.contrib.sam (opaque):    {med['sam/optax']:.2f}")
    print(f"optax.contrib.sam step / SGD step:        {med['optax/sgd']:.2f}")
    for m in (1, 4, 16):
        print(f"sharpness_aware m={m:>2}: step / ((m+1) SGD steps) = {med[m]:.2f}")


if __name__ == "__main__":
    main()
