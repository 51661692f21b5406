"""How cost grows with the parameter count d, on the MLP and on a small CNN.

MLP 64-h-h-10 (batch 512) and the CNN of ``_common`` (two 3×3 convolutions on the 8×8 digits,
batch 32), sized to d ≈ 10⁴, 10⁵, 10⁶. At each size: one ``jax.grad``, one ``sharpness``
probe (trace measure, m = 4) and one eq. 10 SGD step (m = 4), timed interleaved; reported are
the fitted exponents k of time ∝ dᵏ and the probe/grad and step/((m + 1) SGD) ratios at each d.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax

import phipsimu

from . import _common as c

M = 4


def _times(loss, params, x, y, repeats, quick):
    trace = phipsimu.measures.trace()
    est = jax.jit(phipsimu.sharpness(loss, trace, num_samples=M))
    sgd, sgd_init = c.sgd_step(loss, None)
    eq10, eq10_init = c.sgd_step(
        loss, phipsimu.sharpness_aware(trace, rho=0.05, num_samples=M), style="value_fn"
    )
    timers = {
        "grad": c.timer(jax.jit(jax.grad(loss)), params, x, y),
        "probe": c.timer(lambda p: est(p, x, y, key=jax.random.key(0)), params),
    }
    if not quick:
        timers["sgd"] = c.timer(sgd, params, sgd_init(params), x, y)
        timers["eq10"] = c.timer(eq10, params, eq10_init(params), x, y)
    return c.interleave(timers, repeats)


def run(quick: bool, repeats: int) -> list[dict[str, Any]]:
    sizes = (2e3, 1e4) if quick else (1e4, 1e5, 1e6)
    x512, y512 = c.digits_batch(512)
    x32, y32 = c.digits_batch(32)

    def mlp(d):
        h = c.mlp_width_for(d)
        return (*c.mlp((64, h, h, 10)), x512, y512)

    models = {"MLP 64-h-h-10, batch 512": mlp}
    if not quick:
        models["CNN 3×3 conv ×2 + dense, batch 32"] = lambda d: (
            *c.cnn(c.cnn_channels_for(d)),
            x32,
            y32,
        )
    out = []
    for name, build in models.items():
        ds, med = [], {k: [] for k in ("grad", "probe") + (() if quick else ("eq10",))}
        ratios = []
        for target in sizes:
            loss, params, x, y = build(target)
            d = c.num_params(params)
            t = _times(loss, params, x, y, repeats, quick)
            ds.append(d)
            for k in med:
                med[k].append(statistics.median(t[k]))
            ratios.append(
                {
                    "d": d,
                    "grad_ms": 1e3 * statistics.median(t["grad"]),
                    "probe_per_grad": c.median_ratio(t["probe"], t["grad"], M),
                    "eq10_per_m1_sgd": None
                    if quick
                    else c.median_ratio(t["eq10"], t["sgd"], M + 1),
                }
            )
        for k, what in (
            ("grad", "`jax.grad`"),
            ("probe", f"`sharpness` (m = {M})"),
            ("eq10", f"eq. 10 step (m = {M})"),
        )[: len(med)]:
            out.append(
                c.figure(
                    "scaling",
                    f"{name}: exponent k of {what} time ∝ dᵏ",
                    c.fit_exponent(ds, med[k]),
                    per_d=ratios if k == "grad" else None,
                    d=ds,
                    times_ms=[1e3 * v for v in med[k]],
                )
            )
    return out
