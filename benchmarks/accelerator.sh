#!/usr/bin/env bash
# Run the benchmark suite, then the jit / recompilation / sharding tests, on whatever accelerator
# JAX sees (GPU or TPU), in one command from any directory:
#
#   bash benchmarks/accelerator.sh [extra arguments for python -m benchmarks, e.g. --quick]
#
# Needs an environment where `import jax` finds the accelerator (e.g. jax[cuda12] or jax[tpu])
# and `pip install -e ".[dev]"`; PYTHON picks the interpreter (default: python). Results land in
# benchmarks/results/<backend>-<device>-<cores>c.json and .md; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'PY'
import jax

print("backend:", jax.default_backend(), "devices:", jax.devices())
if jax.default_backend() == "cpu":
    print("warning: no accelerator visible to JAX; the numbers will be CPU numbers")
PY
"$PYTHON" -m benchmarks "$@"  # every suite, the model zoo's included (--only zoo for it alone)
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_transforms.py tests/test_estimate.py \
    tests/test_spectral.py -k "jit or recompil or trace or shard or device or eager"
# the zoo through every transform and estimator, and the strategy's same-numbers check
"$PYTHON" -m pytest -q -p no:cacheprovider -m "slow or not slow" tests/test_zoo.py \
    tests/test_execution.py
