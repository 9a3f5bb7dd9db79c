"""The committed laptop study (results/laptop): every Pass@k of every evaluation recomputes from its own per-sample
outcomes, and the report's verdicts recompute from the committed files. Reads only the repository: no model, no
../shared."""
import json
from pathlib import Path

import pytest

import report

LAPTOP = Path(__file__).resolve().parent.parent / "results" / "laptop"


def complete(stage: Path) -> bool:
    """A stage that ended (stage.json says complete): the ones committed; a running one may have partial files."""
    f = stage / "stage.json"
    return f.is_file() and json.loads(f.read_text()).get("status") == "complete"


EVALS = sorted(p for p in LAPTOP.glob("*/*.results.json")
               if p.parent.name.startswith(("eval_", "temps_")) and complete(p.parent)) if LAPTOP.is_dir() else []


@pytest.mark.skipif(not EVALS, reason="results/laptop has no evaluation committed")
@pytest.mark.parametrize("path", EVALS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_committed_pass_at_k_recomputes_from_its_samples(path):
    res = json.loads(path.read_text())
    samples = [json.loads(x) for x in (path.parent / path.name.replace(".results.json", ".samples.jsonl"))
               .read_text().splitlines() if x.strip()]
    assert sorted(s["task_id"] for s in samples) == sorted(r["task_id"] for r in res["samples"])   # one outcome each
    counts = report.per_problem_counts(res)
    per = res["samples_per_problem"]
    assert len(counts) == res["n_problems"] == 164 and {n for n, _ in counts.values()} == {per["min"], per["max"]}
    again = {k: sum(report.per_problem_values(counts, k).values()) / len(counts) for k in res["metrics"]}
    assert again == pytest.approx(res["metrics"], abs=1e-12)


@pytest.mark.skipif(not (LAPTOP / "report" / "report.json").is_file(), reason="results/laptop has no report")
def test_the_committed_verdicts_recompute_from_the_committed_files(tmp_path):
    c = report.Collected(report.StudyFolder(LAPTOP))
    _, numbers = report.section_claims(c, tmp_path)
    committed = json.loads((LAPTOP / "report" / "report.json").read_text()).get("claims", {})
    assert numbers == committed
