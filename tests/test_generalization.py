"""The generalization study (benchmarks/generalization.py) runs end to end with --quick and
writes the JSON docs/study.md and notebook 05 read: its shape, matched gradient budgets, and
that every random rescaling preserves the model (same loss and test accuracy, det D = 1)
while it changes the non-invariant measures and leaves the adaptive ones unchanged."""

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # end to end: `pytest -m slow` (.ci/run runs it)

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "generalization.py"
TRAINING_KEYS = {
    "dataset",
    "noise",
    "method",
    "rho",
    "strength",
    "seeds",
    "test_acc_mean",
    "test_acc_ci95",
    "grad_evals",
}
CORRELATION_KEYS = {"measure", "tau", "tau_ci95", "tau_rescaled", "tau_rescaled_ci95"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("generalization")
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], check=True)
    return json.loads((out / "generalization.json").read_text()), out


def test_training_rows(study):
    result, out = study
    rows = result["training"]
    methods = {"sgd", "sam", "asam", "trace", "adaptive_trace", "frob_sam", "random_sam"}
    assert {r["method"] for r in rows} == methods
    assert len(rows) == len(methods) * len({(r["dataset"], r["noise"]) for r in rows})
    for r in rows:
        assert TRAINING_KEYS <= set(r)
        assert 0.0 <= r["test_acc_mean"] <= 1.0 and r["test_acc_ci95"] >= 0.0
        assert r["seeds"] == len(r["test_acc_per_seed"]) >= 2
    # matched budgets: every method spends the same number of gradient evaluations
    assert len({r["grad_evals"] for r in rows}) == 1
    for name in ("training.png", "correlation.png", "tables.md"):
        assert (out / name).exists(), name


def test_correlation_rows(study):
    result, _ = study
    rows = result["correlation"]
    assert {r["measure"] for r in rows} >= {
        "trace",
        "lambda_max",
        "frobenius",
        "logdet_gn",
        "adaptive_trace",
        "adaptive_lambda_max",
    }
    for r in rows:
        assert CORRELATION_KEYS <= set(r)
        for key in ("tau", "tau_rescaled"):
            if r[key] is None:  # undefined: < 3 finite values (e.g. a divergent measure) or ties
                assert r[key + "_ci95"] == [None, None], r
                continue
            lo, hi = r[key + "_ci95"]
            assert -1.0 <= lo <= hi <= 1.0 and -1.0 <= r[key] <= 1.0


def test_rescaling_preserves_each_model(study):
    result, _ = study
    models = result["models"]
    assert len(models) >= 8
    for m in models:
        assert m["loss_rescaled"] == pytest.approx(m["loss"], rel=1e-5)
        assert m["test_acc_rescaled"] == m["test_acc"]
        assert abs(m["log_det_D"]) < 1e-3  # volume-preserving: det D = 1
        before, after = m["measures"], m["measures_rescaled"]
        # the rescaling is far from the identity: the Hessian's trace moves ...
        assert abs(after["trace"] / before["trace"] - 1.0) > 0.1
        # ... while the adaptive measures are invariant (same probes, T H T unchanged)
        for name in ("adaptive_trace", "adaptive_lambda_max"):
            assert after[name] == pytest.approx(before[name], rel=1e-3)
