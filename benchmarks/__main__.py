"""Run every benchmark in one process; write JSON and the Markdown table of benchmarks/README.md.

    python -m benchmarks [--quick] [--repeats 7] [--only cost memory ...] [--out DIR] [--readme]

Suites (in this order): ``cost`` (probe/grad, SAM/SGD, SAM/optax.contrib.sam, eq. 10 step per
(m + 1) gradients for m = 1…16, and the PyTorch peers when torch is installed), ``memory``
(peak RSS growth against m, one process per point), ``compile`` (compile time against step
time, second eager call), ``scaling`` (exponent of cost in d at d ≈ 10⁴, 10⁵, 10⁶ on an MLP and
a small CNN), ``accuracy`` (spectral estimators against a dense Hessian) and ``zoo`` (the cost
goals and the execution strategy on every model of ``benchmarks/zoo.py`` at benchmark size).
Every timed figure is a median over interleaved repeats after warm-up. Results go to
``DIR/<machine>.json`` and ``DIR/<machine>.md`` (default ``benchmarks/results``), with the
machine (CPU model, cores, backend, device kind, jax version) and the load average before and
after. ``--readme`` copies the table into benchmarks/README.md between its markers. ``--quick``
is a smoke test (small sizes, two repeats, under a minute), whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import _common, accuracy, compile, cost, memory, scaling, zoo_cost

SUITES = {
    "cost": cost.run,
    "memory": memory.run,
    "compile": compile.run,
    "scaling": scaling.run,
    "accuracy": accuracy.run,
    "zoo": zoo_cost.run,
}
ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _fmt(value, digits=3):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(result: dict) -> str:
    """The benchmarks/README.md table: a row per figure, with goal, whether met, cause of a miss."""
    info = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['seconds']:.0f} s). "
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} cores, "
        f"backend {info['backend']} ({info['device_kind']}), "
        f"jax {info['jax']}, optax {info['optax']}"
        + (f", torch {info['torch']}" if "torch" in info else "")
        + f"; load average {info['load_average'][0]:.2f} before, "
        f"{result['load_average_after'][0]:.2f} after; {info['utc']} UTC.",
        "",
        "| suite | figure | value | goal | met |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for f in result["figures"]:
        value = _fmt(f["value"]) + (f" {f['unit']}" if f["unit"] and f["value"] is not None else "")
        details = _details(f)
        if details:
            value += f" ({details})"
        met = {True: "yes", False: "**no**", None: ""}[f["met"]]
        lines.append(f"| {f['suite']} | {f['label']} | {value} | {f['goal'] or ''} | {met} |")
        if f.get("cause"):
            notes.append(f"- {f['label']}: missed; {f['cause']}.")
        if f.get("note"):
            notes.append(f"- {f['label']}: {f['note']}.")
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def _details(f: dict) -> str:
    if f.get("range"):
        lo, hi = f["range"]
        return f"repeats {lo:.2f}–{hi:.2f}"
    if f["suite"] == "memory":
        g = ", ".join(f"m={m}: +{v:.0f}" for m, v in f["growth_mib"].items())
        t = ", ".join(f"{v:.0f}" for v in f["xla_temp_mib"].values() if v is not None)
        r = ", ".join(f"{v:.0f}" for v in f.get("running_mib", {}).values())
        return (
            f"compiling and running, MiB: {g}; running alone: {r} (plain gradient "
            f"+{f.get('grad_run_mib', 0):.0f}); XLA temp: {t}"
        )
    if f["suite"] == "compile":
        eager = f["eager_second_call_ms"]
        return f"compile {f['compile_s']:.2f} s, step {f['step_ms']:.2f} ms" + (
            f", eager 2nd call {eager:.0f} ms" if eager is not None else ""
        )
    if f["suite"] == "scaling":
        per_d = f.get("per_d")
        times = ", ".join(f"{t:.3g}" for t in f["times_ms"])
        text = f"d = {', '.join(str(d) for d in f['d'])}: {times} ms"
        if per_d:
            text += "; probe/grad " + ", ".join(f"{r['probe_per_grad']:.2f}" for r in per_d)
            text += "; step/((m+1) SGD) " + ", ".join(_fmt(r["eq10_per_m1_sgd"]) for r in per_d)
        return text
    if f["suite"] == "accuracy":
        if "power_iteration" in f:
            return f"power iteration {_fmt(f['power_iteration'])}"
        return f"Hutchinson {f['hutchinson']:.3g}, XTrace {f['xtrace']:.3g}"
    return ""


def update_readme(table: str, readme: Path = ROOT / "benchmarks" / "README.md") -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers to put the table between")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}{END}{tail}")


def merge(files: list[Path], out: Path, readme: bool) -> dict:
    """Combine result files: the first one's machine record, each suite from the last file
    that ran it (in the suites' order), every command listed and the highest load average."""
    results = [json.loads(f.read_text()) for f in files]
    owner = {}
    for i, r in enumerate(results):
        for f in r["figures"]:
            owner[f["suite"]] = i
    figures = [f for i, r in enumerate(results) for f in r["figures"] if owner[f["suite"]] == i]
    order = ["cost", "peers", *SUITES]
    figures.sort(key=lambda f: order.index(f["suite"]) if f["suite"] in order else len(order))
    first = results[0]
    result = {
        **first,
        "command": " ; ".join(r["command"] for r in results),
        "seconds": sum(r["seconds"] for r in results),
        "load_average_after": max(
            (r["load_average_after"] for r in results), key=lambda load: load[0]
        ),
        "merged_from": [str(f) for f in files],
        "figures": figures,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = _common.machine_name(first["machine"]) + ("-quick" if first["quick"] else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    (out / f"{stem}.md").write_text(table)
    if readme:
        update_readme(table)
    print(table)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (7)")
    parser.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--readme", action="store_true", help="copy the table into benchmarks/README.md"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="measure nothing: combine earlier results (a later file's suites replace an "
        "earlier one's) into --out",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.readme)
    repeats = args.repeats or (2 if args.quick else 7)
    info = _common.machine()
    try:
        from . import peers_torch

        info.update(peers_torch.info())
    except ImportError:
        pass
    command = "python -m benchmarks" + (" " + " ".join(argv) if argv else "")
    t0 = time.perf_counter()
    figures: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    stem = _common.machine_name(info) + ("-quick" if args.quick else "")
    for name in args.only:
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        figures.extend(SUITES[name](args.quick, repeats))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"[benchmarks] {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
        # written after every suite, so an interrupted run keeps what it measured
        result = {
            "command": command,
            "quick": args.quick,
            "repeats": repeats,
            "machine": info,
            "load_average_after": list(os.getloadavg()),
            "seconds": time.perf_counter() - t0,
            "suites_done": args.only[: args.only.index(name) + 1],
            "figures": figures,
        }
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        table = markdown(result)
        (args.out / f"{stem}.md").write_text(table)
    if args.readme:
        update_readme(table)
    print(table)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
