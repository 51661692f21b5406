"""PyTorch peers, written here from the published algorithm descriptions (optional: needs torch,
which is never a dependency of phipsimu; install it in a separate environment).

* :func:`eq10_step`: the paper authors' way of taking an eq. 10 step for the trace measure
  (φ = ψ = identity, μ = uniform unit sphere, strength s = 1): one clean gradient, then for each
  of the m draws perturb the parameters in place by ρ·v_i, backpropagate the perturbed loss,
  accumulate its gradient and undo the perturbation; the update is
  ``∇L(x) + (2/m)·Σ_i (∇L(x + ρv_i) − ∇L(x))`` followed by SGD.
* :func:`hutchinson`: PyHessian's trace estimator: build the gradient graph once
  (``create_graph=True``), then one double-backward Hessian-vector product per Rademacher probe,
  ``Tr(H) ≈ mean_i v_iᵀ H v_i``.

Both run on the MLP of ``_common`` with the same weights and batch as the JAX side.
"""

from __future__ import annotations

import os

import numpy as np

# torch's OpenMP workers spin after each op by default; between interleaved timings they
# would keep the cores from XLA and slow whichever JAX configuration runs next
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from . import _common as c


def to_torch(params, x, y):
    """The JAX MLP's layers as leaf tensors (requires_grad) and the batch as tensors."""
    layers = [
        (
            torch.tensor(np.asarray(p["w"]), requires_grad=True),
            torch.tensor(np.asarray(p["b"]), requires_grad=True),
        )
        for p in params
    ]
    flat = [t for layer in layers for t in layer]
    return layers, flat, torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y), dtype=torch.long)


def mlp_loss(layers, x, y):
    h = x
    for w, b in layers[:-1]:
        h = torch.relu(h @ w + b)
    w, b = layers[-1]
    return F.cross_entropy(h @ w + b, y)


def sphere_draws(flat, m, generator):
    """m draws uniform on the unit sphere of all parameters together."""
    draws = []
    for _ in range(m):
        v = [torch.randn(p.shape, generator=generator) for p in flat]
        norm = torch.sqrt(sum((vi * vi).sum() for vi in v))
        draws.append([vi / norm for vi in v])
    return draws


def eq10_gradient(layers, flat, x, y, draws, rho):
    """The eq. 10 update direction for the trace measure, m + 1 backward passes."""
    loss = mlp_loss(layers, x, y)
    clean = torch.autograd.grad(loss, flat)
    acc = [torch.zeros_like(p) for p in flat]
    for v in draws:
        with torch.no_grad():
            for p, vi in zip(flat, v):
                p.add_(vi, alpha=rho)
        perturbed = torch.autograd.grad(mlp_loss(layers, x, y), flat)
        with torch.no_grad():
            for p, vi, a, g in zip(flat, v, acc, perturbed):
                p.sub_(vi, alpha=rho)
                a.add_(g)
    m = len(draws)
    return [g + (2.0 / m) * (a - m * g) for g, a in zip(clean, acc)]


def eq10_step_timer(params, x, y, *, m, rho, lr=0.1, min_time=0.1):
    """``run() -> seconds`` of one eq. 10 SGD step (fresh draws every step)."""
    layers, flat, tx, ty = to_torch(params, x, y)
    gen = torch.Generator().manual_seed(0)

    def step():
        direction = eq10_gradient(layers, flat, tx, ty, sphere_draws(flat, m, gen), rho)
        with torch.no_grad():
            for p, d in zip(flat, direction):
                p.sub_(d, alpha=lr)

    return c.timer(step, min_time=min_time)


def hutchinson(layers, flat, x, y, m, generator):
    """PyHessian-style ``Tr(H)`` estimate from m Rademacher probes."""
    grads = torch.autograd.grad(mlp_loss(layers, x, y), flat, create_graph=True)
    total = 0.0
    for _ in range(m):
        v = [torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1 for p in flat]
        hv = torch.autograd.grad(grads, flat, grad_outputs=v, retain_graph=True)
        total += float(sum((h * vi).sum() for h, vi in zip(hv, v)))
    return total / m


def hutchinson_timer(params, x, y, *, m, min_time=0.1):
    layers, flat, tx, ty = to_torch(params, x, y)
    gen = torch.Generator().manual_seed(0)
    return c.timer(lambda: hutchinson(layers, flat, tx, ty, m, gen), min_time=min_time)


def info() -> dict:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
