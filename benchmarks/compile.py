"""Compile time against step time, and the cost of a second eager (non-jitted) call.

On the digits MLP 64-256-256-10, batch 512: compile time is ``jax.jit(f).lower(...).compile()``
on a fresh function; step time the median of warmed-up jitted calls; "eager, 2nd call" is
the second plain call of the un-jitted function with the same shapes (it should hit a cache,
not trace and compile again).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax

import phipsimu

from . import _common as c

M = 16


def run(quick: bool, repeats: int) -> list[dict[str, Any]]:
    loss, params = c.mlp()
    x, y = c.digits_batch()
    key = jax.random.key(0)
    m = 4 if quick else M
    trace, det = phipsimu.measures.trace(), phipsimu.measures.determinant()
    estimators = {f"`sharpness` (trace, m = {m})": phipsimu.sharpness(loss, trace, num_samples=m)}
    if not quick:
        estimators["`top_eigenvalues` (k = 1, 30 iterations)"] = phipsimu.top_eigenvalues(
            loss, 1, num_iterations=30
        )
        estimators[f"`sharpness` (determinant, m = {m})"] = phipsimu.sharpness(
            loss, det, num_samples=m
        )
    cases: dict[str, tuple[Any, tuple, bool]] = {}
    for label, est in estimators.items():
        cases[label] = (lambda p, est=est: est(p, x, y, key=key), (params,), True)
    if not quick:
        step, init = c.sgd_step(
            loss, phipsimu.sharpness_aware(trace, rho=0.05, num_samples=m), style="value_fn"
        )
        cases[f"eq. 10 SGD step (m = {m})"] = (step, (params, init(params), x, y), False)
    step, init = c.sgd_step(loss, phipsimu.sam(rho=0.05), style="value_fn")
    cases["`sam` SGD step"] = (step, (params, init(params), x, y), False)

    timers, compile_s, eager_s = {}, {}, {}
    for label, (fn, args, eager) in cases.items():
        raw = getattr(fn, "__wrapped__", fn)
        samples = []
        for _ in range(1 if quick else 2):
            # a new function object each time, so nothing is served from jit's caches
            fresh = jax.jit(lambda *a, raw=raw: raw(*a))
            t0 = time.perf_counter()
            fresh.lower(*args).compile()
            samples.append(time.perf_counter() - t0)
        compile_s[label] = statistics.median(samples)
        timers[label] = c.timer(jax.jit(raw), *args)
        if eager and not quick:
            jax.block_until_ready(raw(*args))
            t0 = time.perf_counter()
            jax.block_until_ready(raw(*args))
            eager_s[label] = time.perf_counter() - t0
    t = c.interleave(timers, repeats)
    out = []
    for label in cases:
        step_s = statistics.median(t[label])
        out.append(
            c.figure(
                "compile",
                label,
                compile_s[label] / step_s,
                unit="steps",
                compile_s=compile_s[label],
                step_ms=1e3 * step_s,
                eager_second_call_ms=None if label not in eager_s else 1e3 * eager_s[label],
            )
        )
    return out
