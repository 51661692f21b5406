"""The package's modules import one another without cycles (imports inside functions
included): the layers point one way."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "phipsimu"


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of phipsimu it imports}`` from the source, by ``ast``."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] != "phipsimu":
                    continue
                if len(parts) > 1:
                    deps.add(parts[1])
                else:  # from phipsimu import _a, b
                    deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "phipsimu" and len(parts) > 1:
                        deps.add(parts[1])
        deps.discard(path.stem)
        graph[path.stem] = deps & modules
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for w in sorted(graph[u]):
            if state.get(w) == 1:
                return [*stack[stack.index(w) :], w]
            if w not in state and (cycle := visit(w)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = {"a": {"b"}, "b": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    deps = import_graph()
    assert "_curvature" in deps["_estimate"] and "_tree" in deps["_curvature"]
    # _curvature imports tqdm lazily inside a function; phipsimu-internal lazy imports count too
    assert "_krylov" in deps["_spectral"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_one_way():
    """The base layers import nothing above them; the Krylov kernels import no estimator."""
    deps = import_graph()
    assert deps["_checks"] == set()
    assert deps["_tree"] == set()
    assert deps["_diagnostics"] == set()
    # the version guards (JAX releases) sit below everything that calls JAX's newer APIs
    assert deps["_compat"] == set()
    assert deps["_parallel"] <= {"_compat"}
    # the execution layer decides how m evaluations run; it sits on the base layers only
    assert deps["_execution"] <= {"_compat", "_tree", "_parallel"}
    assert deps["_curvature"] <= {"_checks", "_tree", "_parallel", "_execution"}
    assert deps["_krylov"] <= {"_checks", "_tree", "_curvature"}
    assert deps["_measure"] <= {"_checks", "_tree", "_mu", "_diagnostics"}
