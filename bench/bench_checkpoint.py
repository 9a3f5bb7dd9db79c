"""Benchmark: writing one train.py checkpoint of a 7B-sized LoRA run, against a plain torch.save of the same tensors.

    python bench/bench_checkpoint.py [--dir DIR] [--repeats 3] [--layers 32] [--hidden 4096] [--intermediate 11008]
                                     [--r 32]

The shapes are Llama-2-7B's and DeepSeek-Coder-7B's: 32 layers, hidden 4096, MLP 11008, LoRA r 32 on the seven
projections (Appendix C.1), fp32 A and B; AdamW's state, two fp32 moments per LoRA parameter, filled in; no
bottleneck (FT). No model is built: each adapted projection is a lora.LoRALinear around a base nn.Linear on the meta
device (no memory), with real CPU tensors as A and B. Timed: train.save_checkpoint into DIR (the adapter's
safetensors, trainer_state.pt, every file fsynced, the folder renamed in, the older ones rotated: --keep-checkpoints 2),
and, in the same run and the same folder, torch.save of the same tensors (weights and both moments) into one file,
without and with an fsync. Each is run --repeats times in turn, after an untimed os.sync() (so that no write-back of
the one before is left to slow it down); the medians are printed, with the ratios. Without an fsync, torch.save's
time is that of filling the page cache: the data reaches the disk later.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def fake_lora_model(layers: int, hidden: int, intermediate: int, r: int) -> nn.Module:
    """model.layers.i.{self_attn,mlp}.<proj>: LoRALinear modules whose base weights live on the meta device and
    whose A, B are random CPU fp32 tensors of the real shapes; model.lora_config as inject_lora records it."""
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
              "down_proj": (intermediate, hidden)}
    gen = torch.Generator().manual_seed(0)

    def adapted(name):
        fan_in, fan_out = shapes[name]
        m = lora.LoRALinear(nn.Linear(fan_in, fan_out, bias=False, device="meta"), r=r, alpha=r)
        m.lora_A = nn.Parameter(torch.randn(r, fan_in, generator=gen) / fan_in ** 0.5)
        m.lora_B = nn.Parameter(torch.randn(fan_out, r, generator=gen) * 1e-3)
        return m

    blocks = nn.ModuleList(nn.ModuleDict({"self_attn": nn.ModuleDict({n: adapted(n) for n in ATTN}),
                                          "mlp": nn.ModuleDict({n: adapted(n) for n in MLP})})
                           for _ in range(layers))
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = blocks
    root.lora_config = lora.LoRAConfig(r=r, alpha=r, dropout=0.05, targets=lora.DEFAULT_TARGETS)
    return root


def adamw_with_state(params) -> torch.optim.AdamW:
    """An AdamW over params whose state holds what 100 steps leave: the step and two fp32 moments per parameter."""
    opt = torch.optim.AdamW([{"params": params}, {"params": []}], lr=5e-5)   # train.py's two groups (LoRA, VIB)
    gen = torch.Generator().manual_seed(1)
    for p in params:
        opt.state[p] = {"step": torch.tensor(100.0), "exp_avg": torch.randn(p.shape, generator=gen) * 1e-4,
                        "exp_avg_sq": torch.rand(p.shape, generator=gen) * 1e-8}
    return opt


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="folder to write into (default: a temporary folder, removed after)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--r", type=int, default=32)
    args = ap.parse_args(argv)
    if min(args.repeats, args.layers, args.hidden, args.intermediate, args.r) < 1:
        return cli.fail("bench_checkpoint.py", "--repeats, --layers, --hidden, --intermediate and --r must be >= 1")
    if args.dir is not None and not Path(args.dir).is_dir():
        return cli.fail("bench_checkpoint.py", f"--dir {args.dir}: no such folder")

    model = fake_lora_model(args.layers, args.hidden, args.intermediate, args.r)
    params = [p for m in lora.lora_layers(model).values() for p in (m.lora_A, m.lora_B)]
    opt = adamw_with_state(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    n = sum(p.numel() for p in params)
    plain = {**lora.lora_state_dict(model),
             **{f"exp_avg.{i}": opt.state[p]["exp_avg"] for i, p in enumerate(params)},
             **{f"exp_avg_sq.{i}": opt.state[p]["exp_avg_sq"] for i, p in enumerate(params)}}

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_checkpoint.") as tmp:
        run_dir, ref = Path(tmp), Path(tmp) / "plain.pt"

        def ours():
            train.save_checkpoint(run_dir, model, None, opt, sched, scaler, 100, "base", keep=2)

        def torch_save():
            torch.save(plain, ref)

        def torch_save_fsync():
            with open(ref, "wb") as f:
                torch.save(plain, f)
                f.flush()
                os.fsync(f.fileno())

        times = {"save_checkpoint": [], "torch.save": [], "torch.save + fsync": []}
        sizes = {}
        for _ in range(args.repeats):
            for name, fn, out in (("save_checkpoint", ours, run_dir / "checkpoint"), ("torch.save", torch_save, ref),
                                  ("torch.save + fsync", torch_save_fsync, ref)):
                os.sync()                   # untimed: no write-back of the previous one left to slow this one
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                sizes[name] = size_mb(out)
                if out == ref:
                    ref.unlink()
        kept = [d.name for d in train.checkpoint_dirs(run_dir)]

    print(f"LoRA r {args.r} on 7 projections x {args.layers} layers (hidden {args.hidden}, MLP {args.intermediate}): "
          f"{n / 1e6:.1f}M fp32 parameters + AdamW's two moments; {args.repeats} repeats, medians; written into "
          f"{args.dir or tempfile.gettempdir()}; folders kept: {', '.join(kept)}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in times:
        print(f"  {name:<20} {med[name]:7.2f} s  {sizes[name]:7.0f} MB  {sizes[name] / med[name]:6.0f} MB/s  "
              f"(runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"  save_checkpoint / torch.save          {med['save_checkpoint'] / med['torch.save']:.2f}")
    print(f"  save_checkpoint / torch.save + fsync  {med['save_checkpoint'] / med['torch.save + fsync']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
