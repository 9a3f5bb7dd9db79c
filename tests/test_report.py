"""report.py: the report of a study folder as a command of its own. It reads the folder (preset.json, plan.json, the
stages' files), rewrites what reproduce.py's report stage writes, imports no part of the pipeline, and refuses a
folder reproduce.py did not write (or wrote before plan.json) with one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_structure import MODULES, project_imports

REPO = Path(__file__).resolve().parent.parent


def report_py(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "report.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)


def reachable(module: str) -> set:
    """The project modules `module` imports, directly or through others (module level or inside functions)."""
    seen, stack = set(), [module]
    while stack:
        for dep in project_imports(MODULES[stack.pop()]):
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def test_report_imports_no_part_of_the_pipeline():
    assert not reachable("report") & {"reproduce", "train"}
    assert "report" in project_imports(MODULES["reproduce"])          # the report stage calls report.write_report


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """A smoke study with its first stages complete (seconds): most sections are absent, most stages pending."""
    import reproduce as R
    out = tmp_path_factory.mktemp("results")
    assert R.main(["--preset", "smoke", "--out", str(out), "--stages", "split,score_base"]) == 0
    return out / "smoke"


def test_the_command_rewrites_the_report_stage_output(partial, tmp_path):
    import shutil
    copy = tmp_path / "smoke"
    shutil.copytree(partial, copy, ignore=shutil.ignore_patterns("work", "RESULTS.md", "report"))
    done = report_py(copy)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {copy / 'RESULTS.md'}"
    for name in ("RESULTS.md", "report/report.json"):
        assert (copy / name).read_text() == (partial / name).read_text(), name
    text = (copy / "RESULTS.md").read_text()
    assert "## Fig. 3" in text and "## Table 1" not in text and "Not run yet: train_ft, " in text
    plan = json.loads((copy / "plan.json").read_text())
    assert plan["stages"][:2] == ["split", "score_base"] and plan["runs"][0] == "base"


def test_a_folder_without_plan_json_names_the_command_that_writes_it(partial, tmp_path):
    import shutil
    copy = tmp_path / "results" / "smoke"
    shutil.copytree(partial, copy, ignore=shutil.ignore_patterns("work", "plan.json"))
    done = report_py(copy)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"report.py: error: {copy / 'plan.json'}: no such file") and \
        done.stderr.count("\n") == 1
    assert f"reproduce.py --preset smoke --out {copy.parent} --stages report" in done.stderr


def test_a_folder_reproduce_did_not_write_is_one_line_and_exit_2(tmp_path):
    for folder, says in ((tmp_path / "nothing", "no such folder"), (tmp_path, "preset.json: no such file")):
        done = report_py(folder)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("report.py: error: ") and says in done.stderr
    (tmp_path / "preset.json").write_text(json.dumps({"preset": {"name": "laptop"}}))
    (tmp_path / "plan.json").write_text(json.dumps({"stages": []}))
    done = report_py(tmp_path)
    assert done.returncode == 2 and "plan.json: no model (written by an older reproduce.py)" in done.stderr
    (tmp_path / "plan.json").write_text("{")
    done = report_py(tmp_path)
    assert done.returncode == 2 and "plan.json: not valid JSON" in done.stderr and done.stderr.count("\n") == 1


def test_a_verdict_is_read_off_the_interval():
    import report
    assert report.verdict((0.02, 0.01, 0.03), +1) == "reproduced"
    assert report.verdict((0.02, 0.01, 0.03), -1) == "contradicted"
    assert report.verdict((-0.02, -0.03, -0.01), -1) == "reproduced"
    assert report.verdict((0.01, 0.0, 0.03), +1) == "not resolvable"       # an interval touching 0 resolves nothing
    assert report.verdict((0.0, -0.01, 0.01), -1) == "not resolvable"
    assert report.combined(["reproduced", "reproduced"]) == "reproduced"
    assert report.combined(["reproduced", "not resolvable"]) == "not resolvable at this scale"
    assert report.combined(["not resolvable", "contradicted", "reproduced"]) == "contradicted"
    assert report.combined([]) == "not resolvable at this scale"


def test_a_resolved_difference_no_larger_than_the_seed_yardstick_is_training_noise():
    import report
    assert report.verdict((0.02, 0.01, 0.03), +1, noise=0.02) == "within training noise"     # equal: noise
    assert report.verdict((-0.02, -0.03, -0.01), +1, noise=0.025) == "within training noise"  # either sign
    assert report.verdict((0.02, 0.01, 0.03), +1, noise=0.019) == "reproduced"
    assert report.verdict((0.02, 0.01, 0.03), -1, noise=0.019) == "contradicted"
    assert report.verdict((0.01, -0.01, 0.03), +1, noise=0.0) == "not resolvable"            # the interval first
    assert report.combined(["reproduced", "within training noise"]) == "not resolvable at this scale"
    assert report.combined(["within training noise", "contradicted"]) == "contradicted"


def test_paired_difference_resamples_problems_of_both_runs_together():
    import report
    a = {f"t{i}": (10, i % 11) for i in range(40)}
    b = {f"t{i}": (10, 5) for i in range(40)}
    m, lo, hi = report.paired_difference(a, b, "pass@1")
    assert m == pytest.approx(sum(i % 11 for i in range(40)) / 400 - 0.5) and lo < m < hi
    assert report.paired_difference(a, a, "pass@10^(10)") == (0.0, 0.0, 0.0)     # paired: no spread of its own
    shifted = {t: (n, min(n, c + 1)) for t, (n, c) in b.items()}                   # one more pass everywhere
    assert report.paired_difference(shifted, b, "pass@1") == pytest.approx((0.1, 0.1, 0.1))
    greedy = {t: (1, int(c > 5)) for t, (_, c) in a.items()}
    assert report.paired_difference(greedy, greedy, "greedy@1") == (0.0, 0.0, 0.0)
    assert report.bootstrap_mean([0.0, 1.0] * 50)[0] == 0.5
