"""reproduce.py: the smoke preset runs every stage; outputs exist, parse and agree with each other; reruns resume."""
import json
from pathlib import Path

import pytest

import evaluate as E
import report
import reproduce as R


def jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert R.main(["--preset", "smoke", "--out", str(out), "--stages", "all"]) == 0
    return out / "smoke"


def test_every_stage_is_complete_with_metadata(smoke):
    for st in R.plan(R.PRESETS["smoke"]):
        meta = json.loads((smoke / st.name / "stage.json").read_text())
        assert meta["status"] == "complete" and meta["wall_seconds"] >= 0
        assert meta["command"].startswith("python reproduce.py --preset smoke")
        assert meta["versions"]["torch"] and "git_commit" in meta["versions"]


def test_split_is_disjoint_and_scored(smoke):
    p = R.PRESETS["smoke"]
    split = json.loads((smoke / "split" / "split.json").read_text())
    assert len(split["train"]) == p.n_train and len(split["heldout"]) == p.n_heldout
    assert not set(split["train"]) & set(split["heldout"])
    for run in ("base", "ft", "ibft", "ibft_raw"):
        rows = jsonl(smoke / f"score_{run}" / "scores.jsonl")
        assert [r["record"] for r in rows] == split["train"] + split["heldout"]
        assert all(r["tokens"] > 0 and r["nll"] > 0 and r["mink"] >= r["nll"] - 1e-6 for r in rows)  # Min-K% >= mean


def test_runs_share_the_step_budget_and_pruning_follows_p0(smoke):
    steps = {run: len(jsonl(smoke / f"train_{run}" / "metrics.jsonl")) for run in R.runs(R.PRESETS["smoke"])[1:]}
    assert len(set(steps.values())) == 1, steps
    p0 = [r["mink"] for r in jsonl(smoke / "score_base" / "scores.jsonl") if r["split"] == "train"]
    kept = json.loads((smoke / "train_mink25" / "kept.json").read_text())["kept_indices"]
    dropped = set(range(len(p0))) - set(kept)
    assert len(dropped) == round(0.25 * len(p0))
    assert max(p0[i] for i in dropped) <= min(p0[i] for i in kept)           # the most memorized went first
    ibft = jsonl(smoke / "train_ibft" / "metrics.jsonl")
    assert all(r["kl"] > 0 and r["ce_ib"] > 0 for r in ibft)
    assert json.loads((smoke / "train_ibft_raw" / "config.json").read_text())["ib_input"] == "raw"
    assert json.loads((smoke / "train_ibft" / "config.json").read_text())["ib_input"] == "norm"


def test_metrics_are_recomputable_from_the_committed_files(smoke):
    p = R.PRESETS["smoke"]
    for run in R.runs(p):
        greedy = json.loads((smoke / f"eval_{run}" / "humaneval.greedy.results.json").read_text())
        sampled = json.loads((smoke / f"eval_{run}" / "humaneval.T0.2.results.json").read_text())
        assert len(jsonl(smoke / f"eval_{run}" / "humaneval.greedy.samples.jsonl")) == p.problems
        assert len(jsonl(smoke / f"eval_{run}" / "humaneval.T0.2.samples.jsonl")) == p.problems * p.n
        assert set(greedy["metrics"]) == {"greedy@1"}
        counts = report.per_problem_counts(sampled)
        assert sorted(n for n, _ in counts.values()) == [p.n] * p.problems
        again, _ = E.compute_metrics(list(counts.values()), p.ks, p.ms, bootstrap=0)
        assert again == pytest.approx(sampled["metrics"])
    assert R.temps_runs(p) == ("base", "ft", f"sweep_{R.SWEEP_CHOSEN['smoke']}")   # Fig. 6: the chosen IB-FT
    for run in R.temps_runs(p):
        assert (smoke / f"temps_{run}" / "humaneval.T1.results.json").exists()


def test_report_agrees_with_the_stage_outputs(smoke):
    text = (smoke / "RESULTS.md").read_text()
    for heading in ("## Table 1", "## Fig. 3", "## The mechanism", "## Fig. 2", "## Fig. 4", "## Fig. 5", "## Fig. 6",
                    "## Stages"):
        assert heading in text
    assert "Not run yet: none." in text
    numbers = json.loads((smoke / "report" / "report.json").read_text())
    ft = json.loads((smoke / "eval_ft" / "humaneval.T0.2.results.json").read_text())
    assert numbers["table1"]["humaneval/ft"]["metrics"]["pass@2"] == ft["metrics"]["pass@2"]
    assert set(numbers["mechanism"]["quintiles"]) == {"ft", "ibft", "ibft_raw"}
    claims = numbers["claims"]                          # smoke has no mink20: Table 1's two claims are not in its plan
    assert set(claims) == {"ratio", "temperature", "greedy_gap"} and "Not in this preset's plan: no eval_mink20" in text
    assert all(v["verdict"] in ("reproduced", "contradicted", "not resolvable at this scale") for v in claims.values())
    greedy = report.per_problem_counts(json.loads((smoke / "eval_ft" / "humaneval.greedy.results.json").read_text()))
    gap = [E.per_problem("pass@2", *n_c) - greedy[t][1] for t, n_c in sorted(report.per_problem_counts(ft).items())]
    assert claims["greedy_gap"]["parts"]["FT's Pass@2 - greedy@1"] == list(report.bootstrap_mean(gap))
    import csv                                          # runs.csv: every run's final numbers, from its own files
    rows = list(csv.DictReader((smoke / "report" / "runs.csv").open()))
    last = jsonl(smoke / "train_ft" / "metrics.jsonl")[-1]
    ft_row = next(r for r in rows if r["stage"] == "train_ft")
    assert int(ft_row["steps"]) == last["step"] and float(ft_row["loss"]) == last["loss"]
    greedy = json.loads((smoke / "eval_ft" / "humaneval.greedy.results.json").read_text())
    row = next(r for r in rows if r["stage"] == "eval_ft" and r["results"] == "humaneval.greedy")
    assert float(row["greedy@1"]) == greedy["metrics"]["greedy@1"]
    assert {r["stage"] for r in rows} >= {f"train_{x}" for x in R.runs(R.PRESETS["smoke"])[1:]}


def test_report_of_a_run_outside_a_git_checkout(smoke, tmp_path):
    """A source copy without .git records git_commit null (versions()); the report still writes its stage table."""
    import shutil
    copy = tmp_path / "smoke"
    shutil.copytree(smoke, copy, ignore=shutil.ignore_patterns("work"))
    meta_file = copy / "split" / "stage.json"
    meta = json.loads(meta_file.read_text())
    meta["versions"].update(git_commit=None, git_dirty=False)
    meta_file.write_text(json.dumps(meta))
    assert R.main(["--preset", "smoke", "--out", str(tmp_path), "--stages", "report"]) == 0
    assert "| split | " in (copy / "RESULTS.md").read_text()


def test_report_py_rewrites_the_same_report(smoke, tmp_path):
    """`python report.py FOLDER` alone (no stage, no reproduce.py) writes the RESULTS.md and report.json the report
    stage wrote, from the folder's preset.json, plan.json and stage files."""
    import shutil
    import subprocess
    import sys
    copy = tmp_path / "smoke"
    shutil.copytree(smoke, copy, ignore=shutil.ignore_patterns("work", "RESULTS.md", "report"))
    plan = json.loads((copy / "plan.json").read_text())
    assert plan["stages"] == [st.name for st in R.plan(R.PRESETS["smoke"])]
    assert plan["sweep_chosen"] == R.SWEEP_CHOSEN["smoke"] and plan["labels"]["ibft"] == R.label("ibft")
    done = subprocess.run([sys.executable, str(R.ROOT / "report.py"), str(copy)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("RESULTS.md", "report/report.json"):
        assert (copy / name).read_text() == (smoke / name).read_text(), name


def test_rerun_skips_complete_stages_and_force_redoes_one(smoke, capsys):
    out = str(smoke.parent)
    before = (smoke / "eval_ft" / "stage.json").read_text()
    assert R.main(["--preset", "smoke", "--out", out, "--stages", "all"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("complete, skipped") == len(R.plan(R.PRESETS["smoke"]))
    assert (smoke / "eval_ft" / "stage.json").read_text() == before
    samples = (smoke / "eval_base" / "humaneval.T0.2.samples.jsonl").read_text()
    assert R.main(["--preset", "smoke", "--out", out, "--stages", "eval_base", "--force", "eval_base"]) == 0
    assert (smoke / "eval_base" / "humaneval.T0.2.samples.jsonl").read_text() == samples   # seeded: same samples


def test_a_fresh_checkout_retrains_the_adapters_it_does_not_have(smoke, capsys):
    """Adapters live in work/ (not committed): a stage whose adapter is gone runs again, to the same result."""
    import shutil
    out = str(smoke.parent)
    before = [r["loss"] for r in jsonl(smoke / "train_ft" / "metrics.jsonl")]
    shutil.rmtree(smoke / "work" / "runs" / "ft")
    capsys.readouterr()
    assert R.main(["--preset", "smoke", "--out", out, "--stages", "train_ft,eval_ft"]) == 0
    printed = capsys.readouterr().out
    assert "== train_ft: complete, skipped" not in printed and "== eval_ft: complete, skipped" in printed
    assert (smoke / "work" / "runs" / "ft" / "adapter_model.safetensors").exists()
    assert [r["loss"] for r in jsonl(smoke / "train_ft" / "metrics.jsonl")] == before    # seeded: the same run


def test_dry_run_plans_without_running(tmp_path, capsys):
    assert R.main(["--preset", "smoke", "--out", str(tmp_path), "--dry-run", "--stages", "all"]) == 0
    printed = capsys.readouterr().out
    assert "eval_ibft" in printed and "total" in printed
    assert not (tmp_path / "smoke").exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert R.main(["--preset", "smoke", "--out", str(tmp_path), "--stages", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce.py: error: --stages: unknown stage 'nope'") and err.count("\n") == 1
    assert R.main(["--preset", "paper", "--out", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert R.main(["--preset", "smoke", "--out", str(tmp_path), "--stages", "eval_ft"]) == 2
    assert "needs train_ft first" in capsys.readouterr().err


def test_a_results_folder_keeps_one_configuration(tmp_path, capsys):
    assert R.main(["--preset", "smoke", "--out", str(tmp_path), "--stages", "split"]) == 0
    f = tmp_path / "smoke" / "preset.json"
    cfg = json.loads(f.read_text())
    cfg["preset"]["lr"] = 0.5
    f.write_text(json.dumps(cfg))
    assert R.main(["--preset", "smoke", "--out", str(tmp_path), "--stages", "split"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err


def test_sweep_points_and_barrier(smoke):
    """The sensitivity sweep: each point trained with its own flags and diagnostics, scored, measured against FT at
    its seed; the barrier: D_m memorized by the stated rule, gradient shares that add up to 1."""
    p = R.PRESETS["smoke"]
    assert R.parse_point("nosink_a0.03_b0.1_s2") == ("nosink", 0.03, 0.1, 2)
    assert R.parse_point("ft_s1") == ("ft", None, None, 1)
    with pytest.raises(R.UsageError):
        R.parse_point("ibft_a0.1")
    flags = R.sweep_flags(p, "nosink_a0.3_s1", 10)
    assert flags[flags.index("--alpha") + 1] == "0.3" and flags[flags.index("--seed") + 1] == "1"
    assert flags[flags.index("--ib-input") + 1] == "raw" and flags[flags.index("--ib-sink") + 1] == "exclude"
    for point in R.sweep_points(p):
        d = smoke / f"sweep_{point}"
        info = json.loads((d / "point.json").read_text())
        config = json.loads((d / "config.json").read_text())
        metrics = jsonl(d / "metrics.jsonl")
        assert config["seed"] == (R.parse_point(point)[3] or 0)
        assert [r["step"] for r in metrics if "eval_nll" in r][-1] == len(metrics)
        if point.startswith("ft"):
            assert info["adapter_distance_from_ft"] is None and "ib_share" not in metrics[0]
        else:
            assert info["adapter_distance_from_ft"] > 0 and metrics[0]["ib_share"] > 0
            assert config["ib_input"] == ("norm" if point.startswith("norm") else "raw")
        assert len(jsonl(d / "scores.jsonl")) == p.n_train + p.n_heldout
    barrier = json.loads((smoke / "barrier_memorize" / "barrier.json").read_text())
    assert sorted(barrier["d_m"] + barrier["d_n"]) == list(range(p.n_train))
    assert barrier["rounds"][-1]["d_m_min20_median"] < barrier["threshold"]
    for shares in barrier["gradient_shares"].values():
        assert shares["share_m"] + shares["share_n"] == pytest.approx(1.0, abs=1e-5)
    text = (smoke / "RESULTS.md").read_text()
    assert "## When does IB-FT act?" in text and "## A controlled memorization barrier" in text
    chosen = R.SWEEP_CHOSEN["smoke"]                      # scored on the benchmark with its own adapter, paired vs FT
    assert R.sweep_eval_points(p) == [chosen]
    greedy = json.loads((smoke / f"eval_sweep_{chosen}" / "humaneval.greedy.results.json").read_text())
    assert Path(greedy["generated_by"]["adapter"]) == smoke / "work" / "sweep" / chosen
    numbers = json.loads((smoke / "report" / "report.json").read_text())["table1"]
    assert f"humaneval/sweep_{chosen}" in numbers and f"humaneval/sweep_{chosen}-ft/greedy@1" in numbers


def test_template_reaches_every_command(tmp_path):
    """--template (a checkpoint without a chat template) goes to train.py and evaluate.py, and to scoring."""
    s = R.resolve(R.parse_args(["--preset", "laptop", "--template", "alpaca", "--data", str(R.ROOT / "data" /
                                                                                          "default_instruct.jsonl")]))
    assert s.template == "alpaca"
    assert s.model_flags() == ["--model", str(s.model_path), "--template", "alpaca"]
    assert s.model_flags(tmp_path)[:2] == ["--model", str(tmp_path)]
    plain = R.resolve(R.parse_args(["--preset", "laptop", "--data", str(R.ROOT / "data" / "default_instruct.jsonl")]))
    assert plain.model_flags() == ["--model", str(plain.model_path)]
