"""LoRA dropout keyed by example (lora.keyed_dropout, as train.py trains) vs one global-RNG draw per micro-batch (the
LoRADropout default), on the default model (CPU, fp32), both sides in one run.

    OMP_NUM_THREADS=1 python bench/bench_dropout.py [--pairs 5] [--batch 4] [--threads 1]

1. The masks of one forward pass: for the input of every LoRADropout in the batch's forward, `rand_like(x) < p` on
   (B, T, in) vs lora.row_masks (a generator seeded per row, (T_b, in) each), interleaved, medians.
2. One FT step (forward + backward) without and with keyed_dropout, interleaved A B A B, medians: the step ratio is
   what keying costs (target <= 1.02), and the masks' share of the step.
The batch: the `--batch` longest examples of data/default_instruct.jsonl, as bench/bench_train.py takes them.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import lora as L  # noqa: E402
import train as T  # noqa: E402
from bench_train import batch, our_model, step, timed  # noqa: E402
from default_model import default_model_path  # noqa: E402


def dropout_inputs(m, b) -> list:
    """The (B, T, in) shape each LoRADropout sees in one forward pass on batch b."""
    shapes = []
    hooks = [d.register_forward_pre_hook(lambda mod, inp: shapes.append(tuple(inp[0].shape)))
             for d in m.modules() if isinstance(d, L.LoRADropout)]
    with torch.no_grad():
        T.Objective(m, None, 20)(*b)
    for h in hooks:
        h.remove()
    return shapes


def bench_masks(shapes, lengths, seeds, p, reps):
    xs = [torch.empty(s) for s in shapes]
    old = lambda: [torch.rand_like(x) < p for x in xs]                   # noqa: E731  LoRADropout without keys
    new = lambda: [L.row_masks(x, seeds, lengths, p) for x in xs]        # noqa: E731  with keys
    old(), new()                                                         # warm-up
    t_old, t_new = [], []
    for _ in range(reps):
        t_old.append(timed(old))
        t_new.append(timed(new))
    a, c = statistics.median(t_old), statistics.median(t_new)
    n = sum(x.numel() for x in xs)
    print(f"  masks of one forward ({len(xs)} modules, {n / 1e6:.1f}M elements, {sum(lengths)} real of "
          f"{shapes[0][0] * shapes[0][1]} tokens): global RNG {a * 1e3:.1f} ms, keyed {c * 1e3:.1f} ms, "
          f"ratio {c / a:.3f} (medians of {reps})")
    return a, c


def bench_step(m, b, keys, lengths, pairs):
    ft = T.Objective(m, None, 20)
    step(ft, b)                                                          # warm-up
    t_old, t_new = [], []
    for _ in range(pairs):
        m.zero_grad(set_to_none=True)
        t_old.append(timed(lambda: step(ft, b)))
        m.zero_grad(set_to_none=True)
        with L.keyed_dropout(m, keys, lengths):
            t_new.append(timed(lambda: step(ft, b)))
    a, c = statistics.median(t_old), statistics.median(t_new)
    print(f"  FT step: global RNG {a:.2f} s, keyed {c:.2f} s, ratio keyed/global {c / a:.3f} (medians of {pairs} "
          f"pairs; target <= 1.02)")
    return a, c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model_path()
    b = batch(path, args.batch)
    m = our_model(path)                                                  # LoRA r 32, dropout 0.05, all seven
    lengths = b[1].sum(1).tolist()
    keys = [L.mix64(42, 0, i, 0) for i in range(len(lengths))]
    print(f"{path.name}, {torch.get_num_threads()} thread(s), batch {tuple(b[0].shape)}, torch {torch.__version__}")
    shapes = dropout_inputs(m, b)
    masks_old, masks_new = bench_masks(shapes, lengths, [L.mix64(k, 0) for k in keys], 0.05, 3 * args.pairs)
    step_old, step_new = bench_step(m, b, keys, lengths, args.pairs)
    print(f"  the masks' share of a step: global RNG {masks_old / step_old:.1%}, keyed {masks_new / step_new:.1%}; "
          f"keying adds {(masks_new - masks_old) / step_old:+.1%} of a step by the mask timings")


if __name__ == "__main__":
    main()
