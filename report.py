"""RESULTS.md, the figures and the paired differences of a study folder, from whatever stages are complete.

    python report.py results/laptop         # rewrites results/laptop/RESULTS.md, report/report.json, report/*.png

reproduce.py's `report` stage calls write_report(folder); this command line rewrites a report without running any
stage. Everything comes from the folder: preset.json (the preset's settings), plan.json (what the plan says beyond
them: reproduce.py writes it whenever it runs, see write_plan there) and each complete stage's stage.json and files.
This module imports no part of the pipeline (reproduce.py, train.py).

plan.json's keys:
    model, data            the checkpoint's and the data file's names (RESULTS.md's first paragraph)
    stages                 every stage of the plan, in its order (the Stages table, "Not run yet")
    runs                   the study's runs, base first (train_<run>, eval_<run>, ...)
    labels                 run (and sweep_<point>) -> its label in the tables
    sweep_points           the sweep's points in the plan's order, each {point, arm, alpha, beta, seed, ft}: the name
                           parsed (null: the preset's value) and the FT point at its seed it is measured against
    sweep_chosen           the chosen IB-FT setting (null: none)
    sweep_eval_points      the sweep points scored on the benchmarks (eval_sweep_<point>)
    sweep_eval_examples    how many held-out examples the sweep's held-out NLL curves are over
    barrier_points         the runs trained from the memorized model (barrier_<point>)
    temps_runs             Fig. 6's runs (temps_<run>): base, FT and the IB-FT the claims are checked on

Each section is section_<name>(collected, figures folder) -> (Markdown or None, numbers): the Markdown goes into
RESULTS.md when there is any, the numbers into report.json under <name> when there are any.
"""
import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from cli import UsageError, atomic_write, fail, python_command, read_records, write_json, write_text

PLAN_KEYS = ("model", "data", "stages", "runs", "labels", "sweep_points", "sweep_chosen", "sweep_eval_points",
             "sweep_eval_examples", "barrier_points", "temps_runs")


# ----------------------------------------------------------------------------------------------------------------
# The study folder: preset.json, plan.json, the stages' files
# ----------------------------------------------------------------------------------------------------------------

def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list:
    return read_records(path)[0]


class StudyFolder:
    """A folder reproduce.py writes (results/<preset>): its preset's settings and its plan, read once."""

    def __init__(self, out):
        self.out = Path(out)
        if not self.out.is_dir():
            raise UsageError(f"{self.out}: no such folder (a study folder reproduce.py writes, e.g. results/laptop)")
        found = {name: self._read(name) for name in ("preset.json", "plan.json")}
        self.preset = SimpleNamespace(**found["preset.json"]["preset"])
        self.plan = found["plan.json"]
        missing = [k for k in PLAN_KEYS if k not in self.plan]
        if missing:
            raise UsageError(f"{self.out / 'plan.json'}: no {missing[0]} (written by an older reproduce.py); "
                             f"{self._hint()}")

    def _hint(self, preset: Optional[str] = None) -> str:
        out = "" if self.out.parent == Path("results") else f" --out {self.out.parent}"
        return (f"write it with `{python_command()} reproduce.py --preset {preset or self.out.name}{out} "
                "--stages report` (runs no stage; writes plan.json and the report)")

    def _read(self, name: str) -> dict:
        f = self.out / name
        if not f.is_file():
            preset = None
            if name == "plan.json":
                try:
                    preset = read_json(self.out / "preset.json")["preset"]["name"]
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            raise UsageError(f"{f}: no such file; {self._hint(preset)}")
        try:
            obj = read_json(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or (name == "preset.json" and not isinstance(obj.get("preset"), dict)):
            raise UsageError(f"{f}: not a file reproduce.py wrote")
        return obj

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def is_complete(self, stage: str) -> bool:
        f = self.stage_dir(stage) / "stage.json"
        return f.exists() and read_json(f).get("status") == "complete"


# ----------------------------------------------------------------------------------------------------------------
# Tables, figures, paired differences
# ----------------------------------------------------------------------------------------------------------------

# The paper's own numbers for the cells this study reproduces (Pass@1, 5, 10, Pass@10^(2), (5), (10), in %).
PAPER = {
    "humaneval": ("Table A1 (Evol-CodeAlpaca-V1, HumanEval)", {
        "Llama-3-8B base": (29.09, 41.22, 46.95, 37.80, 28.66, 17.07),
        "Llama-3-8B + FT": (56.70, 74.16, 79.27, 73.17, 62.80, 30.49),
        "Llama-3-8B + IB-FT": (61.60, 75.44, 79.88, 73.78, 65.24, 37.20),
        "DeepSeek-Coder-7B-v1.5 base": (44.33, 56.89, 62.20, 54.88, 45.12, 30.49),
        "DeepSeek-Coder-7B-v1.5 + FT": (51.28, 64.10, 64.10, 63.46, 50.00, 32.05),
        "DeepSeek-Coder-7B-v1.5 + IB-FT": (54.57, 67.30, 70.73, 67.07, 54.88, 39.63)}),
    "verilogeval-human": ("Table 1 (OriGen, Eval-Human, DeepSeek-Coder-7B-Instruct-v1.5)", {
        "base": (34.62, 42.09, 44.23, 42.31, 36.54, 24.36), "+ FT": (42.63, 54.60, 57.77, 54.49, 41.03, 27.56),
        "+ FT w/ GRAND": (46.03, 52.48, 54.49, 52.57, 50.85, 43.59),
        "+ FT w/ Min-K%": (50.89, 55.49, 56.41, 55.12, 51.92, 42.95),
        "+ IB-FT": (51.99, 54.86, 55.77, 54.49, 51.92, 48.07)}),
    "verilogeval-machine": ("Table 1 (OriGen, Eval-Machine, DeepSeek-Coder-7B-Instruct-v1.5)", {
        "base": (56.47, 64.76, 67.13, 63.64, 58.74, 43.66), "+ FT": (67.83, 76.02, 76.92, 76.23, 72.73, 49.65),
        "+ FT w/ GRAND": (72.73, 75.92, 76.92, 74.83, 72.73, 66.43),
        "+ FT w/ Min-K%": (73.78, 75.70, 76.23, 75.52, 74.13, 68.52),
        "+ IB-FT": (75.67, 78.51, 79.02, 78.32, 77.62, 69.23)}),
}
TABLE_RUNS = ("base", "ft", "mink20", "grand", "ibft", "ibft_raw")


def _plt():
    """matplotlib's pyplot (Agg) when installed, else None: figures are optional, the numbers never are."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _save(fig, path: Path, caption: str) -> list:
    """Write the figure atomically; returns the Markdown lines that show it in RESULTS.md."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    _plt().close(fig)
    return ["", f"![{caption}](report/{path.name})"]


def md_table(head: list, rows: list) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def per_problem_counts(results: dict) -> dict:
    """task_id -> (n, c) from an evaluate.py results file."""
    out = {}
    for r in results["samples"]:
        n, c = out.get(r["task_id"], (0, 0))
        out[r["task_id"]] = (n + 1, c + (r["outcome"] == "passed"))
    return out


def per_problem_values(counts: dict, metric: str) -> dict:
    """task_id -> the problem's unbiased estimate of `metric` from its (n, c); greedy@1 is the greedy pass rate."""
    import evaluate as E
    name = "pass@1" if metric == E.GREEDY else metric
    return {t: E.per_problem(name, *nc) for t, nc in counts.items()}


def bootstrap_mean(d, bootstrap: int = 2000, seed: int = 0) -> tuple:
    """(mean, 2.5th, 97.5th percentile) of per-problem values d, the interval from resampling the problems."""
    d = np.asarray(d, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(bootstrap, len(d)))
    means = d[idx].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(a: dict, b: dict, metric: str, bootstrap: int = 2000, seed: int = 0) -> tuple:
    """Mean over problems of metric(a) - metric(b), with a 95% bootstrap interval that resamples problems (paired:
    both runs are scored on the same resampled problems)."""
    va, vb = per_problem_values(a, metric), per_problem_values(b, metric)
    return bootstrap_mean([va[t] - vb[t] for t in sorted(set(va) & set(vb))], bootstrap, seed)


def verdict(diff: tuple, sign: int, noise: Optional[float] = None) -> str:
    """The paper says the difference has sign `sign` (+1 or -1). Its 95% interval decides: wholly on the paper's
    side of 0, "reproduced"; wholly on the other, "contradicted"; containing 0, "not resolvable". `noise`: the size
    of the same difference between two training seeds of FT (the yardstick), where it was measured; a difference
    resolved over problems but no larger than that is "within training noise", which resolves nothing either."""
    mean, lo, hi = diff
    if lo <= 0 <= hi:
        return "not resolvable"
    if noise is not None and abs(mean) <= noise + 1e-12:    # equal counts give equal means up to rounding
        return "within training noise"
    return "reproduced" if (lo > 0) == (sign > 0) else "contradicted"


def combined(verdicts: list) -> str:
    """One verdict for a claim made of several: contradicted if any part is, reproduced if every part is, else not
    resolvable at this scale."""
    if "contradicted" in verdicts:
        return "contradicted"
    return "reproduced" if verdicts and all(v == "reproduced" for v in verdicts) else "not resolvable at this scale"


def fmt_diff(d: tuple) -> str:
    return f"{100 * d[0]:+.2f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def fmt_cell(met: dict, iv: dict, k: str) -> str:
    """A metric in % with its bootstrap interval, or "" where the run lacks it."""
    if k not in met:
        return ""
    return f"{100 * met[k]:.2f}" + (f" [{100 * iv[k][0]:.1f}, {100 * iv[k][1]:.1f}]" if k in iv else "")


class Collected:
    """Everything the complete stages wrote, read once; the plan's names (labels, sweep points) beside it."""

    def __init__(self, s: StudyFolder):
        self.s, self.p, self.plan = s, s.preset, s.plan
        self.points = {e["point"]: e for e in s.plan["sweep_points"]}
        self.done = {name: read_json(s.stage_dir(name) / "stage.json") for name in s.plan["stages"]
                     if s.is_complete(name)}
        self.scores = {run: read_jsonl(s.stage_dir(f"score_{run}") / "scores.jsonl")
                       for run in ("base", "ft", "ibft", "ibft_raw") if f"score_{run}" in self.done}
        tofu = s.stage_dir("score_base") / "tofu.jsonl"
        self.tofu = read_jsonl(tofu) if "score_base" in self.done and tofu.exists() else None
        self.metrics = {run: read_jsonl(s.stage_dir(f"train_{run}") / "metrics.jsonl")
                        for run in s.plan["runs"][1:] if f"train_{run}" in self.done}

    def label(self, run: str) -> str:
        """A run's label in the tables (plan.json's labels; reproduce.label)."""
        return self.plan["labels"].get(run, run)

    def short(self, run: str) -> str:
        """The label without its "+ ": how a run is named in a difference ("IB-FT - FT")."""
        return "base" if run == "base" else self.label(run)[2:]

    def results(self, run: str, bench: str, tag: str) -> Optional[dict]:
        stage = "eval" if tag in ("greedy", f"T{self.p.temperature:g}") else "temps"
        f = self.s.stage_dir(f"{stage}_{run}") / f"{bench}.{tag}.results.json"
        return read_json(f) if f"{stage}_{run}" in self.done and f.exists() else None

    def counts(self, run: str, bench: str, tag: str) -> Optional[dict]:
        """task_id -> (n, c) of one results file, None where it is not there."""
        r = self.results(run, bench, tag)
        return per_problem_counts(r) if r else None

    def evaluated(self, run: str, bench: str) -> Optional[SimpleNamespace]:
        """A run's greedy and sampled results at the preset's temperature (both needed, else None): met and iv (the
        metrics and intervals of both), greedy and sampled (task_id -> (n, c))."""
        T = f"T{self.p.temperature:g}"
        g, smp = self.results(run, bench, "greedy"), self.results(run, bench, T)
        if not (g and smp):
            return None
        return SimpleNamespace(met={**g["metrics"], **smp["metrics"]}, iv={**g["intervals"], **smp["intervals"]},
                               greedy=per_problem_counts(g), sampled=per_problem_counts(smp))

    def values(self, ev: SimpleNamespace, metric: str) -> dict:
        """task_id -> the metric's per-problem value of an evaluated run (greedy@1 from its greedy samples)."""
        return per_problem_values(self.counts_of(ev, metric), metric)

    @staticmethod
    def counts_of(ev: SimpleNamespace, metric: str) -> dict:
        """The (n, c) per problem a metric is computed from: the greedy samples for greedy@1, else the sampled."""
        import evaluate as E
        return ev.greedy if metric == E.GREEDY else ev.sampled

    def diff(self, ev_a: SimpleNamespace, ev_b: SimpleNamespace, metric: str) -> tuple:
        """paired_difference of two evaluated runs on one metric."""
        return paired_difference(self.counts_of(ev_a, metric), self.counts_of(ev_b, metric), metric)

    def eval_runs(self) -> list:
        """Every run the tables may show, in their order: base, FT, IB-FT's runs and sweep points, then the pruned."""
        sweep = [f"sweep_{x}" for x in self.plan["sweep_eval_points"]]
        return list(dict.fromkeys([r for r in self.plan["runs"] if not r.startswith(("grand", "mink"))] + sweep +
                                  [r for r in tuple(self.plan["runs"]) + TABLE_RUNS if r.startswith(("grand", "mink"))]))

    def ibft(self) -> str:
        """The IB-FT run the claims are checked on: the sensitivity study's chosen setting where the plan has one
        (its sweep point, evaluated by eval_sweep_<point>), else the `ibft` run."""
        chosen = self.plan["sweep_chosen"]
        return f"sweep_{chosen}" if chosen and chosen in self.plan["sweep_eval_points"] else "ibft"


def section_fig3(c: Collected, figs: Path) -> tuple:
    import mink
    if "base" not in c.scores:
        return None, {}
    train = {run: [r["mink"] for r in rows if r["split"] == "train"] for run, rows in c.scores.items()}
    named = {"p0: train set, base": train["base"]}
    named.update({f"p1: train set, {c.label(r)[2:]}": v for r, v in train.items() if r != "base"})
    if c.tofu:
        named["p2: TOFU, base"] = [r["mink"] for r in c.tofu]
    overlaps = {f"{a} / {b}": mink.overlap(named[a], named[b]) for a in named for b in named if a < b}
    text = ["## Fig. 3: how much of the fine-tuning set the base model already predicts (Min-20% Prob)", "",
            "Lower = more memorized. " + _fig3_sentence(named, overlaps), "", "```",
            mink.quantile_table(named), "```", "", md_table(["pair", "overlap coefficient"],
                                                              [[k, f"{v:.2f}"] for k, v in overlaps.items()])]
    plt = _plt()
    if plt:
        fig, ax = plt.subplots(figsize=(7, 4))
        lo = min(min(v) for v in named.values())
        hi = max(max(v) for v in named.values())
        for name, xs in named.items():
            ax.hist(xs, bins=np.linspace(lo, hi, 41), density=True, alpha=0.45, label=name)
        ax.set_xlabel("Min-20% Prob (mean NLL of the 20% least likely tokens)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        text += _save(fig, figs / "fig3_mink.png", "Fig. 3")
    return "\n".join(text), {"quantiles": {k: np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist()
                                           for k, v in named.items()}, "overlap": overlaps}


def _fig3_sentence(named, overlaps) -> str:
    p0 = "p0: train set, base"
    out = f"The base model's median score on the training set is {np.median(named[p0]):.2f}"
    p2 = [k for k in named if k.startswith("p2")]
    if p2:
        pair = f"{min(p0, p2[0])} / {max(p0, p2[0])}"
        out += f" against {np.median(named[p2[0]]):.2f} on fictitious TOFU answers (overlap {overlaps[pair]:.2f})"
    p1 = [k for k in named if k.startswith("p1")]
    if p1:
        out += "; after fine-tuning, " + ", ".join(f"{k[len('p1: train set, '):]} {np.median(named[k]):.2f}"
                                                   for k in p1)
    return out + "."


def section_table1(c: Collected, figs: Path) -> tuple:
    import evaluate as E
    T = f"T{c.p.temperature:g}"
    K = max(c.p.ks)
    cols = [E.GREEDY] + [f"pass@{k}" for k in c.p.ks] + [f"pass@{K}^({m})" for m in c.p.ms]
    text, numbers = [], {}
    for bench in c.p.benchmarks:
        rows, per = [], {}
        for run in TABLE_RUNS + tuple(f"sweep_{x}" for x in c.plan["sweep_eval_points"]):
            greedy, sampled = c.results(run, bench, "greedy"), c.results(run, bench, T)
            if not (greedy or sampled):
                continue
            met = {**(greedy["metrics"] if greedy else {}), **(sampled["metrics"] if sampled else {})}
            iv = {**(greedy["intervals"] if greedy else {}), **(sampled["intervals"] if sampled else {})}
            rows.append([c.label(run)] + [fmt_cell(met, iv, k) for k in cols])
            numbers[f"{bench}/{run}"] = {"metrics": met, "intervals": iv}
            per[run] = {"greedy": per_problem_counts(greedy) if greedy else None,
                        "sampled": per_problem_counts(sampled) if sampled else None}
        if not rows:
            continue
        n_prob = len(next(iter(per.values()))["sampled"] or next(iter(per.values()))["greedy"])
        text += [f"## Table 1: {bench}, {n_prob} problems, greedy@1 and n = {c.p.n} samples at T = {c.p.temperature}",
                 "", "In %, with 95% bootstrap intervals over problems.", "",
                 md_table(["run"] + [k[0].upper() + k[1:] for k in cols], rows), ""]
        diffs = []
        for a, b in (("ibft", "ft"), ("ft", "base"), ("ibft", "base"), ("ibft_raw", "ibft"), ("mink20", "ft"),
                     ("grand", "ft"), *((f"sweep_{x}", "ft") for x in c.plan["sweep_eval_points"])):
            if a in per and b in per:
                cells = []
                for k in cols:
                    kind = "greedy" if k == E.GREEDY else "sampled"
                    if per[a][kind] and per[b][kind]:
                        d = paired_difference(per[a][kind], per[b][kind], k)
                        cells.append(fmt_diff(d))
                        numbers[f"{bench}/{a}-{b}/{k}"] = list(d)
                    else:
                        cells.append("")
                diffs.append([f"{c.short(a)} - {c.short(b)}"] + cells)
        if diffs:
            text += ["Differences in points, paired over problems (95% bootstrap interval; an interval that "
                     "contains 0 is a difference this run cannot resolve):", "",
                     md_table(["difference"] + [k[0].upper() + k[1:] for k in cols], diffs), ""]
        if bench in PAPER:
            title, ref = PAPER[bench]
            text += [f"The paper's {title}, for comparison (sampled Pass@1; no greedy column):", "",
                     md_table(["run", "Pass@1", "Pass@5", "Pass@10", "Pass@10^(2)", "Pass@10^(5)", "Pass@10^(10)"],
                              [[k] + [f"{x:.2f}" for x in v] for k, v in ref.items()]), ""]
    return ("\n".join(text) if text else None), numbers


def greedy_gap(c: Collected, ev: SimpleNamespace, K: int) -> dict:
    """task_id -> sampled Pass@K minus greedy Pass@1 of one run: Fig. 2's gap, per problem."""
    import evaluate as E
    sampled, greedy = c.values(ev, f"pass@{K}"), c.values(ev, E.GREEDY)
    return {t: sampled[t] - greedy[t] for t in sorted(set(sampled) & set(greedy))}


def section_fig2(c: Collected, figs: Path) -> tuple:
    """Greedy Pass@1 next to sampled Pass@k and Pass@k^(m) for every evaluated run, and the gap between them."""
    import evaluate as E
    bench = c.p.benchmarks[0]
    K = max(c.p.ks)
    names = [E.GREEDY] + [f"pass@{k}" for k in c.p.ks] + [f"pass@{K}^({m})" for m in c.p.ms]
    rows, bars, numbers = [], {}, {}
    for run in c.eval_runs():
        ev = c.evaluated(run, bench)
        if not ev:
            continue
        gap = bootstrap_mean(list(greedy_gap(c, ev, K).values()))
        numbers[run] = {"gap": gap}
        rows.append([c.label(run)] + [f"{100 * ev.met[n]:.2f}" for n in names] + [fmt_diff(gap)])
        if run in ("base", "ft", c.ibft()):
            bars[c.label(run)] = [100 * ev.met[n] for n in names]
    if not rows:
        return None, {}
    text = [f"## Fig. 2: greedy decoding against sampling ({bench})", "",
            "The paper's Fig. 2 reads a gap between greedy Pass@1 and sampled Pass@k as a sign of uncertain "
            f"fine-tuning. Here, in %; the gap is Pass@{K} minus greedy@1, per problem, with its 95% bootstrap "
            "interval:", "", md_table(["run"] + names + [f"gap Pass@{K} - greedy@1"], rows)]
    plt = _plt()
    if plt and bars:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        w = 0.8 / len(bars)
        for j, (name, v) in enumerate(bars.items()):
            ax.bar(np.arange(len(names)) + j * w, v, w, label=name)
        ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names)
        ax.set_ylabel("%")
        ax.legend()
        text += _save(fig, figs / "fig2_greedy_vs_sampled.png", "Fig. 2")
    return "\n".join(text), numbers


def section_fig4(c: Collected, figs: Path) -> tuple:
    """Pass@k against the share of most memorized examples removed (Fig. 4, A1); FT (0%) and IB-FT as references."""
    import evaluate as E
    bench = c.p.benchmarks[0]
    ks = [f"pass@{k}" for k in c.p.ks]
    cols = [E.GREEDY] + ks
    points = [(pct, run, c.evaluated(run, bench)) for pct, run in
              [(0, "ft")] + [(round(100 * r), f"mink{round(100 * r)}") for r in c.p.removals]]
    points = [(pct, run, ev) for pct, run, ev in points if ev]
    if len(points) < 2:
        return None, {}
    refs = [(run, ev) for run, ev in ((r, c.evaluated(r, bench)) for r in dict.fromkeys((c.ibft(), "ibft"))) if ev]
    rows = [[f"{pct}% removed" + (" (FT)" if pct == 0 else "")] + [fmt_cell(ev.met, ev.iv, k) for k in cols]
            for pct, _, ev in points]
    rows += [[c.short(r)] + [fmt_cell(ev.met, ev.iv, k) for k in cols] for r, ev in refs]
    ft = points[0][2] if points[0][0] == 0 else None
    numbers, diffs = {"points": {pct: ev.met for pct, _, ev in points}}, []
    if ft:
        for pct, run, ev in points[1:]:
            cells = []
            for k in cols:
                d = c.diff(ev, ft, k)
                numbers[f"{run}-ft/{k}"] = d
                cells.append(fmt_diff(d))
            diffs.append([f"{pct}% removed - FT"] + cells)
    text = [f"## Fig. 4: FT without the most memorized examples ({bench})", "",
            "Removal by p0 (lowest Min-20% Prob first); every run has FT's step budget. In %, with 95% bootstrap "
            "intervals over problems (the figure's band: FT w/ Min-K%'s); IB-FT's rows are its reference lines:", "",
            md_table(["run"] + [k[0].upper() + k[1:] for k in cols], rows)]
    if diffs:
        text += ["", "Differences from FT in points, paired over problems:", "",
                 md_table(["difference"] + [k[0].upper() + k[1:] for k in cols], diffs)]
    plt = _plt()
    if plt:
        fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.4), squeeze=False)
        xs = [pct for pct, _, _ in points]
        for ax, k in zip(axes[0], ks):
            y = [100 * ev.met[k] for _, _, ev in points]
            ax.plot(xs, y, marker="o", color="C0", label="FT w/ Min-K%")
            if all(k in ev.iv for _, _, ev in points):
                ax.fill_between(xs, [100 * ev.iv[k][0] for _, _, ev in points],
                                [100 * ev.iv[k][1] for _, _, ev in points], color="C0", alpha=0.15)
            if ft:
                ax.axhline(100 * ft.met[k], color="k", ls="--", lw=1, label="FT (0% removed)")
            for j, (r, ev) in enumerate(refs):              # lines only: their intervals are in the table
                ax.axhline(100 * ev.met[k], color=f"C{j + 1}", lw=1.2, label=c.short(r))
            ax.set_title(k)
            ax.set_xlabel("most memorized examples removed (%)")
            ax.set_ylabel("%")
        axes[0][0].legend(fontsize=7)
        text += _save(fig, figs / "fig4_pruning.png", "Fig. 4")
    return "\n".join(text), numbers


def section_fig5(c: Collected, figs: Path) -> tuple:
    import mink
    if "geometry" not in c.done:
        return None, {}
    g = read_json(c.s.stage_dir("geometry") / "geometry.json")
    l2 = {c.label(r): v["l2"] for r, v in g["runs"].items()}
    ang = {c.label(r): v["angle"] for r, v in g["runs"].items()}
    text = [f"## Fig. 5: most vs least memorized examples at layer {g['layer']}", "",
            f"{g['pairs']} random pairs between the lowest and highest 20% of p0 "
            f"({len(g['groups']['most'])} examples each); each example's hidden state is averaged over its response "
            "tokens.", "", "l2 distance:", "```", mink.quantile_table(l2), "```", "", "angle (degrees):", "```",
            mink.quantile_table(ang, digits=2), "```"]
    plt = _plt()
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, (xlabel, named) in zip(axes, (("l2 distance", l2), ("angle (degrees)", ang))):
            for name, xs in named.items():
                ax.hist(xs, bins=40, density=True, alpha=0.45, label=name)
            ax.set_xlabel(xlabel)
            ax.legend(fontsize=8)
        text += _save(fig, figs / "fig5_geometry.png", "Fig. 5")
    return "\n".join(text), {}


# The numbers the paper's text gives for Fig. 6 (DeepSeek-Coder-7B-Instruct-v1.5 on OriGen; the figure has the rest).
PAPER_FIG6 = ("Eval-Human, T = 1.0, Pass@5^(5): IB-FT 34.22 vs FT 4.32; Eval-Human, T = 0.6, Pass@5^(5): FT 12.92 "
              "vs base 18.96; Eval-Machine, T = 1.0: IB-FT 50.34 vs FT 2.10, and base 43.66 (Pass@10^(10)) vs FT 2.10")


def temps_diffs(c: Collected, bench: str, names: list) -> dict:
    """(a, b, T, metric) -> paired difference, for IB-FT - FT, FT - base and IB-FT - base at every temperature both
    runs were sampled at."""
    ib, out = c.ibft(), {}
    for a, b in ((ib, "ft"), ("ft", "base"), (ib, "base")):
        for t in c.p.temperatures:
            ca, cb = c.counts(a, bench, f"T{t:g}"), c.counts(b, bench, f"T{t:g}")
            if ca and cb:
                for n in names:
                    out[(a, b, t, n)] = paired_difference(ca, cb, n)
    return out


def section_fig6(c: Collected, figs: Path) -> tuple:
    """Pass@k^(k) (all k samples pass) against the sampling temperature, for base, FT and IB-FT (plan's temps_runs)."""
    bench = c.p.benchmarks[0]
    names = [f"pass@{k}^({k})" for k in c.p.ks if k > 1]
    cols = [f"pass@{min(c.p.ks)}", f"pass@{max(c.p.ks)}"] + names      # Pass@1 and Pass@K beside, for context
    rows, series = [], {}
    for run in c.plan["temps_runs"]:
        for t in c.p.temperatures:
            r = c.results(run, bench, f"T{t:g}")
            if r:
                rows.append([c.label(run), f"{t:g}"] + [fmt_cell(r["metrics"], r["intervals"], n) for n in cols])
                series.setdefault(run, []).append((t, r))
    if not any(len(v) > 1 for v in series.values()):
        return None, {}
    diffs = temps_diffs(c, bench, cols)
    text = [f"## Fig. 6: temperature ({bench})", "",
            "Pass@k^(k): all k samples must pass (the paper's Fig. 6); Pass@1 and Pass@K beside it. In %, with 95% "
            "bootstrap intervals over problems:", "", md_table(["run", "T"] + cols, rows)]
    if diffs:
        pairs = list(dict.fromkeys((a, b, t) for a, b, t, _ in diffs))
        text += ["", "Differences in points, paired over problems:", "",
                 md_table(["difference", "T"] + cols,
                          [[f"{c.short(a)} - {c.short(b)}", f"{t:g}"] + [fmt_diff(diffs[(a, b, t, n)]) for n in cols]
                           for a, b, t in pairs])]
    text += ["", f"The paper's text, for comparison: {PAPER_FIG6}."]
    plt = _plt()
    if plt:
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
        for j, n in enumerate(names):
            ax = axes[0][j]
            for i, (run, pts) in enumerate(series.items()):
                ts = [t for t, _ in pts]
                ax.plot(ts, [100 * r["metrics"][n] for _, r in pts], marker="o", color=f"C{i}", label=c.label(run))
                if all(n in r["intervals"] for _, r in pts):
                    ax.fill_between(ts, [100 * r["intervals"][n][0] for _, r in pts],
                                    [100 * r["intervals"][n][1] for _, r in pts], color=f"C{i}", alpha=0.12)
            ax.set_title(n)
            ax.set_xlabel("temperature")
            ax.set_ylabel("%")
            ax.legend(fontsize=8)
        text += _save(fig, figs / "fig6_temperature.png", "Fig. 6")
    return "\n".join(text), {f"{a}-{b}/T{t:g}/{n}": d for (a, b, t, n), d in diffs.items()}


def quintiles(base_scores: list) -> list:
    """The training split's examples in five groups by p0, Q1 = most memorized (lowest Min-K%)."""
    base = [r for r in base_scores if r["split"] == "train"]
    return np.array_split(np.array(sorted(range(len(base)), key=lambda i: (base[i]["mink"], i))), 5)


def quintile_drops(base_scores: list, run_scores: list) -> list:
    """Per quintile, how much a run lowered the mean training NLL of its examples from the base model's."""
    base = [r["nll"] for r in base_scores if r["split"] == "train"]
    run = [r["nll"] for r in run_scores if r["split"] == "train"]
    return [float(np.mean([base[i] for i in idx]) - np.mean([run[i] for i in idx])) for idx in quintiles(base_scores)]


def split_drops(base_scores: list, run_scores: list) -> dict:
    """Per-example paired drops (base NLL - run NLL), averaged per split, and the train - held-out gap."""
    nll = {part: np.array([r["nll"] for r in run_scores if r["split"] == part]) for part in ("train", "heldout")}
    base = {part: np.array([r["nll"] for r in base_scores if r["split"] == part]) for part in nll}
    drop = {part: float(np.mean(base[part] - nll[part])) for part in nll}
    return {"train": float(nll["train"].mean()), "heldout": float(nll["heldout"].mean()),
            "train_median": float(np.median(nll["train"])), "heldout_median": float(np.median(nll["heldout"])),
            "drop_train": drop["train"], "drop_heldout": drop["heldout"], "gap": drop["train"] - drop["heldout"]}


def section_mechanism(c: Collected, figs: Path) -> tuple:
    """Per memorization quintile of p0: how much each run lowered the training NLL; and the train/held-out gap."""
    if "base" not in c.scores:
        return None, {}
    base = [r for r in c.scores["base"] if r["split"] == "train"]
    fine = [r for r in ("ft", "ibft", "ibft_raw") if r in c.scores]
    numbers, rows = {"quintiles": {r: quintile_drops(c.scores["base"], c.scores[r]) for r in fine}, "gap": {}}, []
    for q, idx in enumerate(quintiles(c.scores["base"]), 1):
        rows.append([f"Q{q}", f"{np.mean([base[i]['mink'] for i in idx]):.2f}",
                     f"{np.mean([base[i]['nll'] for i in idx]):.3f}"] +
                    [f"{numbers['quintiles'][run][q - 1]:.3f}" for run in fine])
    spread = {run: max(v) - min(v) for run, v in numbers["quintiles"].items()}
    text = ["## The mechanism: does IB-FT treat memorized and unmemorized data more equally?", "",
            "Training examples split into quintiles by p0 (Q1 = most memorized). Mean response NLL (nats/token) on "
            "the base model, and how much each run lowered it:", "",
            md_table(["quintile", "p0 mean", "base NLL"] + [f"drop, {c.label(r)[2:]}" for r in fine], rows), ""]
    if spread:
        text += ["Spread of the drop across quintiles (max - min; smaller = more equal): " +
                 ", ".join(f"{c.label(r)[2:]} {v:.3f}" for r, v in spread.items()) + ".", ""]
    # Per-example paired drops (base NLL - run NLL) cancel the two splits' different difficulty; the gap is how much
    # more the trained-on examples improved than unseen ones of the same data.
    gap_rows = []
    for run, rows_ in c.scores.items():
        g = numbers["gap"][run] = split_drops(c.scores["base"], rows_)
        gap_rows.append([c.label(run), f"{g['train']:.3f} ({g['train_median']:.3f})",
                         f"{g['heldout']:.3f} ({g['heldout_median']:.3f})", f"{g['drop_train']:+.3f}",
                         f"{g['drop_heldout']:+.3f}", f"{g['gap']:+.3f}"])
    text += ["Generalization: mean (median) response NLL on the training split and on the held-out split of the same "
             "data, each example's drop from the base model, and the gap between the two drops (how much more the "
             "trained-on examples improved than unseen ones):", "",
             md_table(["run", "train NLL", "held-out NLL", "drop, train", "drop, held-out", "gap"], gap_rows)]
    numbers["spread"] = spread
    plt = _plt()
    if plt and c.metrics:
        keys = [k for k in ("ce", "kl", "ce_ib") if any(m[0].get(k) for m in c.metrics.values())]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
        for ax, k in zip(axes[0], keys):
            for run, m in c.metrics.items():
                if run in ("ft", "ibft", "ibft_raw") and (k == "ce" or run.startswith("ibft")):
                    ax.plot([x["step"] for x in m], [x[k] for x in m], label=c.label(run)[2:], lw=1)
            ax.set_title(k)
            ax.set_xlabel("step")
            ax.set_yscale("log" if k == "kl" else "linear")
            ax.legend(fontsize=8)
        text += ["", "Training curves (CE, KL, CE_IB per optimizer step, from metrics.jsonl):"]
        text += _save(fig, figs / "training_curves.png", "training curves")
    return "\n".join(text), numbers


SWEEP_MEASURES = (   # (key, column, digits): what each sweep point is read by, against FT's seed range
    ("heldout_nll", "held-out NLL", 4), ("drop_heldout", "held-out NLL drop, per example", 4), ("drop_train", "train NLL drop", 4), ("gap", "gap", 4),
    ("spread", "quintile spread", 4), ("l2_median", "l2 median", 2), ("angle_median", "angle median", 2),
    ("norm_median", "pooled norm median", 1), ("distance", "distance from FT", 3))


def sweep_point_numbers(s: StudyFolder, base_scores: list, point: dict) -> dict:
    """One sweep point's measures (`point`: its plan.json entry), read from its stage folder (and score_base)."""
    d, arm = s.stage_dir(f"sweep_{point['point']}"), point["arm"]
    m, info = read_jsonl(d / "metrics.jsonl"), read_json(d / "point.json")
    scores = read_jsonl(d / "scores.jsonl")
    drops = quintile_drops(base_scores, scores)
    cfg = read_json(d / "config.json")
    shares = [r["ib_share"] for r in m if "ib_share" in r]
    held = [r for r in scores if r["split"] == "heldout"]
    return {"arm": arm, "alpha": None if arm == "ft" else cfg["alpha"], "beta": None if arm == "ft" else cfg["beta"],
            "seed": cfg["seed"], **split_drops(base_scores, scores), "spread": max(drops) - min(drops),
            "heldout_nll": sum(r["nll"] * r["tokens"] for r in held) / sum(r["tokens"] for r in held),
            "quintile_drops": drops, "l2_median": info["geometry"]["l2_median"],
            "angle_median": info["geometry"]["angle_median"], "norm_median": info["geometry"].get("norm_median"),
            "distance": info["adapter_distance_from_ft"],
            "ib_share": float(np.median(shares)) if shares else None,
            "ib_cos": float(np.median([r["ib_cos"] for r in m if "ib_cos" in r])) if shares else None,
            "rate_first": m[0].get("rate"), "rate": m[-1].get("rate"),
            "sink_share_first": m[0].get("sink_share"), "sink_share": m[-1].get("sink_share"),
            "eval_curve": [(r["step"], r["eval_nll"]) for r in m if "eval_nll" in r]}


def section_sweep(c: Collected, figs: Path) -> tuple:
    """The sensitivity sweep: every complete point's measures, FT's seed range, and which points leave it."""
    arms = ("ft", "norm", "nosink", "authors")
    def order(x):
        e = c.points[x]
        return (arms.index(e["arm"]), *(v if v is not None else -1 for v in (e["alpha"], e["beta"], e["seed"])))

    points = sorted((x for x in c.points if f"sweep_{x}" in c.done), key=order)
    if not points or "base" not in c.scores:
        return None, {}
    base = c.scores["base"]
    num = {x: sweep_point_numbers(c.s, base, c.points[x]) for x in points}
    norms = read_json(c.s.stage_dir("geometry_sweep") / "norms.json") if "geometry_sweep" in c.done else {}
    for x in points:      # geometry_sweep's measurement, else the point's own (points run since it was recorded)
        num[x]["norm_median"] = norms.get(x, num[x]["norm_median"])
    ft = [x for x in points if num[x]["arm"] == "ft"]
    rng = {k: (min(num[x][k] for x in ft), max(num[x][k] for x in ft)) for k, _, _ in SWEEP_MEASURES
           if len(ft) >= 2 and all(num[x][k] is not None for x in ft)}

    def cell(x, k, digits):
        v = num[x][k]
        if v is None:
            return "-"
        out = k in rng and num[x]["arm"] != "ft" and not rng[k][0] <= v <= rng[k][1]
        return f"**{v:.{digits}f}**" if out else f"{v:.{digits}f}"

    def opt(v, f):
        return "-" if v is None else format(v, f)

    rows = [[f"`{x}`", opt(num[x]["alpha"], "g"), opt(num[x]["beta"], "g"), num[x]["seed"],
             opt(num[x]["ib_share"], ".3f"), opt(num[x]["rate"], ".2f"),
             "-" if num[x]["sink_share"] is None else
             f"{100 * num[x]['sink_share_first']:.1f}% -> {100 * num[x]['sink_share']:.1f}%"]
            + [cell(x, k, dg) for k, _, dg in SWEEP_MEASURES] for x in points]
    text = ["## When does IB-FT act? The sensitivity sweep", "",
            "Arms: `ft` plain FT; `norm` IB-FT with q_phi on the RMS-normalized hidden state; `nosink` q_phi on the "
            "raw hidden state (the paper) with the attention sink kept out; `authors` the authors' released code as "
            "it ran (raw input, sink kept, KL over rows padded to 2048, alpha 0.2, beta 0.01, lr 1e-4, warmup 0.1). "
            "Every point has the preset's data, seed (unless `_s`) and FT's step budget. ib_share: median over the run "
            "of |grad alpha*l_IB| / |grad CE| on the LoRA weights; rate: KL nats per bottlenecked token at the last "
            "step (summed over latent dims); sink share: the share of all tokens' KL on attention sinks at the first and "
            "the last step (a sink that training shrank below the threshold is no longer one). NLL drops are paired "
            "per example against the base model, each example's mean weighted equally (nats/token); held-out NLL "
            "is the mean over all held-out response tokens instead (the usual LM number); the gap is train drop - "
            "held-out drop; the quintile "
            "spread is the mechanism table's; l2/angle medians are Fig. 5's; the distance is ||dW - dW_FT|| / "
            "||dW_FT|| from FT's adapter at the same seed; the pooled norm median is the median norm of the same "
            "pooled states (`geometry_sweep`" + (f"; base model {norms['base']:.1f}" if "base" in norms else "") +
            "). **Bold**: outside FT's range over "
            f"{len(ft)} seeds" + (f" ({', '.join(f'{k} {lo:.4g}..{hi:.4g}' for k, (lo, hi) in rng.items())})"
                                  if rng else " (needs two FT seeds)") + ".", "",
            md_table(["point", "alpha", "beta", "seed", "ib_share", "rate", "sink share"] +
                     [col for _, col, _ in SWEEP_MEASURES], rows), "",
            f"Each point reruns with `python reproduce.py --preset {c.p.name} --stages sweep_<point>`; its train.py "
            "flags are in `sweep_<point>/point.json`, its per-step diagnostics in `sweep_<point>/metrics.jsonl`."]
    chosen = c.plan["sweep_chosen"]
    settings = {re.sub(r"_s[0-9]+$", "", x) for x in points if re.search(r"_s[0-9]+$", x) and num[x]["arm"] != "ft"}
    for setting in sorted(settings, key=lambda x: (x != chosen, x)):   # every setting run at several seeds
        pairs = [(x, c.points[x]["ft"]) for x in points
                 if re.sub(r"_s[0-9]+$", "", x) == setting and c.points[x]["ft"] in num]
        if len(pairs) < 2:
            continue
        keys = [(k, col, dg) for k, col, dg in SWEEP_MEASURES if k != "distance"]
        diffs = {x: {k: None if num[x][k] is None or num[f][k] is None else num[x][k] - num[f][k] for k, _, _ in keys}
                 for x, f in pairs}
        rows = [[f"`{x}` - `{f}`"] + ["-" if diffs[x][k] is None else f"{diffs[x][k]:+.{dg}f}" for k, _, dg in keys]
                for x, f in pairs]
        if len(pairs) > 1:
            rows.append(["mean"] + [f"{np.mean([diffs[x][k] for x, _ in pairs]):+.{dg}f}"
                                    if all(diffs[x][k] is not None for x, _ in pairs) else "-" for k, _, dg in keys])
        what = f"The chosen setting `{setting}`" if setting == chosen else f"`{setting}`"
        text += ["", f"{what} against FT at the same seed (same LoRA init, data order and dropout draws):", "",
                 md_table(["pair"] + [col for _, col, _ in keys], rows)]
    plt = _plt()
    if plt:
        text += _sweep_figures(plt, c, figs, num, rng)
    return "\n".join(text), {"points": num, "ft_range": rng}


def _sweep_figures(plt, c: Collected, figs: Path, num: dict, rng: dict) -> list:
    """Held-out NLL and quintile spread against alpha per arm (FT's seed range shaded); held-out NLL over steps
    for FT and the chosen setting, its step 0 the base model's (score_base, the same examples)."""
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "heldout_nll", "held-out NLL (all response tokens)"),
                           (axes[1], "spread", "quintile spread")):
        for arm in ("norm", "nosink", "authors"):
            pts = sorted((v["alpha"], v[key]) for x, v in num.items()
                         if v["arm"] == arm and v["seed"] == c.p.seed and v["beta"] == (0.01 if arm == "authors"
                                                                                      else c.p.beta))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=arm)
        if key in rng:
            ax.axhspan(*rng[key], color="grey", alpha=0.3, label="FT, seed range")
        ax.set_xscale("log")
        ax.set_xlabel("alpha")
        ax.set_title(title)
        ax.legend(fontsize=8)
    out += _save(fig, figs / "sweep_alpha.png", "sweep against alpha")
    chosen = c.plan["sweep_chosen"]
    base = [r for r in c.scores["base"] if r["split"] == "heldout"][:c.plan["sweep_eval_examples"]]
    step0 = sum(r["nll"] * r["tokens"] for r in base) / sum(r["tokens"] for r in base)
    curves = {x: v for x, v in num.items() if v["arm"] == "ft" or (chosen and x.startswith(chosen) and "_b" not in x)}
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for x, v in curves.items():
            ax.plot([0] + [s_ for s_, _ in v["eval_curve"]], [step0] + [e for _, e in v["eval_curve"]], marker="o",
                    ls="-" if v["arm"] == "ft" else "--", label=x)
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out NLL ({len(base)} examples)")
        ax.legend(fontsize=8)
        out += _save(fig, figs / "sweep_heldout_curves.png", "held-out NLL over steps")
    return out


def section_barrier(c: Collected, figs: Path) -> tuple:
    """The memorization barrier: NLL drops on D_m, D_n and held-out data, from the base and the memorized model."""
    if "barrier_memorize" not in c.done or "base" not in c.scores:
        return None, {}
    info = read_json(c.s.stage_dir("barrier_memorize") / "barrier.json")
    memorized = read_jsonl(c.s.stage_dir("barrier_memorize") / "scores.jsonl")
    groups = {"D_m": set(info["d_m"]), "D_n": set(info["d_n"])}

    def drops(before, after):
        out = {}
        for name, idx in groups.items():
            pairs = [(b["nll"], a["nll"]) for b, a in zip(before, after) if b["split"] == "train" and b["index"] in idx]
            out[name] = float(np.mean([b - a for b, a in pairs]))
        out["held-out"] = float(np.mean([b["nll"] - a["nll"] for b, a in zip(before, after)
                                         if b["split"] == "heldout"]))
        return out

    def means(rows):
        out = {name: float(np.mean([r["nll"] for r in rows if r["split"] == "train" and r["index"] in idx]))
               for name, idx in groups.items()}
        out["held-out"] = float(np.mean([r["nll"] for r in rows if r["split"] == "heldout"]))
        return out

    levels = {"base model": means(c.scores["base"]), "memorized model (base + FT on D_m)": means(memorized)}
    runs = {}
    if "sweep_ft_s0" in c.done:
        runs["FT from the base model (sweep ft_s0)"] = drops(c.scores["base"],
                                                             read_jsonl(c.s.stage_dir("sweep_ft_s0") / "scores.jsonl"))
        levels["base + FT (sweep ft_s0)"] = means(read_jsonl(c.s.stage_dir("sweep_ft_s0") / "scores.jsonl"))
    for point in c.plan["barrier_points"]:
        if point and f"barrier_{point}" in c.done:
            name = f"{'FT' if point.startswith('ft') else f'IB-FT `{point}`'} from the memorized model"
            after = read_jsonl(c.s.stage_dir(f"barrier_{point}") / "scores.jsonl")
            runs[name], levels[f"memorized + {name.split(' from')[0]}"] = drops(memorized, after), means(after)
    sh = info["gradient_shares"]
    text = ["## A controlled memorization barrier", "",
            f"Rule: {info['rule']}. D_m and D_n are {len(info['d_m'])} and {len(info['d_n'])} training examples. "
            "Rounds (epochs: D_m's median Min-20% Prob): " + ", ".join(
                f"{r['epochs']}: {r['d_m_min20_median']:.3f}" for r in info["rounds"]) +
            f"; the threshold was {info['threshold']:.3f}.", "",
            "The first step's CE gradient on a fresh LoRA, split by the examples its tokens come from (share = "
            "<g_group, g> / |g|^2; the two add up to 1):", "",
            md_table(["model", "D_m share", "D_n share", "norm of g_m", "norm of g_n"],
                     [[k, f"{v['share_m']:.3f}", f"{v['share_n']:.3f}", f"{v['norm_m']:.4f}", f"{v['norm_n']:.4f}"]
                      for k, v in sh.items()]), "",
            "Mean response-NLL drop per example (nats/token), paired against the model each run started from:", "",
            md_table(["run", "D_m", "D_n", "held-out"],
                     [[k] + [f"{v[g]:+.4f}" for g in ("D_m", "D_n", "held-out")] for k, v in runs.items()]), "",
            "Mean response NLL (nats/token) of each group on each model:", "",
            md_table(["model", "D_m", "D_n", "held-out"],
                     [[k] + [f"{v[g]:.4f}" for g in ("D_m", "D_n", "held-out")] for k, v in levels.items()])]
    return "\n".join(text), {"info": {k: v for k, v in info.items() if k not in ("d_m", "d_n")}, "drops": runs,
                              "levels": levels}


def section_claims(c: Collected, figs: Path) -> tuple:
    """The paper's claims this study can check (Table 1's two, Fig. 4 / A1, Fig. 6, Fig. 2), each with its paired
    differences (95% bootstrap intervals over problems) and one verdict (verdict, combined): reproduced, contradicted,
    within training noise, or not resolvable at this scale."""
    import evaluate as E
    bench = c.p.benchmarks[0]
    K = max(c.p.ks)
    strict = f"pass@{K}^({K})"
    ib = c.ibft()
    ev = {r: c.evaluated(r, bench) for r in c.eval_runs()}
    ev = {r: e for r, e in ev.items() if e}
    items, numbers = [], {}

    def diff(a, b, k):
        return c.diff(ev[a], ev[b], k)

    def gap_diff(a, b):
        """Fig. 2's gap (Pass@K - greedy@1) of run a minus run b's, paired over problems."""
        ga, gb = greedy_gap(c, ev[a], K), greedy_gap(c, ev[b], K)
        return bootstrap_mean([ga[t] - gb[t] for t in sorted(set(ga) & set(gb))])

    # The yardstick: FT at another training seed against FT, on every measure the claims use at the preset's
    # temperature. noise[measure] is the largest such difference; a claimed difference no larger is training noise.
    seeds = [f"sweep_{x}" for x, e in c.points.items() if e["arm"] == "ft" and e["seed"] and f"sweep_{x}" in ev]
    yard, noise = [], {}
    if "ft" in ev:
        for r in seeds:
            ds = [(k, diff(r, "ft", k)) for k in (E.GREEDY,) + tuple(f"pass@{k}" for k in c.p.ks) + (strict,)]
            ds.append(("gap", gap_diff(r, "ft")))
            yard.append((f"FT at seed {c.points[r[len('sweep_'):]]['seed']} - FT", ds))
            for k, d in ds:
                noise[k] = max(noise.get(k, 0.0), abs(d[0]))

    def claim(key, title, paper, parts, missing):
        """parts: (description, (mean, lo, hi), sign the paper gives, the yardstick's measure or None)."""
        if missing:
            absent = [x for x in missing if x not in c.plan["stages"]]
            items.append(f"- **{title}** " + (f"Not in this preset's plan: no {', '.join(absent)}." if absent else
                                              f"Not run yet: needs {', '.join(missing)}."))
            return
        vs = [verdict(d, sign, noise.get(m) if m else None) for _, d, sign, m in parts]
        v = combined(vs)
        here = "; ".join(f"{desc} {fmt_diff(d)} ({x})" for (desc, d, _, _), x in zip(parts, vs))
        items.append(f"- **{title}** The paper: {paper}. Here: {here}. **Verdict: {v}.**")
        numbers[key] = {"verdict": v, "parts": {desc: list(d) for desc, d, _, _ in parts},
                        "part_verdicts": {desc: x for (desc, _, _, _), x in zip(parts, vs)}}

    def need(*runs):
        return [f"eval_{r}" for r in runs if r not in ev]

    # 1. Table 1: data selection helps FT; IB-FT ranks first.
    hum = PAPER["verilogeval-human"][1]
    gain = {(x, i): hum[f"+ FT w/ {x}"][i] - hum["+ FT"][i] for x in ("Min-K%", "GRAND") for i in (0, 5)}
    claim("selection", "Table 1: FT w/ Min-K% and FT w/ GRAND improve on FT.",
          f"on Eval-Human, Pass@1 +{gain['Min-K%', 0]:.2f} and +{gain['GRAND', 0]:.2f}, Pass@10^(10) "
          f"+{gain['Min-K%', 5]:.2f} and +{gain['GRAND', 5]:.2f} points",
          [(f"{c.short(r)} - FT, {k}", diff(r, "ft", k), +1, k) for r in ("mink20", "grand")
           for k in ("pass@1", strict)]
          if not need("ft", "mink20", "grand") else [], need("ft", "mink20", "grand"))
    claim("ibft_first", "Table 1: IB-FT ranks above FT and both data-selection baselines.",
          f"on Eval-Human, Pass@1 {hum['+ IB-FT'][0]:.2f} against {hum['+ FT w/ Min-K%'][0]:.2f} (Min-K%), "
          f"{hum['+ FT w/ GRAND'][0]:.2f} (GRAND) and {hum['+ FT'][0]:.2f} (FT); Pass@10^(10) {hum['+ IB-FT'][5]:.2f} "
          f"against at most {max(hum[x][5] for x in ('+ FT', '+ FT w/ Min-K%', '+ FT w/ GRAND')):.2f}",
          [(f"IB-FT - {c.short(r)}, {k}", diff(ib, r, k), +1, k) for r in ("ft", "mink20", "grand")
           for k in ("pass@1", strict)] if not need(ib, "ft", "mink20", "grand") else [],
          need(ib, "ft", "mink20", "grand"))

    # 2. Fig. 4 / Fig. A1: removing the most memorized 10% helps Pass@1; the best ratio depends on the metric.
    ratios = [("ft", 0)] + [(f"mink{round(100 * r)}", round(100 * r)) for r in c.p.removals]
    miss = need(*(r for r, _ in ratios))
    parts = []
    if not miss:
        first = ratios[1]                               # the smallest ratio (the paper's 10%)
        parts.append((f"{first[1]}% removed - FT, pass@1", diff(first[0], "ft", "pass@1"), +1, "pass@1"))
        ks = [f"pass@{k}" for k in c.p.ks]
        best = {k: max(ratios, key=lambda x: ev[x[0]].met[k]) for k in ks}
        split = [(k1, k2) for k1 in ks for k2 in ks if k1 < k2 and best[k1] != best[k2]]
        if split:       # two metrics peak at different ratios: each peak against the other's, on its own metric
            k1, k2 = max(split, key=lambda kk: min(diff(best[kk[0]][0], best[kk[1]][0], kk[0])[1],
                                                   diff(best[kk[1]][0], best[kk[0]][0], kk[1])[1]))
            for a, b in ((k1, k2), (k2, k1)):
                if (best[a][0], best[b][0], a) == (first[0], "ft", "pass@1"):
                    continue                            # the first part already
                parts.append((f"{k1} peaks at {best[k1][1]}%, {k2} at {best[k2][1]}%: on {a}, {best[a][1]}% - "
                              f"{best[b][1]}%", diff(best[a][0], best[b][0], a), +1, a))
        else:           # one ratio peaks on every metric: the metric-dependence is contradicted if it peaks clearly
            r0 = best[ks[0]]
            for k in ks:
                runner = max((x for x in ratios if x != r0), key=lambda x: ev[x[0]].met[k])
                parts.append((f"every metric peaks at {r0[1]}%; on {k}, {runner[1]}% - {r0[1]}%",
                              diff(runner[0], r0[0], k), +1, k))
    claim("ratio", "Fig. 4 / Fig. A1: removing the most memorized 10% improves Pass@1, and the best removal ratio "
          "depends on the metric.", "removing 10% gives a substantial Pass@1 gain on both VerilogEval sets (Fig. 4, "
          "plotted only); DeepSeek-Coder's Pass@1 peaks at 10% and its Pass@5 at 30% (Fig. A1)", parts, miss)

    # 3. Fig. 6: FT falls below base at higher temperatures; IB-FT stays above FT. No yardstick: FT's other seed is
    # sampled at the preset's temperature only.
    names = [f"pass@{k}^({k})" for k in c.p.ks if k > 1]
    hot = [t for t in c.p.temperatures if t > c.p.temperature]
    miss = [f"temps_{r}" for r in ("base", "ft", ib) if f"temps_{r}" not in c.done]
    parts = []
    if not miss:
        d = temps_diffs(c, bench, names)
        parts = [(f"T {t:g}, {desc}, {n}", d[(a, b, t, n)], sign, None) for t in hot for n in names
                 for a, b, desc, sign in ((ib, "ft", "IB-FT - FT", +1), ("ft", "base", "FT - base", -1))]
    claim("temperature", "Fig. 6: at higher temperature FT falls below the base model while IB-FT stays above FT.",
          PAPER_FIG6, parts, miss)

    # 4. Fig. 2: FT's greedy Pass@1 lags its sampled Pass@K; IB-FT narrows the gap by raising greedy Pass@1.
    miss, parts = need("ft", ib), []
    if not miss:
        gf = greedy_gap(c, ev["ft"], K)
        parts = [(f"FT's Pass@{K} - greedy@1", bootstrap_mean(list(gf.values())), +1, None),
                 ("IB-FT - FT, greedy@1", diff(ib, "ft", E.GREEDY), +1, E.GREEDY),
                 ("IB-FT's gap - FT's gap", gap_diff(ib, "ft"), -1, "gap")]
    claim("greedy_gap", f"Fig. 2: FT's greedy Pass@1 lags its sampled Pass@{K}, and IB-FT narrows that gap by "
          "raising greedy Pass@1.",
          "the fine-tuned model's Pass@1 drops sharply against its Pass@5 and Pass@10 (Fig. 2, plotted only); IB-FT's "
          "gains are largest at k = 1 (Table 1)", parts, miss)

    for name, ds in yard:
        items.append(f"- **Yardstick: {name}.** " + "; ".join(
            f"{f'gap (Pass@{K} - greedy@1)' if k == 'gap' else k} {fmt_diff(d)}" for k, d in ds) +
            f" (T = {c.p.temperature:g}). A claimed difference no larger than these is within training noise, "
            "whatever its interval over problems says.")
        numbers.setdefault("yardstick", {}).update({k: list(d) for k, d in ds})
    planned = any(x.startswith("eval_sweep_ft") for x in c.plan["stages"])
    how = ("; a part resolved over problems but no larger than the same difference between two training seeds of FT "
           "(the yardstick, last line: one pair of seeds, a scale rather than an interval) is within training noise "
           "and resolves nothing either. Fig. 6's temperatures have no yardstick: FT's other seed is sampled at "
           f"T = {c.p.temperature:g} only." if yard else
           f"; no FT run at another seed is evaluated{' yet' if planned else ''}, so how much of each difference is "
           "training noise is not measured.")
    text = [f"## The paper's claims, checked ({bench})", "",
            f"IB-FT here is the run `{ib}`" + (", the sensitivity study's chosen setting" if ib != "ibft" else "") +
            ". Each claim is a set of differences in points, paired over problems, with 95% bootstrap intervals over "
            "the problems (not over training seeds): an interval wholly on the paper's side of 0 reproduces that "
            "part, wholly on the other side contradicts it, and one that contains 0 cannot resolve it. A claim is "
            "reproduced when every part is, contradicted when any part is. Every run is one training seed" + how,
            ""] + items
    return "\n".join(text), numbers


# The report's sections, in RESULTS.md's order.
SECTIONS = (section_claims, section_table1, section_fig3, section_mechanism, section_sweep, section_barrier,
            section_fig2, section_fig4, section_fig5, section_fig6)


RUNS_CSV_TRAIN = ("steps", "loss", "ce", "kl", "ce_ib", "eval_nll", "ib_share_median", "rate", "sink_share")


def runs_table(c: Collected) -> list:
    """One row per complete training stage (train_*, sweep_*, barrier_* but memorize) with its last step's numbers and
    the median ib_share, and per complete evaluation (eval_*, temps_*) with its metrics: report/runs.csv, for
    comparing runs in a spreadsheet. Every value is read from the stage's own metrics.jsonl or results files."""
    rows = []
    for name in c.done:
        d = c.s.stage_dir(name)
        if name.startswith(("train_", "sweep_", "barrier_")) and (d / "metrics.jsonl").is_file():
            m = read_jsonl(d / "metrics.jsonl")
            shares = [r["ib_share"] for r in m if "ib_share" in r]
            last = {**m[-1], "steps": m[-1]["step"], "ib_share_median": float(np.median(shares)) if shares else None,
                    "eval_nll": next((r["eval_nll"] for r in reversed(m) if "eval_nll" in r), None)}
            rows.append({"stage": name, **{k: last.get(k) for k in RUNS_CSV_TRAIN}})
        elif name.startswith(("eval_", "temps_")):
            for f in sorted(d.glob("*.results.json")):
                res = read_json(f)
                bench_tag = f.name[:-len(".results.json")]
                rows.append({"stage": name, "results": bench_tag,
                             **{k: res["metrics"][k] for k in res["metrics"]}})
    return rows


def write_runs_csv(path: Path, rows: list):
    """rows (dicts) as CSV, the columns in order of first appearance; empty cells where a row lacks a column."""
    import csv
    import io
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    write_text(path, buf.getvalue())


def write_report(out) -> Path:
    """RESULTS.md, report/report.json and the figures of the study folder `out`; returns RESULTS.md's path."""
    s = StudyFolder(out)
    c = Collected(s)
    figs = s.out / "report"
    p = s.preset
    head = [f"# Results: preset `{p.name}`", "",
            f"Written by `python reproduce.py --preset {p.name}` from the stages complete so far. Model: "
            f"`{s.plan['model']}`; data: `{s.plan['data']}`; every number below is recomputable from the files "
            "in this folder (per-sample results and samples beside each evaluation).", "",
            "Settings: " + ", ".join(f"{k} {getattr(p, k)}" for k in (
                "n_train", "n_heldout", "max_len", "epochs", "batch_size", "lr", "lora_r", "lora_alpha", "alpha",
                "beta", "layer", "n", "temperature", "top_p", "max_new_tokens")) + "."]
    sections, numbers = [], {}
    for fn in SECTIONS:
        text, nums = fn(c, figs)
        if text:
            sections.append(text)
            if nums:
                numbers[fn.__name__[len("section_"):]] = nums
    stage_rows = [[name, f"{meta['wall_seconds'] / 60:.1f}", (meta["versions"].get("git_commit") or "-")[:8] +
                   ("+" if meta["versions"].get("git_dirty") else ""), meta["summary"]] for name, meta in c.done.items()]
    pending = [name for name in s.plan["stages"] if name not in c.done]
    tail = ["## Stages", "", md_table(["stage", "minutes", "commit", "summary"], stage_rows), "",
            "Not run yet: " + (", ".join(pending) if pending else "none") + "."]
    write_text(s.out / "RESULTS.md", "\n\n".join(["\n".join(head)] + sections + ["\n".join(tail)]) + "\n")
    write_json(figs / "report.json", numbers)
    write_runs_csv(figs / "runs.csv", runs_table(c))
    return s.out / "RESULTS.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a study folder written by reproduce.py (results/<preset>)")
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        path = write_report(args.folder)
    except UsageError as e:
        return fail("report.py", e)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
