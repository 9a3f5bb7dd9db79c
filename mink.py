"""Measuring memorization: Min-K% Prob, pruning the most-memorized data, and the representation geometry.

Sec. 3 of the paper asks how much of a fine-tuning set the *base* model has already memorized. It measures this
with Min-K% Prob (Shi et al., 2023, "Detecting Pretraining Data from Large Language Models"), K = 20:

    Min-K%(x) = - 1/|S| * sum_{t in S} log p(x_t | x_<t),   S = the K% of scored tokens with the lowest log p

the mean negative log-likelihood of the least likely tokens. LOWER = MORE MEMORIZED (even the hardest tokens are
predicted confidently), as the paper reads it. Min-K%++ (Zhang et al., 2024, "Min-K%++: Improved Baseline for
Detecting Pre-Training Data from Large Language Models") normalizes each token by the next-token distribution,

    z_t = (log p(x_t | x_<t) - mu_t) / sigma_t,   mu_t = E_{v~p}[log p(v)],  sigma_t^2 = Var_{v~p}[log p(v)]

and averages the lowest K% of z_t; its paper's score is "higher = member", so here the score is the NEGATED mean,
which keeps one convention for both: lower = more memorized.

What this file provides, in the paper's order:
    score_examples / token_logprobs   Fig. 3: p0 (data on base), p1 (data on base + adapter), p2 (TOFU on base)
    report                            Fig. 3: quantile tables of p0, p1, p2 and their overlap coefficients
    prune / `prune` command           Fig. 4, Fig. A1, Table 1 "FT w/ Min-K%": drop the most-memorized x%
    geometry                          Sec. 4, Fig. 5: l2 distances and angles between most- and least-memorized
                                      examples' hidden states at layer 20, for base, FT and IB-FT

What is scored is explicit: `--text-field F` scores a whole text (every token after the first); otherwise the data is
read as train.py reads it (data.py: messages, Alpaca or instruction/response pairs, detected; `--prompt-field P
--response-field R` name a pair) and only the assistant turns' tokens (end-of-turn token included) are scored, given
the templated conversation before them, i.e. the tokens fine-tuning trains on. K% of T tokens is floor(K*T/100),
as in Shi et al.'s code, but at least one token. Geometry pools hidden states over the same scored tokens.

CLI:
    python mink.py --data D --out scores.jsonl [--model M] [--adapter RUN_DIR] [--k 20] [--score mink|minkpp]
                   [--text-field F | --prompt-field P --response-field R] [--reference] [--limit N]
    python mink.py report --p0 base.jsonl [--p1 ft.jsonl] [--p2 tofu.jsonl] [--png fig3.png]
    python mink.py prune --data D --scores S --remove 0.1 0.2 0.3 0.4 --out-dir DIR
    python mink.py geometry --data D --scores S [--layer 20] [--model M] [--adapter FT_DIR] [--adapter IBFT_DIR]
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

import data
from checkpoint import load_model
from cli import DTYPE_HELP, UsageError, add_model_flags, atomic_write, fail, read_records, write_jsonl
from default_model import default_model_path
from model import resolve_dtype
from tokenizer import FAMILIES, load_tokenizer

K_PERCENT = 20            # Fig. 3: Min-20% Prob
SCORES = ("mink", "minkpp")


class ExampleError(ValueError):
    """Bad input in one example; `index` lets the CLI name the data file's line."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


# ----------------------------------------------------------------------------------------------------------------
# Data: JSONL or a JSON list of objects, and which tokens of an example are scored
# ----------------------------------------------------------------------------------------------------------------

def _field(example, index, name):
    if name not in example:
        raise ExampleError(index, f"example {index} has no field '{name}' (fields: {', '.join(example) or 'none'})")
    value = example[name]
    if not isinstance(value, str):
        raise ExampleError(index, f"example {index}: field '{name}' is {type(value).__name__}, not a string")
    return value


def encode_examples(tokenizer, examples, text_field=None, prompt_field=None, response_field=None,
                    max_len=None, path="the examples") -> tuple:
    """(rows, scored): token ids per example and, per token, whether it is scored.

    --text-field F: the whole text as the tokenizer encodes it by default (BOS only where the checkpoint's tokenizer
    adds one); every token after the first is scored.  Otherwise the examples are conversations in any format
    data.py reads (messages, Alpaca, instruction/response pairs; --prompt-field P --response-field R name a pair):
    rendered with the model's template, the assistant turns (each through its end-of-turn token) are scored, each
    token given everything before it. Rows longer than max_len are cut to their first max_len tokens."""
    if text_field and (prompt_field or response_field):
        raise ValueError("use either a text field or a prompt/response field pair, not both")
    fmt = None if text_field or not examples else data.detect_format(examples, path, prompt_field, response_field)
    rows, scored = [], []
    for i, ex in enumerate(examples):
        if text_field:
            ids = tokenizer.encode(_field(ex, i, text_field))
            mask = [t >= 1 for t in range(len(ids))]          # the first token has no context to be predicted from
        else:
            try:
                ids, mask = tokenizer.encode_messages(fmt.messages(ex, f"example {i}"))
            except (UsageError, ValueError) as e:
                raise ExampleError(i, str(e) if str(e).startswith(f"example {i}") else f"example {i}: {e}") from None
        if max_len:
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):
            what = f"field '{text_field}'" if text_field else "the response (after truncation)"
            raise ExampleError(i, f"example {i}: {what} leaves no token to score ({len(ids)} token(s))")
        rows.append(ids)
        scored.append(mask)
    return rows, scored


def _scored_mask(spec, n: int) -> list:
    """A row's scored tokens as a bool list of length n: spec is that list, or the int position of the first scored
    token (every later one is scored too)."""
    return [t >= spec for t in range(n)] if isinstance(spec, int) else list(spec)[:n]


# ----------------------------------------------------------------------------------------------------------------
# Per-token log-probabilities, batched with right padding; the LM head only at scored positions
# ----------------------------------------------------------------------------------------------------------------

def length_batches(rows, batch_size: int) -> list:
    """Index batches of at most batch_size rows, longest rows first, so that rows padded together have similar
    lengths (little padding) and the largest batch comes first (any out-of-memory shows up at once)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def right_pad(rows, device) -> tuple:
    """(input_ids, attention_mask), both (B, T): the rows right-padded (pad id 0; the mask hides it)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r)
        mask[j, :len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def token_logprobs(model, rows, scored, batch_size=8, normalize=False, chunk_tokens=512) -> list:
    """Per example, a float32 tensor of log p(x_t | x_<t) for its scored tokens t, in order (scored[i]: a bool per
    token, or the int position of the first scored token, encode_examples); with normalize=True the Min-K%++ value
    (log p(x_t) - mu_t) / sigma_t instead.

    Rows are right-padded in batches (the attention mask hides the padding; positions count from 0 in every row),
    so an example's values do not depend on its batch companions beyond float rounding. The final norm, LM head
    and log-softmax run only on the hidden states of scored positions, chunk_tokens rows at a time: never on a
    (B, T, V) tensor."""
    if len(rows) != len(scored):
        raise ValueError("rows and scored differ in length")
    device = model.lm_head.weight.device
    out = [None] * len(rows)
    for batch in length_batches(rows, batch_size):
        ids, mask = right_pad([rows[i] for i in batch], device)            # (B, T)
        pred = torch.zeros((len(batch), ids.shape[1] - 1), dtype=torch.bool)  # (B, T-1): position t-1 predicts token t
        for j, i in enumerate(batch):
            pred[j, :len(rows[i]) - 1] = torch.tensor(_scored_mask(scored[i], len(rows[i]))[1:], dtype=torch.bool)
        pred = pred.to(device)
        h, _ = model.trunk(ids, attention_mask=mask)                        # (B, T, H), before the final norm
        h_sel = h[:, :-1][pred]                                             # (N, H) scored positions, row-major
        target = ids[:, 1:][pred]                                           # (N,)
        values = []
        for hc, tc in zip(h_sel.split(chunk_tokens), target.split(chunk_tokens)):
            logits = model.logits(hc).float()                               # (n, V)
            if not normalize:                                               # log p(x_t) = s_{x_t} - logsumexp(s)
                values.append(logits.gather(-1, tc[:, None]).squeeze(-1) - logits.logsumexp(-1))
                continue
            logp = logits.log_softmax(-1)                                   # Min-K%++ (Zhang et al., 2024)
            p = logp.exp()
            mu = (p * logp).sum(-1)                                         # mu_t = E_p[log p]
            var = (p * (logp - mu[:, None]) ** 2).sum(-1)                   # sigma_t^2 = Var_p[log p]
            lp = logp.gather(-1, tc[:, None]).squeeze(-1)
            values.append((lp - mu) / var.clamp_min(1e-12).sqrt())
        values = torch.cat(values).cpu()
        for i, v in zip(batch, values.split(pred.sum(1).tolist())):
            out[i] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Min-K% Prob (Shi et al., 2023) and Min-K%++ (Zhang et al., 2024): lower = more memorized
# ----------------------------------------------------------------------------------------------------------------

def n_lowest(n_tokens: int, k: float) -> int:
    """How many tokens form the lowest K%: floor(K% of n), as Shi et al.'s code, but at least one (never NaN)."""
    return max(1, int(n_tokens * k / 100))


def min_k(values: torch.Tensor, k: float = K_PERCENT) -> float:
    """-(mean of the lowest K% of per-token values). On log-probs this is Min-K% Prob, the mean NLL of the K% least
    likely tokens; on Min-K%++ z-values it is the negated Min-K%++ score. Lower = more memorized for both."""
    if values.numel() == 0:
        raise ValueError("no scored tokens")
    lowest = values.float().sort().values[:n_lowest(values.numel(), k)]
    return -float(lowest.mean())


def default_batch_size(model) -> int:
    """8 on an accelerator; 1 on the CPU, where batching buys nothing and padding costs (bench/bench_mink.py, 2
    threads: batch 8 at 0.95x the speed of batch 1 on 64 length-sorted python_instruct examples)."""
    return 1 if model.lm_head.weight.device.type == "cpu" else 8


def score_examples(model, tokenizer, examples, k=K_PERCENT, score="mink", text_field=None, prompt_field=None,
                   response_field=None, batch_size=None, max_len=None, return_counts=False, path="the examples"):
    """Min-K% (score='mink') or negated Min-K%++ (score='minkpp') per example, in input order; lower = more
    memorized. batch_size None: default_batch_size. With return_counts=True also the scored-token counts."""
    rows, scored = encode_examples(tokenizer, examples, text_field, prompt_field, response_field,
                                   max_len or model.config.max_position_embeddings, path)
    return score_tokens(model, rows, scored, k, score, batch_size, return_counts)


def score_tokens(model, rows, scored, k=K_PERCENT, score="mink", batch_size=None, return_counts=False):
    """score_examples on rows already tokenized: token ids and their scored masks (encode_examples, data.encode)."""
    if score not in SCORES:
        raise ValueError(f"unknown score '{score}' (choose from {', '.join(SCORES)})")
    if not 0 < k <= 100:
        raise ValueError(f"k is a percentage in (0, 100], got {k}")
    values = token_logprobs(model, rows, scored, batch_size or default_batch_size(model), normalize=(score == "minkpp"))
    scores = [min_k(v, k) for v in values]
    return (scores, [v.numel() for v in values]) if return_counts else scores


# ----------------------------------------------------------------------------------------------------------------
# Pruning the most-memorized examples (Fig. 4, Fig. A1; Table 1's FT w/ Min-K% keeps 80%)
# ----------------------------------------------------------------------------------------------------------------

def prune_indices(scores, remove: float) -> list:
    """Indices kept, in input order, after removing round(remove * N) examples with the lowest scores (the most
    memorized; ties broken by input position)."""
    if not 0 <= remove < 1:
        raise ValueError(f"remove must be in [0, 1), got {remove}")
    if any(not math.isfinite(s) for s in scores):
        raise ValueError("scores contain NaN or infinity")
    n_remove = round(remove * len(scores))
    dropped = set(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n_remove])
    return [i for i in range(len(scores)) if i not in dropped]


def prune(examples, scores, remove: float) -> list:
    """The examples left after dropping the most-memorized fraction `remove`, in input order."""
    if len(examples) != len(scores):
        raise ValueError(f"{len(examples)} examples but {len(scores)} scores")
    return [examples[i] for i in prune_indices(scores, remove)]


# ----------------------------------------------------------------------------------------------------------------
# Distributions (Fig. 3): quantiles and the overlap coefficient
# ----------------------------------------------------------------------------------------------------------------

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def overlap(a, b, bins: int = 40) -> float:
    """Overlap coefficient OVL = sum_i min(P_a(i), P_b(i)) of the two histograms on one common grid (`bins` equal
    bins spanning both samples; P = fraction of the sample in bin i), i.e. the shared area of the two densities:
    1 = identical, 0 = disjoint."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    pa = np.histogram(a, edges)[0] / len(a)
    pb = np.histogram(b, edges)[0] / len(b)
    return float(np.minimum(pa, pb).sum())


def quantile_table(named: dict, digits: int = 3) -> str:
    """One row per sample: n, mean and the 5/25/50/75/95% quantiles."""
    head = ["", "n", "mean"] + [f"q{int(q * 100):02d}" for q in QUANTILES]
    lines = [head]
    for name, xs in named.items():
        xs = np.asarray(xs, dtype=float)
        lines.append([name, str(len(xs)), f"{xs.mean():.{digits}f}"] +
                     [f"{v:.{digits}f}" for v in np.quantile(xs, QUANTILES)])
    widths = [max(len(r[c]) for r in lines) for c in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
                     for r in lines)


def _histograms_png(path, panels, title):
    """panels: [(xlabel, {name: values})]. Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (xlabel, named) in zip(axes[0], panels):
        for name, xs in named.items():
            ax.hist(xs, bins=40, density=True, alpha=0.45, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Representation geometry (Sec. 4, Fig. 5): most- vs least-memorized examples at layer l
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def pooled_hidden(model, rows, layer: int, pool_from=None, batch_size=8) -> torch.Tensor:
    """(N, H) float32: the raw output of block `layer` (as model(..., hidden_layer=l): transformers' hidden_states[l]
    for l < L; for l = L pre-norm, where transformers' last entry is normed), averaged over each example's scored
    tokens pool_from[i] (encode_examples' masks, or first positions; default 1: all but the first; padding excluded).

    Why not all tokens: the first position is an attention sink whose state is ~100x larger than the others
    (SmolLM2, layer 20: norm ~25000 vs ~200) and the template prefix is the same in every example, so a mean over
    all tokens mostly measures 1/T, the length; the scored tokens are also exactly what the Min-K% score measured."""
    device = model.lm_head.weight.device
    pool_from = pool_from or [1] * len(rows)
    out = torch.zeros(len(rows), model.hidden_size)
    for batch in length_batches(rows, batch_size):
        ids, mask = right_pad([rows[i] for i in batch], device)            # (B, T)
        _, h = model.trunk(ids, attention_mask=mask, hidden_layer=layer)   # (B, T, H); no LM head needed
        keep = torch.zeros(ids.shape, dtype=torch.float32)                 # (B, T): 1 on the pooled positions
        for j, i in enumerate(batch):
            keep[j, :len(rows[i])] = torch.tensor(_scored_mask(pool_from[i], len(rows[i])), dtype=torch.float32)
        keep = keep.to(device)[..., None]
        out[batch] = ((h.float() * keep).sum(1) / keep.sum(1)).cpu()        # (B, H) mean over pooled positions
    return out


def memorization_groups(scores, fraction: float = 0.2) -> tuple:
    """(most, least): indices of the lowest-scored and highest-scored `fraction` of examples (at least one each)."""
    n = max(1, int(len(scores) * fraction))
    if 2 * n > len(scores):
        raise ValueError(f"{len(scores)} examples are too few for two disjoint groups of {n}")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return order[:n], order[-n:]


def draw_pairs(most, least, n_pairs: int, seed: int = 0) -> list:
    """n_pairs random (most-memorized, least-memorized) index pairs, uniform with replacement, seeded."""
    rng = np.random.default_rng(seed)
    return list(zip(rng.choice(most, n_pairs).tolist(), rng.choice(least, n_pairs).tolist()))


def pair_geometry(hidden: torch.Tensor, pairs, index_of: dict) -> tuple:
    """l2 distances and angles in degrees between the pooled hidden states of each pair."""
    a = hidden[[index_of[i] for i, _ in pairs]].double()
    b = hidden[[index_of[j] for _, j in pairs]].double()
    l2 = (a - b).norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
    return l2.numpy(), torch.rad2deg(torch.arccos(cos)).numpy()


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def load_scored_model(model_path, adapter=None, template=None, device=None, dtype=None):
    """(model, tokenizer): the base checkpoint (default: the embedded SmolLM2-135M-Instruct), plus a LoRA adapter
    folder merged into its weights when given."""
    path = model_path or default_model_path()
    model = load_model(path, dtype=dtype, device=device)
    if adapter:
        import lora                                                          # only needed with --adapter
        import peft_io
        lora.merge(peft_io.load_adapter(model, adapter), keep_base=False)
    return model, load_tokenizer(path, family=template)


def read_scores(path) -> tuple:
    """(scores in index order, the score file's objects); checks that the indices are exactly 0..N-1."""
    rows, places = read_records(path)
    by_index = {}
    for obj, where in zip(rows, places):
        if not isinstance(obj.get("index"), int) or not isinstance(obj.get("score"), (int, float)):
            raise ValueError(f"{where}: a score line needs an integer 'index' and a numeric 'score'")
        if obj["index"] in by_index:
            raise ValueError(f"{where}: index {obj['index']} appears twice")
        by_index[obj["index"]] = float(obj["score"])
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"{path}: indices are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))], rows


def _add_data_args(p, adapter: bool = True):
    add_model_flags(p, FAMILIES, adapter=adapter)
    p.add_argument("--text-field", default=None, help="score the whole text of this field, every token after the first")
    p.add_argument("--prompt-field", default=None,
                   help="score the response given this templated prompt field (default: the data format is "
                   "detected as train.py does: messages, Alpaca, instruction/response, ...)")
    p.add_argument("--response-field", default=None, help="the response field (default: detected)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--batch-size", type=int, default=None, help="examples per forward (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--max-len", type=int, default=None, help="cut rows to this many tokens (default: model context)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def cmd_score(args):
    dtype = resolve_dtype(args.dtype, args.device)          # bf16 where it is native only: refused before any work
    examples, where = read_records(args.data, "--data")
    if args.limit is not None:
        examples, where = examples[:args.limit], where[:args.limit]
    if not examples:
        raise ValueError(f"{args.data}: no examples")
    model, tok = load_scored_model(args.model, args.adapter, args.template, args.device, dtype)
    try:
        scores, counts = score_examples(model, tok, examples, args.k, args.score, args.text_field, args.prompt_field,
                                        args.response_field, args.batch_size, args.max_len, return_counts=True,
                                        path=args.data)
    except ExampleError as e:
        raise UsageError(f"{where[e.index]}: {e}") from None
    extra = {"reference": True} if args.reference else {}
    write_jsonl(args.out, ({"index": i, "score": s, "n_tokens": n, "score_kind": args.score, "k": args.k, **extra}
                            for i, (s, n) in enumerate(zip(scores, counts))))
    print(f"wrote {len(scores)} {args.score} scores (K={args.k}%) to {args.out}")
    print(quantile_table({Path(args.data).name: scores}))
    return 0


def cmd_report(args):
    named, kinds = {}, set()
    for label, path, what in (("p0", args.p0, "data on base"), ("p1", args.p1, "data on base + adapter"),
                              ("p2", args.p2, "reference on base")):
        if path:
            scores, rows = read_scores(path)
            named[f"{label} ({what})"] = scores
            kinds.add((rows[0].get("score_kind"), rows[0].get("k")))
            if (label == "p2") != bool(rows[0].get("reference")):
                marked = "is" if rows[0].get("reference") else "is not"
                print(f"note: {path} {marked} marked --reference", file=sys.stderr)
    if len(kinds) > 1:
        print(f"warning: the score files mix score kinds / K: {sorted(kinds, key=str)}", file=sys.stderr)
    print("Min-K% scores (lower = more memorized)")
    print(quantile_table(named))
    first, *others = list(named)
    for other in others:
        ovl = overlap(named[first], named[other], args.bins)
        print(f"overlap({first.split()[0]}, {other.split()[0]}) = {ovl:.3f}"
              f"  (shared area of the two histograms, {args.bins} common bins)")
    if args.png:
        kind, k = next(iter(kinds))
        if _histograms_png(args.png, [(f"{kind or 'mink'} score (K={k}%)", named)], "Fig. 3: memorization scores"):
            print(f"wrote {args.png}")
        else:
            print("note: matplotlib is not installed; no PNG written (pip install matplotlib)", file=sys.stderr)
    return 0


def cmd_prune(args):
    examples, _ = read_records(args.data, "--data")
    scores, _ = read_scores(args.scores)
    if len(scores) != len(examples):
        raise ValueError(f"{args.scores}: {len(scores)} scores for {len(examples)} examples in {args.data} "
                         f"(score the whole file, without --limit)")
    stem = Path(args.data).name.removesuffix(".jsonl").removesuffix(".json")
    print(f"{'removed':>8} {'kept':>6} {'score cut':>10}  file")
    for r in args.remove:
        keep = prune_indices(scores, r)
        out = Path(args.out_dir) / f"{stem}_remove{round(r * 100):02d}.jsonl"
        write_jsonl(out, (examples[i] for i in keep))
        dropped = sorted(set(range(len(scores))) - set(keep))
        cut = max((scores[i] for i in dropped), default=float("nan"))
        print(f"{r:>8.0%} {len(keep):>6} {cut:>10.4f}  {out}")
    return 0


def cmd_geometry(args):
    examples, where = read_records(args.data, "--data")
    scores, _ = read_scores(args.scores)
    if len(scores) > len(examples):
        raise ValueError(f"{args.scores}: {len(scores)} scores but only {len(examples)} examples in {args.data}")
    most, least = memorization_groups(scores, args.group)                   # a --limit'ed score file: a prefix
    pairs = draw_pairs(most, least, args.pairs, args.seed)
    chosen = most + least                                                    # only these two groups are embedded
    index_of = {i: j for j, i in enumerate(chosen)}
    rows, results = None, {}
    for adapter in [None] + (args.adapter or []):
        model, tok = load_scored_model(args.model, adapter, args.template, args.device)
        if not 0 <= args.layer <= model.num_layers:
            raise ValueError(f"--layer {args.layer}: the model has layers 0..{model.num_layers}")
        if rows is None:                                                     # same tokenizer for base and adapters
            try:
                max_len = args.max_len or model.config.max_position_embeddings
                rows, scored = encode_examples(tok, examples[:len(scores)], args.text_field, args.prompt_field,
                                               args.response_field, max_len, args.data)
            except ExampleError as e:
                raise UsageError(f"{where[e.index]}: {e}") from None
        hidden = pooled_hidden(model, [rows[i] for i in chosen], args.layer, [scored[i] for i in chosen],
                               args.batch_size or default_batch_size(model))
        results["base" if adapter is None else f"+{Path(adapter).name}"] = pair_geometry(hidden, pairs, index_of)
        del model
    print(f"layer {args.layer}, mean over each example's scored tokens; most-memorized = lowest {args.group:.0%} of "
          f"scores ({len(most)}), least-memorized = highest {args.group:.0%} ({len(least)}); "
          f"{args.pairs} random pairs (seed {args.seed})")
    print("\nl2 distance")
    print(quantile_table({name: l2 for name, (l2, _) in results.items()}))
    print("\nangle (degrees)")
    print(quantile_table({name: ang for name, (_, ang) in results.items()}, digits=2))
    if args.png:
        panels = [("l2 distance", {n: r[0] for n, r in results.items()}),
                  ("angle (degrees)", {n: r[1] for n, r in results.items()})]
        if _histograms_png(args.png, panels, f"Fig. 5: most- vs least-memorized pairs, layer {args.layer}"):
            print(f"wrote {args.png}")
        else:
            print("note: matplotlib is not installed; no PNG written (pip install matplotlib)", file=sys.stderr)
    return 0


COMMANDS = ("score", "report", "prune", "geometry")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mink.py", description="Min-K%% Prob memorization analysis (Sec. 3-4). "
                                 "`python mink.py --data D --out S` runs the default command, score.")
    sub = ap.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="Min-K%% Prob scores of a data set (Fig. 3); the default command")
    score.add_argument("--data", required=True, help="JSONL file or JSON list of objects")
    score.add_argument("--out", required=True, help="scores JSONL: one {index, score, ...} per example, input order")
    score.add_argument("--k", type=float, default=K_PERCENT, help="K in percent (Fig. 3: 20)")
    score.add_argument("--score", choices=SCORES, default="mink",
                       help="mink: Min-K%% Prob; minkpp: negated Min-K%%++ (both: lower = more memorized)")
    score.add_argument("--reference", action="store_true", help="mark the scores as the reference set p2 (e.g. TOFU)")
    score.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help=DTYPE_HELP)
    _add_data_args(score)

    report = sub.add_parser("report", help="Fig. 3: p0/p1/p2 quantiles and overlaps")
    report.add_argument("--p0", required=True, help="scores of the data on the base model")
    report.add_argument("--p1", default=None, help="scores of the data on the fine-tuned model")
    report.add_argument("--p2", default=None, help="scores of the reference set (TOFU) on the base model")
    report.add_argument("--bins", type=int, default=40, help="histogram bins for the overlap coefficient")
    report.add_argument("--png", default=None, help="draw Fig. 3 here (needs matplotlib)")

    prune_p = sub.add_parser("prune", help="Fig. 4 / A1: drop the most-memorized x%%")
    prune_p.add_argument("--data", required=True)
    prune_p.add_argument("--scores", required=True, help="scores JSONL of --data (from `python mink.py`)")
    prune_p.add_argument("--remove", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4],
                         help="removal ratios (Fig. A1: 0.1 0.2 0.3 0.4)")
    prune_p.add_argument("--out-dir", required=True)

    geo = sub.add_parser("geometry", help="Fig. 5: distances and angles at layer l")
    geo.add_argument("--data", required=True)
    geo.add_argument("--scores", required=True, help="scores JSONL of --data (on the base model)")
    geo.add_argument("--layer", type=int, default=20, help="hidden layer (Fig. 5: 20)")
    geo.add_argument("--adapter", action="append", help="LoRA adapter folder; repeat for FT and IB-FT")
    geo.add_argument("--group", type=float, default=0.2, help="size of each group as a fraction of the data")
    geo.add_argument("--pairs", type=int, default=1000, help="random (most, least) pairs")
    geo.add_argument("--seed", type=int, default=0)
    geo.add_argument("--png", default=None, help="draw Fig. 5 here (needs matplotlib)")
    _add_data_args(geo, adapter=False)
    return ap


def check_args(args):
    """The checks argparse cannot express, as usage errors naming the flag."""
    if getattr(args, "text_field", None) and (args.prompt_field or args.response_field):
        raise UsageError("--text-field excludes --prompt-field/--response-field")
    if args.command == "score" and not 0 < args.k <= 100:
        raise UsageError(f"--k {args.k}: a percentage in (0, 100]")
    if args.command == "prune" and not all(0 <= r < 1 for r in args.remove):
        raise UsageError("--remove: ratios in [0, 1)")
    if args.command == "geometry" and not (0 < args.group <= 0.5 and args.pairs > 0):
        raise UsageError("--group must be in (0, 0.5] and --pairs positive")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["score"] + argv                         # the default command: python mink.py --data D --out S
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        commands = {"score": cmd_score, "report": cmd_report, "prune": cmd_prune, "geometry": cmd_geometry}
        return commands[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        return fail("mink.py", e)


if __name__ == "__main__":
    sys.exit(main())
