"""The whole `evaluate.py --generate` command, end to end, against an earlier commit's: the throughput issue's target.

    python bench/bench_eval_command.py [--problems 20] [--repeats 2] [--baseline 0a1cf05] [--variants fp32,bf16]
                                       [--out bench_eval_command.json]

Each variant runs the same command as a fresh process, start-up, model loading, compilation and scoring included:

    evaluate.py --benchmark humaneval --generate --limit P --n 10 --temperature 0.2 --top-p 0.95
                --max-new-tokens 512 --seed 0 --samples S --out R [variant flags]

`baseline` runs it in a detached git worktree of --baseline (fp32, the code before the throughput work); the others in
this checkout: `fp32` (the default on the CPU), `bf16` (`--dtype bf16`; refused where the CPU has no native bf16) and
any `name=--flag ...` given in --variants. The runs are interleaved (baseline, fp32, bf16, baseline, ...) and each
variant's median wall time is divided into the baseline's. Next to the speed it prints each variant's Pass@1 and
Pass@10 on the P problems, and how many completions equal the baseline's (fp32 gives all of them; bf16 rounds
differently, so its samples differ and its Pass@k is read against its bootstrap interval on a full run instead).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def command(cwd: Path, work: Path, problems: int, flags: list) -> list:
    return [sys.executable, str(cwd / "evaluate.py"), "--benchmark", "humaneval", "--generate", "--limit", str(problems),
            "--n", "10", "--temperature", "0.2", "--top-p", "0.95", "--max-new-tokens", "512", "--seed", "0",
            "--samples", str(work / "S.jsonl"), "--out", str(work / "R.json"), *flags]


def run_once(name: str, cwd: Path, problems: int, flags: list, keep: Path) -> dict:
    """One fresh evaluate.py process; returns its wall time, metrics and completions."""
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        t0 = time.perf_counter()
        p = subprocess.run(command(cwd, work, problems, flags), cwd=cwd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"bench_eval_command.py: {name} failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
        metrics = json.loads((work / "R.json").read_text())["metrics"]
        rows = [json.loads(x) for x in (work / "S.jsonl").read_text().splitlines() if x.strip()]
        (keep / f"{name}.samples.jsonl").write_text((work / "S.jsonl").read_text())
    return {"wall_s": wall, "metrics": metrics, "completions": [(r["task_id"], r["completion"]) for r in rows],
            "stderr_tail": p.stderr.strip().splitlines()[-3:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=20, help="the first N HumanEval problems")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant (interleaved)")
    ap.add_argument("--baseline", default="0a1cf05", help="the commit to compare against (fp32)")
    ap.add_argument("--variants", default="fp32,bf16",
                    help="comma-separated: fp32, bf16, or NAME=FLAGS (e.g. 'compiled=--compile')")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    flags = {"fp32": [], "bf16": ["--dtype", "bf16"]}
    variants = {}
    for v in args.variants.split(","):
        name, _, extra = v.partition("=")
        if name not in flags and not extra:
            ap.error(f"--variants: unknown variant {name!r} (fp32, bf16 or NAME=FLAGS)")
        variants[name] = extra.split() if extra else flags[name]
    base_dir = Path(tempfile.mkdtemp(prefix="bench_eval_baseline_"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_dir), args.baseline],
                   check=True, capture_output=True)
    keep = Path(tempfile.mkdtemp(prefix="bench_eval_samples_"))
    runs = {"baseline": [], **{k: [] for k in variants}}
    try:
        for rep in range(args.repeats):
            for name in runs:
                cwd, fl = (base_dir, []) if name == "baseline" else (REPO, variants[name])
                r = run_once(name, cwd, args.problems, fl, keep)
                runs[name].append(r)
                print(f"repeat {rep + 1} {name:>10}: {r['wall_s']:7.1f} s  pass@1 {r['metrics'].get('pass@1', 0):.2f}",
                      flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_dir)], capture_output=True)
    base = statistics.median(r["wall_s"] for r in runs["baseline"])
    ref = runs["baseline"][0]["completions"]
    report = {"problems": args.problems, "repeats": args.repeats, "baseline_commit": args.baseline, "variants": {}}
    print(f"\n{args.problems} HumanEval problems x n = 10, the whole evaluate.py --generate command, medians of "
          f"{args.repeats}; baseline = {args.baseline} (fp32)")
    print(f"{'variant':>10} {'wall s':>8} {'speed-up':>9} {'pass@1':>7} {'pass@10':>8} {'same completions':>17}")
    for name, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        same = sum(a == b for a, b in zip(rs[0]["completions"], ref))
        m = rs[0]["metrics"]
        report["variants"][name] = {"wall_s": [r["wall_s"] for r in rs], "median_s": wall, "speedup": base / wall,
                                    "pass@1": m.get("pass@1"), "pass@10": m.get("pass@10"),
                                    "same_completions": same, "completions": len(ref)}
        print(f"{name:>10} {wall:8.1f} {base / wall:8.2f}x {m.get('pass@1', 0):7.2f} {m.get('pass@10', 0):8.2f} "
              f"{same:>8}/{len(ref)}")
    print(f"samples kept in {keep}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
