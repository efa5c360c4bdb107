"""The package's import graph: no cycles anywhere, and the layers import downwards only.

Imports are read from the source (module level and inside functions alike), so a lazy import that
closes a circle counts as much as a top-level one.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bmgpt_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the bmgpt_jax modules it imports (a `from pkg import name` names the submodule if one exists)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("bmgpt_jax")]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
                targets = [t for t in targets if t.startswith("bmgpt_jax")]
            else:
                continue
            missing = [t for t in targets if t.startswith("bmgpt_jax") and t not in files]
            assert not missing, f"{path}:{node.lineno} imports {missing}, which do not exist"
            edges.update(t for t in targets if t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def imports_under(graph, prefix: str) -> dict[str, set[str]]:
    return {m: e for m, e in graph.items() if m == prefix or m.startswith(prefix + ".")}


def test_the_graph_is_read():
    graph = import_graph()
    assert "bmgpt_jax.models.biomedgpt" in graph["bmgpt_jax.convert.openbiomed"]
    assert "bmgpt_jax.data.prompts" in graph["bmgpt_jax.chat"]
    assert "bmgpt_jax.data.examples" in graph["bmgpt_jax.data.pipeline"]          # relative imports resolve


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


BOTTOM = ("bmgpt_jax.parallel", "bmgpt_jax.config",   # imported by every layer; they import nothing of ours
          "bmgpt_jax.distributed")


def test_the_bottom_layer_imports_nothing_of_ours():
    graph = import_graph()
    for module in BOTTOM:
        assert not [e for e in graph[module] if e.startswith("bmgpt_jax")], module


def test_models_import_no_upper_layer():
    allowed = ("bmgpt_jax.models", *BOTTOM, "bmgpt_jax.data.molecules")  # molecules: vocabulary sizes
    for module, edges in imports_under(import_graph(), "bmgpt_jax.models").items():
        bad = sorted(e for e in edges if not e.startswith(allowed))
        assert not bad, f"{module} imports {bad}"


def test_data_imports_no_model_or_training():
    for module, edges in imports_under(import_graph(), "bmgpt_jax.data").items():
        bad = sorted(e for e in edges if not e.startswith(("bmgpt_jax.data", *BOTTOM)))
        assert not bad, f"{module} imports {bad}"


def test_generation_imports_downwards_only():
    for module, edges in imports_under(import_graph(), "bmgpt_jax.generation").items():
        bad = sorted(e for e in edges if not e.startswith(("bmgpt_jax.generation", "bmgpt_jax.models", *BOTTOM)))
        assert not bad, f"{module} imports {bad}"


def test_placement_lives_in_parallel():
    """Data and checkpointing place arrays through parallel.py, never through the train step."""
    graph = import_graph()
    for module in ("bmgpt_jax.data.pipeline", "bmgpt_jax.training.checkpoint"):
        assert "bmgpt_jax.training.step" not in graph[module]
