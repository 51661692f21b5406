"""Do the per-key status flags mark the keys whose intervals fail? A coverage study.

A tanh MLP 4-10-6-3 (d = 137, float32, 64 random Gaussian inputs and targets, mean squared
error; the model of the issue 27 audit) at its initialisation, where H is indefinite. For each
preset and number of probes m, ``phipsimu.sharpness`` is evaluated on ``--keys`` fixed keys
and compared with the dense float64 closed form (``phipsimu.exact_sharpness``). Printed per
(preset, m):

* ``coverage``: share of keys whose ``value ± 1.96·stderr`` covers the reference;
* ``flagged``: share of keys with a nonzero ``status``;
* ``cov|flag``: covered or flagged (the promise of docs/conventions.md, "Diagnostics");
* ``unflagged``: coverage among the keys left unflagged (and how many they are): a flag is
  useful only if this is at least the nominal 0.95 (goal: >= 0.93);
* the median Pareto k̂.

    python -m benchmarks.coverage_flags [--keys 400] [--num-samples 64 256]
        [--presets trace eigen_moment_2 eigen_moment_4]

The full study (400 keys, m = 64 and 256, three presets) takes a few CPU-minutes on the
2-core development machine; ``--keys 100 --num-samples 64`` is a quick look.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import phipsimu

from . import _common as c

PRESETS = {
    "trace": phipsimu.measures.trace,
    "eigen_moment_2": lambda: phipsimu.measures.eigen_moment(2),
    "eigen_moment_4": lambda: phipsimu.measures.eigen_moment(4),
    "frobenius": phipsimu.measures.frobenius,
}


def model(seed: int = 0, sizes=(4, 10, 6, 3), num: int = 64):
    """The tanh MLP, its data and its mean squared error."""
    key, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = c.init_mlp(key, sizes)
    x = jax.random.normal(kx, (num, sizes[0]))
    y = jax.random.normal(ky, (num, sizes[-1]))

    def loss(p, x, y):
        h = x
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return jnp.mean((h @ p[-1]["w"] + p[-1]["b"] - y) ** 2)

    return loss, params, x, y


def reference(loss, measure, params, x, y) -> float:
    """The closed form on the dense float64 Hessian."""
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        est = phipsimu.exact_sharpness(loss, measure)(to64(params), to64(x), to64(y))
        return float(est.value)


def study(name: str, num_samples: int, keys: int, seed: int = 0) -> dict:
    """Coverage, flags and unflagged coverage of one preset at one m over ``keys`` keys."""
    loss, params, x, y = model(seed)
    measure = PRESETS[name]()
    exact = reference(loss, measure, params, x, y)
    fn = phipsimu.sharpness(loss, measure, num_samples=num_samples)
    batch = jax.jit(jax.vmap(lambda k: fn(params, x, y, key=k)))
    est = batch(jax.random.split(jax.random.key(1000 + seed), keys))
    value, stderr = np.asarray(est.value, np.float64), np.asarray(est.stderr, np.float64)
    covered = np.abs(value - exact) <= 1.96 * stderr
    flagged = np.asarray(est.status) != 0
    unflagged = ~flagged
    return {
        "preset": name,
        "m": num_samples,
        "keys": keys,
        "coverage": float(covered.mean()),
        "flagged": float(flagged.mean()),
        "covered_or_flagged": float((covered | flagged).mean()),
        "unflagged_coverage": float(covered[unflagged].mean()) if unflagged.any() else None,
        "unflagged_keys": int(unflagged.sum()),
        "median_k": float(np.nanmedian(np.asarray(est.pareto_k)))
        if np.any(np.isfinite(np.asarray(est.pareto_k)))
        else None,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=400)
    parser.add_argument("--num-samples", type=int, nargs="+", default=[64, 256])
    parser.add_argument(
        "--presets", nargs="+", default=["trace", "eigen_moment_4"], choices=sorted(PRESETS)
    )
    args = parser.parse_args(argv)
    rows = []
    print(f"tanh MLP 4-10-6-3 (d = 137), {args.keys} keys, covered: |error| <= 1.96 stderr")
    print(
        f"{'preset':16s} {'m':>5s} {'coverage':>9s} {'flagged':>8s} {'cov|flag':>9s} "
        f"{'unflagged':>10s} {'(keys)':>7s} {'med k':>6s}"
    )
    for name in args.presets:
        for m in args.num_samples:
            r = study(name, m, args.keys)
            rows.append(r)
            unf = "-" if r["unflagged_coverage"] is None else f"{r['unflagged_coverage']:.3f}"
            k = "-" if r["median_k"] is None else f"{r['median_k']:.2f}"
            print(
                f"{name:16s} {m:5d} {r['coverage']:9.3f} {r['flagged']:8.3f} "
                f"{r['covered_or_flagged']:9.3f} {unf:>10s} {r['unflagged_keys']:7d} {k:>6s}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
