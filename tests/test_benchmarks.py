"""The benchmark suite runs end to end (``python -m benchmarks --quick``: a smoke test, no
timing assertions) and writes its JSON and Markdown with the machine record."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_suite_writes_json_and_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,  # wall time on a loaded shared machine
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (json_file,) = tmp_path.glob("*-quick.json")
    result = json.loads(json_file.read_text())
    for key in ("cpu_model", "cpu_cores", "backend", "device_kind", "jax", "load_average"):
        assert key in result["machine"]
    suites = {f["suite"] for f in result["figures"]}
    assert {"cost", "memory", "compile", "scaling", "accuracy", "zoo"} <= suites
    for f in result["figures"]:
        if f["suite"] != "peers":
            assert f["value"] is not None, f
        assert f["met"] in (True, False, None)
    table = json_file.with_suffix(".md").read_text()
    assert "| suite | figure | value | goal | met |" in table
    assert result["machine"]["cpu_model"] in table


def test_torch_peer_eq10_direction_matches_jax():
    """The PyTorch peer computes the same eq. 10 direction (trace measure) as JAX does for the
    same draws: ∇L + (2/m)·Σ(∇L(x + ρv_i) − ∇L(x))."""

    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from benchmarks import _common as c
    from benchmarks import peers_torch as pt

    loss, params = c.mlp((64, 16, 10))
    x, y = c.digits_batch(32)
    layers, flat, tx, ty = pt.to_torch(params, x, y)
    draws = pt.sphere_draws(flat, 3, torch.Generator().manual_seed(0))
    rho = 0.05
    got = pt.eq10_gradient(layers, flat, tx, ty, draws, rho)
    vs = [
        [
            {"w": jnp.asarray(v[2 * i].numpy()), "b": jnp.asarray(v[2 * i + 1].numpy())}
            for i in range(len(params))
        ]
        for v in draws
    ]

    def objective(p):
        base = loss(p, x, y)
        shifted = [loss(jax.tree.map(lambda a, b: a + rho * b, p, v), x, y) for v in vs]
        return base + 2 * jnp.mean(jnp.stack(shifted) - base)

    want = [a for layer in jax.grad(objective)(params) for a in (layer["w"], layer["b"])]
    for a, b in zip(want, got):
        np.testing.assert_allclose(b.numpy(), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_coverage_flags_study_runs():
    """``python -m benchmarks.coverage_flags`` at a tiny size (a smoke run: its numbers at 16
    keys mean nothing); the full study's numbers are in docs/conventions.md, "Diagnostics"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["--keys", "16", "--num-samples", "32", "--presets", "trace", "eigen_moment_4"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.coverage_flags", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [r[:2] for r in rows] == [["trace", "32"], ["eigen_moment_4", "32"]]
    assert all(0.0 <= float(r[4]) <= 1.0 for r in rows)  # covered or flagged


def test_readme_flag_writes_the_table_into_benchmarks_readme(tmp_path):
    """``--readme`` replaces what lies between the markers of benchmarks/README.md, and only
    that (the committed file has the markers, the front page no longer carries the table)."""
    from benchmarks.__main__ import END, START, update_readme

    committed = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert committed.count(START) == 1 and committed.count(END) == 1
    assert START not in (ROOT / "README.md").read_text(encoding="utf-8")
    copy = tmp_path / "README.md"
    copy.write_text(committed, encoding="utf-8")
    update_readme("| new table |\n", copy)
    head, rest = committed.split(START, 1)
    tail = rest.split(END, 1)[1]
    assert copy.read_text(encoding="utf-8") == f"{head}{START}\n| new table |\n{END}{tail}"
