"""Cost on the model zoo (``benchmarks/zoo.py``): the cost goals of benchmarks/README.md on the
networks SAM users train, and the execution strategy each one gets.

Per model at benchmark size, timed in one interleaved run (``--quick``, the smoke test the
slow suite runs: the CNN at test size, m = 1 and 4 only):

* gradient and SGD step (the denominators); ``sam`` step / SGD step;
* ``sharpness`` probe (trace measure, m = 4) per gradient;
* Hessian-vector and Gauss–Newton-vector product per gradient, and their compiled memory (XLA
  temp + outputs) against a gradient's;
* eq. 10 step per (m + 1) SGD steps for m = 1, 4, 16 (1, 4 above 5M parameters), and its
  compiled memory at m = 4 and m = 256 (flat in m);
* the strategy: the eq. 10 step and the probe at m = 4 under the policy
  (``phipsimu._execution.unroll_for``) against the same computation forced into ``vmap``
  chunks inside a loop (the policy before round 3), on the same key.
"""

from __future__ import annotations

from typing import Any

import jax

import phipsimu
from phipsimu import _execution

from . import _common as c
from . import zoo

RHO = 0.05
MODELS = ("mlp", "cnn", "resnet18", "transformer", "vit")
#: Perturbations per eq. 10 step; models above 5M parameters stop at m = 4 on CPU (m = 16 is
#: 17 gradients of several seconds each per repeat).
STEP_MS = (1, 4, 16)
#: ``--quick``: one conv net at small m (the smoke test: the suite runs end to end).
QUICK_MODELS = ("cnn",)


def _memory(fn: Any, *args: Any) -> int | None:
    """Bytes XLA allocates for ``fn(*args)`` besides its inputs: temporaries and outputs."""
    try:
        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
    except Exception:  # a backend without memory statistics
        return None


def _chosen(make: Any) -> tuple[Any, str]:
    """``make()`` and the strategy the policy chose for its loops while it traced:
    "unroll" if any loop was unrolled, else "loop"."""
    seen = []
    policy = _execution.unroll_for

    def record(num: int, program: Any = None) -> bool:
        seen.append(policy(num, program))
        return seen[-1]

    _execution.unroll_for = record
    try:
        return make(), "unroll" if any(seen) else "loop"
    finally:
        _execution.unroll_for = policy


def _forced(strategy: str | None, make: Any) -> Any:
    """``make()`` with the execution strategy forced while it traces (the timer's warm-up
    call traces and compiles, so the choice sticks to the compiled program)."""
    old = _execution._FORCE
    _execution._FORCE = strategy
    try:
        return make()
    finally:
        _execution._FORCE = old


def run(quick: bool, repeats: int) -> list[dict[str, Any]]:
    size = "test" if quick else "bench"
    repeats = min(repeats, 2 if quick else 3)
    out: list[dict[str, Any]] = []
    for name in QUICK_MODELS if quick else MODELS:
        out += _model(name, size, repeats)
    return out


def _model(name: str, size: str, repeats: int) -> list[dict[str, Any]]:
    model = zoo.build(name, size)
    loss, params = model.loss, model.params
    x, y = model.batch
    trace = phipsimu.measures.trace()
    key = jax.random.key(0)
    hessian = phipsimu.curvature.hessian(loss)
    ggn = phipsimu.curvature.gauss_newton(model.apply, model.output_loss)
    v = jax.tree.map(lambda a: jax.random.normal(key, a.shape, a.dtype), params)
    grad = jax.jit(jax.grad(loss))

    def step_timer(tx: Any) -> Any:
        step, init = c.sgd_step(loss, tx, style="plain" if tx is None else "value_fn")
        return c.timer(step, params, init(params), x, y)

    def probe_timer(m: int) -> Any:
        fn = jax.jit(phipsimu.sharpness(loss, trace, num_samples=m))
        return c.timer(lambda p: fn(p, x, y, key=key), params)

    def eq10(m: int) -> Any:
        return phipsimu.sharpness_aware(trace, rho=RHO, num_samples=m)

    timers = {
        "grad": c.timer(grad, params, x, y),
        "hvp": c.timer(jax.jit(hessian.matvec), params, v, x, y),
        "ggn": c.timer(jax.jit(ggn.matvec), params, v, x, y),
        "sgd": step_timer(None),
        "sam": step_timer(phipsimu.sam(rho=RHO)),
        "probe4": probe_timer(4),
        "probe4_loop": _forced("loop", lambda: probe_timer(4)),
    }
    step_ms = STEP_MS if c.num_params(params) < 5e6 and size != "test" else STEP_MS[:2]
    chosen = {}
    for m in step_ms:
        timers[f"eq10_{m}"], chosen[m] = _chosen(lambda m=m: step_timer(eq10(m)))
    timers["eq10_4_loop"] = _forced("loop", lambda: step_timer(eq10(4)))
    t = c.interleave(timers, repeats)

    n = f"{name} (d = {c.num_params(params):,})"
    rows = [
        c.ratio_figure("zoo", f"{n}: `sam` step / SGD step", t["sam"], t["sgd"], goal=("<=", 2.05)),
        c.ratio_figure(
            "zoo",
            f"{n}: `sharpness` probe / gradient, m = 4",
            t["probe4"],
            t["grad"],
            4,
            goal=("<=", 1.5),
            unit="gradients",
        ),
        c.ratio_figure(
            "zoo", f"{n}: HVP / gradient", t["hvp"], t["grad"], goal=("<=", 2.0), unit="gradients"
        ),
        c.ratio_figure(
            "zoo",
            f"{n}: GGN-vp / gradient",
            t["ggn"],
            t["grad"],
            goal=("<=", 1.5),
            unit="gradients",
        ),
    ]
    for m in step_ms:
        rows.append(
            c.ratio_figure(
                "zoo",
                f"{n}: eq. 10 step / ((m + 1) SGD steps), m = {m}",
                t[f"eq10_{m}"],
                t["sgd"],
                m + 1,
                goal=("<=", 1.2),
                strategy=chosen[m],
            )
        )
    for what, key in (("eq. 10 step", "eq10_4"), ("probe", "probe4")):
        rows.append(
            c.ratio_figure(
                "zoo",
                f"{n}: {what}, m = 4, `vmap` chunks in a loop / the policy's choice",
                t[f"{key}_loop"],
                t[key],
                unit="×",
            )
        )
    g = _memory(grad, params, x, y)
    mem = {
        "HVP": _memory(hessian.matvec, params, v, x, y),
        "GGN-vp": _memory(ggn.matvec, params, v, x, y),
    }
    for what, b in mem.items():
        rows.append(
            c.figure(
                "zoo",
                f"{n}: {what} memory / gradient memory (XLA temp + outputs)",
                None if b is None or not g else b / g,
                goal=("<=", 2.0),
                unit="×",
            )
        )
    step_mem = {}
    for m in (4, 256):
        step, init = c.sgd_step(loss, eq10(m), style="value_fn")
        step_mem[m] = _memory(step, params, init(params), x, y)
    ok = None not in step_mem.values()
    rows.append(
        c.figure(
            "zoo",
            f"{n}: eq. 10 step memory, m = 256 / m = 4 (XLA temp + outputs)",
            step_mem[256] / step_mem[4] if ok else None,
            goal=("<=", 1.5),
            unit="×",
        )
    )
    return rows
