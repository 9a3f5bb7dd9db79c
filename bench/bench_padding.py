"""Padding in train.py's micro-batches, random vs --group-by-length: token counting only (no model runs, no timing).

    python bench/bench_padding.py [--data FILE] [--model DIR] [--max-len 2048] [--limit N] [--batch-size 4]
                                  [--world 1] [--epochs 3] [--seed 42]

The examples are tokenized as train.py does (data.encode with --model's tokenizer and template, cut to --max-len)
and laid out by train.micro_batches with and without lengths. Each process pads its slice of a global micro-batch
to the slice's longest row (train.shard, train.collate), so it computes rows x longest tokens. The padding ratio is
computed tokens / real tokens over the whole run: 1.00 means no padding.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import cli  # noqa: E402
import data  # noqa: E402
import train as T  # noqa: E402
from default_model import default_model_path  # noqa: E402
from tokenizer import FAMILIES, load_tokenizer  # noqa: E402


def computed_tokens(plan, lengths, world) -> int:
    """Tokens the forward passes compute over the plan: per process slice, rows x its longest row."""
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
