"""Step and probe costs on the issue's digits MLP 64-256-256-10 (d = 85,002), batch 512.

* one probe of ``sharpness`` (trace measure) and of ``hessian_trace`` (Hutchinson) / one
  ``jax.grad``;
* ``sam`` step / SGD step and / ``optax.contrib.sam`` (opaque mode) step, also without
  the non-finite guard;
* ``sharpness_aware`` (eq. 10) step with m perturbations / ((m + 1) SGD steps), counting the
  caller's own gradient: m + 1 gradients is the floor (one clean, m perturbed);
* the PyTorch peers of ``peers_torch`` (when torch is installed), interleaved in the same
  repeats: the authors'-style eq. 10 step and a PyHessian-style Hutchinson probe.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import optax

import phipsimu

from . import _common as c

RHO = 0.05


def run(quick: bool, repeats: int) -> list[dict[str, Any]]:
    loss, params = c.mlp()
    x, y = c.digits_batch()
    probe_ms = (4,) if quick else (4, 16, 64)
    step_ms = (2,) if quick else (1, 2, 4, 8, 16)
    hutch_m = 4 if quick else 16
    trace = phipsimu.measures.trace()

    timers = {"grad": c.timer(jax.jit(jax.grad(loss)), params, x, y)}
    for m in probe_ms:
        fn = jax.jit(phipsimu.sharpness(loss, trace, num_samples=m))
        timers[f"probe{m}"] = c.timer(lambda p, fn=fn: fn(p, x, y, key=jax.random.key(0)), params)
    hutch = jax.jit(phipsimu.hessian_trace(loss, num_samples=hutch_m))
    timers["hutchinson"] = c.timer(lambda p: hutch(p, x, y, key=jax.random.key(0)), params)
    # drawing the probes alone (the key is an argument, as in a training loop)
    samplers = {"uniform on the sphere": trace.mu, "Rademacher": phipsimu.mu.rademacher()}
    for name, mu in samplers.items():
        draw = jax.jit(lambda p, k, mu=mu: mu.draw(k, p, hutch_m).v)
        timers[f"draw {name}"] = c.timer(draw, params, jax.random.key(0))

    def step_timer(tx, style="plain"):
        step, init = c.sgd_step(loss, tx, style=style)
        return c.timer(step, params, init(params), x, y)

    timers["sgd"] = step_timer(None)
    timers["sam"] = step_timer(phipsimu.sam(rho=RHO), "value_fn")
    timers["sam_unguarded"] = step_timer(phipsimu.sam(rho=RHO, skip_nonfinite=False), "value_fn")
    opaque = optax.contrib.sam(
        optax.sgd(0.1),
        optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
        sync_period=2,
        opaque_mode=True,
    )
    # optax.contrib.sam is the whole optimizer (outer SGD inside), so its step has no chain
    timers["optax_sam"] = _optax_sam_timer(loss, opaque, params, x, y)
    for m in step_ms:
        timers[f"eq10_{m}"] = step_timer(
            phipsimu.sharpness_aware(trace, rho=RHO, num_samples=m), "value_fn"
        )

    peers = _peers(loss, params, x, y, quick)
    if isinstance(peers, dict):
        timers.update({k: v for k, v in peers.items() if k.startswith("torch_")})

    t = c.interleave(timers, repeats)
    out = []
    for m in probe_ms:
        out.append(
            c.ratio_figure(
                "cost",
                f"`sharpness` probe / `jax.grad`, m = {m}",
                t[f"probe{m}"],
                t["grad"],
                m,
                goal=("<=", 1.5),
                unit="gradients",
                cause="a probe is a second directional derivative (nested JVPs through "
                "the loss, about one gradient) plus drawing the probe (see the drawing row)",
            )
        )
    out.append(
        c.ratio_figure(
            "cost",
            f"`hessian_trace` (Hutchinson) probe / `jax.grad`, m = {hutch_m}",
            t["hutchinson"],
            t["grad"],
            hutch_m,
            goal=("<=", 1.5),
            unit="gradients",
            cause="a probe is one quadratic form (nested JVPs through the loss) and one "
            "Rademacher draw",
        )
    )
    for name in samplers:
        out.append(
            c.ratio_figure(
                "cost",
                f"drawing one probe ({name}, m = {hutch_m}) / `jax.grad`",
                t[f"draw {name}"],
                t["grad"],
                hutch_m,
                unit="gradients",
            )
        )
    out.append(
        c.ratio_figure(
            "cost",
            "`sam` step / SGD step",
            t["sam"],
            t["sgd"],
            goal=("<=", 2.1),
            cause="SAM needs two gradients per step; anything above 2 is the normalisation "
            "and the perturbed-params update, which are memory-bound at this size",
        )
    )
    out.append(
        c.ratio_figure(
            "cost",
            "`sam` step / `optax.contrib.sam` (opaque) step",
            t["sam"],
            t["optax_sam"],
            goal=("<=", 1.0),
            cause="both take two gradients; `sam` also checks the perturbed loss and "
            "gradient for non-finite values and selects the step (`skip_nonfinite`, next "
            "row without it), which `optax.contrib.sam` does not",
        )
    )
    out.append(
        c.ratio_figure(
            "cost",
            "`sam(skip_nonfinite=False)` step / `optax.contrib.sam` (opaque) step",
            t["sam_unguarded"],
            t["optax_sam"],
        )
    )
    for m in step_ms:
        out.append(
            c.ratio_figure(
                "cost",
                f"eq. 10 step / ((m + 1) SGD steps), m = {m}",
                t[f"eq10_{m}"],
                t["sgd"],
                m + 1,
                goal=("<=", 1.25),
                cause="every repeat misses the goal; besides the m + 1 gradients the step "
                "draws m probes (threefry normals for every coordinate; see the drawing row) "
                "and evaluates the loss once more at x",
            )
        )
    if isinstance(peers, dict):
        m = step_ms[-1]
        load, threads = peers.pop("load"), peers.pop("threads")
        busy = (
            f"measured at load average {load:.1f} on {c.machine()['cpu_cores']} cores, so "
            f"torch ran on {threads} thread (its OpenMP workers spin-wait and starve when "
            "threads outnumber cores) while XLA kept its pool: compare on an idle machine"
            if threads == 1
            else None
        )
        out.append(
            c.ratio_figure(
                "peers",
                f"PyTorch eq. 10 step (authors' style) / ours, m = {m}",
                t["torch_eq10"],
                t[f"eq10_{m}"],
                goal=(">=", 1.3),
                unit="× faster",
                torch_threads=threads,
                cause="both do m + 1 gradients; PyTorch's eager CPU kernels are close to "
                "XLA's at this size",
                note=busy,
            )
        )
        out.append(
            c.ratio_figure(
                "peers",
                f"PyHessian-style Hutchinson probe / ours, m = {hutch_m}",
                t["torch_hutch"],
                t["hutchinson"],
                goal=(">=", 2.0),
                unit="× faster",
                cause="PyHessian's double-backward HVP reuses one retained graph, so its "
                "per-probe cost is one extra backward pass",
                note=busy,
            )
        )
    else:
        out.append(c.figure("peers", "PyTorch peers", None, note=peers))
    return out


def _optax_sam_timer(loss, opt, params, x, y):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = opt.update(
            grads, state, params, grad_fn=lambda p, _: jax.grad(loss)(p, x, y)
        )
        return optax.apply_updates(params, updates), state

    return c.timer(step, params, opt.init(params), x, y)


def _peers(loss, params, x, y, quick):
    """Timers for the PyTorch peers, or a note saying why they are skipped."""
    try:
        from . import peers_torch
    except ImportError as err:
        return f"skipped: {err} (install torch in a separate environment, see benchmarks/README.md)"
    # with more runnable threads than cores torch's spinning OpenMP workers starve: one thread
    load, cores = os.getloadavg()[0], c.machine()["cpu_cores"]
    threads = 1 if load > cores else cores
    peers_torch.torch.set_num_threads(threads)
    return {
        "torch_eq10": peers_torch.eq10_step_timer(params, x, y, m=2 if quick else 16, rho=RHO),
        "torch_hutch": peers_torch.hutchinson_timer(params, x, y, m=4 if quick else 16),
        "load": load,
        "threads": threads,
    }
