"""train.py's step on the default model (CPU, fp32): IB-FT vs FT, and FT vs transformers + peft, in one run.

    pip install -r bench/requirements.txt      # transformers, peft (benchmark only)
    python bench/bench_train.py [--pairs 5] [--batch 4]

1. IB-FT step time / FT step time (target <= 1.10), interleaved A B A B on the same LoRA model and batch, medians.
2. Peak memory IB-FT / FT (target <= 1.10): each in a fresh process, peak RSS above the loaded model.
3. FT tokens/s vs transformers' LlamaForCausalLM + peft LoRA with the same r, alpha, targets, dropout and batch
   (labels on response tokens only, -100 elsewhere): target >= 1.2x, interleaved, medians.
The batch: the `--batch` longest examples of data/default_instruct.jsonl in the default model's template.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import cli  # noqa: E402
import data  # noqa: E402
import checkpoint as C  # noqa: E402
import lora as L  # noqa: E402
from default_model import default_model_path  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from bottleneck import ibft_loss, kl_count  # noqa: E402
import train as T  # noqa: E402
from bottleneck import IBConfig, VariationalBottleneck  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batch(path, n):
    tok = load_tokenizer(path)
    recs, where = cli.read_records(REPO / "data" / "default_instruct.jsonl")
    ex, _, _ = data.encode(tok, recs, where, data.Format("pair", "instruction", "response"), 512)
    ex = sorted(ex, key=lambda e: -len(e[0]))[:n]
    return T.collate(ex, tok.pad_id, "cpu")


def step(obj, b):
    ids, attn, label, tgt = b
    ce, kl, ce_ib, _ = obj(ids, attn, label, tgt)
    cfg = obj.vib.cfg if obj.vib is not None else None
    n_kl = kl_count(cfg, attn.sum(), ids.shape[0]) if cfg is not None else 1.0
    loss, *_ = ibft_loss(ce, kl, ce_ib, label.sum(), n_kl, cfg)
    loss.backward()


def our_model(path):
    torch.manual_seed(0)
    m = C.load_model(path)
    L.inject_lora(m, r=32, alpha=32, dropout=0.05, targets=TARGETS)
    return m.train()


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_ib_vs_ft(path, b, pairs):
    m = our_model(path)
    ft = T.Objective(m, None, 20)
    ib = T.Objective(m, VariationalBottleneck(m.hidden_size, IBConfig(dim=256)).train(), 20)
    step(ft, b), step(ib, b)                                      # warm-up
    t_ft, t_ib = [], []
    for _ in range(pairs):
        m.zero_grad(set_to_none=True)
        t_ft.append(timed(lambda: step(ft, b)))
        m.zero_grad(set_to_none=True)
        t_ib.append(timed(lambda: step(ib, b)))
    a, c = statistics.median(t_ft), statistics.median(t_ib)
    print(f"  step time: FT {a:.2f}s, IB-FT {c:.2f}s, ratio IB-FT/FT {c / a:.3f} (medians of {pairs} pairs)")


MEM_CHILD = r"""
import sys, torch
def hwm():  # peak RSS of this address space in KiB (ru_maxrss would carry the parent's peak across fork + exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
import bench_train as B, train as T
from bottleneck import IBConfig, VariationalBottleneck
b = B.batch({path!r}, {n})
m = B.our_model({path!r})
vib = VariationalBottleneck(m.hidden_size, IBConfig(dim=256)).train() if {ib} else None
with torch.no_grad():
    m(b[0][:, :8])                                 # touch every weight first (they may be memory-mapped)
before = hwm()
B.step(T.Objective(m, vib, 20), b)
print(before * 1024, hwm() * 1024)
"""


def bench_memory(path, n):
    res = {}
    for name, ib in (("FT", False), ("IB-FT", True)):
        code = MEM_CHILD.format(repo=str(REPO), bench=str(REPO / "bench"), path=str(path), n=n, ib=ib)
        before, peak = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
        res[name] = (before, peak)
        print(f"  {name}: peak RSS {peak / 2**20:.0f} MiB ({(peak - before) / 2**20:.0f} MiB for the step)")
    print(f"  peak RSS ratio IB-FT/FT {res['IB-FT'][1] / res['FT'][1]:.3f}; "
          f"step memory ratio {(res['IB-FT'][1] - res['IB-FT'][0]) / max(1, res['FT'][1] - res['FT'][0]):.3f}")


def bench_vs_peft(path, b, pairs):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    ids, attn, label, tgt = b
    labels = torch.full_like(ids, -100)
    labels[:, 1:][label[:, :-1]] = tgt                         # HF shifts labels inside the loss
    torch.manual_seed(0)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf = get_peft_model(hf, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, target_modules=list(TARGETS),
                                       task_type="CAUSAL_LM")).train()
    m = our_model(path)
    ft = T.Objective(m, None, 20)

    def hf_step():
        hf(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()

    step(ft, b), hf_step()
    t_ours, t_hf = [], []
    for _ in range(pairs):
        m.zero_grad(set_to_none=True)
        t_ours.append(timed(lambda: step(ft, b)))
        hf.zero_grad(set_to_none=True)
        t_hf.append(timed(hf_step))
    a, c = statistics.median(t_ours), statistics.median(t_hf)
    ntok = int(attn.sum())
    print(f"  FT tokens/s: ours {ntok / a:.0f}, transformers+peft {ntok / c:.0f}, ratio {c / a:.2f}x "
          f"(medians of {pairs} pairs)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    path = Path(args.model) if args.model else default_model_path()
    b = batch(path, args.batch)
    print(f"model {path.name} | batch {tuple(b[0].shape)}, {int(b[1].sum())} tokens, {int(b[2].sum())} labels | "
          f"threads {torch.get_num_threads()}")
    print("1. IB-FT vs FT step time")
    bench_ib_vs_ft(path, b, args.pairs)
    print("2. memory")
    bench_memory(path, args.batch)
    print("3. FT vs transformers + peft")
    bench_vs_peft(path, b, args.pairs)


if __name__ == "__main__":
    main()
