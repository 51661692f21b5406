"""One memory measurement in a fresh process (so peak RSS belongs to this call alone).

    python -m benchmarks._memory_probe KIND M

KIND: ``sharpness`` (trace measure, m probes), ``grad_loss`` (``jax.grad`` of
``sharpness_aware_loss``), ``update`` (a ``sharpness_aware`` SGD step) or ``frobenius_update``
(a ``frobenius_sam`` SGD step: the vector-ψ path). Prints one JSON line
with, in MiB: the growth of peak RSS above the RSS just before compiling and running the
call (``total_mib``, the goal's measure), over the RSS before each phase while compiling
(``compile_mib``) and running it (``run_mib``), the running growth of a compiled plain gradient
(``grad_run_mib``), and XLA's planned temporary buffers for the call. The peak is reset
before each phase (Linux ``/proc/self/clear_refs``), so each number belongs to its phase; where
that is unavailable the process-wide ``ru_maxrss`` is used instead.
"""

from __future__ import annotations

import json
import re
import resource
import sys

import jax

import phipsimu

from . import _common as c

RHO = 0.05


def _status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"{field}:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return None if found is None else int(found.group(1)) / 1024.0


def start_phase() -> float:
    """Reset the peak to the current RSS; return the current RSS (MiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    now = _status("VmRSS")
    return peak_mib() if now is None else now


def peak_mib() -> float:
    hwm = _status("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 if hwm is None else hwm


def phase(fn) -> float:
    """Growth of peak RSS over the RSS at the start while ``fn()`` runs (MiB)."""
    before = start_phase()
    fn()
    return peak_mib() - before


def main(kind: str, m: int) -> None:
    loss, params = c.mlp()
    x, y = c.digits_batch()
    key = jax.random.key(0)
    grad = jax.jit(jax.grad(loss)).lower(params, x, y).compile()
    jax.block_until_ready(grad(params, x, y))
    grad_run = phase(lambda: jax.block_until_ready(grad(params, x, y)))
    trace = phipsimu.measures.trace()
    if kind == "sharpness":
        est = phipsimu.sharpness(loss, trace, num_samples=m)
        fn, args = jax.jit(lambda p: est(p, x, y, key=key).value), (params,)
    elif kind == "grad_loss":
        obj = phipsimu.sharpness_aware_loss(loss, trace, rho=RHO, num_samples=m)
        fn, args = jax.jit(jax.grad(lambda p: obj(p, x, y, key=key))), (params,)
    elif kind == "update":
        step, init = c.sgd_step(
            loss, phipsimu.sharpness_aware(trace, rho=RHO, num_samples=m), style="value_fn"
        )
        fn, args = step, (params, init(params), x, y)
    elif kind == "frobenius_update":
        tx = phipsimu.frobenius_sam(rho=RHO, num_samples=m, lam=1.0)
        step, init = c.sgd_step(loss, tx, style="value_fn")
        fn, args = step, (params, init(params), x, y)
    else:
        raise ValueError(f"kind={kind!r}: must be sharpness, grad_loss, update or frobenius_update")
    # compiling, then running, as a user meets the call; each phase's peak is reset
    start = start_phase()
    compiled = fn.lower(*args).compile()
    compile_growth = peak_mib() - start
    before_run = start_phase()
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    run = peak_mib() - before_run
    total = max(compile_growth, before_run - start + run)
    stats = compiled.memory_analysis()
    temp = None if stats is None else stats.temp_size_in_bytes / 2**20
    print(
        json.dumps(
            {
                "kind": kind,
                "m": m,
                "grad_run_mib": grad_run,
                "total_mib": total,
                "compile_mib": compile_growth,
                "run_mib": run,
                "xla_temp_mib": temp,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
