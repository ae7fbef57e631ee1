"""The layout's rules (README, How it works): the command layer (svlm/cli.py and
every `__main__.py`) sits on top and no library module imports it, and the
library's module-level imports have no cycle."""

import ast

from conftest import REPO

SVLM = REPO / "svlm"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("svlm")}


def library_modules():
    return [p for p in SVLM.rglob("*.py") if p.name != "__main__.py" and p != SVLM / "cli.py"]


def test_no_library_module_imports_the_command_layer():
    for path in library_modules():
        used = imports(path, top_level_only=False)
        assert not [m for m in used if m == "svlm.cli" or m.endswith(".__main__")], path


def test_no_import_cycle():
    modules = {module_name(p): p for p in SVLM.rglob("*.py") if p.name != "__main__.py"}
    graph = {name: {m for m in imports(path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}  # fmt: skip
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in graph[name]:
            assert state.get(dep) != 1, " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
