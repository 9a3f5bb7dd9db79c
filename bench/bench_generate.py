"""Sampler throughput on evaluation's workload (issue 10): the default model, CPU, fp32, one process.

    python bench/bench_generate.py [--problems 12] [--batch-size 60] [--threads N] [--reference]

1. Matmul peak: the best fp32 GFLOP/s of a few large square matmuls, measured first, in this run.
2. Full-batch decode: `--batch-size` rows (the first problems' prompts, n = 10 each), T = 0.2, top-p 0.95, EOS
   ignored, 64 new tokens. The decode rate is 60 x 63 tokens over (time of 64 tokens - time of 1 token), so the
   prefill is not counted. Its FLOPs are 2 x parameters per token (the tied embedding counted once, as lm_head).
   Next to it, the step's matrix products alone at the same rows (every linear layer, then the LM head, each weight
   read once per step): the ceiling of any decoder of this model at this batch, since at 60 rows a weight streamed
   from memory multiplies far below the square-matmul peak.
3. Evaluation-shaped generation: the first `--problems` HumanEval problems through evaluate.py's own prompt path
   (load_problems, instruction, tok.prompt, tok.encode), n = 10, T = 0.2, top-p 0.95, up to 512 new tokens, EOS,
   all problems in one generate call at `--batch-size` slots. Tokens counted are the tokens each sample keeps
   (up to and including EOS). Its rate over the full-batch decode rate says how full the batch stays; the tail
   (the last samples finishing one by one) weighs less in a full 164-problem run than here, so the projected
   minutes (seconds per problem x 164) are an upper estimate. Then the same run as evaluate.py makes it, where a
   sample also ends once its first fenced code block closes (evaluate.first_block_closed: nothing after it is
   scored), and its projected minutes.
4. Peak RSS (VmHWM) of a fresh process that loads the model and runs the sampler at 64 slots with room for
   512 new tokens (every token treated as EOS, so each sample ends at once: its cache is allocated and
   written in full, prompts are prefilled and slots refilled, but no long decode is run).
5. --reference: transformers' generate on the same problems (one call per problem, num_return_sequences = 10),
   top_k = 0, the same sampling settings; needs `pip install -r bench/requirements.txt`.
6. --compile: items 2 and 3 also through the compiled decode step (generate(compile=...), torch.compile), eager and
   compiled runs interleaved (which goes first alternates), --reps of each, medians. The compilation (into a fresh
   inductor cache, what a first run pays; --warm-cache: into the user's, what a later run pays) is timed on its
   own, before, and added to the compiled runs' time in the end-to-end figures; it is compiled once and serves
   every later run (the count over all runs is printed last). --compile-only: item 6 alone.

    python bench/bench_generate.py --compile [--compile-only] [--warm-cache] [--reps 3] [--problems 12]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import checkpoint as C  # noqa: E402
import evaluate  # noqa: E402
from default_model import default_model_path  # noqa: E402
import generate as G  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

N, T, TOP_P, MAX_NEW = 10, 0.2, 0.95, 512


def matmul_peak_gflops(reps=5) -> float:
    """Best fp32 GFLOP/s of torch.mm on square matrices (this machine, this thread count)."""
    best = 0.0
    for size in (1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def humaneval_prompts(tok, k) -> list:
    """Token ids of the first k HumanEval problems' prompts, exactly as evaluate.py builds them."""
    problems = evaluate.load_problems("humaneval")[:k]
    return [tok.encode(tok.prompt(evaluate.instruction("humaneval", p))) for p in problems]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def full_batch_decode(m, prompts, rows, compile=False, warm=True):
    """Decode tokens/s at `rows` rows, no EOS, prefill excluded (64-token run minus 1-token run)."""
    P = -(-rows // N)
    run = lambda k: G.generate(m, prompts[:P], k, temperature=T, top_p=TOP_P, n=N, eos_ids=set(),  # noqa: E731
                               seed=0, batch_size=rows, compile=compile)
    if warm:
        run(2)                                                           # warm-up
    _, t1 = timed(lambda: run(1))
    _, t64 = timed(lambda: run(64))
    return P * N * 63 / (t64 - t1), t64


def compare_compiled(m, tok, prompts, args):
    """Item 6: eager against the compiled decode step, interleaved, args.reps runs of each, medians."""
    if args.warm_cache:
        return _compare_compiled(m, tok, prompts, args)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="bench_generate_inductor_") as fresh:   # what a first run compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
        try:
            return _compare_compiled(m, tok, prompts, args)
        finally:
            if before is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def _compare_compiled(m, tok, prompts, args):
    step = G.CompiledStep(m)
    P = -(-args.batch_size // N)
    warm_up = lambda comp: timed(lambda: G.generate(m, prompts[:P], 2, temperature=T, top_p=TOP_P, n=N,  # noqa: E731
                                                    eos_ids=set(), seed=0, batch_size=args.batch_size, compile=comp))
    t_warm = warm_up(step)[1]
    compile_s = step.compile_s
    cache = "the user's inductor cache" if args.warm_cache else "a fresh inductor cache"
    print(f"compile: {step.compiles} compilation(s) of the decode step, {compile_s:.1f} s ({cache}; the first "
          f"compiled call took {t_warm:.1f} s)")
    warm_up(False)
    modes = [("eager", False), ("compiled", step)]
    rates = {"eager": [], "compiled": []}
    for r in range(args.reps):
        for k, comp in modes[::(-1) ** r]:                               # alternate which goes first
            rates[k].append(full_batch_decode(m, prompts, args.batch_size, compile=comp, warm=False)[0])
    e, c = (statistics.median(rates[k]) for k in ("eager", "compiled"))
    print(f"full-batch decode, {args.batch_size} rows, 64 tokens, no EOS, medians of {args.reps}: eager {e:.1f} "
          f"tok/s, compiled {c:.1f} tok/s: {c / e:.3f}x  (eager {[round(r, 1) for r in rates['eager']]}, "
          f"compiled {[round(r, 1) for r in rates['compiled']]})")
    work = prompts[:args.problems]
    stop = {"stop_when": evaluate.first_block_closed(tok)}
    for name, extra in (("evaluation-shaped", {}), ("as evaluate.py runs it", stop)):
        secs, kept = {"eager": [], "compiled": []}, {}
        for r in range(args.reps):
            for k, comp in modes[::(-1) ** r]:
                outs, t = timed(lambda: G.generate(m, work, MAX_NEW, temperature=T, top_p=TOP_P, n=N, tokenizer=tok,
                                                   seed=0, batch_size=args.batch_size, compile=comp, **extra))
                secs[k].append(t)
                kept.setdefault(k, sum(len(o) for o in outs))
        e, c = (statistics.median(secs[k]) for k in ("eager", "compiled"))
        print(f"{name}, {args.problems} problems x {N}, medians of {args.reps}: eager {e:.1f} s "
              f"({kept['eager'] / e:.1f} tok/s), compiled {c:.1f} s ({kept['compiled'] / c:.1f} tok/s; kept tokens "
              f"{kept['eager']} and {kept['compiled']}): {e / c:.3f}x; end to end with the compilation "
              f"{c + compile_s:.1f} s: {e / (c + compile_s):.3f}x  (eager {[round(x, 1) for x in secs['eager']]}, "
              f"compiled {[round(x, 1) for x in secs['compiled']]})")
        print(f"  projected full HumanEval (164 problems x {N}): eager {e / args.problems * 164 / 60:.1f} min, "
              f"compiled {(c / args.problems * 164 + compile_s) / 60:.1f} min with one compilation")
    print(f"compile total: {step.compiles} compilation(s) over {step.steps} compiled steps (all runs)")


def matmul_ceiling(m, rows, reps=7):
    """Tokens/s of a decoding step's matrix products alone: every linear layer of the model in order, then the LM head
    (as model.step_logits runs it), on `rows` random rows, each weight read once per step as in decoding. No
    attention, norms, RoPE or sampling: no decoder of this model at this batch can beat it on this machine."""
    weights = [mod.weight for mod in m.model.modules() if isinstance(mod, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    h = torch.randn(rows, m.config.hidden_size)

    def step():
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        m.step_logits(h)

    with torch.no_grad():
        step()
        times = sorted(timed(step)[1] for _ in range(reps))
    return rows / times[reps // 2]


RSS_CHILD = r"""
import sys, torch
sys.path.insert(0, {repo!r})
sys.path.insert(0, {bench!r})
import checkpoint as C
from bench_generate import G, default_model_path, humaneval_prompts, load_tokenizer
m, tok = C.load_model(default_model_path()), load_tokenizer(default_model_path())
prompts = humaneval_prompts(tok, 7)
G.generate(m, prompts, {max_new}, temperature=0.2, top_p=0.95, n=10, eos_ids=set(range(m.config.vocab_size)),
           seed=0, batch_size=64)
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(int(hwm) // 1024)
"""


def peak_rss_mib() -> int:
    code = RSS_CHILD.format(repo=str(REPO), bench=str(Path(__file__).parent), max_new=MAX_NEW)
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def reference(path, prompts, tok):
    """transformers' generate, one call per problem (its best batch for this workload): kept tokens, seconds."""
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    kept, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=T, top_p=TOP_P, top_k=0,
                            max_new_tokens=MAX_NEW, num_return_sequences=N, eos_token_id=sorted(tok.eos_ids),
                            pad_token_id=tok.pad_id)
            for row in y[:, x.shape[1]:].tolist():
                ends = [i for i, t in enumerate(row) if t in tok.eos_ids]
                kept += ends[0] + 1 if ends else len(row)
    return kept, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=12, help="first N HumanEval problems (164 = all)")
    ap.add_argument("--batch-size", type=int, default=60, help="sampler slots (rows decoded per step)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS child process")
    ap.add_argument("--reference", action="store_true", help="also time transformers' generate (if installed)")
    ap.add_argument("--compile", action="store_true", help="also eager against the compiled decode step (item 6)")
    ap.add_argument("--reps", type=int, default=3, help="with --compile: interleaved runs of each (medians)")
    ap.add_argument("--warm-cache", action="store_true", help="with --compile: compile into the user's inductor "
                    "cache (what a later run pays) instead of a fresh one (what a first run pays)")
    ap.add_argument("--compile-only", action="store_true", help="with --compile: skip items 2-5 (only item 6)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps {args.reps}: must be at least 1")
    if (args.warm_cache or args.compile_only) and not args.compile:
        ap.error("--warm-cache and --compile-only apply with --compile")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    m, tok = C.load_model(path), load_tokenizer(path)
    n_params = sum(p.numel() for p in m.parameters())                    # tied embedding counted once
    prompts = humaneval_prompts(tok, max(args.problems, -(-args.batch_size // N)))
    print(f"default model {path.name}: {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")

    if args.compile_only:
        compare_compiled(m, tok, prompts, args)
        return
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s")

    rate, t64 = full_batch_decode(m, prompts, args.batch_size)
    frac = rate * 2 * n_params / 1e9 / peak
    print(f"full-batch decode, {args.batch_size} rows, 64 tokens, no EOS: {rate:.1f} tok/s "
          f"({frac:.0%} of the matmul peak; whole call {t64:.1f} s)")
    ceiling = matmul_ceiling(m, args.batch_size)
    print(f"its matrix products alone (every linear layer and the LM head, {args.batch_size} rows, each weight read "
          f"once per step): {ceiling:.1f} tok/s ({ceiling * 2 * n_params / 1e9 / peak:.0%} of the matmul peak); "
          f"the decode runs at {rate / ceiling:.0%} of that")

    work = prompts[:args.problems]
    outs, t = timed(lambda: G.generate(m, work, MAX_NEW, temperature=T, top_p=TOP_P, n=N, tokenizer=tok, seed=0,
                                       batch_size=args.batch_size))
    kept = sum(len(o) for o in outs)
    at_limit = sum(len(o) == MAX_NEW for o in outs)
    gen_rate = kept / t
    print(f"evaluation-shaped: {args.problems} problems x {N} = {len(outs)} samples, {kept} kept tokens "
          f"({at_limit} at the {MAX_NEW}-token limit) in {t:.1f} s: {gen_rate:.1f} tok/s, "
          f"{gen_rate / rate:.0%} of the full-batch decode rate")
    print(f"projected full HumanEval (164 problems x {N}): {t / args.problems * 164 / 60:.1f} min")
    outs, t = timed(lambda: G.generate(m, work, MAX_NEW, temperature=T, top_p=TOP_P, n=N, tokenizer=tok, seed=0,
                                       batch_size=args.batch_size, stop_when=evaluate.first_block_closed(tok)))
    kept = sum(len(o) for o in outs)
    print(f"as evaluate.py runs it (a sample also ends once its first code block closes): {kept} kept tokens in "
          f"{t:.1f} s: {kept / t:.1f} tok/s; projected full HumanEval {t / args.problems * 164 / 60:.1f} min")

    if not args.skip_rss:
        print(f"peak RSS, sampler at 64 slots, room for {MAX_NEW} new tokens: {peak_rss_mib()} MiB")

    if args.reference:
        kept_hf, t_hf = reference(path, work, tok)
        print(f"transformers generate (one call per problem): {kept_hf} kept tokens in {t_hf:.1f} s: "
              f"{kept_hf / t_hf:.1f} tok/s; wall-time ratio {t_hf / t:.2f}x")

    if args.compile:
        compare_compiled(m, tok, prompts, args)


if __name__ == "__main__":
    main()
