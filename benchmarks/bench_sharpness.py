"""Cost of one probe of ``phipsimu.sharpness`` in units of one ``jax.grad`` of the same loss.

MLP 64-256-256-10 (ReLU, cross-entropy), batch 512, CPU by default. Prints, for several probe
counts m and both batching modes (one vmap over all m probes; chunks of 4, the default), the
median over repeats of

    time(sharpness with m probes) / (m · time(jax.grad))

measured in one run, so machine noise affects numerator and denominator alike. The naive
reference (vmap of forward-over-reverse HVPs, then vᵀHv) is printed for comparison.

    python benchmarks/bench_sharpness.py [--repeats 7] [--samples 4 16 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from _mlp import init_mlp

import phipsimu


def loss(params, x, y):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def timer(fn, *args, inner=5, **kwargs):
    """A compiled, warmed-up closure returning the mean time of ``inner`` calls."""
    jax.block_until_ready(fn(*args, **kwargs))

    def run():
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args, **kwargs)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / inner

    return run


def naive(m):
    sampler = phipsimu.mu.sphere()

    def fn(params, x, y, key):
        v, _ = sampler.sample(key, params, m)
        hvp = phipsimu.hvp(loss)

        def one(vi):
            hv = hvp(params, vi, x, y)
            return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(vi), jax.tree.leaves(hv)))

        return jax.vmap(one)(v)

    return jax.jit(fn)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    key = jax.random.key(0)
    params = init_mlp(key, [64, 256, 256, 10])
    x = jax.random.normal(jax.random.key(1), (512, 64))
    y = jax.nn.one_hot(jnp.arange(512) % 10, 10)
    grad = timer(jax.jit(jax.grad(loss)), params, x, y)
    print(f"backend: {jax.default_backend()}, jax {jax.__version__}, repeats {args.repeats}")
    print(
        f"{'probes m':>9}{'vmap all':>10}{'default':>10}{'naive HVP':>11}   (gradients per probe)"
    )
    for m in args.samples:
        timers = [
            timer(
                jax.jit(
                    phipsimu.sharpness(
                        loss, phipsimu.measures.trace(), num_samples=m, chunk_size=chunk_size
                    )
                ),
                params,
                x,
                y,
                key=key,
            )
            for chunk_size in (m, None)
        ]
        timers.append(timer(naive(m), params, x, y, key))
        # interleave gradient and probe timings in every repeat; median of per-repeat ratios
        ratios = [[] for _ in timers]
        for _ in range(args.repeats):
            t_g = grad()
            for r, t in zip(ratios, timers):
                r.append(t() / (m * t_g))
        row = [statistics.median(r) for r in ratios]
        print(f"{m:>9}{row[0]:>10.2f}{row[1]:>10.2f}{row[2]:>11.2f}")


if __name__ == "__main__":
    main()
