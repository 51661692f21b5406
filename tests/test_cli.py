"""``phipsimu demo``: the quick run end to end (a row per method with finite values and
confidence intervals over 2 seeds, a figure, no progress-bar frames in a log), the interval
arithmetic, ``--version`` and bad options."""

import math
import re
import subprocess
import sys

import pytest

import phipsimu
from phipsimu import _cli

METHODS = ("sgd", "sam", "asam", "trace", "adaptive")
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def run(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "phipsimu", *args], capture_output=True, text=True, **kwargs
    )


@pytest.mark.slow
def test_demo_quick_table_and_figure(tmp_path):
    out = tmp_path / "demo.png"
    result = run("demo", "--quick", "--out", str(out), timeout=900)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in METHODS:
            assert "n/a" not in line, line  # 2 seeds: every column has an interval
            rows[parts[0]] = [float(x) for x in re.findall(NUMBER, line.replace("x", " "))]
    assert sorted(rows) == sorted(METHODS)
    for name, values in rows.items():
        # acc ± CI, loss, trace ± CI, λ_max ± CI, adaptive ± CI, time ratio
        assert len(values) == 10, (name, values)
        assert all(math.isfinite(v) for v in values)
        acc, acc_ci, loss, trace, trace_ci = values[:5]
        assert 0.5 < acc <= 1.0 and acc_ci > 0 and loss > 0 and trace > 0 and trace_ci > 0
    assert rows["sgd"][-1] == 1.0
    assert "95% confidence interval of the mean over 2 seeds" in result.stdout
    assert "interleaved rounds" in result.stdout
    assert "asam = ASAM (adaptive SAM)" in result.stdout
    assert out.exists() and out.stat().st_size > 10_000
    assert f"figure: {out}" in result.stdout
    assert "\r" not in result.stderr  # stderr is not a terminal: no progress-bar frames


def test_interval_and_format():
    mean, half = _cli.interval([1.0, 2.0, 3.0])
    # t(0.975, 2) · s / √3 with s = 1
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert _cli.interval([0.5]) == (0.5, None)
    assert _cli.fmt(0.5, None).strip() == "0.5 ± n/a"
    assert _cli.fmt(0.5, 0.0).strip() == "0.5 ± n/a"  # a zero spread is not a known zero
    assert _cli.fmt(0.5, 0.012).strip() == "0.5 ± 0.012"
    one = _cli.summarise(
        [
            {
                "accuracy": (0.9, None),
                "trace": (1.0, 0.1),
                "lambda_max": (2.0, None),
                "adaptive": (3.0, 0.2),
            }
        ]
    )
    assert one == {
        "accuracy": (0.9, None),
        "trace": (1.0, 0.2),
        "lambda_max": (2.0, None),
        "adaptive": (3.0, 0.4),
    }


def test_time_steps_interleaved():
    """Every method is timed in every round, the order alternates between rounds, the warm-up
    round is dropped, and the ratios are taken within a round."""
    calls = []

    def fake(name):
        def step(params, state, x, y):
            calls.append(name)
            return params, state, 0.0

        return step

    runs = {n: (fake(n), 0.0, None) for n in ("sgd", "sam", "trace")}
    seconds = _cli.time_steps(runs, [0.0], [0.0], rounds=3, steps=2)
    assert {n: len(t) for n, t in seconds.items()} == {"sgd": 3, "sam": 3, "trace": 3}
    assert all(t > 0 for times in seconds.values() for t in times)
    # 4 rounds (warm-up + 3) of 2 steps per method; the first method of a round alternates
    firsts = [calls[i] for i in range(0, len(calls), 6)]
    assert len(calls) == 4 * 3 * 2 and firsts == ["trace", "sgd", "trace", "sgd"]
    ratios = _cli.ratios_to({"sgd": [1.0, 2.0], "sam": [2.0, 3.0]})
    assert ratios == {"sgd": [1.0, 1.0], "sam": [2.0, 1.5]}


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"phipsimu {phipsimu.__version__}"


def test_demo_rejects_bad_options():
    for args, message in [
        (["--steps", "0"], "--steps=0"),
        (["--seeds", "0"], "--seeds=0"),
        (["--methods", "sgd,adam"], "--methods='sgd,adam'"),
        (["--num-samples", "3"], "--num-samples=3"),
    ]:
        result = run("demo", *args)
        assert result.returncode != 0 and message in result.stderr
