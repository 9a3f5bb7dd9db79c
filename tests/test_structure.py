"""The import graph of the project's modules: cli.py at the bottom imports none of them, and no module reaches itself
again through its imports (module-level or inside functions)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in REPO.glob("*.py")}


def project_imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return (names & set(MODULES)) - {path.stem}


def test_cli_imports_no_project_module():
    assert project_imports(MODULES["cli"]) == set()


def test_no_import_cycle():
    graph = {m: project_imports(p) for m, p in MODULES.items()}
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                assert dep != start, " -> ".join(path + [dep])
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
