"""The import graph of the project's modules: cli.py at the bottom imports none of them, no module reaches itself
again through its imports (module-level or inside functions), the math (model.py, lora.py) imports none of the
file formats (checkpoint.py: a checkpoint folder; peft_io.py: PEFT's adapter files): those import the math, and
report.py (a study folder's report) reaches no part of the pipeline (reproduce.py, train.py)."""
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


def test_the_math_imports_no_file_format():
    assert project_imports(MODULES["model"]) == {"cli"}                      # UsageError, for --dtype
    assert project_imports(MODULES["lora"]) == {"cli"}                       # CheckpointError, for the key checks
    assert "model" in project_imports(MODULES["checkpoint"])                  # checkpoint -> model, never the reverse
    assert not project_imports(MODULES["checkpoint"]) & {"lora", "peft_io", "reproduce", "train"}
    assert {"lora", "checkpoint"} <= project_imports(MODULES["peft_io"])     # peft_io -> lora, never the reverse


def test_the_test_fixtures_do_not_depend_on_the_study():
    """tests/conftest.py's random checkpoints come from checkpoint.py, not from reproduce.py's pipeline."""
    assert project_imports(REPO / "tests" / "conftest.py") == {"checkpoint"}


def test_the_report_imports_no_part_of_the_pipeline():
    """report.py reads a study folder; it reaches neither reproduce.py nor train.py, directly or through others."""
    seen, stack = set(), ["report"]
    while stack:
        for dep in project_imports(MODULES[stack.pop()]):
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    assert not seen & {"reproduce", "train"}, sorted(seen)


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
