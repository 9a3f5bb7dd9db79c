"""The attention sink at the bottleneck's layer: which tokens carry a massive hidden state, measured.

    scripts/python scripts/sink_norms.py                         # default model, layer 20, data/default_instruct.jsonl
    scripts/python scripts/sink_norms.py --data results/laptop/work/data/train.jsonl --layer 20
    scripts/python scripts/sink_norms.py --goldens               # the golden fixtures' random checkpoints

For every real token it takes the norm of the layer-l* output and divides it by the median norm of its row (the
ratio bottleneck.sink_mask thresholds). It prints, per position class, how many tokens exceed each threshold and the
largest ratio outside position 0: the numbers that justify bottleneck.SINK_RATIO (docs/train.md, "The attention sink").
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data                                                    # noqa: E402
from bottleneck import SINK_RATIO                              # noqa: E402
from checkpoint import load_model                              # noqa: E402
from cli import read_records                                   # noqa: E402
from default_model import default_model_path                   # noqa: E402
from tokenizer import load_tokenizer                           # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"
THRESHOLDS = (3, 5, 10, SINK_RATIO, 50)


@torch.no_grad()
def row_ratios(model, rows, layer) -> list:
    """Per row, the (T,) ratios |h_t| / median_t |h_t| of the block-`layer` output."""
    out = []
    for ids in rows:
        _, h = model.trunk(torch.tensor([ids]), hidden_layer=layer)      # (1, T, H)
        norm = h[0].float().norm(dim=-1)                               # (T,)
        out.append(norm / norm.median())
    return out


def report(name, ratios):
    first = torch.stack([r[0] for r in ratios])
    rest = torch.cat([r[1:] for r in ratios])
    print(f"{name}: {len(ratios)} rows, {rest.numel() + len(ratios)} tokens")
    print(f"  position 0: ratio min {first.min():.1f}, median {first.median():.1f}, max {first.max():.1f}")
    print(f"  positions 1..: ratio median {rest.median():.2f}, 99.9th pct {rest.quantile(0.999):.2f}, "
          f"max {rest.max():.2f}")
    for t in THRESHOLDS:
        print(f"  ratio > {t:>3}: position 0 in {int((first > t).sum())}/{len(ratios)} rows, "
              f"{int((rest > t).sum())} other tokens")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", action="append", default=[], help="instruction data (repeatable; default: "
                    "data/default_instruct.jsonl)")
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--goldens", action="store_true", help="the golden fixtures' checkpoints on random token ids")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.goldens:
        for case in sorted(p for p in GOLDEN.iterdir() if (p / "model.safetensors").is_file()):
            model = load_model(case)
            g = torch.Generator().manual_seed(0)
            rows = [torch.randint(0, model.config.vocab_size, (64,), generator=g).tolist() for _ in range(8)]
            for layer in range(1, model.config.num_layers):
                report(f"golden {case.name}, layer {layer}", row_ratios(model, rows, layer))
        return
    path = Path(args.model) if args.model else default_model_path()
    model, tok = load_model(path), load_tokenizer(path)
    for f in args.data or [str(Path(__file__).resolve().parent.parent / "data" / "default_instruct.jsonl")]:
        records, where = read_records(Path(f), "--data")
        fmt = data.detect_format(records, f)
        examples, _, _ = data.encode(tok, records, where, fmt, 2048)
        report(f"{path.name}, layer {args.layer}, {f}", row_ratios(model, [ids for ids, _ in examples], args.layer))


if __name__ == "__main__":
    main()
