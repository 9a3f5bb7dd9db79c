"""The paper's study by one command: Sections 3-5 as a staged, resumable pipeline over the project's modules.

    python reproduce.py --preset laptop                 # the default model on the CPU; writes results/laptop/
    python reproduce.py --preset paper --model DIR --data ORIGEN.jsonl     # Appendix C.1/C.2 as written, on GPUs
    python reproduce.py --preset smoke                  # a tiny random checkpoint: the wiring, in seconds
    python reproduce.py --preset laptop --dry-run       # the stage plan with each stage's estimated cost

Runs (one adapter each, same data, seed and step budget):
    base       the model before fine-tuning
    ft         FT, Eq. (1)
    ibft       IB-FT, Eq. (IB-FT) with the bottleneck at --layer
    ibft_raw   IB-FT with the paper-faithful raw q_phi input (--ib-input raw, the sink kept)
    mink<p>    FT on the data without its p% most memorized examples by p0 (Fig. 4; mink20 = Table 1's FT w/ Min-K%)
    grand      FT on the 80% of the data with the highest GraNd scores (Table 1's FT w/ GRAND)

Stages, each writing under results/<preset>/<stage>/ and skipped once its stage.json says complete:
    split          a fixed training subset and a held-out split of the same data (record indices, no text copied)
    score_base     Fig. 3's p0 (Min-20% Prob of the training set on the base model) and p2 (TOFU on the base model),
                   with every example's NLL for the mechanism study
    train_<run>    train.train; resumes from its last checkpoint
    score_<run>    Fig. 3's p1 and the NLLs on the fine-tuned model
    eval_<run>     Table 1, Fig. 2: greedy@1 and n samples at T (Pass@k, Pass@k^(m)); generation resumes per problem
    geometry       Fig. 5: l2 distance and angle between the most and least memorized examples at --layer
    temps_<run>    Fig. 6: the other sampling temperatures
    report         tables, figures and RESULTS.md from whatever stages are complete (always rerun)

Adapters, checkpoints and the materialized data subsets live in results/<preset>/work/ (not committed).
"""
import argparse
import functools
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cli import UsageError, atomic_write, fail, read_records, write_json, write_jsonl, write_text

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Preset:
    name: str
    data: Optional[str]                 # instruction/response data (None: --data is required)
    n_train: Optional[int]              # training examples (None: all but the held-out ones)
    n_heldout: int                      # held-out examples of the same data, never trained on
    max_len: int                        # examples longer than this many tokens are not selected
    epochs: float
    batch_size: int                     # global batch = per-process batch here (one process, no accumulation)
    lr: float
    lora_r: int
    lora_alpha: float
    alpha: float                        # Eq. (IB-FT)
    beta: float                         # Eq. (6)
    layer: int                          # l*, also Fig. 5's layer
    benchmarks: tuple
    ks: tuple = (1, 5, 10)
    ms: tuple = (2, 5, 10)
    n: int = 10                         # samples per problem (Appendix C.2)
    temperature: float = 0.2
    temperatures: tuple = (0.2, 0.6, 1.0)   # Fig. 6
    top_p: float = 0.95
    max_new_tokens: int = 512
    problems: Optional[int] = None      # the first N problems of each benchmark (None: all)
    n_tofu: int = 200                   # TOFU question/answer pairs for p2
    removals: tuple = (0.1, 0.2, 0.3, 0.4)  # Fig. 4
    grand_seeds: int = 3
    gen_batch: int = 64
    pairs: int = 1000                   # Fig. 5
    model: Optional[str] = None         # None: the embedded default (smoke: a tiny random checkpoint)
    seed: int = 0
    core: tuple = ()                    # stages run by default; --stages all adds the rest
    rates: dict = field(default_factory=dict)   # for --dry-run: tokens/s of scoring, training, generation


# The memorization side first (cheap), then the evaluations (most of the cost).
CORE = ("split", "score_base", "train_ft", "train_ibft", "score_ft", "score_ibft", "geometry", "train_ibft_raw",
        "score_ibft_raw", "eval_base", "eval_ft", "eval_ibft")

PRESETS = {
    # Evol-CodeAlpaca-V1's setting of Appendix C.1 (lr 1e-4, LoRA alpha 64, beta 0.01) on its stand-in, scored on
    # HumanEval as Table A1 is. Sized from the rates measured on this project's 2-core CPU in fp32: LoRA training
    # (r 32, all seven projections) ~90 tokens/s, scoring ~480, sampling ~150 (bench/bench_generate.py).
    "laptop": Preset(
        name="laptop", data=str(SHARED_DATA / "train" / "python_instruct.jsonl"), n_train=80, n_heldout=80,
        max_len=384, epochs=3, batch_size=4, lr=1e-4, lora_r=32, lora_alpha=64, alpha=0.1, beta=0.01, layer=20,
        benchmarks=("humaneval",), core=CORE,
        rates={"score": 480.0, "train": 90.0, "generate": 150.0, "tokens_per_sample": 150,
               "where": "measured, 2-core CPU"}),
    # Appendix C.1 (OriGen) and C.2 as written: a user's 7B checkpoint and OriGen-format data on GPUs.
    "paper": Preset(
        name="paper", data=None, n_train=None, n_heldout=1000, max_len=2048, epochs=3, batch_size=4, lr=5e-5,
        lora_r=32, lora_alpha=32, alpha=0.1, beta=0.02, layer=20,
        benchmarks=("verilogeval-human", "verilogeval-machine"), n_tofu=4000, core=CORE + tuple(
            f"{s}_{r}" for r in ("mink20", "grand") for s in ("train", "eval")),
        rates={"score": 20000.0, "train": 3000.0, "generate": 1500.0, "tokens_per_sample": 300,
               "where": "assumed for one A100-80GB and a 7B model, not measured"}),
    # The wiring on a tiny random checkpoint: every stage, in seconds.
    "smoke": Preset(
        name="smoke", data=str(ROOT / "data" / "default_instruct.jsonl"), n_train=16, n_heldout=8, max_len=256,
        epochs=1, batch_size=4, lr=1e-3, lora_r=4, lora_alpha=8, alpha=0.1, beta=0.02, layer=2,
        benchmarks=("humaneval",), ks=(1, 2), ms=(2,), n=2, temperatures=(0.2, 1.0), max_new_tokens=8,
        problems=2, n_tofu=8, removals=(0.25,), grand_seeds=1, gen_batch=8, pairs=50, model="tiny",
        rates={"score": 20000.0, "train": 5000.0, "generate": 500.0, "tokens_per_sample": 8, "where": "rough"}),
}

# Every run of the study: what train.py gets beyond the preset, and its label in the tables.
LABELS = {"base": "base", "ft": "+ FT", "ibft": "+ IB-FT (normalized input)",
          "ibft_raw": "+ IB-FT (raw input, sink kept)", "grand": "+ FT w/ GRAND"}


def runs(p: Preset) -> list:
    return ["base", "ft", "ibft", "ibft_raw", "grand"] + [f"mink{round(100 * r)}" for r in p.removals]


def label(run: str) -> str:
    if run.startswith("sweep_"):
        return f"+ IB-FT `{run[len('sweep_'):]}` (sweep)"
    return LABELS.get(run) or f"+ FT w/ Min-K% (-{run[4:]}%)"


def train_flags(p: Preset, run: str, n_ft_steps: int) -> list:
    """train.py flags of one run. Pruned runs keep FT's step budget: more epochs over fewer examples."""
    flags = ["--method", "ibft" if run.startswith("ibft") else "ft", "--layer", str(p.layer),
             "--epochs", str(p.epochs), "--batch-size", str(p.batch_size), "--lr", str(p.lr),
             "--lora-r", str(p.lora_r), "--lora-alpha", str(p.lora_alpha), "--alpha", str(p.alpha),
             "--beta", str(p.beta), "--max-len", str(p.max_len), "--seed", str(p.seed)]
    if run.startswith("ibft"):                          # the study's runs: q_phi's input as named, the sink kept
        flags += ["--ib-input", "raw" if run == "ibft_raw" else "norm", "--ib-sink", "keep"]
    keep = 0.8 if run == "grand" else (1 - int(run[4:]) / 100 if run.startswith("mink") else 1.0)
    if keep < 1:                                        # enough whole epochs, cut at FT's number of steps
        flags[flags.index("--epochs") + 1] = str(math.ceil(p.epochs / keep))
        flags += ["--max-steps", str(n_ft_steps)]
    if run == "grand":
        flags += ["--prune", "grand", "--keep", "0.8", "--grand-seeds", str(p.grand_seeds)]
    return flags


# ----------------------------------------------------------------------------------------------------------------
# Files: reading back, stage metadata
# ----------------------------------------------------------------------------------------------------------------

def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list:
    return read_records(path)[0]


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    """The code and machine a run used, read once when its first stage starts: the modules a stage uses are loaded
    then, so a later edit to the working tree does not make a running study's record wrong."""
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"git_commit": commit or None, "git_dirty": dirty, "torch": torch.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------------------------------------------
# The study's context: paths shared by the stages
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Study:
    preset: Preset
    out: Path                           # results/<preset>
    model_path: Path
    data_path: Path
    device: Optional[str] = None
    template: Optional[str] = None      # --template: a chat template family for a checkpoint without its own

    @property
    def work(self) -> Path:
        return self.out / "work"

    def model_flags(self, path: Optional[Path] = None) -> list:
        """--model (the study's checkpoint, or `path`) and --template for train.py and evaluate.py."""
        return ["--model", str(path or self.model_path)] + (["--template", self.template] if self.template else [])

    def load(self, adapter: Optional[Path] = None, base: Optional[Path] = None) -> tuple:
        """(model, tokenizer): the study's checkpoint (or `base`) with an adapter merged in, for scoring."""
        import mink
        return mink.load_scored_model(base or self.model_path, adapter, template=self.template, device=self.device)

    def tokenizer(self, path: Optional[Path] = None):
        from tokenizer import load_tokenizer
        return load_tokenizer(path or self.model_path, family=self.template)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def run_dir(self, run: str) -> Path:
        return self.work / "runs" / run

    def adapter(self, run: str) -> Optional[Path]:
        return None if run == "base" else self.run_dir(run)

    def split_file(self, part: str) -> Path:
        return self.work / "data" / f"{part}.jsonl"


def tofu_path() -> Optional[Path]:
    path = SHARED_DATA / "tofu" / "full.jsonl"
    return path if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------
# Stage: split (the training subset and the held-out split; indices only, the text stays where it is)
# ----------------------------------------------------------------------------------------------------------------

def stage_split(s: Study, d: Path):
    import data
    p = s.preset
    records, where = read_records(s.data_path, "--data")
    fmt = data.detect_format(records, s.data_path)
    if fmt.kind == "messages":
        raise UsageError(f"{s.data_path}: the study needs one instruction and one response per record "
                         f"(Alpaca or instruction/response fields), not multi-turn messages")
    fields = (fmt.prompt, fmt.response)
    tok = s.tokenizer()
    order = np.random.default_rng(p.seed).permutation(len(records)).tolist()     # a fixed, seeded subset
    chosen, lengths, pairs = [], {}, {}
    need = (p.n_train or len(records)) + p.n_heldout
    for i in order:
        r = records[i]
        if not isinstance(r.get(fields[1]), str) or not r[fields[1]].strip():
            continue
        user, assistant = fmt.messages(r, where[i])                                # Alpaca's input joins the instruction
        prompt, response = tok.encode_example(user["content"], assistant["content"])
        if len(prompt) + len(response) <= p.max_len:                              # no example is truncated
            chosen.append(i)
            lengths[i] = len(prompt) + len(response)
            pairs[i] = (user["content"], assistant["content"])
        if len(chosen) == need:
            break
    if len(chosen) < p.n_heldout + 2 * p.batch_size:
        raise UsageError(f"{s.data_path}: only {len(chosen)} examples fit --max-len {p.max_len}")
    heldout, train_idx = chosen[:p.n_heldout], chosen[p.n_heldout:]
    for part, idx in (("train", train_idx), ("heldout", heldout)):
        write_jsonl(s.split_file(part), [{"instruction": pairs[i][0], "response": pairs[i][1], "_record": i}
                                         for i in idx])
    digest = hashlib.sha256(s.data_path.read_bytes()).hexdigest()
    write_json(d / "split.json", {
        "data": str(s.data_path), "sha256": digest, "records": len(records), "fields": list(fields),
        "rule": f"seeded permutation (numpy default_rng({p.seed})) of the records, keeping those of at most "
                f"{p.max_len} tokens; the first {p.n_heldout} are held out, the next {len(train_idx)} are trained on",
        "train": train_idx, "heldout": heldout,
        "train_tokens": sum(lengths[i] for i in train_idx), "heldout_tokens": sum(lengths[i] for i in heldout)})
    return f"{len(train_idx)} training and {len(heldout)} held-out examples"


# ----------------------------------------------------------------------------------------------------------------
# Stages: score_<run> (Min-K% and NLL per example: Fig. 3 and the mechanism study)
# ----------------------------------------------------------------------------------------------------------------

def score_rows(model, tok, examples, prompt_field, response_field, batch_size) -> list:
    """Per example: Min-20% Prob (Sec. 3), the mean NLL of the response tokens, and their count."""
    import mink
    rows, scored = mink.encode_examples(tok, examples, prompt_field=prompt_field, response_field=response_field)
    values = mink.token_logprobs(model, rows, scored, batch_size)
    return [{"mink": mink.min_k(v, mink.K_PERCENT), "nll": -float(v.mean()), "tokens": v.numel()} for v in values]


def split_scores(s: Study, model, tok) -> list:
    """score_rows for every example of the training and held-out splits, each tagged with its split and record."""
    import mink
    bs, out = mink.default_batch_size(model), []
    for part in ("train", "heldout"):
        examples = read_jsonl(s.split_file(part))
        for i, r in enumerate(score_rows(model, tok, examples, "instruction", "response", bs)):
            out.append({"split": part, "index": i, "record": examples[i]["_record"], **r})
    return out


def stage_score(s: Study, d: Path, run: str):
    import mink
    model, tok = s.load(s.adapter(run))
    bs = mink.default_batch_size(model)
    out = split_scores(s, model, tok)
    write_jsonl(d / "scores.jsonl", out)
    msg = f"{len(out)} examples scored"
    tofu = tofu_path()
    if run == "base" and tofu is not None:                                        # p2: the reference set
        qa = read_jsonl(tofu)[:s.preset.n_tofu]
        ref = score_rows(model, tok, qa, "question", "answer", bs)
        write_jsonl(d / "tofu.jsonl", [{"index": i, **r} for i, r in enumerate(ref)])
        msg += f", {len(ref)} TOFU pairs"
    elif run == "base":
        msg += "; no TOFU (../shared/data/tofu/full.jsonl not found): p2 is left out"
    return msg


# ----------------------------------------------------------------------------------------------------------------
# Stages: train_<run>
# ----------------------------------------------------------------------------------------------------------------

def ft_steps(s: Study) -> int:
    """FT's optimizer steps: the budget every run of the study gets."""
    import train
    n = len(read_jsonl(s.split_file("train")))
    return len(train.micro_batches(n, s.preset.batch_size, 1, s.preset.epochs, s.preset.seed))


def run_training(d: Path, run_dir: Path, flags: list) -> float:
    """train.train with these flags into run_dir, resumed from its last checkpoint where one is there; its
    metrics.jsonl and config.json copied into the stage folder d. Returns the seconds it took."""
    import train
    if train.checkpoint_dirs(run_dir):                  # any checkpoint kept (train.py's --resume picks the newest)
        flags = flags + ["--resume"]
    t0 = time.time()
    train.train(train.parse_args(flags))
    for name in ("metrics.jsonl", "config.json"):
        write_text(d / name, (run_dir / name).read_text())
    return time.time() - t0


def stage_train(s: Study, d: Path, run: str):
    data = s.split_file("train")
    if run.startswith("mink"):                          # drop the most memorized examples by p0 (Fig. 4)
        import mink
        scores = [r["mink"] for r in read_jsonl(s.stage_dir("score_base") / "scores.jsonl") if r["split"] == "train"]
        examples = read_jsonl(data)
        kept = mink.prune_indices(scores, int(run[4:]) / 100)
        data = s.work / "data" / f"train_{run}.jsonl"
        write_jsonl(data, [examples[i] for i in kept])
        write_json(d / "kept.json", {"removed_fraction": int(run[4:]) / 100, "kept_indices": kept})
    run_dir = s.run_dir(run)
    flags = train_flags(s.preset, run, ft_steps(s)) + [
        *s.model_flags(), "--data", str(data), "--out", str(run_dir)]
    run_training(d, run_dir, flags)
    m = read_jsonl(d / "metrics.jsonl")
    return f"{len(m)} steps, loss {m[0]['loss']:.4f} -> {m[-1]['loss']:.4f}"


# ----------------------------------------------------------------------------------------------------------------
# Stages: eval_<run> and temps_<run> (evaluate.py's functions; samples and per-sample results kept)
# ----------------------------------------------------------------------------------------------------------------

def evaluate_run(s: Study, d: Path, adapter: Optional[Path], temperature: float, greedy: bool = False) -> list:
    """One generate-and-score pass per benchmark of the study's model with `adapter` (None: the base model)."""
    import evaluate as E
    import sandbox
    p = s.preset
    msgs = []
    for bench in p.benchmarks:
        tag = "greedy" if greedy else f"T{temperature:g}"
        samples, out = d / f"{bench}.{tag}.samples.jsonl", d / f"{bench}.{tag}.results.json"
        argv = ["--benchmark", bench, "--samples", str(samples), "--out", str(out), "--generate",
                *s.model_flags(), "--n", str(p.n), "--temperature", str(temperature),
                "--top-p", str(p.top_p), "--max-new-tokens", str(p.max_new_tokens), "--batch-size", str(p.gen_batch),
                "--seed", str(p.seed), "--k", *map(str, p.ks), "--m", *map(str, p.ms)]
        argv += ["--adapter", str(adapter)] if adapter is not None else []
        argv += ["--limit", str(p.problems)] if p.problems else []
        argv += ["--device", s.device] if s.device else []
        args = E.parse_args(argv + (["--greedy"] if greedy else []))
        every = E.load_problems(bench)
        problems, ids = every[:p.problems], {q["task_id"] for q in every}
        E.generate_samples(args, bench, problems, samples, args.temperature[0], ids)
        rep = E.score(args, bench, problems, samples, out, sandbox.Sandbox(), ids)
        msgs.append(f"{bench} {tag}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in rep["metrics"].items()))
    return msgs


def stage_eval(s: Study, d: Path, run: str):
    """Greedy@1 and n samples at the preset's temperature. `run`: a run of the study, or sweep_<point>."""
    adapter = s.work / "sweep" / run[len("sweep_"):] if run.startswith("sweep_") else s.adapter(run)
    return "; ".join(evaluate_run(s, d, adapter, 0.0, greedy=True) + evaluate_run(s, d, adapter, s.preset.temperature))


def stage_temps(s: Study, d: Path, run: str):
    return "; ".join(m for t in s.preset.temperatures if t != s.preset.temperature
                     for m in evaluate_run(s, d, s.adapter(run), t))


# ----------------------------------------------------------------------------------------------------------------
# Stage: geometry (Fig. 5)
# ----------------------------------------------------------------------------------------------------------------

def geometry_groups(s: Study) -> tuple:
    """Fig. 5's (most, least) memorized 20% of the training split by p0, and the seeded pairs drawn between them."""
    import mink
    scores = [r["mink"] for r in read_jsonl(s.stage_dir("score_base") / "scores.jsonl") if r["split"] == "train"]
    most, least = mink.memorization_groups(scores, 0.2)
    return most, least, mink.draw_pairs(most, least, s.preset.pairs, s.preset.seed)


def pair_geometry(s: Study, model, tok, most, least, pairs) -> dict:
    """l2 distances and angles between the pairs' pooled layer-l* states on one model (Fig. 5)."""
    import mink
    examples, chosen = read_jsonl(s.split_file("train")), most + least
    index_of = {i: j for j, i in enumerate(chosen)}
    rows, scored = mink.encode_examples(tok, [examples[i] for i in chosen])
    hidden = mink.pooled_hidden(model, rows, s.preset.layer, scored, mink.default_batch_size(model))
    l2, angle = mink.pair_geometry(hidden, pairs, index_of)
    return {"l2": [round(float(x), 4) for x in l2], "angle": [round(float(x), 4) for x in angle],
            "norm": [round(float(x), 4) for x in hidden.norm(dim=-1)]}


def stage_geometry(s: Study, d: Path):
    p = s.preset
    most, least, pairs = geometry_groups(s)
    out = {"layer": p.layer, "groups": {"most": most, "least": least}, "pairs": p.pairs, "runs": {}}
    for run in ("base", "ft", "ibft"):
        model, tok = s.load(s.adapter(run))
        out["runs"][run] = pair_geometry(s, model, tok, most, least, pairs)
        del model
    write_json(d / "geometry.json", out)
    return ", ".join(f"{r}: l2 median {np.median(v['l2']):.1f}, angle median {np.median(v['angle']):.1f}"
                     for r, v in out["runs"].items())


# ----------------------------------------------------------------------------------------------------------------
# Stages: sweep_<point> (when does IB-FT act? the sensitivity analysis the paper's Limitations ask for)
# ----------------------------------------------------------------------------------------------------------------

# A point is ARM[_aALPHA][_bBETA][_sSEED] on the preset's data, seed and step budget:
#   ft       plain FT (seed range: ft_s0, ft_s1, ft_s2)
#   norm     IB-FT, q_phi on the RMS-normalized hidden state (this project's first default)
#   nosink   IB-FT, q_phi on the raw hidden state (the paper), the attention sink kept out (--ib-sink exclude)
#   authors  the authors' released code as it ran: raw input, sink kept, KL over rows padded to 2048, alpha 0.2,
#            beta 0.01, lr 1e-4, warmup 0.1
# Each trains with the diagnostics on (ib_share every 10 steps, held-out NLL every SWEEP_EVAL_EVERY steps on the
# first SWEEP_EVAL_EXAMPLES held-out examples), then scores both splits (the mechanism table), Fig. 5's geometry
# medians, and the adapter's relative distance from FT's at the same seed.
SWEEP = {
    "laptop": ("ft_s0", "nosink_a0.03", "nosink_a0.1", "ft_s1", "ft_s2", "nosink_a0.01", "nosink_a0.3",
               "nosink_a0.001", "norm_a100", "norm_a1000", "norm_a10", "norm_a1", "authors", "norm_a0.1",
               "norm_a10_s1", "norm_a10_s2", "norm_a1_s1", "norm_a1_s2", "norm_a2", "norm_a2_s1", "norm_a2_s2",
               # the first choice (raw input, sink out, alpha 0.01), its beta neighbours and seeds
               "nosink_a0.01_b0.001", "nosink_a0.01_b0.1", "nosink_a0.01_s1", "nosink_a0.01_s2"),
    "smoke": ("ft_s0", "norm_a10", "authors"),
}
# The chosen setting (README, "When does IB-FT act?"): its beta neighbours and its other seeds run too. On the laptop
# preset it replaced nosink_a0.01, the first choice, once the normalized input at alpha 1 and 2 acted at three seeds
# without costing held-out NLL; alpha 2, because alpha 1's ib_share on the main command's data is 0.038.
SWEEP_CHOSEN = {"laptop": "norm_a2", "smoke": "nosink_a0.1"}
BARRIER_POINTS = {"laptop": ("ft_s0", "norm_a10", "nosink_a0.01")}    # beside the chosen setting
# Scored on the benchmarks too (eval_sweep_<point>), after the chosen setting: the first choice, and the setting that
# differs from FT most (the paper's per-example picture, at a cost in held-out NLL). FT's evaluation is eval_ft
# (train_ft: the same recipe as sweep_ft_s0).
SWEEP_EVAL = {"laptop": ("nosink_a0.01", "norm_a10")}
SWEEP_EVAL_EVERY = 20
SWEEP_EVAL_EXAMPLES = 40
POINT = re.compile(r"(ft|norm|nosink|authors)(?:_a([0-9.e-]+))?(?:_b([0-9.e-]+))?(?:_s([0-9]+))?")


def sweep_points(p: Preset) -> list:
    """The preset's points, then the chosen setting, its beta neighbours, and FT and it at seeds 1 and 2."""
    chosen = SWEEP_CHOSEN.get(p.name)
    extra = [chosen, f"{chosen}_b0.001", f"{chosen}_b0.1", "ft_s1", "ft_s2", f"{chosen}_s1", f"{chosen}_s2"] \
        if chosen else []
    return list(dict.fromkeys(list(SWEEP.get(p.name, ())) + extra))


def sweep_eval_points(p: Preset) -> list:
    """The sweep points evaluated on the benchmarks: the chosen setting and the preset's SWEEP_EVAL."""
    return [x for x in dict.fromkeys((SWEEP_CHOSEN.get(p.name),) + SWEEP_EVAL.get(p.name, ())) if x]


def parse_point(point: str) -> tuple:
    """(arm, alpha or None, beta or None, seed or None) of a point's name."""
    m = POINT.fullmatch(point)
    if not m:
        raise UsageError(f"sweep point '{point}' is not ARM[_aALPHA][_bBETA][_sSEED] (ARM: ft, norm, nosink, authors)")
    arm, a, b, seed = m.groups()
    return arm, None if a is None else float(a), None if b is None else float(b), None if seed is None else int(seed)


def set_flag(flags: list, name: str, value) -> list:
    """flags with `name value` set: replaced where it is, appended where it is not."""
    out = list(flags)
    if name in out:
        out[out.index(name) + 1] = str(value)
    else:
        out += [name, str(value)]
    return out


def sweep_flags(p: Preset, point: str, n_ft_steps: int) -> list:
    """train.py flags of one sweep point (beyond --model/--data/--out)."""
    arm, alpha, beta, seed = parse_point(point)
    flags = train_flags(p, "ft" if arm == "ft" else "ibft", n_ft_steps)
    if arm != "ft":
        flags = set_flag(set_flag(flags, "--ib-input", "norm" if arm == "norm" else "raw"), "--ib-sink",
                         "exclude" if arm == "nosink" else "keep")
    if arm == "authors":
        flags += ["--kl-normalizer", "padded", "--kl-pad-to", "2048"]
        for name, value in (("--alpha", 0.2), ("--beta", 0.01), ("--lr", 1e-4), ("--warmup-ratio", 0.1)):
            flags = set_flag(flags, name, value)
    for name, value in (("--alpha", alpha), ("--beta", beta), ("--seed", seed)):
        if value is not None:
            flags = set_flag(flags, name, f"{value:g}" if isinstance(value, float) else value)
    return flags


def sweep_ft(point: str) -> str:
    """The FT point at the same seed: what a point's adapter distance is measured from."""
    return f"ft_s{parse_point(point)[3] or 0}"


def lora_deltas(run_dir: Path) -> dict:
    """Module name -> B @ A of a PEFT adapter file (the scaling, the same for every run of a study, left out)."""
    from safetensors.torch import load_file
    import lora
    w = load_file(str(run_dir / lora.ADAPTER_WEIGHTS))
    return {k[:-len(".lora_A.weight")]: w[k[:-len("A.weight")] + "B.weight"].double() @ w[k].double()
            for k in w if k.endswith(".lora_A.weight")}


def adapter_distance(run_dir: Path, ref_dir: Path) -> float:
    """||dW - dW_ref|| / ||dW_ref||, Frobenius over all adapted matrices together."""
    a, b = lora_deltas(run_dir), lora_deltas(ref_dir)
    if set(a) != set(b):
        raise UsageError(f"{run_dir} and {ref_dir} adapt different modules")
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a) / sum(float(b[k].pow(2).sum()) for k in b))


def sweep_eval_file(s: Study) -> Path:
    """The held-out examples whose NLL is logged during training (the first SWEEP_EVAL_EXAMPLES of the split)."""
    path = s.work / "data" / "heldout_eval.jsonl"
    write_jsonl(path, read_jsonl(s.split_file("heldout"))[:SWEEP_EVAL_EXAMPLES])
    return path


def stage_sweep(s: Study, d: Path, point: str):
    run_dir = s.work / "sweep" / point
    flags = sweep_flags(s.preset, point, ft_steps(s)) + [
        *s.model_flags(), "--data", str(s.split_file("train")), "--out", str(run_dir),
        "--diag-every", "10", "--eval-data", str(sweep_eval_file(s)),
        "--eval-every", str(SWEEP_EVAL_EVERY)]
    train_seconds = run_training(d, run_dir, flags)
    model, tok = s.load(run_dir)
    write_jsonl(d / "scores.jsonl", split_scores(s, model, tok))
    most, least, pairs = geometry_groups(s)
    geo = pair_geometry(s, model, tok, most, least, pairs)
    ref = s.work / "sweep" / sweep_ft(point)
    write_json(d / "point.json", {
        "point": point, "train_flags": flags, "train_seconds": round(train_seconds, 1),
        "geometry": {"l2_median": float(np.median(geo["l2"])), "angle_median": float(np.median(geo["angle"])),
                     "norm_median": float(np.median(geo["norm"]))},
        "adapter_distance_from_ft": None if point == sweep_ft(point) else adapter_distance(run_dir, ref)})
    m = read_jsonl(d / "metrics.jsonl")
    shares = [r["ib_share"] for r in m if "ib_share" in r]
    return (f"{len(m)} steps, ce {m[0]['ce']:.4f} -> {m[-1]['ce']:.4f}, eval_nll {m[-1]['eval_nll']:.4f}"
            + (f", ib_share median {np.median(shares):.3f}, rate {m[-1]['rate']:.2f}" if shares else ""))


def stage_sweep_norms(s: Study, d: Path):
    """The median norm of Fig. 5's pooled layer-l* states for the base model and every trained sweep point: whether
    a change of the pairs' l2 distance is a change of scale (the angle is scale-free)."""
    most, least, pairs = geometry_groups(s)
    out = {}
    for point in ["base"] + [x for x in sweep_points(s.preset) if is_ready(s, f"sweep_{x}")]:
        adapter = None if point == "base" else s.work / "sweep" / point
        model, tok = s.load(adapter)
        out[point] = float(np.median(pair_geometry(s, model, tok, most, least, pairs)["norm"]))
        del model
    write_json(d / "norms.json", out)
    return ", ".join(f"{k} {v:.1f}" for k, v in out.items())


# ----------------------------------------------------------------------------------------------------------------
# Stages: barrier_* (a controlled memorization barrier: Sec. 3 and Appendix A's premise, tested directly)
# ----------------------------------------------------------------------------------------------------------------

# D_m, a seeded half of the training split, is first made memorized: FT on D_m alone, in rounds of (epochs) at lr
# (each round a fresh run), until the median Min-20% Prob of D_m falls below the base model's most-memorized quintile
# (the 20th percentile of p0 over the whole training split); that adapter is merged. Then FT and the chosen IB-FT
# train on D_m + D_n (the whole split, FT's step budget) from the merged model.
BARRIER = {"laptop": ((4, 8, 16), 5e-4), "smoke": ((4, 8), 3e-2)}      # preset -> (rounds' epochs, lr)


def barrier_points(p: Preset) -> list:
    """The runs trained from the memorized model: FT and the chosen IB-FT (and any the preset adds)."""
    if p.name not in BARRIER:
        return []
    return list(dict.fromkeys(BARRIER_POINTS.get(p.name, ("ft_s0",)) + (SWEEP_CHOSEN.get(p.name),)))


def barrier_halves(s: Study) -> tuple:
    """(D_m, D_n): training-split indices, a seeded half each."""
    n = len(read_jsonl(s.split_file("train")))
    order = np.random.default_rng(s.preset.seed + 1).permutation(n).tolist()
    return sorted(order[:n // 2]), sorted(order[n // 2:])


def group_gradient_shares(s: Study, model_path: Path, halves: tuple) -> dict:
    """The first step's CE gradient on a fresh LoRA (the preset's r, alpha, seed; no dropout), split by where its
    tokens come from: g = g_m + g_n, and each group's share <g_x, g> / |g|^2 (the two add up to 1), with the norms."""
    import torch
    import data
    import lora
    import train
    from model import linear_cross_entropy, load_model
    p, tok = s.preset, s.tokenizer(model_path)
    model = load_model(model_path, device=s.device)
    lora.inject_lora(model, r=p.lora_r, alpha=p.lora_alpha, dropout=0.0,
                     generator=torch.Generator().manual_seed(p.seed))
    records, where = read_records(s.split_file("train"))
    encoded, _, _ = data.encode(tok, records, where, data.detect_format(records, "train"), p.max_len)   # as train.py
    n_label = sum(sum(t[1:]) for _, t in encoded)                           # the step's label tokens
    params = [q for q in model.parameters() if q.requires_grad]
    grads = []
    for idx in halves:
        model.zero_grad(set_to_none=True)
        for b in range(0, len(idx), p.batch_size):
            ids, attn, label, tgt = train.collate([encoded[i] for i in idx[b:b + p.batch_size]], tok.pad_id,
                                                  model.lm_head.weight.device)
            (linear_cross_entropy(model.model.norm(model.trunk(ids, attn)[0][label]), model.lm_head.weight, tgt)
             / n_label).backward()
        grads.append(torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten() for q in params]))
    g = grads[0] + grads[1]
    return {"share_m": float(grads[0] @ g / (g @ g)), "share_n": float(grads[1] @ g / (g @ g)),
            "norm_m": float(grads[0].norm()), "norm_n": float(grads[1].norm()), "norm": float(g.norm())}


def stage_barrier_memorize(s: Study, d: Path):
    import mink
    import train
    import lora
    p = s.preset
    d_m, d_n = barrier_halves(s)
    records = read_jsonl(s.split_file("train"))
    p0 = [r["mink"] for r in read_jsonl(s.stage_dir("score_base") / "scores.jsonl") if r["split"] == "train"]
    threshold = float(np.quantile(p0, 0.2))
    data = s.work / "data" / "barrier_m.jsonl"
    write_jsonl(data, [records[i] for i in d_m])
    rounds, run_dir, (schedule, lr) = [], None, BARRIER[p.name]
    for epochs in schedule:
        run_dir = s.work / "barrier" / f"memorize_e{epochs}"
        flags = set_flag(set_flag(train_flags(p, "ft", 0), "--epochs", epochs), "--lr", lr)
        if not (run_dir / "adapter_model.safetensors").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            train.train(train.parse_args(flags + [*s.model_flags(), "--data", str(data), "--out", str(run_dir)]))
        model, tok = s.load(run_dir)
        scores = score_rows(model, tok, [records[i] for i in d_m], "instruction", "response",
                            mink.default_batch_size(model))
        median = float(np.median([r["mink"] for r in scores]))
        rounds.append({"epochs": epochs, "d_m_min20_median": median, "flags": flags})
        if median < threshold:
            break
    else:
        raise UsageError(f"D_m's median Min-20% Prob stayed above {threshold:.3f} after {schedule[-1]} epochs")
    merged = s.work / "barrier" / "memorized"
    shutil.rmtree(merged, ignore_errors=True)
    lora.merge_checkpoint(s.model_path, run_dir, merged)
    model, tok = s.load(base=merged)
    write_jsonl(d / "scores.jsonl", split_scores(s, model, tok))
    del model
    shares = {"base": group_gradient_shares(s, s.model_path, (d_m, d_n)),
              "memorized": group_gradient_shares(s, merged, (d_m, d_n))}
    write_json(d / "barrier.json", {
        "rule": "FT on D_m alone, rounds of " + ", ".join(map(str, schedule)) + f" epochs at lr {lr:g} "
                "(each a fresh run), until the median Min-20% Prob of D_m < the 20th percentile of the base "
                "model's p0 over the training split; that adapter merged",
        "d_m": d_m, "d_n": d_n, "threshold": threshold, "rounds": rounds, "gradient_shares": shares})
    return (f"D_m memorized after {rounds[-1]['epochs']} epochs (median Min-20% {rounds[-1]['d_m_min20_median']:.3f} "
            f"< {threshold:.3f}); D_m's gradient share {shares['base']['share_m']:.3f} on the base model, "
            f"{shares['memorized']['share_m']:.3f} on the memorized one")


def stage_barrier_train(s: Study, d: Path, point: str):
    merged, run_dir = s.work / "barrier" / "memorized", s.work / "barrier" / point
    flags = sweep_flags(s.preset, point, ft_steps(s)) + [
        *s.model_flags(merged), "--data", str(s.split_file("train")), "--out", str(run_dir), "--diag-every", "10"]
    run_training(d, run_dir, flags)
    model, tok = s.load(run_dir, base=merged)
    write_jsonl(d / "scores.jsonl", split_scores(s, model, tok))
    write_json(d / "point.json", {"point": point, "train_flags": flags})
    m = read_jsonl(d / "metrics.jsonl")
    return f"{len(m)} steps from the memorized model, ce {m[0]['ce']:.4f} -> {m[-1]['ce']:.4f}"


# ----------------------------------------------------------------------------------------------------------------
# The plan: stages, dependencies, cost estimates
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    fn: Callable                        # fn(study, stage_dir) -> one-line summary
    deps: tuple
    what: str                           # where it is in the paper


def plan(p: Preset) -> list:
    stages = [Stage("split", stage_split, (), "data"),
              Stage("score_base", lambda s, d: stage_score(s, d, "base"), ("split",), "Fig. 3 p0, p2; mechanism")]
    for run in runs(p)[1:]:
        deps = ("split", "score_base") if run.startswith("mink") else ("split",)
        stages.append(Stage(f"train_{run}", lambda s, d, r=run: stage_train(s, d, r), deps, f"train {label(run)}"))
    for run in runs(p):
        dep = () if run == "base" else (f"train_{run}",)
        stages.append(Stage(f"eval_{run}", lambda s, d, r=run: stage_eval(s, d, r), dep, "Table 1, Fig. 2, Fig. 4"))
    for run in ("ft", "ibft", "ibft_raw"):
        stages.append(Stage(f"score_{run}", lambda s, d, r=run: stage_score(s, d, r), (f"train_{run}",),
                            "Fig. 3 p1; mechanism"))
    stages.append(Stage("geometry", stage_geometry, ("score_base", "train_ft", "train_ibft"), "Fig. 5"))
    for run in ("base", "ft", "ibft"):
        dep = () if run == "base" else (f"train_{run}",)
        stages.append(Stage(f"temps_{run}", lambda s, d, r=run: stage_temps(s, d, r), dep, "Fig. 6"))
    if p.name in BARRIER:
        stages.append(Stage("barrier_memorize", stage_barrier_memorize, ("split", "score_base"),
                            "memorization barrier: D_m memorized"))
    for point in barrier_points(p):
        if point:
            stages.append(Stage(f"barrier_{point}", lambda s, d, x=point: stage_barrier_train(s, d, x),
                                ("barrier_memorize",), "memorization barrier: D_m + D_n from the memorized model"))
    for point in sweep_points(p):
        deps = ("split", "score_base") + (() if point == sweep_ft(point) else (f"sweep_{sweep_ft(point)}",))
        stages.append(Stage(f"sweep_{point}", lambda s, d, x=point: stage_sweep(s, d, x), deps,
                            "sensitivity (when IB-FT acts)"))
    for point in sweep_eval_points(p):
        stages.append(Stage(f"eval_sweep_{point}", lambda s, d, x=point: stage_eval(s, d, f"sweep_{x}"),
                            (f"sweep_{point}",), "sensitivity: HumanEval of a sweep point (Table 1's columns)"))
    if sweep_points(p):
        stages.append(Stage("geometry_sweep", stage_sweep_norms, ("split", "score_base"),
                            "sensitivity: the pooled states' norms (Fig. 5's scale)"))
    return stages


def estimate_minutes(s: Study, stage: str) -> float:
    """Rough cost from the preset's rates and the data's token counts (split.json, or a guess before it exists)."""
    p, r = s.preset, s.preset.rates
    split = s.stage_dir("split") / "split.json"
    if split.exists():
        sp = read_json(split)
        train_tok, held_tok = sp["train_tokens"], sp["heldout_tokens"]
    else:
        n_train = p.n_train or 10000
        train_tok, held_tok = n_train * 0.75 * p.max_len, p.n_heldout * 0.75 * p.max_len
    problems = p.problems or {"humaneval": 164, "verilogeval-human": 156, "verilogeval-machine": 143}
    n_prob = sum(problems if isinstance(problems, int) else problems.get(b, 164) for b in p.benchmarks)
    kind, _, run = stage.partition("_")
    if kind == "split":
        return 0.2
    if kind == "score":
        extra = p.n_tofu * 60 if run == "base" else 0
        return (train_tok + held_tok + extra) / r["score"] / 60
    if kind == "train":
        grand = 1.5 * p.grand_seeds * train_tok / r["train"] if run == "grand" else 0
        return (p.epochs * train_tok / r["train"] * (1.1 if run.startswith("ibft") else 1.0) + grand) / 60
    if kind == "eval":
        return n_prob * (p.n + 1) * r["tokens_per_sample"] / r["generate"] / 60
    if kind == "temps":
        return n_prob * p.n * (len(p.temperatures) - 1) * r["tokens_per_sample"] / r["generate"] / 60
    if kind == "geometry":
        return 3 * 0.4 * train_tok / r["score"] / 60
    if kind == "barrier":     # memorize: about 8 epochs over half the split; then one training and scoring
        if run == "memorize":
            return (8 * 0.5 * train_tok / r["train"] + 2 * (train_tok + held_tok) / r["score"]) / 60
        return (p.epochs * train_tok / r["train"] * 1.1 + (train_tok + held_tok) / r["score"]) / 60
    if kind == "sweep":       # train with diagnostics (+15%), score both splits, one geometry pass
        train = p.epochs * train_tok / r["train"] * (1.0 if run.startswith("ft") else 1.1) * 1.15
        return (train + (train_tok + held_tok) / r["score"] + 0.4 * train_tok / r["score"]) / 60
    return 0.1


# ----------------------------------------------------------------------------------------------------------------
# Running stages: skip what is complete, record command line, versions and wall time
# ----------------------------------------------------------------------------------------------------------------

def is_complete(s: Study, stage: str) -> bool:
    f = s.stage_dir(stage) / "stage.json"
    return f.exists() and read_json(f).get("status") == "complete"


def is_ready(s: Study, stage: str) -> bool:
    """Complete, and what later stages need from it is here: a training stage's adapter lives in work/, which is not
    committed, so on a fresh checkout the run is trained again (same seed, same data) before it is evaluated."""
    if stage.startswith("train_") and not (s.run_dir(stage[len("train_"):]) / "adapter_model.safetensors").exists():
        return False
    point = stage[len("sweep_"):]
    if stage.startswith("sweep_") and not (s.work / "sweep" / point / "adapter_model.safetensors").exists():
        return False
    if stage == "barrier_memorize" and not (s.work / "barrier" / "memorized" / "model.safetensors").exists():
        return False
    if stage == "split" and not all(s.split_file(part).exists() for part in ("train", "heldout")):
        return False                                    # the materialized subsets live in work/ too
    return is_complete(s, stage)


def run_stage(s: Study, st: Stage, argv: list):
    missing = [x for x in st.deps if not is_ready(s, x)]
    if missing:
        raise UsageError(f"stage {st.name} needs {', '.join(missing)} first (add them to --stages)")
    d = s.stage_dir(st.name)
    d.mkdir(parents=True, exist_ok=True)
    print(f"\n== {st.name} ({st.what}) ==", flush=True)
    versions()
    t0 = time.time()
    summary = st.fn(s, d)
    wall = time.time() - t0
    write_json(d / "stage.json", {"stage": st.name, "status": "complete", "summary": summary,
                                  "command": " ".join(shlex.quote(a) for a in ["python", "reproduce.py", *argv]),
                                  "versions": versions(), "wall_seconds": round(wall, 1),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"== {st.name}: {summary} ({wall / 60:.1f} min)", flush=True)


def resolve(args) -> Study:
    p = PRESETS[args.preset]
    out = Path(args.out) / p.name
    data = Path(args.data) if args.data else (Path(p.data) if p.data else None)
    if data is None:
        raise UsageError(f"--preset {p.name} needs --data (instruction/response JSONL)")
    if not data.is_file():
        raise UsageError(f"--data {data}: no such file" + ("" if args.data else " (no ../shared here: pass --data)"))
    if p.name == "smoke":
        model_path = out / "work" / "tiny-model"
        if not args.dry_run:
            make_tiny_checkpoint(model_path)
    elif args.model or p.model:
        model_path = Path(args.model or p.model)
    elif p.name == "paper":
        raise UsageError("--preset paper needs --model (a 7B HF checkpoint folder)")
    else:
        from default_model import default_model_path
        model_path = default_model_path()
    return Study(preset=p, out=out, model_path=model_path, data_path=data.resolve(), device=args.device,
                 template=args.template)


def check_preset_unchanged(s: Study):
    """A results folder belongs to one configuration (the preset's settings, the model by name, the data by content):
    refuse to mix in stages run under different ones."""
    now = {"preset": asdict(s.preset), "model": s.model_path.name,
           "data_sha256": hashlib.sha256(s.data_path.read_bytes()).hexdigest()}
    now["preset"].pop("rates")
    now = json.loads(json.dumps(now))                       # tuples as the file holds them: lists
    f = s.out / "preset.json"
    if f.exists():
        before = read_json(f)
        diff = sorted(k for k in set(before["preset"]) | set(now["preset"])
                      if before["preset"].get(k) != now["preset"].get(k))
        diff += [k for k in ("model", "data_sha256") if before.get(k) != now[k]]
        if diff:
            raise UsageError(f"{f}: this folder was made with other settings ({', '.join(diff)}); "
                             f"use another --out or remove it")
    else:
        write_json(f, now)


# ----------------------------------------------------------------------------------------------------------------
# The smoke preset's tiny random checkpoint
# ----------------------------------------------------------------------------------------------------------------

def random_weights(cfg: dict, seed: int = 0, std: float = 0.08) -> dict:
    """Random tensors for a config.json dict, named and shaped by model.Transformer itself (so a family switch that
    adds tensors adds them here too): norms 1 + N(0, std^2), the rest N(0, std^2); no lm_head when it is tied."""
    import torch
    from model import ModelArgs, Transformer
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(ModelArgs.from_config(cfg)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        w = torch.randn(shape, generator=g) * std
        out[name] = (1 + w if name.endswith("norm.weight") else w).contiguous()
    return out


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A 4-layer random Llama (hidden 64, GQA 4/2) with the default model's tokenizer, in HF layout."""
    if (path / "config.json").exists():
        return path
    from safetensors.torch import save_file
    from default_model import default_model_path
    src = default_model_path()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": read_json(src / "config.json")["vocab_size"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(random_weights(cfg, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_json(tmp / "config.json", cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, tmp / name)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Report: tables, figures and RESULTS.md from whatever stages are complete
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


def paired_difference(a: dict, b: dict, metric: str, bootstrap: int = 2000, seed: int = 0) -> tuple:
    """Mean over problems of metric(a) - metric(b), with a 95% bootstrap interval that resamples problems (paired:
    both runs are scored on the same resampled problems)."""
    import evaluate as E
    ids = sorted(set(a) & set(b))
    name = "pass@1" if metric == E.GREEDY else metric
    d = np.array([E.per_problem(name, *a[t]) - E.per_problem(name, *b[t]) for t in ids])
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(bootstrap, len(ids)))
    means = d[idx].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


class Collected:
    """Everything the complete stages wrote, read once."""

    def __init__(self, s: Study):
        self.s, self.p = s, s.preset
        self.done = {st.name: read_json(s.stage_dir(st.name) / "stage.json") for st in plan(s.preset)
                     if is_complete(s, st.name)}
        self.scores = {run: read_jsonl(s.stage_dir(f"score_{run}") / "scores.jsonl")
                       for run in ("base", "ft", "ibft", "ibft_raw") if f"score_{run}" in self.done}
        tofu = s.stage_dir("score_base") / "tofu.jsonl"
        self.tofu = read_jsonl(tofu) if "score_base" in self.done and tofu.exists() else None
        self.metrics = {run: read_jsonl(s.stage_dir(f"train_{run}") / "metrics.jsonl")
                        for run in runs(s.preset)[1:] if f"train_{run}" in self.done}

    def results(self, run: str, bench: str, tag: str) -> Optional[dict]:
        stage = "eval" if tag in ("greedy", f"T{self.p.temperature:g}") else "temps"
        f = self.s.stage_dir(f"{stage}_{run}") / f"{bench}.{tag}.results.json"
        return read_json(f) if f"{stage}_{run}" in self.done and f.exists() else None


def section_fig3(c: Collected, figs: Path) -> tuple:
    import mink
    if "base" not in c.scores:
        return None, {}
    train = {run: [r["mink"] for r in rows if r["split"] == "train"] for run, rows in c.scores.items()}
    named = {"p0: train set, base": train["base"]}
    named.update({f"p1: train set, {label(r)[2:]}": v for r, v in train.items() if r != "base"})
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
        for run in TABLE_RUNS + tuple(f"sweep_{x}" for x in sweep_eval_points(c.p)):
            greedy, sampled = c.results(run, bench, "greedy"), c.results(run, bench, T)
            if not (greedy or sampled):
                continue
            met = {**(greedy["metrics"] if greedy else {}), **(sampled["metrics"] if sampled else {})}
            iv = {**(greedy["intervals"] if greedy else {}), **(sampled["intervals"] if sampled else {})}
            rows.append([label(run)] + [f"{100 * met[k]:.2f} [{100 * iv[k][0]:.1f}, {100 * iv[k][1]:.1f}]"
                                        if k in met else "" for k in cols])
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
                     ("grand", "ft"), *((f"sweep_{x}", "ft") for x in sweep_eval_points(c.p))):
            if a in per and b in per:
                cells = []
                for k in cols:
                    kind = "greedy" if k == E.GREEDY else "sampled"
                    if per[a][kind] and per[b][kind]:
                        m, lo, hi = paired_difference(per[a][kind], per[b][kind], k)
                        cells.append(f"{100 * m:+.2f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
                        numbers[f"{bench}/{a}-{b}/{k}"] = [m, lo, hi]
                    else:
                        cells.append("")
                diffs.append([f"{label(a)[2:] if a != 'base' else 'base'} - {label(b)[2:] if b != 'base' else 'base'}"]
                             + cells)
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


def section_fig2(c: Collected, figs: Path) -> Optional[str]:
    """Greedy Pass@1 next to sampled Pass@k and Pass@k^(m) for base, FT and IB-FT."""
    T = f"T{c.p.temperature:g}"
    K = max(c.p.ks)
    names = ["greedy@1"] + [f"pass@{k}" for k in c.p.ks] + [f"pass@{K}^({m})" for m in c.p.ms]
    bars = {}
    for run in ("base", "ft", "ibft"):
        g, smp = c.results(run, c.p.benchmarks[0], "greedy"), c.results(run, c.p.benchmarks[0], T)
        if g and smp:
            bars[label(run)] = [100 * {**g["metrics"], **smp["metrics"]}[n] for n in names]
    if not bars:
        return None
    text = [f"## Fig. 2: greedy decoding against sampling ({c.p.benchmarks[0]})", "",
            "The paper's Fig. 2 reads a gap between greedy Pass@1 and sampled Pass@k as a sign of uncertain "
            "fine-tuning. Here, in %:", "",
            md_table(["run"] + names, [[k] + [f"{x:.2f}" for x in v] for k, v in bars.items()])]
    plt = _plt()
    if plt:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        w = 0.8 / len(bars)
        for j, (name, v) in enumerate(bars.items()):
            ax.bar(np.arange(len(names)) + j * w, v, w, label=name)
        ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names)
        ax.set_ylabel("%")
        ax.legend()
        text += _save(fig, figs / "fig2_greedy_vs_sampled.png", "Fig. 2")
    return "\n".join(text)


def section_fig4(c: Collected, figs: Path) -> Optional[str]:
    T = f"T{c.p.temperature:g}"
    bench = c.p.benchmarks[0]
    points = []
    for pct, run in [(0, "ft")] + [(round(100 * r), f"mink{round(100 * r)}") for r in c.p.removals]:
        g, smp = c.results(run, bench, "greedy"), c.results(run, bench, T)
        if smp:
            points.append((pct, (g or {}).get("metrics", {}).get("greedy@1"), smp["metrics"]))
    if len(points) < 2:
        return None
    ks = [f"pass@{k}" for k in c.p.ks]
    text = [f"## Fig. 4: FT without the most memorized examples ({bench})", "",
            "Removal by p0 (lowest Min-20% Prob first); every run has FT's step budget. In %:", "",
            md_table(["removed"] + ["greedy@1"] + ks,
                     [[f"{pct}%", "" if g is None else f"{100 * g:.2f}"] + [f"{100 * m[k]:.2f}" for k in ks]
                      for pct, g, m in points])]
    plt = _plt()
    if plt:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for k in ks:
            ax.plot([x for x, _, _ in points], [100 * m[k] for _, _, m in points], marker="o", label=k)
        ax.set_xlabel("most memorized examples removed (%)")
        ax.set_ylabel("%")
        ax.legend()
        text += _save(fig, figs / "fig4_pruning.png", "Fig. 4")
    return "\n".join(text)


def section_fig5(c: Collected, figs: Path) -> Optional[str]:
    import mink
    if "geometry" not in c.done:
        return None
    g = read_json(c.s.stage_dir("geometry") / "geometry.json")
    l2 = {label(r): v["l2"] for r, v in g["runs"].items()}
    ang = {label(r): v["angle"] for r, v in g["runs"].items()}
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
    return "\n".join(text)


def section_fig6(c: Collected, figs: Path) -> Optional[str]:
    bench = c.p.benchmarks[0]
    names = [f"pass@{k}^({k})" for k in c.p.ks if k > 1]
    rows, series = [], {}
    for run in ("base", "ft", "ibft"):
        for t in c.p.temperatures:
            r = c.results(run, bench, f"T{t:g}")
            if r:
                rows.append([label(run), f"{t:g}"] + [f"{100 * r['metrics'][n]:.2f}" for n in names])
                series.setdefault(run, []).append((t, [100 * r["metrics"][n] for n in names]))
    if not any(len(v) > 1 for v in series.values()):
        return None
    text = [f"## Fig. 6: temperature ({bench})", "", "Pass@k^(k): all k samples must pass. In %:", "",
            md_table(["run", "T"] + names, rows)]
    plt = _plt()
    if plt:
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
        for j, n in enumerate(names):
            for run, pts in series.items():
                axes[0][j].plot([t for t, _ in pts], [v[j] for _, v in pts], marker="o", label=label(run))
            axes[0][j].set_title(n)
            axes[0][j].set_xlabel("temperature")
            axes[0][j].legend(fontsize=8)
        text += _save(fig, figs / "fig6_temperature.png", "Fig. 6")
    return "\n".join(text)


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
            md_table(["quintile", "p0 mean", "base NLL"] + [f"drop, {label(r)[2:]}" for r in fine], rows), ""]
    if spread:
        text += ["Spread of the drop across quintiles (max - min; smaller = more equal): " +
                 ", ".join(f"{label(r)[2:]} {v:.3f}" for r, v in spread.items()) + ".", ""]
    # Per-example paired drops (base NLL - run NLL) cancel the two splits' different difficulty; the gap is how much
    # more the trained-on examples improved than unseen ones of the same data.
    gap_rows = []
    for run, rows_ in c.scores.items():
        g = numbers["gap"][run] = split_drops(c.scores["base"], rows_)
        gap_rows.append([label(run), f"{g['train']:.3f} ({g['train_median']:.3f})",
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
                    ax.plot([x["step"] for x in m], [x[k] for x in m], label=label(run)[2:], lw=1)
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


def sweep_point_numbers(s: Study, base_scores: list, point: str) -> dict:
    """One sweep point's measures, read from its stage folder (and score_base)."""
    d = s.stage_dir(f"sweep_{point}")
    m, info = read_jsonl(d / "metrics.jsonl"), read_json(d / "point.json")
    scores = read_jsonl(d / "scores.jsonl")
    drops = quintile_drops(base_scores, scores)
    arm, alpha, beta, seed = parse_point(point)
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
        arm, *rest = parse_point(x)
        return (arms.index(arm), *(v if v is not None else -1 for v in rest))

    points = sorted((x for x in sweep_points(c.p) if f"sweep_{x}" in c.done), key=order)
    if not points or "base" not in c.scores:
        return None, {}
    base = c.scores["base"]
    num = {x: sweep_point_numbers(c.s, base, x) for x in points}
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
    chosen = SWEEP_CHOSEN.get(c.p.name)
    pairs = [(x, sweep_ft(x)) for x in points if x.split("_s")[0] == chosen and sweep_ft(x) in num]
    if pairs:
        keys = [(k, col, dg) for k, col, dg in SWEEP_MEASURES if k != "distance"]
        diffs = {x: {k: None if num[x][k] is None or num[f][k] is None else num[x][k] - num[f][k] for k, _, _ in keys}
                 for x, f in pairs}
        rows = [[f"`{x}` - `{f}`"] + ["-" if diffs[x][k] is None else f"{diffs[x][k]:+.{dg}f}" for k, _, dg in keys]
                for x, f in pairs]
        if len(pairs) > 1:
            rows.append(["mean"] + [f"{np.mean([diffs[x][k] for x, _ in pairs]):+.{dg}f}"
                                    if all(diffs[x][k] is not None for x, _ in pairs) else "-" for k, _, dg in keys])
        text += ["", f"The chosen setting `{chosen}` against FT at the same seed (same LoRA init, data order and "
                 "dropout draws):", "", md_table(["pair"] + [col for _, col, _ in keys], rows)]
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
    chosen = SWEEP_CHOSEN.get(c.p.name)
    base = [r for r in c.scores["base"] if r["split"] == "heldout"][:SWEEP_EVAL_EXAMPLES]
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
    for point in barrier_points(c.p):
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


def write_report(s: Study):
    c = Collected(s)
    figs = s.out / "report"
    p = s.preset
    head = [f"# Results: preset `{p.name}`", "",
            f"Written by `python reproduce.py --preset {p.name}` from the stages complete so far. Model: "
            f"`{s.model_path.name}`; data: `{s.data_path.name}`; every number below is recomputable from the files "
            "in this folder (per-sample results and samples beside each evaluation).", "",
            "Settings: " + ", ".join(f"{k} {getattr(p, k)}" for k in (
                "n_train", "n_heldout", "max_len", "epochs", "batch_size", "lr", "lora_r", "lora_alpha", "alpha",
                "beta", "layer", "n", "temperature", "top_p", "max_new_tokens")) + "."]
    sections, numbers = [], {}
    for fn in (section_table1, section_fig3, section_mechanism, section_sweep, section_barrier):
        text, nums = fn(c, figs)
        if text:
            sections.append(text)
            numbers[fn.__name__[len("section_"):]] = nums
    for fn in (section_fig2, section_fig4, section_fig5, section_fig6):
        text = fn(c, figs)
        if text:
            sections.append(text)
    stage_rows = [[name, f"{meta['wall_seconds'] / 60:.1f}", (meta["versions"].get("git_commit") or "-")[:8] +
                   ("+" if meta["versions"].get("git_dirty") else ""), meta["summary"]] for name, meta in c.done.items()]
    pending = [st.name for st in plan(p) if st.name not in c.done]
    tail = ["## Stages", "", md_table(["stage", "minutes", "commit", "summary"], stage_rows), "",
            "Not run yet: " + (", ".join(pending) if pending else "none") + "."]
    write_text(s.out / "RESULTS.md", "\n\n".join(["\n".join(head)] + sections + ["\n".join(tail)]) + "\n")
    write_json(figs / "report.json", numbers)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--model", help="HF checkpoint folder (laptop: the embedded default; paper: required)")
    ap.add_argument("--data", help="instruction/response JSONL (laptop: ../shared/data/train/python_instruct.jsonl)")
    ap.add_argument("--out", default="results", help="results folder; the preset's go to OUT/<preset>/")
    ap.add_argument("--stages", default="core", help="comma-separated stage names, 'core' (the preset's default) or "
                    "'all'; `report` always runs last")
    ap.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo this stage (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the stage plan with estimated minutes, run nothing")
    ap.add_argument("--device", help="torch device (default: CUDA when available, else the CPU)")
    ap.add_argument("--template", help="chat template family for a checkpoint that ships none (e.g. alpaca for a base "
                    "model; see train.py --template)")
    return ap.parse_args(argv)


def select(p: Preset, spec: str, stages: list) -> list:
    names = [st.name for st in stages]
    if spec == "all":
        wanted = names
    else:
        wanted = []
        for item in spec.split(","):
            item = item.strip()
            if item == "core":
                wanted += list(p.core or names)
            elif item == "report":
                continue
            elif item not in names:
                raise UsageError(f"--stages: unknown stage '{item}' (stages: {', '.join(names)}, report, core, all)")
            else:
                wanted.append(item)
    order = {n: i for i, n in enumerate(p.core + tuple(n for n in names if n not in p.core))}
    return [st for st in sorted(stages, key=lambda st: order[st.name]) if st.name in set(wanted)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        s = resolve(args)
        stages = plan(s.preset)
        chosen = select(s.preset, args.stages, stages)
        unknown = [f for f in args.force if f not in {st.name for st in stages}]
        if unknown:
            raise UsageError(f"--force: unknown stage '{unknown[0]}'")
        if args.dry_run:
            print(f"preset {s.preset.name}: model {s.model_path}, data {s.data_path}, out {s.out}")
            print(f"rates ({s.preset.rates['where']}): " + ", ".join(
                f"{k} {v:g} tok/s" for k, v in s.preset.rates.items() if k in ("score", "train", "generate")))
            total = 0.0
            for st in chosen:
                done = is_ready(s, st.name) and st.name not in args.force
                est = estimate_minutes(s, st.name)
                total += 0 if done else est
                print(f"  {st.name:<16} {'done' if done else f'~{est:6.1f} min':>12}  {st.what}")
            print(f"  {'total':<16} {f'~{total:6.1f} min':>12}  (then: report)")
            return 0
        check_preset_unchanged(s)
        for st in chosen:
            if st.name in args.force:                 # redo from nothing: no resumed samples or checkpoints
                shutil.rmtree(s.stage_dir(st.name), ignore_errors=True)
                if st.name.startswith("train_"):
                    shutil.rmtree(s.run_dir(st.name[len("train_"):]), ignore_errors=True)
            elif is_ready(s, st.name):
                print(f"== {st.name}: complete, skipped", flush=True)
                continue
            run_stage(s, st, argv)
        print("\n== report ==", flush=True)
        write_report(s)
        print(f"wrote {s.out / 'RESULTS.md'}")
    except UsageError as e:
        return fail("reproduce.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
