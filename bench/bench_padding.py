"""Padding in train.py's micro-batches, random vs --group-by-length: token counting, and with --time, training speed.

    python bench/bench_padding.py [--data FILE] [--model DIR] [--max-len 2048] [--limit N] [--batch-size 4]
                                  [--world 1] [--epochs 3] [--seed 42] [--time REPEATS]

The examples are tokenized as train.py does (data.encode with --model's tokenizer and template, cut to --max-len)
and laid out by train.micro_batches with and without lengths. Each process pads its slice of a global micro-batch
to the slice's longest row (train.shard, train.collate), so it computes rows x longest tokens. The padding ratio is
computed tokens / real tokens over the whole run: 1.00 means no padding.

--time R runs `train.py --method ft` on the same data, flags and epochs R times each way, interleaved (random, grouped,
random, ...), each a fresh process, and prints real tokens per second of wall time (start-up included, the same in
both) and the median ratio. Every example is seen once per epoch either way, so both runs train on the same tokens.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import cli  # noqa: E402
import data  # noqa: E402
import train as T  # noqa: E402
from default_model import default_model_path  # noqa: E402
from tokenizer import FAMILIES, load_tokenizer  # noqa: E402


def computed_tokens(plan, lengths, world) -> int:
    """Tokens the forward passes compute over the plan: per process slice, rows x its longest row. An empty slice
    (a short last micro-batch, fewer examples than processes) counts 0: its dummy row (train.step_batches) trains
    on nothing."""
    total = 0
    for batch in plan:
        for r in range(world):
            rows = [lengths[i] for i in T.shard(batch, r, world)]
            total += len(rows) * max(rows, default=0)
    return total


def padding(lengths, batch_size, world, epochs, seed) -> dict:
    """{mode: (computed tokens, real tokens)} for random and length-grouped micro-batches of the same run."""
    out = {}
    for mode, by in (("random", None), ("group-by-length", lengths)):
        plan = T.micro_batches(len(lengths), batch_size, world, epochs, seed, by)
        real = sum(lengths[i] for b in plan for i in b)
        out[mode] = (computed_tokens(plan, lengths, world), real)
    return out


def time_training(args, real_tokens: int, repeats: int) -> dict:
    """{mode: [real tokens / wall s of each run]} of train.py --method ft, random and grouped, interleaved."""
    out = {"random": [], "group-by-length": []}
    for _ in range(repeats):
        for mode in out:
            with tempfile.TemporaryDirectory() as d:
                cmd = [sys.executable, str(REPO / "train.py"), "--method", "ft", "--data", args.data, "--max-len",
                       str(args.max_len), "--batch-size", str(args.batch_size), "--epochs", f"{args.epochs:g}",
                       "--seed", str(args.seed), "--out", d, "--save-minutes", "0", "--diag-every", "0"]
                cmd += ["--model", args.model] if args.model else []
                cmd += ["--group-by-length"] if mode == "group-by-length" else []
                t0 = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                wall = time.perf_counter() - t0
                if p.returncode != 0:
                    raise cli.UsageError(f"train.py failed: {p.stderr.strip().splitlines()[-1:]}")
            out[mode].append(real_tokens / wall)
            print(f"  {mode:<16} {real_tokens / wall:7.1f} real tok/s ({wall:.1f} s)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_model_flags(ap, FAMILIES, adapter=False)
    ap.add_argument("--data", default=str(T.DEFAULT_DATA), help="training data in any format train.py reads")
    ap.add_argument("--max-len", type=int, default=2048, help="cut examples to this many tokens (train.py's flag)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N records")
    ap.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per process")
    ap.add_argument("--world", type=int, default=1, help="processes")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--time", type=int, default=0, metavar="REPEATS",
                    help="also time train.py --method ft this many times each way (interleaved)")
    args = ap.parse_args(argv)
    try:
        if min(args.max_len, args.batch_size, args.world) < 1 or (args.limit is not None and args.limit < 1):
            raise cli.UsageError("--max-len, --batch-size, --world and --limit must be >= 1")
        records, where = cli.read_records(args.data, "--data")
        records, where = records[:args.limit], where[:args.limit]
        if not records:
            raise cli.UsageError(f"{args.data}: no examples")
        tok = load_tokenizer(Path(args.model) if args.model else default_model_path(), family=args.template)
        fmt = data.detect_format(records, args.data)
        examples, _, stats = data.encode(tok, records, where, fmt, args.max_len)
    except cli.UsageError as e:
        return cli.fail("bench_padding.py", e)
    lengths = [len(ids) for ids, _ in examples]
    res = padding(lengths, args.batch_size, args.world, args.epochs, args.seed)
    print(f"{args.data}: {len(lengths)} examples ({stats['truncated']} cut to {args.max_len} tokens, "
          f"{stats['dropped']} dropped: no response token left), "
          f"{sum(lengths)} real tokens, {min(lengths)}-{max(lengths)} per example | batch {args.batch_size} x "
          f"{args.world} process(es), {args.epochs:g} epochs, seed {args.seed}")
    for mode, (computed, real) in res.items():
        print(f"  {mode:<16} computed/real tokens {computed / real:.3f} ({computed} computed, {real} real)")
    (c_r, _), (c_g, _) = res["random"], res["group-by-length"]
    print(f"  group-by-length computes {1 - c_g / c_r:.1%} fewer tokens than random")
    if args.time:
        if args.world != 1 or args.limit is not None:
            return cli.fail("bench_padding.py", cli.UsageError("--time trains on the whole --data in one process: "
                                                               "leave --world at 1 and drop --limit"))
        speed = time_training(args, res["random"][1], args.time)
        r, g = statistics.median(speed["random"]), statistics.median(speed["group-by-length"])
        print(f"  training, medians of {args.time}: random {r:.1f}, grouped {g:.1f} real tok/s: {g / r:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
