"""A model zoo for tests and benchmarks, in flax nnx: the networks SAM users train.

Every model is built once with :func:`build` and handed out as pure functions of arrays
(``nnx.split`` once; ``nnx.merge`` inside each loss), so they jit, grad and vmap like any
JAX function, with synthetic inputs drawn from a fixed key (nothing is downloaded):

- ``mlp``: the digits MLP of the benchmarks, 64-256-256-10, ReLU (d = 85,002).
- ``cnn``: the benchmarks' small CNN on 8×8 inputs (``benchmarks._common.cnn``): two 3×3
  'SAME' convolutions with ReLU and a dense read-out; at 299 channels d ≈ 10⁶.
- ``resnet18``: CIFAR-style ResNet-18 (3×3 stem, no max-pool, four stages of two basic
  blocks, BatchNorm after every convolution, 1×1 projection shortcuts, global average pool):
  11.17M parameters on 32×32×3 inputs with 10 classes.
- ``transformer``: a decoder-only, pre-LayerNorm transformer (learned position embeddings,
  multi-head causal self-attention, GELU MLP of width 4·w, dropout 0.1 on each residual
  branch and the embeddings, untied read-out): vocabulary 256, context 128, width 384,
  6 heads, 6 layers, 10.9M parameters; next-token cross-entropy.
- ``vit``: a small ViT-style classifier (4×4 patches of 32×32×3 images, the transformer's
  pre-LayerNorm blocks without the causal mask, mean-pooled tokens), 2.7M parameters at
  benchmark size.

``size="test"`` keeps each architecture's structure at tiny widths and batches (it compiles
and runs in seconds on a laptop CPU); ``size="bench"`` is the benchmark size above.

Modes: ``loss(params, x, y)`` is train mode (BatchNorm normalises with the batch's
statistics, dropout with a fixed key) and drops the new running statistics, for cost
benchmarks and estimators; ``train_loss(params, state, x, y, key)`` is train mode with
dropout drawn from ``key`` and returns ``(loss, new_state)`` (the ``has_aux=True`` recipe of
docs/guides/flax.md); ``eval_loss(params, state, x, y)`` is eval mode (running statistics, no
dropout). ``apply(params, x)`` gives the logits of ``loss`` and ``output_loss(logits, y)``
the cross-entropy, for the Gauss–Newton operator. With ``dtype=jnp.bfloat16`` parameters,
inputs and so activations are bf16 (``compute_dtype=jnp.bfloat16`` also pins every layer's
computation to bf16, as flax's mixed precision does); the logits are cast to float32 for the
cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

NAMES = ("mlp", "cnn", "resnet18", "transformer", "vit")
SIZES = ("test", "bench")


class Model(NamedTuple):
    """A zoo model as pure functions of arrays (see the module docstring for the modes)."""

    name: str
    params: Any  # nnx.State of the nnx.Param variables (jax leaves are arrays)
    state: Any  # nnx.State of everything else (BatchNorm running statistics), may be empty
    batch: tuple  # (x, y): synthetic inputs and integer labels / next tokens
    loss: Callable[..., jax.Array]  # loss(params, x, y): train mode, fixed dropout key
    train_loss: Callable[..., Any]  # train_loss(params, state, x, y, key) -> (loss, state)
    eval_loss: Callable[..., jax.Array]  # eval_loss(params, state, x, y)
    apply: Callable[..., jax.Array] | None = None  # apply(params, x): logits as in ``loss``
    output_loss: Callable[..., jax.Array] | None = None  # output_loss(logits, y)
    graphdef: Any = None  # nnx.merge(graphdef, params, state) rebuilds the module
    config: Any = None  # the architecture's hyperparameters at this size


def num_params(params: Any) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy on integer labels, computed in float32."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# --- architectures -------------------------------------------------------------------------


class MLP(nnx.Module):
    def __init__(self, sizes, *, dtype, compute, rngs: nnx.Rngs):
        kw = dict(dtype=compute, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(a, b, **kw) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class CNN(nnx.Module):
    def __init__(self, channels: int, *, side: int, dtype, compute, rngs: nnx.Rngs):
        kw = dict(dtype=compute, param_dtype=dtype, rngs=rngs)
        self.side = side
        self.conv1 = nnx.Conv(1, channels, (3, 3), padding="SAME", **kw)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), padding="SAME", **kw)
        self.out = nnx.Linear(side * side * channels, 10, **kw)

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
        h = x.reshape(-1, self.side, self.side, 1)
        h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(h))))
        return self.out(h.reshape(h.shape[0], -1))


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, dtype, compute, rngs: nnx.Rngs):
        conv = dict(use_bias=False, dtype=compute, param_dtype=dtype, rngs=rngs)
        bn = dict(momentum=0.9, dtype=compute, param_dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, **conv)
        self.bn1 = nnx.BatchNorm(cout, **bn)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, **conv)
        self.bn2 = nnx.BatchNorm(cout, **bn)
        if stride != 1 or cin != cout:
            self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, **conv)
            self.proj_bn = nnx.BatchNorm(cout, **bn)
        else:
            self.proj = self.proj_bn = None

    def __call__(self, x, *, train: bool):
        avg = not train
        h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=avg))
        h = self.bn2(self.conv2(h), use_running_average=avg)
        if self.proj is not None:
            x = self.proj_bn(self.proj(x), use_running_average=avg)
        return jax.nn.relu(h + x)


class ResNet18(nnx.Module):
    def __init__(self, widths, *, classes: int, dtype, compute, rngs: nnx.Rngs):
        self.stem = nnx.Conv(
            3,
            widths[0],
            (3, 3),
            padding=1,
            use_bias=False,
            dtype=compute,
            param_dtype=dtype,
            rngs=rngs,
        )
        self.stem_bn = nnx.BatchNorm(
            widths[0], momentum=0.9, dtype=compute, param_dtype=dtype, rngs=rngs
        )
        blocks = []
        cin = widths[0]
        for stage, cout in enumerate(widths):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(
                    BasicBlock(cin, cout, stride, dtype=dtype, compute=compute, rngs=rngs)
                )
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, classes, dtype=compute, param_dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
        h = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        for block in self.blocks:
            h = block(h, train=train)
        return self.head(jnp.mean(h, axis=(1, 2)))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + Drop(Attn(LN(x))), then x + Drop(MLP(LN(x)))."""

    def __init__(self, width: int, heads: int, dropout: float, *, dtype, compute, rngs: nnx.Rngs):
        kw = dict(dtype=compute, param_dtype=dtype, rngs=rngs)
        self.ln1 = nnx.LayerNorm(width, **kw)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, keep_rngs=False, **kw)
        self.ln2 = nnx.LayerNorm(width, **kw)
        self.fc1 = nnx.Linear(width, 4 * width, **kw)
        self.fc2 = nnx.Linear(4 * width, width, **kw)
        self.drop = nnx.Dropout(dropout)

    def __call__(self, x, mask, *, train: bool, rngs: nnx.Rngs | None):
        drop = dict(deterministic=not train, rngs=rngs)
        x = x + self.drop(self.attn(self.ln1(x), mask=mask, deterministic=True), **drop)
        h = self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))
        return x + self.drop(h, **drop)


class Transformer(nnx.Module):
    """Decoder-only language model on integer tokens ``(batch, context)``."""

    def __init__(self, cfg: dict, *, dtype, compute, rngs: nnx.Rngs):
        kw = dict(dtype=compute, param_dtype=dtype, rngs=rngs)
        w = cfg["width"]
        self.embed = nnx.Embed(cfg["vocab"], w, **kw)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg["context"], w), dtype))
        self.drop = nnx.Dropout(cfg["dropout"])
        self.blocks = nnx.List(
            [
                Block(w, cfg["heads"], cfg["dropout"], dtype=dtype, compute=compute, rngs=rngs)
                for _ in range(cfg["layers"])
            ]
        )
        self.ln = nnx.LayerNorm(w, **kw)
        self.head = nnx.Linear(w, cfg["vocab"], **kw)

    def __call__(self, tokens, *, train: bool, rngs: nnx.Rngs | None = None):
        t = tokens.shape[-1]
        h = self.embed(tokens) + self.pos[:t]
        h = self.drop(h, deterministic=not train, rngs=rngs)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            h = block(h, mask, train=train, rngs=rngs)
        return self.head(self.ln(h))


class ViT(nnx.Module):
    """ViT-style classifier: patch embedding, pre-LayerNorm blocks, mean-pooled tokens."""

    def __init__(self, cfg: dict, *, dtype, compute, rngs: nnx.Rngs):
        kw = dict(dtype=compute, param_dtype=dtype, rngs=rngs)
        w, p = cfg["width"], cfg["patch"]
        tokens = (cfg["side"] // p) ** 2
        self.patch = nnx.Conv(3, w, (p, p), strides=p, padding="VALID", **kw)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, w), dtype))
        self.blocks = nnx.List(
            [
                Block(w, cfg["heads"], cfg["dropout"], dtype=dtype, compute=compute, rngs=rngs)
                for _ in range(cfg["layers"])
            ]
        )
        self.ln = nnx.LayerNorm(w, **kw)
        self.head = nnx.Linear(w, cfg["classes"], **kw)

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
        h = self.patch(x)
        h = h.reshape(h.shape[0], -1, h.shape[-1]) + self.pos[...]
        for block in self.blocks:
            h = block(h, None, train=train, rngs=rngs)
        return self.head(jnp.mean(self.ln(h), axis=1))


# --- sizes ---------------------------------------------------------------------------------

CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": {
        "test": {"sizes": (64, 16, 16, 10), "batch": 8},
        "bench": {"sizes": (64, 256, 256, 10), "batch": 512},
    },
    "cnn": {
        "test": {"channels": 4, "side": 8, "batch": 4},
        "bench": {"channels": 299, "side": 8, "batch": 32},
    },
    "resnet18": {
        "test": {"widths": (4, 4, 8, 8), "side": 8, "classes": 10, "batch": 4},
        "bench": {"widths": (64, 128, 256, 512), "side": 32, "classes": 10, "batch": 32},
    },
    "transformer": {
        "test": {
            "vocab": 32,
            "context": 8,
            "width": 16,
            "heads": 2,
            "layers": 2,
            "dropout": 0.1,
            "batch": 2,
        },
        "bench": {
            "vocab": 256,
            "context": 128,
            "width": 384,
            "heads": 6,
            "layers": 6,
            "dropout": 0.1,
            "batch": 8,
        },
    },
    "vit": {
        "test": {
            "side": 8,
            "patch": 4,
            "width": 16,
            "heads": 2,
            "layers": 2,
            "dropout": 0.1,
            "classes": 10,
            "batch": 2,
        },
        "bench": {
            "side": 32,
            "patch": 4,
            "width": 192,
            "heads": 3,
            "layers": 6,
            "dropout": 0.1,
            "classes": 10,
            "batch": 32,
        },
    },
}


def _module(name: str, cfg: dict, dtype: Any, compute: Any, rngs: nnx.Rngs) -> nnx.Module:
    if name == "mlp":
        return MLP(cfg["sizes"], dtype=dtype, compute=compute, rngs=rngs)
    if name == "cnn":
        return CNN(cfg["channels"], side=cfg["side"], dtype=dtype, compute=compute, rngs=rngs)
    if name == "resnet18":
        return ResNet18(
            cfg["widths"], classes=cfg["classes"], dtype=dtype, compute=compute, rngs=rngs
        )
    if name == "transformer":
        return Transformer(cfg, dtype=dtype, compute=compute, rngs=rngs)
    return ViT(cfg, dtype=dtype, compute=compute, rngs=rngs)


def _batch(name: str, cfg: dict, n: int, key: jax.Array, dtype: Any) -> tuple:
    kx, ky = jax.random.split(key)
    if name == "transformer":
        seq = jax.random.randint(kx, (n, cfg["context"] + 1), 0, cfg["vocab"])
        return seq[:, :-1], seq[:, 1:]
    if name == "mlp":
        x = jax.random.uniform(kx, (n, cfg["sizes"][0]), dtype)
    elif name == "cnn":
        x = jax.random.uniform(kx, (n, cfg["side"] ** 2), dtype)
    else:
        x = jax.random.normal(kx, (n, cfg["side"], cfg["side"], 3), dtype)
    return x, jax.random.randint(ky, (n,), 0, 10)


def build(
    name: str,
    size: str = "test",
    *,
    seed: int = 0,
    batch_size: int | None = None,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
) -> Model:
    """The zoo model ``name`` at ``size`` ("test" or "bench") as pure functions of arrays.

    Args:
      name: one of :data:`NAMES`.
      size: "test" (tiny, compiles in seconds) or "bench" (the benchmark size).
      seed: draws the initial parameters, the synthetic batch and the fixed dropout key.
      batch_size: examples (sequences) in the synthetic batch; None: the size's default.
      dtype: of the parameters and the inputs, hence of the activations (float32,
        bfloat16, float64 with x64).
      compute_dtype: the layers' ``dtype``: None computes in the dtype of the inputs and
        parameters (so the float32 copies phipsimu perturbs with 16-bit params compute in
        float32, docs/conventions.md "Low precision"); ``jnp.bfloat16`` casts every layer's
        inputs and parameters to bf16 (flax's mixed precision), perturbed points included.

    Returns:
      A :class:`Model`.
    """
    if name not in NAMES:
        raise ValueError(f"name={name!r}: must be one of {NAMES}")
    if size not in SIZES:
        raise ValueError(f"size={size!r}: must be one of {SIZES}")
    cfg = dict(CONFIGS[name][size])
    n = cfg.pop("batch") if batch_size is None else int(batch_size)
    if n < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
    k_init, k_data, k_drop = jax.random.split(jax.random.key(seed), 3)
    module = _module(name, cfg, dtype, compute_dtype, nnx.Rngs(params=k_init))
    graphdef, params, state = nnx.split(module, nnx.Param, ...)
    batch = _batch(name, cfg, n, k_data, dtype)

    def forward(params, state, x, *, train: bool, key: jax.Array | None):
        model = nnx.merge(graphdef, params, state, copy=True)
        rngs = None if key is None else nnx.Rngs(dropout=key)
        logits = model(x, train=train, rngs=rngs)
        return logits, nnx.state(model, nnx.Not(nnx.Param))

    def train_loss(params, state, x, y, key):
        logits, new_state = forward(params, state, x, train=True, key=key)
        return cross_entropy(logits, y), new_state

    def apply(params, x):
        return forward(params, state, x, train=True, key=k_drop)[0]

    def loss(params, x, y):
        return cross_entropy(apply(params, x), y)

    def eval_loss(params, state, x, y):
        return cross_entropy(forward(params, state, x, train=False, key=None)[0], y)

    return Model(
        name,
        params,
        state,
        batch,
        loss,
        train_loss,
        eval_loss,
        apply=apply,
        output_loss=cross_entropy,
        graphdef=graphdef,
        config=cfg,
    )
