"""DDP gives one process's run: LoRA dropout keyed by example (lora.keyed_dropout, train.dropout_keys). A row's mask
depends on its key, its length and the module, not on its batch companions or padding; activation checkpointing
redraws it exactly; and 2 torchrun processes with the default dropout train the adapter one process does, also
when an epoch ends with a micro-batch of fewer examples than processes (a process with no example runs a dummy row
weighted 0)."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoint as C
import lora as L
import train as T
from test_train import STRICT_ENV, run_train, write_data

REPO = Path(__file__).resolve().parent.parent


def torchrun(port, *args):
    """train.py on 2 gloo processes (torchrun), each on one thread in MKL's strict mode, as run_train runs one."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), str(REPO / "train.py"), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                       env=STRICT_ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def dropouts(n, p):
    """n LoRADropout modules in one container, in training mode."""
    return nn.ModuleList(L.LoRADropout(p) for _ in range(n)).train()


# ---------------------------------------------------------------------------------------------------------------
# The keyed masks
# ---------------------------------------------------------------------------------------------------------------

def test_a_rows_mask_depends_on_its_key_length_and_module_only():
    mods = dropouts(2, 0.5)
    ones = torch.ones(3, 10, 8)                                         # rows of 10, 4 and 7 real tokens
    with L.keyed_dropout(mods, [11, 22, 33], [10, 4, 7]):
        batch = [m(ones) for m in mods]                                 # (3, 10, 8) each
        again = mods[0](ones)                                           # a recomputation: the same draw
    with L.keyed_dropout(mods, [22], [4]):                              # row 22 alone, unpadded
        alone = [m(torch.ones(1, 4, 8)) for m in mods]
    with L.keyed_dropout(mods, [33, 22], [7, 4]):                       # other companions, padded to 7
        other = [m(torch.ones(2, 7, 8)) for m in mods]
    for i in range(2):
        assert torch.equal(batch[i][1, :4], alone[i][0])
        assert torch.equal(batch[i][1, :4], other[i][1, :4])
        assert torch.equal(batch[i][2, :7], other[i][0])
        assert (batch[i][:, :4] == 0).any()                             # dropout acts
    assert torch.equal(again, batch[0])
    assert not torch.equal(batch[0][1, :4], batch[1][1, :4])            # another module: another mask
    assert not torch.equal(batch[0][0, :4], batch[0][1, :4])            # another key: another mask
    assert set(batch[0].unique().tolist()) == {0.0, 2.0}                # inverted dropout: kept x 1 / (1 - p)
    assert all(m.rows is None for m in mods)                            # the keys end with the block


def test_keyed_mask_rate_and_the_global_rng_without_keys():
    (m,) = dropouts(1, 0.05)
    x = torch.ones(4, 250, 100)
    with L.keyed_dropout(m, [1, 2, 3, 4], [250, 250, 250, 250]):
        rate = float((m(x) == 0).float().mean())
    assert abs(rate - 0.05) < 0.005                                     # 100k draws: > 7 standard errors
    torch.manual_seed(7)                                                # no keys: the global RNG, as before
    want = x.masked_fill(torch.rand_like(x) < 0.05, 0.0).mul_(1.0 / 0.95)
    torch.manual_seed(7)
    assert torch.equal(m(x), want)
    with pytest.raises(ValueError, match="one key per row"):
        with L.keyed_dropout(m, [1, 2], [250, 250]):
            m(x)


def test_dropout_keys_do_not_depend_on_how_a_step_is_cut():
    one = T.dropout_keys(42, 3, [[5, 1, 7, 2]])                         # 1 process x 4
    two = T.dropout_keys(42, 3, [[5, 1], [7, 2]])                       # 2 micro-batches of 2 (or 2 processes)
    assert one[0] == two[0] + two[1] and len(set(one[0])) == 4
    assert T.dropout_keys(42, 4, [[5]]) != T.dropout_keys(42, 3, [[5]])            # another step
    assert T.dropout_keys(43, 3, [[5]]) != T.dropout_keys(42, 3, [[5]])            # another seed
    span = T.dropout_keys(42, 3, [[5, 1], [1, 9]])                      # a step across an epoch's end sees 1 twice
    assert span[0][1] != span[1][0]


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout(tiny_ckpt):
    model = C.load_model(tiny_ckpt)
    L.inject_lora(model, r=4, alpha=8, dropout=0.3, generator=torch.Generator().manual_seed(0))
    for lin in L.lora_layers(model).values():
        torch.nn.init.normal_(lin.lora_B, std=0.05, generator=torch.Generator().manual_seed(1))  # B != 0: masks act
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 2, 2, 2]])
    attn = (torch.arange(8) < torch.tensor([[8], [5]])).long()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(checkpointing, p=0.3):
        model.gradient_checkpointing = checkpointing
        for m in model.modules():
            if isinstance(m, L.LoRADropout):
                m.p = p
        torch.manual_seed(123)                     # the global RNG is not what the masks come from
        with L.keyed_dropout(model, [L.mix64(1), L.mix64(2)], [8, 5]):
            h, _ = model.trunk(ids, attn)
            loss = F.cross_entropy(model.logits(h[attn.bool()]), ids[attn.bool()])
            return torch.autograd.grad(loss, params)

    plain, ckpt = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    assert any(not torch.equal(a, b) for a, b in zip(plain, grads(False, p=0)))   # dropout did change them


# ---------------------------------------------------------------------------------------------------------------
# 2 processes = 1 process, dropout on
# ---------------------------------------------------------------------------------------------------------------

def test_two_process_ddp_with_dropout_matches_one_process(tmp_path, tiny_ckpt):
    """torchrun on 2 gloo processes (1 example each, 2 accumulated) against 1 process (4 examples), the default
    --lora-dropout 0.05: the same adapter and losses to DDP's rounding (the two sum gradients in another order)."""
    data = write_data(tmp_path / "d.jsonl", n=16)
    common = ["--model", tiny_ckpt, "--data", data, "--max-steps", 3, "--lr", 1e-3, "--layer", 2, "--method", "ibft"]
    run_train(*common, "--batch-size", 4, "--out", tmp_path / "one")
    torchrun(29531, *common, "--batch-size", 1, "--global-batch-size", 4, "--out", tmp_path / "two")  # 2 x 1 x 2 accum
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert (cfg["world_size"], cfg["grad_accum"], cfg["global_batch_size"], cfg["lora_dropout"]) == (2, 2, 4, 0.05)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)    # it trained
    la = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == 3 and la == pytest.approx(lb, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# A short last micro-batch: fewer examples than processes
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [13, 16, 23])
def test_the_plan_depends_on_the_global_micro_batch_only(n):
    """batch x world = 4 however it is split: the same micro-batches, an epoch's short last one (1 or 3 examples)
    kept, fractional epochs cut alike."""
    for lengths in (None, [i % 5 for i in range(n)]):
        one = T.micro_batches(n, 4, 1, 2.5, 7, lengths)
        assert one == T.micro_batches(n, 2, 2, 2.5, 7, lengths) == T.micro_batches(n, 1, 4, 2.5, 7, lengths)
        assert sorted(i for b in one[:-(-n // 4)] for i in b) == list(range(n))        # epoch 1: every example
    assert [len(b) for b in T.micro_batches(13, 1, 4, 1, 7)] == [4, 4, 4, 1]
    assert [T.shard([9], r, 4) for r in range(4)] == [[9], [], [], []]


def test_an_empty_shard_runs_the_first_example_as_a_dummy_that_counts_nothing(monkeypatch):
    """step_batches for rank 1 of 2 on the micro-batch [5]: the dummy row is example 5 with its key, length and
    noise rows (rank 0's), and the step's counts (before the all-reduce) are 0."""
    monkeypatch.setattr(T.dist, "all_reduce", lambda t: None)                        # no process group here
    examples = [([1, 2, 3 + i, 4], [False, False, True, True]) for i in range(8)]
    run = SimpleNamespace(world=2, rank=1, examples=examples, plan=[[3, 6], [5]], grad_accum=2,
                          tok=SimpleNamespace(pad_id=0), device=torch.device("cpu"), args=SimpleNamespace(seed=42))
    batches, real, noise, rows, counts = T.step_batches(run, 0)
    keys = T.dropout_keys(42, 0, run.plan)
    assert real == [True, False] and counts == [2.0, 4.0, 1.0]                       # example 6 only
    assert torch.equal(batches[1][0], torch.tensor([[1, 2, 8, 4]]))                    # example 5, the dummy
    assert rows == [([keys[0][1]], [4]), ([keys[1][0]], [4])] and noise == [(2, 4), (0, 2)]
    run.rank = 0
    batches, real, noise, rows, counts = T.step_batches(run, 0)
    assert real == [True, True] and counts == [4.0, 8.0, 2.0] and noise == [(0, 4), (0, 2)]


def test_two_processes_on_an_epoch_with_a_one_example_tail_match_one_process(tmp_path, tiny_ckpt):
    """13 examples in global micro-batches of 4 (1 process x 4, or 2 x 2): each epoch ends with a 1-example one,
    whose empty second shard runs a dummy row weighted 0. Three steps of 3 micro-batches over 2 epochs put the dummy
    first in a step (under no_sync) and last; --kl-normalizer padded counts rows, rate the real tokens."""
    data = write_data(tmp_path / "d.jsonl", n=13)
    # lr 1e-4: Adam turns DDP's rounding of a near-zero gradient element into up to ~1e-3 of a step's update; at
    # lr 1e-3 one element differs by 1.3e-6, as much as without the tail (16 examples: 5e-7), at 1e-4 by 1.3e-7.
    common = ["--model", tiny_ckpt, "--data", data, "--epochs", 2, "--grad-accum", 3, "--lr", 1e-4, "--layer", 2,
              "--method", "ibft", "--kl-normalizer", "padded", "--kl-pad-to", 64, "--max-len", 64,
              "--diag-every", 1]
    run_train(*common, "--batch-size", 4, "--out", tmp_path / "one")
    torchrun(29537, *common, "--batch-size", 2, "--out", tmp_path / "two")
    cfg = [json.loads((tmp_path / r / "config.json").read_text()) for r in ("one", "two")]
    assert [(c["world_size"], c["global_batch_size"], c["total_steps"]) for c in cfg] == [(1, 12, 3), (2, 12, 3)]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)    # it trained
    ra, rb = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("one", "two"))
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3]
    for k in ("loss", "ce", "kl", "ce_ib", "rate", "sink_share", "ib_share", "grad_norm"):
        assert [r[k] for r in ra] == pytest.approx([r[k] for r in rb], rel=1e-5), k


def test_dropout_masks_process_draws_from_the_global_rng(tmp_path, tiny_ckpt):
    """--dropout-masks process (the laptop study's protocol) trains with other masks than the keyed default, and
    with dropout off both are the same run: the flag changes where the masks come from and nothing else. The
    laptop preset passes it."""
    import reproduce as R
    data = write_data(tmp_path / "d.jsonl", n=8)
    adapters = {}
    for name, extra in (("example", []), ("process", ["--dropout-masks", "process"]),
                        ("example0", ["--lora-dropout", 0]), ("process0", ["--lora-dropout", 0, "--dropout-masks",
                                                                           "process"])):
        out = tmp_path / name
        run_train("--model", tiny_ckpt, "--data", data, "--max-steps", 2, "--batch-size", 4, "--lr", 1e-3, "--layer", 2,
                  "--out", out, *extra)
        adapters[name] = load_file(str(out / "adapter_model.safetensors"))
    assert any(not torch.equal(adapters["example"][k], adapters["process"][k]) for k in adapters["example"])
    assert all(torch.equal(adapters["example0"][k], adapters["process0"][k]) for k in adapters["example0"])
    flags = R.train_flags(R.PRESETS["laptop"], "ft", 60)
    assert flags[flags.index("--dropout-masks") + 1] == "process"
    assert R.PRESETS["paper"].dropout_masks == "example"
