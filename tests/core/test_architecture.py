"""The shape of the house, checked from the source: imports go one way (no cycle, function-local
imports counted), `passes/` holds passes and their private helpers only, one module makes output
directories, functions stay short, and every checkpoint directory belongs to exactly one format."""
import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("moeconv", "passes")
MAX_FUNCTION_LINES = 60
# Functions allowed to stay longer, each with its reason (the list the issue asks to keep short).
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods) -> set[str]:
    """Modules of `mods` that `name` imports anywhere in its file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_imports_inside_functions(tmp_path):
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    probe = tmp_path / "x.py"
    probe.write_text("def f():\n    from moeconv.formats.base import Format\n    from . import y\n")
    mods = {"moeconv.x": probe, "moeconv.y": probe, "moeconv.formats": probe}
    assert _imports("moeconv.x", probe, mods) == {"moeconv.formats", "moeconv.y"}


def test_no_import_cycle_in_moeconv_or_passes():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert import_cycles(graph) == []


def test_passes_holds_passes_and_their_private_helpers_only():
    from passes import REGISTRY
    homes = {cls.__module__ for cls in REGISTRY}
    mods = _modules()
    helpers_used = set()
    for home in homes:
        helpers_used |= {m for m in _imports(home, mods[home], mods) if m.startswith("passes.")}
    for name in mods:
        if name.startswith("passes.") and name not in homes:
            assert name in helpers_used, f"{name} is in passes/ but is neither a pass nor a helper of one"


def test_one_module_makes_output_directories():
    callers = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called == "atomic_output_dir":
                    callers.add(name)
    assert callers == {"moeconv.jobs.driver"}


def test_no_function_longer_than_the_limit():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = f"{name}.{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long.append(f"{key} ({lines} lines)")
    assert long == []


@pytest.mark.parametrize("raw", [
    {"model_type": "llama"}, {"model_type": "mixtral"}, {"model_type": "qwen2_moe"},
    {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}},
    {"model_type": "moeconv", "moeconv": {"format_version": 1}},
    {"model_type": "moeconv", "moeconv": {"format_version": 1, "quantization": {}}},
    {"model_type": "moeconv_sparse", "moeconv_sparse": {}},
])
def test_every_checkpoint_directory_belongs_to_exactly_one_format(raw, tmp_path):
    from moeconv.formats import FORMATS
    claimed = [f.name for f in FORMATS if f.detect(tmp_path, raw)]
    assert len(claimed) == 1, claimed
