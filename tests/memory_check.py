"""One peak-memory measurement in a fresh process (run by tests/test_memory.py).

    python tests/memory_check.py KIND M

Builds the MLP 64-256-256-10 (d = 85,002) on a batch of 128, compiles and runs KIND twice and
prints the process's peak RSS in MiB (``VmHWM``; ``ru_maxrss`` would count the parent's
pages, since Linux keeps it across the fork and exec that started this process). KIND:
``grad`` (a plain jitted gradient, the baseline), ``sharpness`` (trace measure, M probes),
``grad_loss`` (``jax.grad`` of ``sharpness_aware_loss``, M perturbations) or ``update`` (a
``sharpness_aware`` step, M perturbations, applied by ``optax.sgd``) or ``frobenius`` (a
``frobenius_sam`` step: the vector-ψ path), at the default chunking.
"""

import re
import sys

import jax
import optax
from conftest import init_mlp, mlp_loss

import phipsimu


def build(kind: str, m: int):
    params = init_mlp(jax.random.key(0), [64, 256, 256, 10])
    x = jax.random.normal(jax.random.key(1), (128, 64))
    y = jax.random.normal(jax.random.key(2), (128, 10))
    key = jax.random.key(3)
    trace = phipsimu.measures.trace()
    if kind == "grad":
        return jax.jit(jax.grad(mlp_loss)), (params, x, y)
    if kind == "sharpness":
        est = phipsimu.sharpness(mlp_loss, trace, num_samples=m)
        return jax.jit(lambda p: est(p, x, y, key=key).value), (params,)
    if kind == "grad_loss":
        obj = phipsimu.sharpness_aware_loss(mlp_loss, trace, rho=0.05, num_samples=m)
        return jax.jit(jax.grad(lambda p: obj(p, x, y, key=key))), (params,)
    if kind == "update":
        tx = optax.chain(phipsimu.sharpness_aware(trace, rho=0.05, num_samples=m), optax.sgd(0.1))

        def step(p, state):
            g = jax.grad(mlp_loss)(p, x, y)
            updates, state = tx.update(g, state, p, value_fn=lambda q: mlp_loss(q, x, y))
            return optax.apply_updates(p, updates), state

        return jax.jit(step), (params, tx.init(params))
    if kind == "frobenius":
        tx = optax.chain(phipsimu.frobenius_sam(rho=0.05, num_samples=m, lam=1.0), optax.sgd(0.1))

        def frobenius_step(p, state):
            g = jax.grad(mlp_loss)(p, x, y)
            updates, state = tx.update(g, state, p, value_fn=lambda q: mlp_loss(q, x, y))
            return optax.apply_updates(p, updates), state

        return jax.jit(frobenius_step), (params, tx.init(params))
    raise ValueError(f"kind={kind!r}: must be grad, sharpness, grad_loss, update or frobenius")


def main(kind: str, m: int) -> None:
    fn, args = build(kind, m)
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    with open("/proc/self/status") as f:
        hwm = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    assert hwm is not None, "no VmHWM in /proc/self/status"
    print(int(hwm.group(1)) / 1024.0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
