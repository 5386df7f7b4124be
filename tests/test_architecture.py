"""Dependencies run one way (docs/design.md §8), read from the source's own imports."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("any4_jax", "converters", "pallas_kernels")
EDGE = {"any4_jax.cli", "any4_jax.assets"}  # run by a user; may use the converters


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: project modules it imports}`` (at any depth of the file)."""
    files = {module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` depends on the submodule; `from mod import name` on mod
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            deps |= {t for t in targets if t in files}
        graph[name] = deps - {name}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    """Control: the parser sees the imports it must judge."""
    graph = import_graph()
    assert "any4_jax.formats" in graph["any4_jax.quantize"]
    assert "any4_jax.checkpoint" in graph["converters.hf2flax"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_nothing_imports_the_cli():
    importers = [m for m, deps in import_graph().items() if "any4_jax.cli" in deps]
    assert importers == []


def test_packages_depend_downhill():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("pallas_kernels"):
            assert not any(d.startswith(("any4_jax", "converters")) for d in deps), (module, deps)
        if module.startswith("any4_jax") and module not in EDGE:
            assert not any(d.startswith("converters") for d in deps), (module, deps)


def test_library_code_starts_no_subprocess():
    """Only fetching assets (`pip download`, which has no Python API) and building
    the CPU kernel (the C++ compiler) shell out."""
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            if module_name(f) not in ("any4_jax.assets", "pallas_kernels.cpu"):
                assert "subprocess" not in f.read_text(), f
