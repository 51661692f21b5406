"""The small classification pipeline that the demo, the notebooks, the benchmarks, the study
and the tests share: bundled scikit-learn datasets (no downloads), a dense MLP and its loss.

Written once here so every number in the project comes from the same data and model. Needs
scikit-learn for the data (the ``examples`` extra: ``pip install -e ".[examples]"`` in a clone,
or ``pip install scikit-learn``); the model functions need only JAX.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

#: Datasets that ship inside scikit-learn (nothing is downloaded).
DATASETS = ("digits", "breast_cancer", "wine")


class Split(NamedTuple):
    """Features (float32) and integer labels of the train, validation and test splits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def load_dataset(
    name: str = "digits",
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    val_fraction: float = 0.0,
    label_noise: float = 0.0,
) -> Split:
    """A bundled scikit-learn dataset, standardised, split at random with ``seed``.

    Features are scaled to zero mean and unit variance with the training split's statistics
    (digits: divided by 16, its pixel range). With ``label_noise`` = p, a fraction p of the
    *training* labels (never validation or test) is replaced by a different class drawn
    uniformly, with the same ``seed``.

    Args:
      name: one of :data:`DATASETS`.
      seed: fixes the split and the noisy labels.
      test_fraction: share of the examples held out for test, in (0, 1).
      val_fraction: share held out for validation, in [0, 1); 0 gives empty validation arrays.
      label_noise: share of training labels flipped, in [0, 1).

    Raises:
      ValueError: on an unknown ``name`` or fractions out of range.
      ImportError: when scikit-learn is not installed.
    """
    if name not in DATASETS:
        raise ValueError(f"name={name!r}: must be one of {DATASETS}")
    for arg, value, lo_open in (
        ("test_fraction", test_fraction, True),
        ("val_fraction", val_fraction, False),
        ("label_noise", label_noise, False),
    ):
        if not (0.0 < value < 1.0 if lo_open else 0.0 <= value < 1.0):
            bound = "(0, 1)" if lo_open else "[0, 1)"
            raise ValueError(f"{arg}={value!r}: must be in {bound}")
    if test_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"test_fraction + val_fraction = {test_fraction + val_fraction}: must be < 1"
        )
    try:
        from sklearn import datasets
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "phipsimu.examples.load_dataset needs scikit-learn (the examples extra): "
            "pip install scikit-learn"
        ) from err
    data = getattr(datasets, f"load_{name}")()
    x = np.asarray(data.data, np.float64)
    y = np.asarray(data.target, np.int32)
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_test = round(test_fraction * len(x))
    n_val = round(val_fraction * len(x))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    if name == "digits":
        x = x / 16.0
    else:
        mean, std = x[train].mean(0), x[train].std(0)
        x = (x - mean) / np.where(std > 0, std, 1.0)
    x = x.astype(np.float32)
    y_train = y[train].copy()
    if label_noise > 0:
        flip = rng.random(len(train)) < label_noise
        shift = rng.integers(1, num_classes, size=len(train))
        y_train = np.where(flip, (y_train + shift) % num_classes, y_train).astype(np.int32)
    return Split(x[train], y_train, x[val], y[val], x[test], y[test], num_classes)


def init_mlp(key: jax.Array, sizes: Sequence[int], *, gain: float = 2.0) -> list[dict[str, Any]]:
    """Dense layers ``[{"w": (fan_in, fan_out), "b": (fan_out,)}, ...]``, weights drawn from
    ``N(0, gain/fan_in)`` (He initialisation for ``gain=2``), zero biases."""
    if len(sizes) < 2:
        raise ValueError(f"sizes={sizes!r}: need at least an input and an output size")
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out)) * np.sqrt(gain / fan_in)
        params.append({"w": w, "b": jnp.zeros(fan_out)})
    return params


def mlp_apply(params: Sequence[dict[str, Any]], x: ArrayLike) -> jax.Array:
    """Logits of the ReLU MLP built by :func:`init_mlp`."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params: Sequence[dict[str, Any]], x: ArrayLike, y: ArrayLike) -> jax.Array:
    """Mean softmax cross-entropy of :func:`mlp_apply` on integer labels ``y``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y))


def accuracy(params: Sequence[dict[str, Any]], x: ArrayLike, y: ArrayLike) -> jax.Array:
    """Share of examples whose largest logit is the label."""
    return jnp.mean(jnp.argmax(mlp_apply(params, x), -1) == y)
