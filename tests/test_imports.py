"""Imports run one way: lsrm.py -> tools/ -> tiny_data/ -> model/, read from the `import` lines of every file
(those inside functions too). model/ imports neither tools/ nor tiny_data/, but for one hook (the tiny backbones,
`model.assemble.tiny_backbones`), and no module reaches itself again through its imports."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "tiny_data", "tools")
MAY_IMPORT = {"model": {"model"}, "tiny_data": {"model", "tiny_data"}, "tools": {"model", "tiny_data", "tools"},
              "lsrm": {"model", "tiny_data", "tools"}}
HOOK = ("model.assemble", "tiny_backbones", "tiny_data.pretrain")     # (module, function, what it imports)


def modules() -> dict[str, Path]:
    files = [p for d in PACKAGES for p in sorted((ROOT / d).glob("*.py"))] + [ROOT / "lsrm.py"]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


MODULES = modules()


def imports(name: str) -> list[tuple[str, str | None]]:
    """(project module imported, the function it is imported in or None) for every import line of `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((a.name, function) for a in child.names if a.name in MODULES)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in child.names:              # `from model import config`: the module model.config
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                    if target in MODULES:
                        found.append((target, function))
            visit(child, inner)
    visit(ast.parse(path.read_text()), None)
    return [(m, f) for m, f in found if m != name]


GRAPH = {name: imports(name) for name in MODULES}


def test_each_package_imports_only_those_below_it():
    wrong = [(name, m, f) for name, edges in GRAPH.items() for m, f in edges
             if m.split(".")[0] not in MAY_IMPORT[name.split(".")[0]] and (name, f, m) != HOOK]
    assert not wrong, f"imports against the one way (module, imports, in function): {wrong}"


def test_the_tiny_backbones_hook_is_the_one_way_out_of_model():
    out = [(name, f, m) for name, edges in GRAPH.items() if name.startswith("model")
           for m, f in edges if not m.startswith("model")]
    assert out == [HOOK]
    assert not any(m.startswith("model.assemble") for m, _ in GRAPH["tiny_data.pretrain"])


def test_paths_and_errors_sit_below_everything():
    assert GRAPH["model.errors"] == []
    assert [m for m, _ in GRAPH["model.paths"]] == ["model.errors"]
    users = {name for name, edges in GRAPH.items() for m, _ in edges if m == "model.paths"}
    assert {"model.assemble", "tiny_data.pretrain", "tools.bench"} <= users


def test_no_import_cycle():
    """Depth-first over every import (lazy ones included): a module met again on the path is a cycle."""
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for m, _ in GRAPH[name]:
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[name] = "done"
    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_the_graph_reads_lazy_and_relative_imports():
    """The reader itself: it sees imports inside functions and resolves `from . import x`."""
    assert ("tiny_data.pretrain", "tiny_backbones") in GRAPH["model.assemble"]
    assert ("model.config", None) in GRAPH["model.assemble"]          # from . import config as C
    assert any(m == "tools.ablate" and f == "cmd_ablate" for m, f in GRAPH["lsrm"])
