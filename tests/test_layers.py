"""The house plan of labs_lib: layers that import only downwards, no import cycle, every folder a map.

Every import in labs_lib counts, the lazy ones inside functions included. A module may import from its own layer
or the layers below; a test names both modules of every upward import and every cycle it finds.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "labs_lib"

# Lowest first. Same number: the same layer (imports between them are fine while they make no cycle).
LAYERS = {"core": 0, "models": 1, "data": 1, "parallel": 2, "measure": 2, "estimates": 2, "train": 3,
          "inference": 3, "jobs": 4, "labs": 5, "planner": 5, "deploy": 5, "grading": 5,
          "generate": 3, "export": 3}  # the last two: the entry points python -m labs_lib.generate / .export


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The labs_lib modules ``name`` imports (``from labs_lib.x import y`` counts y when y is a module)."""
    path = MODULES[name]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("labs_lib.") and target != name and not target.startswith(name + "."):
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int:
    return LAYERS[name.split(".")[1]]


def test_every_module_lives_in_a_layer():
    loose = [n for n in MODULES if n != "labs_lib" and n.split(".")[1] not in LAYERS]
    assert not loose, f"modules outside the layers {sorted(LAYERS)}: {loose} (move them into one)"


def test_imports_go_only_downwards():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, deps in GRAPH.items() if a != "labs_lib" for b in deps if layer(b) > layer(a)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_what_they_look_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("labs_lib.core.config") < layer("labs_lib.train.loop") < layer("labs_lib.labs.checks")


@pytest.mark.parametrize("folder", sorted({p.parent for p in PACKAGE.rglob("*.py")} - {PACKAGE / "__pycache__"}),
                         ids=lambda p: p.name)
def test_every_folder_has_a_map(folder):
    """Each folder's __init__.py is its map: a docstring naming every module in it."""
    init = folder / "__init__.py"
    assert init.exists(), f"{folder} has no __init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    modules = [p.stem for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    modules += [p.name for p in folder.iterdir() if (p / "__init__.py").exists()]
    missing = [m for m in modules if m not in doc]
    assert not missing, f"{init.relative_to(PACKAGE.parent)}'s docstring does not mention {missing}"
