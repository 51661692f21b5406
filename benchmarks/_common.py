"""Pieces every benchmark shares: the machine record, the models and data, interleaved timing.

Timing rule: every configuration is compiled and warmed up first; then each repeat times every
configuration once (in a rotated order), and figures are medians over repeats of per-repeat
ratios, so load on a shared machine affects numerator and denominator alike.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import phipsimu
from phipsimu import examples

#: The issue's model: digits MLP 64-256-256-10 (d = 85,002), batch 512.
MLP_SIZES = (64, 256, 256, 10)
BATCH = 512


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on (recorded with every result)."""
    device = jax.devices()[0]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "optax": optax.__version__,
        "phipsimu": phipsimu.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def machine_name(info: dict[str, Any]) -> str:
    """A file-name slug: backend, device (or CPU model) and core count."""
    what = info["cpu_model"] if info["backend"] == "cpu" else info["device_kind"]
    slug = "".join(c if c.isalnum() else "-" for c in what.lower())
    slug = "-".join(part for part in slug.split("-") if part and part not in ("r", "tm"))
    return f"{info['backend']}-{slug}-{info['cpu_cores']}c"


def digits_batch(batch: int = BATCH) -> tuple[jax.Array, jax.Array]:
    """The first ``batch`` digits training images (64 features in [0, 1]) and labels,
    repeated if ``batch`` exceeds the split."""
    split = examples.load_dataset("digits")
    idx = np.arange(batch) % len(split.x_train)
    return jnp.asarray(split.x_train[idx]), jnp.asarray(split.y_train[idx])


def mlp(sizes=MLP_SIZES, seed: int = 0):
    """(loss, params) of the examples' ReLU MLP with cross-entropy on integer labels."""
    return examples.cross_entropy, examples.init_mlp(jax.random.key(seed), list(sizes))


def init_mlp(key: jax.Array, sizes) -> list[dict[str, jax.Array]]:
    """A tanh MLP's params with Glorot-like weights and small non-zero biases (the test suite's
    model, ``tests/conftest.py``; ``phipsimu.examples.init_mlp`` has zero biases)."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, k1, k2 = jax.random.split(key, 3)
        params.append(
            {
                "w": jax.random.normal(k1, (fan_in, fan_out)) / np.sqrt(fan_in),
                "b": 0.1 * jax.random.normal(k2, (fan_out,)),
            }
        )
    return params


def mlp_width_for(d: float, inputs: int = 64, outputs: int = 10) -> int:
    """Width h of a 2-hidden-layer MLP ``inputs-h-h-outputs`` with about ``d`` parameters."""
    # d = h² + (inputs + outputs + 2) h + outputs
    b = inputs + outputs + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * (d - outputs))) / 2))


def cnn_channels_for(d: float) -> int:
    """Channels c of :func:`cnn` with about ``d`` parameters: 9c² + 651c + 10."""
    return max(1, round((-651 + math.sqrt(651**2 + 36 * (d - 10))) / 18))


def cnn(channels: int, seed: int = 0):
    """(loss, params) of a small CNN on the 8×8 digits: two 3×3 convolutions with ``channels``
    channels (ReLU, 'SAME') and a dense read-out; cross-entropy on integer labels."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    c = channels
    normal = jax.random.normal
    params = {
        "conv1": {"w": normal(k1, (3, 3, 1, c)) * np.sqrt(2 / 9), "b": jnp.zeros(c)},
        "conv2": {"w": normal(k2, (3, 3, c, c)) * np.sqrt(2 / (9 * c)), "b": jnp.zeros(c)},
        "out": {"w": normal(k3, (64 * c, 10)) * np.sqrt(1 / (64 * c)), "b": jnp.zeros(10)},
    }

    def conv(h, layer):
        out = jax.lax.conv_general_dilated(
            h, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.relu(out + layer["b"])

    def loss(params, x, y):
        h = x.reshape(-1, 8, 8, 1)
        h = conv(conv(h, params["conv1"]), params["conv2"])
        logits = h.reshape(h.shape[0], -1) @ params["out"]["w"] + params["out"]["b"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss, params


def num_params(params) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def timer(fn: Callable[..., Any], *args: Any, min_time: float = 0.1) -> Callable[[], float]:
    """Warm ``fn(*args)`` up (compiling it) and return ``run() -> seconds per call``, the mean
    of an inner loop long enough (>= ``min_time``) to swamp the clock's resolution and the
    first call's cold caches after another configuration ran (a short loop timed right after
    a large program reads slow)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, math.ceil(min_time / once))

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / inner

    return run


def interleave(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Time every configuration once per repeat, rotating the order; per-repeat seconds."""
    names = list(timers)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timers[name]())
    return times


def median_ratio(num: list[float], den: list[float], scale: float = 1.0) -> float:
    """Median over repeats of ``num[r] / (scale · den[r])``."""
    return statistics.median(a / (scale * b) for a, b in zip(num, den))


def ratio_range(num: list[float], den: list[float], scale: float = 1.0) -> list[float]:
    """Smallest and largest per-repeat ratio: how much the load moved the figure."""
    ratios = [a / (scale * b) for a, b in zip(num, den)]
    return [min(ratios), max(ratios)]


def ratio_figure(
    suite: str, label: str, num: list[float], den: list[float], scale: float = 1.0, **extra: Any
) -> dict[str, Any]:
    """:func:`figure` of the median per-repeat ratio ``num / (scale · den)``, with its range."""
    return figure(
        suite,
        label,
        median_ratio(num, den, scale),
        range=ratio_range(num, den, scale),
        **extra,
    )


def fit_exponent(xs, ys) -> float:
    """Slope of log y against log x (least squares): cost ∝ xᵏ."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def sgd_step(loss, tx: optax.GradientTransformation | None = None, *, style: str = "plain"):
    """A jitted training step ``(params, state, x, y) -> (params, state)``: the caller's own
    gradient, then ``tx`` (``value_fn`` for phipsimu's transforms, ``grad_fn`` for
    ``optax.contrib.sam``) chained before SGD."""
    tx = optax.sgd(0.1) if tx is None else optax.chain(tx, optax.sgd(0.1))

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        if style == "value_fn":
            updates, state = tx.update(grads, state, params, value_fn=lambda p: loss(p, x, y))
        elif style == "grad_fn":
            updates, state = tx.update(
                grads, state, params, grad_fn=lambda p, _: jax.grad(loss)(p, x, y)
            )
        else:
            updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step, tx.init


def figure(
    suite: str,
    label: str,
    value: float | None,
    *,
    goal: tuple[str, float] | None = None,
    unit: str = "",
    cause: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One reported number; ``goal=("<=", 1.5)`` marks it met or missed. ``cause`` explains a
    miss (kept only when the goal is missed); a miss whose per-repeat ``range`` straddles the
    goal is put down to load noise instead."""
    met = None
    if goal is not None and value is not None:
        op, bound = goal
        met = bool(value <= bound) if op == "<=" else bool(value >= bound)
        spread = extra.get("range")
        if not met and spread and spread[0] <= bound <= spread[1]:
            cause = (
                f"within the load noise: the per-repeat values span {spread[0]:.2f}–"
                f"{spread[1]:.2f}, across the goal (rerun on a quiet machine)"
            )
    return {
        "suite": suite,
        "label": label,
        "value": value,
        "unit": unit,
        "goal": None if goal is None else f"{goal[0]} {goal[1]}",
        "met": met,
        "cause": cause if met is False else None,
        **extra,
    }
