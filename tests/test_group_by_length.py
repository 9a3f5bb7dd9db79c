"""train.py --group-by-length: micro-batches of similar lengths (train.micro_batches with lengths). Every epoch still
visits each example once in micro-batches of the configured size, with less padding than random batches; a run with
the flag trains; bench/bench_padding.py reports the two padding ratios."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as T

REPO = Path(__file__).resolve().parent.parent


def lengths_varied(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(10, 400) for _ in range(n)]


def epochs_of(plan, n, g):
    """The plan cut back into its epochs (ceil(n / g) micro-batches each)."""
    per = math.ceil(n / g)
    return [plan[e:e + per] for e in range(0, len(plan), per)]


def padded(plan, lengths):
    """Padding tokens of a one-process plan: each micro-batch's rows x its longest row, minus its real tokens."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plan)


def test_without_lengths_the_plan_is_the_seeded_permutation_as_before():
    n, g, seed = 23, 4, 7
    want = []
    for epoch in range(2):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        want += [perm[i:i + g] for i in range(0, n, g)]
    assert T.micro_batches(n, g, 1, 2, seed) == want


@pytest.mark.parametrize("n, batch_size, world", [(203, 4, 1), (203, 2, 2), (64, 4, 1), (500, 4, 1)])
def test_grouped_epochs_cover_every_example_once_in_full_batches_with_less_padding(n, batch_size, world):
    lengths, g, epochs = lengths_varied(n), batch_size * world, 3
    plan = T.micro_batches(n, batch_size, world, epochs, 42, lengths)
    assert plan == T.micro_batches(n, batch_size, world, epochs, 42, lengths)            # seeded
    chunks = epochs_of(plan, n, g)
    assert len(chunks) == epochs
    for epoch in chunks:
        assert sorted(i for b in epoch for i in b) == list(range(n))                    # each example once
        assert [len(b) for b in epoch] == [g] * (n // g) + ([n % g] if n % g else [])  # the short one last
        for b in epoch:                                      # one sorted window each: rows in descending length
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert chunks[0] != chunks[1]                                                       # a fresh order per epoch
    random_plan = T.micro_batches(n, batch_size, world, epochs, 42)
    assert padded(plan, lengths) < 0.5 * padded(random_plan, lengths)


def test_grouped_batches_come_from_windows_of_16_micro_batches():
    """Lengths that grow with the index: a window holds 16 x g examples of the permutation, so no micro-batch mixes
    examples from two windows, and the batch order is not the windows' order."""
    n, g = 320, 4
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    window_of = {i: pos // (16 * g) for pos, i in enumerate(perm)}
    plan = T.micro_batches(n, g, 1, 1, 5, list(range(n)))
    assert all(len({window_of[i] for i in b}) == 1 for b in plan)
    assert [window_of[b[0]] for b in plan] != sorted(window_of[b[0]] for b in plan)


def write_varied_data(path, n=24):
    rows = [json.dumps({"instruction": f"Write function {i}.",
                        "response": "def f():\n" + "    x = 1\n" * (1 + (i * 7) % 13) + "    return x\n"})
            for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_training_with_group_by_length(tmp_path, tiny_ckpt):
    data = write_varied_data(tmp_path / "d.jsonl")
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--model", str(tiny_ckpt), "--data", str(data),
                        "--method", "ibft", "--layer", "2", "--max-steps", "2", "--group-by-length", "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2] and all(math.isfinite(r["loss"]) for r in metrics)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["group_by_length"] is True


def test_bench_padding_reports_less_padding_when_grouped(tmp_path, tiny_ckpt):
    data = write_varied_data(tmp_path / "d.jsonl", n=40)
    p = subprocess.run([sys.executable, str(REPO / "bench" / "bench_padding.py"), "--model", str(tiny_ckpt),
                        "--data", str(data)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    ratio = {line.split()[0]: float(line.split()[3]) for line in p.stdout.splitlines()[1:3]}
    assert 1.0 <= ratio["group-by-length"] < ratio["random"], p.stdout
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "bench_padding.py"), "--data",
                          str(tmp_path / "none.jsonl")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "none.jsonl: no such file" in bad.stderr
