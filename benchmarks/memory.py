"""Peak memory against the number of samples m, each measurement in a fresh process.

Growth of peak RSS while compiling and running the call (MiB above the RSS just before it,
median of 3 fresh processes per point; the running phase alone, and a plain jitted gradient,
are reported beside it) for ``sharpness`` (trace measure), ``jax.grad(sharpness_aware_loss)``,
the ``sharpness_aware`` SGD step and the ``frobenius_sam`` SGD step (vector ψ, two passes) on
the digits MLP 64-256-256-10, batch 512, at the default chunking; plus the growth while
compiling and XLA's planned temporary buffers. Goal: the running peak at m = 256 at most 1.5×
the one at m = 4.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import _common as c

ROOT = Path(__file__).resolve().parent.parent
LABELS = {
    "sharpness": "`sharpness`",
    "grad_loss": "`jax.grad(sharpness_aware_loss)`",
    "update": "`sharpness_aware` step",
    "frobenius_update": "`frobenius_sam` step (vector ψ)",
}


def measure(kind: str, m: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._memory_probe", kind, str(m)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_of(kind: str, m: int, runs: int) -> dict[str, Any]:
    """Field by field median of ``runs`` fresh processes (the compile phase's peak varies by
    a few tens of MiB from process to process)."""
    rows = [measure(kind, m) for _ in range(runs)]

    def mid(k: str) -> Any:
        values = [r[k] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        return statistics.median(values) if numeric else values[0]

    return {k: mid(k) for k in rows[0]}


def run(quick: bool, repeats: int) -> list[dict[str, Any]]:
    runs = 1 if quick else min(repeats, 3)
    kinds = ("sharpness",) if quick else tuple(LABELS)
    ms = (4, 8) if quick else (4, 16, 64, 256)
    out = []
    for kind in kinds:
        rows = [median_of(kind, m, runs) for m in ms]
        total = {r["m"]: r["total_mib"] for r in rows}
        lo, hi = ms[0], ms[-1]
        # from the second point on every m uses the same chunked program (needs 3+ points)
        flat = total[hi] / max(total[ms[1]], 1.0) if len(ms) > 2 else float("inf")
        cause = (
            "memory grows with m: the call holds buffers for more samples at once (see the "
            "running growth per m and XLA's temp buffers)"
            if flat > 1.1
            else f"not proportional to m: from m = {ms[1]} to {hi} the peak grows {flat:.2f}×; "
            f"at m = {lo} one vmap over all samples compiles to a smaller program than the "
            "chunked loop used beyond one chunk"
        )
        out.append(
            c.figure(
                "memory",
                f"{LABELS[kind]}: peak RSS growth compiling and running, m = {hi} / m = {lo}",
                total[hi] / max(total[lo], 1.0),
                goal=("<=", 1.5),
                unit="×",
                cause=cause,
                growth_mib=total,
                running_mib={r["m"]: r["run_mib"] for r in rows},
                compile_mib={r["m"]: r["compile_mib"] for r in rows},
                xla_temp_mib={r["m"]: r["xla_temp_mib"] for r in rows},
                grad_run_mib=rows[0]["grad_run_mib"],
            )
        )
    return out
