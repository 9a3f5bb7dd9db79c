"""Benchmark: Min-K% scoring throughput of mink.py vs the reference implementation's way (Shi et al., 2023).

Reference: transformers' LlamaForCausalLM on the same checkpoint folder, one example at a time, as the Min-K% Prob
code does it: `model(ids, labels=ids)`, log_softmax over the full (T, V) logits, then a Python loop gathering each
token's log-prob. Ours: mink.score_examples, batched with right padding, the LM head and log-softmax only at scored
positions. Both score the same token ids (the response given the templated prompt) on the same examples, fp32, and
the scores are compared. Reports scored tokens/s and the speed ratio measured in the same run.

It also prints what bounds that ratio. Both sides must run the whole decoder stack on every token (the response is
scored given the prompt), so the FLOPs differ only by the vocabulary head at unscored positions. The script counts the
multiply-adds of each side from config.json and measures this machine's fp32 peak with a large matrix product on the
same threads. Then no exact fp32 implementation can beat  t_reference / (FLOPs_ours / peak).

    python bench/bench_mink.py [--n 64] [--batch-size 8] [--data ../shared/data/train/python_instruct.jsonl]
Needs transformers (bench/requirements.txt) and ../shared; skips with a message when either is absent.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import mink  # noqa: E402
from checkpoint import load_model  # noqa: E402
from default_model import default_model_path  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def reference_scores(hf_model, rows, score_from, k):
    """Shi et al.'s loop: full logits, log_softmax over every position, per-token .item() gathering."""
    scores = []
    for ids, start in zip(rows, score_from):
        input_ids = torch.tensor(ids).unsqueeze(0).to(hf_model.device)
        with torch.no_grad():
            outputs = hf_model(input_ids, labels=input_ids)
        logits = outputs.logits
        probabilities = torch.nn.functional.log_softmax(logits, dim=-1)
        all_prob = []
        for i, token_id in enumerate(input_ids[0][1:]):
            all_prob.append(probabilities[0, i, token_id].item())
        scored = np.array(all_prob[start - 1:])
        k_length = max(1, int(len(scored) * k / 100))
        scores.append(-float(np.mean(np.sort(scored)[:k_length])))
    return scores


def flops(cfg, rows, score_from):
    """(reference, ours) floating-point operations (2 per multiply-add) of a forward pass over `rows`: the linear
    layers of every block on every token, causal attention (QK^T and AV, T^2/2 each per head), and the vocabulary
    head on every position (reference) or on the scored positions only (ours)."""
    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or H // heads
    block = H * heads * d * 2 + H * kv * d * 2 + 3 * H * cfg["intermediate_size"]    # q, o, k, v, gate/up/down
    T = sum(len(r) for r in rows)
    n_scored = sum(len(r) - s for r, s in zip(rows, score_from))
    attention = L * heads * d * sum(len(r) ** 2 for r in rows)                         # 2 x T^2/2 per head
    trunk = L * block * T + attention
    return 2.0 * (trunk + H * V * T), 2.0 * (trunk + H * V * n_scored)


def peak_flops(sizes=(512, 1024, 2048), repeats=5) -> float:
    """This machine's fp32 matrix-product peak on the current threads: the best rate of `repeats` n^3 products for
    each n in `sizes` (generous on purpose: the bound it gives must not be too low)."""
    rates = []
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        rates.append(2.0 * n ** 3 / min(_timed(lambda: a @ b) for _ in range(repeats)))
    return max(rates)


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train" / "python_instruct.jsonl"))
    ap.add_argument("--n", type=int, default=64, help="examples (the first N of --data)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8], help="mink.py batch sizes to time")
    ap.add_argument("--k", type=float, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunk", type=int, default=16, help="examples per interleaved timing round")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides (default: torch's choice; use 1 on a machine shared with other "
                         "jobs, where oversubscribed threads make timings meaningless)")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        print(f"SKIP: {args.data} not found (the benchmark reads ../shared/data/train/python_instruct.jsonl)")
        return 0
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        print("SKIP: transformers is not installed (pip install -r bench/requirements.txt)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    examples, _ = cli.read_records(args.data)
    examples = examples[:args.n]
    tok = load_tokenizer(path)
    rows, score_from = mink.encode_examples(tok, examples)
    # Sorted by length, so that each interleaved chunk is padded about as little as a whole data set sorted by
    # mink.py would be (the reference's cost does not depend on the order).
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    examples, rows, score_from = [examples[i] for i in order], [rows[i] for i in order], [score_from[i] for i in order]
    n_scored = sum(len(r) - s for r, s in zip(rows, score_from))
    n_total = sum(len(r) for r in rows)
    print(f"{len(rows)} examples of {Path(args.data).name}: {n_total} tokens, {n_scored} scored (response), "
          f"model {path.name}, fp32, {args.device}, {torch.get_num_threads()} threads")

    f_ref, f_ours = flops(json.loads((path / "config.json").read_text()), rows, score_from)
    ours_model = load_model(path, dtype=torch.float32, device=args.device)
    hf = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(args.device).eval()
    mink.score_examples(ours_model, tok, examples[:2], k=args.k, batch_size=2)      # warm-up
    reference_scores(hf, rows[:2], score_from[:2], args.k)

    # Interleaved rounds (the reference, then each batch size of ours, on the same chunk of examples), so that the
    # load of a shared machine falls on all alike.
    ref, t_ref = [], 0.0
    ours = {b: [] for b in args.batch_size}
    t_ours = {b: 0.0 for b in args.batch_size}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for c in range(0, len(rows), args.chunk):
        sync()
        t0 = time.perf_counter()
        ref += reference_scores(hf, rows[c:c + args.chunk], score_from[c:c + args.chunk], args.k)
        sync()
        t_ref += time.perf_counter() - t0
        for b in args.batch_size:
            t0 = time.perf_counter()
            ours[b] += mink.score_examples(ours_model, tok, examples[c:c + args.chunk], k=args.k, batch_size=b)
            sync()
            t_ours[b] += time.perf_counter() - t0

    print(f"reference (transformers, batch 1, full log_softmax): {t_ref:7.2f} s  {n_scored / t_ref:8.1f} scored tok/s  "
          f"{f_ref / t_ref / 1e9:6.1f} GFLOP/s")
    worst = 0.0
    for b in args.batch_size:
        diff = max(abs(x - y) for x, y in zip(ours[b], ref))
        worst = max(worst, diff)
        print(f"mink.py   (batch {b:2d}, LM head at scored positions):   {t_ours[b]:7.2f} s  "
              f"{n_scored / t_ours[b]:8.1f} scored tok/s  {f_ours / t_ours[b] / 1e9:6.1f} GFLOP/s  "
              f"speed-up {t_ref / t_ours[b]:.2f}x (target >= 3x)  "
              f"max |score difference| {diff:.1e}")
    if args.device == "cpu":
        peak = peak_flops()
        print(f"bounds: the reference does {f_ref / f_ours:.3f}x the FLOPs of ours; this machine's fp32 peak "
              f"({peak / 1e9:.1f} GFLOP/s, the best square matrix product) caps any exact implementation at "
              f"{t_ref * peak / f_ours:.2f}x the reference")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
