"""Accuracy of the spectral estimators on a trained digits MLP (scikit-learn's ``load_digits``).

MLP 64-32-10 (tanh, cross-entropy, d = 2410) trained full-batch with Adam; the reference is the
dense Hessian (``jax.hessian``) and its float64 eigenvalues (numpy). Reports:

1. HVPs until the top eigenvalue is within 1e-3 relative error, Lanczos vs power iteration
   (median over seeds). Lanczos' tridiagonal after n steps is the leading n×n block of the
   one after N steps, so a single N-step run gives the Ritz value for every n; power
   iteration's Rayleigh quotient is recorded at every step (its last value is checked
   against ``phipsimu.power_iteration``).
2. Relative error of Tr(H) at fixed HVP budgets: Hutchinson (Rademacher) vs Hutch++ vs
   XTrace (median over seeds).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import phipsimu
from phipsimu import _curvature, _krylov
from phipsimu.examples import init_mlp

from . import _common as c


def loss(params, x, y):
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, axis=-1))


def trained_mlp(steps):
    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jax.nn.one_hot(digits.target, 10)
    params = init_mlp(jax.random.key(0), [64, 32, 10], gain=1.0)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(loss)(params, x, y)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, x, y


def lanczos_matvecs_to_tol(params, x, y, lam_max, n_max, key, tol):
    """Smallest n whose Ritz value is within tol of λ_max (prefix property of Lanczos)."""
    eig = jax.jit(phipsimu.top_eigenvalues(loss, 1, num_iterations=n_max))
    # the public result of the full run, and T from the same Lanczos recurrence
    top = float(eig(params, x, y, key=key).value[0])
    start = phipsimu.mu.gaussian().draw(key, params, 1)
    op = _curvature.bind(phipsimu.curvature.hessian(loss), params, (x, y), None, start.perturbed, 1)
    s = jax.jit(lambda v: _krylov.lanczos(op, v, n_max))(start.active())
    alpha, beta = np.asarray(s.alpha[0], np.float64), np.asarray(s.beta[0], np.float64)
    for n in range(1, n_max + 1):
        t = np.diag(alpha[:n]) + np.diag(beta[: n - 1], 1) + np.diag(beta[: n - 1], -1)
        theta = np.linalg.eigvalsh(t)[-1]
        if abs(theta - lam_max) <= tol * abs(lam_max):
            assert abs(top - lam_max) <= tol * abs(lam_max)
            return n
    return None


def power_matvecs_to_tol(params, x, y, lam_max, n_max, key, tol):
    hvp = phipsimu.hvp(loss)
    v0, _ = phipsimu.mu.gaussian().sample(key, params, 1)
    v0 = jax.tree_util.tree_map(lambda a: a[0], v0)

    @jax.jit
    def run(v):
        def body(v, _):
            w = hvp(params, v, x, y)
            theta = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(w)))
            nrm = jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(w)))
            return jax.tree.map(lambda a: a / nrm, w), theta

        nrm = jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(v)))
        return jax.lax.scan(body, jax.tree.map(lambda a: a / nrm, v), None, length=n_max)[1]

    thetas = np.asarray(run(v0), np.float64)
    public = phipsimu.power_iteration(loss, num_iterations=n_max)(params, x, y, key=key)
    assert abs(float(public.value[0]) - thetas[-1]) <= 1e-4 * abs(thetas[-1])
    hits = np.nonzero(np.abs(thetas - lam_max) <= tol * abs(lam_max))[0]
    # converged from that step on (the Rayleigh quotient rises monotonically for PSD-dominant H)
    return int(hits[0]) + 1 if hits.size else None


def _median(counts):
    """Median HVP count; a run that never reached the tolerance counts as infinitely many."""
    return statistics.median(float("inf") if n is None else n for n in counts)


def run(quick: bool, repeats: int) -> list[dict]:
    del repeats  # accuracy, not time: medians over seeds
    seeds, steps, budgets = (1, 50, (18,)) if quick else (20, 500, (30, 60, 120))
    params, x, y = trained_mlp(steps)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hess = np.asarray(jax.jit(jax.hessian(lambda z: loss(unravel(z), x, y)))(flat), np.float64)
    lam = np.linalg.eigvalsh(0.5 * (hess + hess.T))

    tol, n_max = 1e-3, (100 if quick else 400)
    runs = range(min(seeds, 10))
    lanczos = [
        lanczos_matvecs_to_tol(params, x, y, lam[-1], n_max // 5, jax.random.key(s), tol)
        for s in runs
    ]
    # the smoke test skips power iteration (its eager public call compiles for long)
    power = [
        None
        if quick
        else power_matvecs_to_tol(params, x, y, lam[-1], n_max, jax.random.key(s), tol)
        for s in runs
    ]
    model = f"trained digits MLP 64-32-10 (d = {flat.size}, {steps} Adam steps)"
    out = [
        c.figure(
            "accuracy",
            f"HVPs to 1e-3 relative error in λ_max, Lanczos ({model})",
            _median(lanczos),
            unit="HVPs",
            power_iteration=None if quick else _median(power),
            seeds=len(lanczos),
        )
    ]
    ref = lam.sum()
    for budget in budgets:
        errs = {}
        for method in ("hutchinson", "hutch++", "xtrace"):
            fn = jax.jit(phipsimu.hessian_trace(loss, num_samples=budget, method=method))
            errs[method] = statistics.median(
                abs(float(fn(params, x, y, key=jax.random.key(s)).value) - ref) / abs(ref)
                for s in range(seeds)
            )
        out.append(
            c.figure(
                "accuracy",
                f"relative error of Tr(H) at {budget} HVPs, Hutch++ (Hutchinson, XTrace beside)",
                errs["hutch++"],
                hutchinson=errs["hutchinson"],
                xtrace=errs["xtrace"],
                seeds=seeds,
            )
        )
    return out
