"""``phipsimu demo --quick`` runs end to end and every estimate is finite and consistent."""

import math
import re
import subprocess
import sys


def test_demo_quick_runs_and_reports_finite_estimates():
    result = subprocess.run(
        [sys.executable, "-m", "phipsimu", "demo", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [
        line.split()
        for line in result.stdout.splitlines()
        if re.match(r"^(trace|eigen_moment_2|frobenius|adaptive trace)\s", line)
    ]
    assert len(rows) == 4
    for row in rows:
        est, se, exact, z = (float(x) for x in row[-4:])
        assert all(math.isfinite(v) for v in (est, se, exact, z))
        assert se > 0


def test_demo_rejects_bad_options():
    result = subprocess.run(
        [sys.executable, "-m", "phipsimu", "demo", "--steps", "0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "--steps=0" in result.stderr
