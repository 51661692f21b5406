"""``phipsimu demo --quick``: runs end to end, a row per method with finite values, a figure."""

import math
import re
import subprocess
import sys

METHODS = ("sgd", "sam", "asam", "trace", "adaptive")
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def test_demo_quick_table_and_figure(tmp_path):
    out = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "phipsimu", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in METHODS:
            rows[parts[0]] = [float(x) for x in re.findall(NUMBER, line.replace("x", " "))]
    assert sorted(rows) == sorted(METHODS)
    for name, values in rows.items():
        # acc, loss, trace ± se, λ_max ± residual, adaptive ± se, time ratio
        assert len(values) == 9, (name, values)
        assert all(math.isfinite(v) for v in values)
        acc, loss, trace, trace_se = values[:4]
        assert 0.5 < acc <= 1.0 and loss > 0 and trace > 0 and trace_se > 0
    assert rows["sgd"][-1] == 1.0
    assert out.exists() and out.stat().st_size > 10_000
    assert f"figure: {out}" in result.stdout


def test_demo_rejects_bad_options():
    for args, message in [
        (["--steps", "0"], "--steps=0"),
        (["--methods", "sgd,adam"], "--methods='sgd,adam'"),
        (["--num-samples", "3"], "--num-samples=3"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "phipsimu", "demo", *args], capture_output=True, text=True
        )
        assert result.returncode != 0 and message in result.stderr
