"""bottleneck.py and train.py: the KL, the IB objective's gradient paths, bit-exact FT/IB-FT equivalence at alpha = 0,
SIGKILL + resume, two-process DDP, GRAND's per-example gradients, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lora as L
import model as M
import train as T
from bottleneck import IBConfig, VariationalBottleneck, gaussian_kl, ib_terms

REPO = Path(__file__).resolve().parent.parent


def write_data(path, n=12, bad_line=None):
    rows = [json.dumps({"instruction": f"Write function number {i} that returns {i * 7}.",
                        "response": f"def f{i}():\n    return {i * 7}\n"}) for i in range(n)]
    if bad_line is not None:
        rows[bad_line] = '{"instruction": "oops", "response": '
    path.write_text("\n".join(rows) + "\n")
    return path


def run_train(*args, check=True, env=None, timeout=300):
    p = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


# ---------------------------------------------------------------------------------------------------------------
# KL (Eq. (4))
# ---------------------------------------------------------------------------------------------------------------

def test_kl_closed_form_matches_torch_distributions_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 8, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 8, generator=g, dtype=torch.float64).clamp(-2, 2)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p), rtol=1e-12, atol=1e-12)
    # Monte Carlo: E_q[log q(z) - log p(z)] with 400k samples; the standard error of each estimate is < 0.01 here,
    # so a tolerance of 0.05 (> 5 standard errors) cannot fail by chance.
    z = q.sample((400_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    assert (mc - gaussian_kl(mu, logvar)).abs().max() < 0.05
    assert gaussian_kl(torch.zeros(3), torch.zeros(3)).abs().max() == 0


def test_kl_reduction_and_clamp():
    h = torch.randn(2, 5, 16) * 50
    real = torch.ones(2, 5, dtype=torch.bool)
    real[1, 3:] = False
    label = real.clone()
    label[:, 0] = False
    for red, per_tok in (("mean", 4), ("sum", 1)):
        vib = VariationalBottleneck(16, IBConfig(dim=4, kl_reduction=red, logvar_clamp=4.0, input_norm=False))
        kl_sum, n_kl, h_bar = vib(h, real, label)
        mu, logvar = vib.encode(h[real])
        assert logvar.abs().max() <= 4.0
        assert n_kl == int(real.sum()) * per_tok                   # padding never counts
        torch.testing.assert_close(kl_sum, gaussian_kl(mu, logvar).sum())
        assert h_bar.shape == (int(label.sum()), 16)
    unclamped = VariationalBottleneck(16, IBConfig(dim=4, logvar_clamp=None, input_norm=False))
    assert unclamped.encode(h)[1].abs().max() > 4.0


def test_linear_cross_entropy_equals_reference():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (37,), generator=g)
    ours = M.linear_cross_entropy(h, W, y, chunk=8)
    (gh,) = torch.autograd.grad(ours * 3, h)
    ref = F.cross_entropy(h @ W.t(), y, reduction="sum")
    (rh,) = torch.autograd.grad(ref * 3, h)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, rh)


def test_ib_gradient_reaches_lora_of_layers_up_to_l_star_only(tiny_ckpt):
    layer = 2                                                       # of 4
    m = M.load_model(tiny_ckpt)
    L.inject_lora(m, r=4, alpha=8, dropout=0.0, generator=torch.Generator().manual_seed(0))
    for lin in L.lora_layers(m).values():                           # non-zero B, so A gets gradients too
        torch.nn.init.normal_(lin.lora_B, std=0.05)
    vib = VariationalBottleneck(m.hidden_size, IBConfig(layer=layer, dim=8))
    ids, attn, label, tgt = T.collate([([5, 6, 7, 8, 9, 10], 2), ([11, 12, 13, 14], 1)], 2, "cpu")
    _, h_l = m.trunk(ids, attn, hidden_layer=layer)
    kl_sum, n_kl, ce_ib = ib_terms(m, vib, h_l, attn, label, tgt)
    (kl_sum / n_kl + 0.02 * ce_ib).backward()                       # l_IB alone, Eq. (6)
    for name, lin in L.lora_layers(m).items():
        idx = int(name.split(".")[2])                               # model.layers.<idx>...
        grads = [p.grad for p in (lin.lora_A, lin.lora_B)]
        reached = any(gr is not None and gr.abs().sum() > 0 for gr in grads)
        assert reached == (idx < layer), f"{name}: IB gradient {'reached' if reached else 'missed'} layer {idx + 1}"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vib.parameters())


# ---------------------------------------------------------------------------------------------------------------
# train.py end to end (tiny random checkpoints)
# ---------------------------------------------------------------------------------------------------------------

def test_ibft_alpha_zero_is_bit_identical_to_ft(tmp_path, tiny_ckpt):
    data = write_data(tmp_path / "d.jsonl")
    common = ["--model", tiny_ckpt, "--data", data, "--max-steps", 4, "--lr", 1e-3, "--layer", 2, "--seed", 3]
    run_train(*common, "--method", "ft", "--out", tmp_path / "ft")
    run_train(*common, "--method", "ibft", "--alpha", 0, "--out", tmp_path / "ib0")
    run_train(*common, "--method", "ibft", "--alpha", 0.5, "--out", tmp_path / "ib")
    ft = load_file(str(tmp_path / "ft" / "adapter_model.safetensors"))
    ib0 = load_file(str(tmp_path / "ib0" / "adapter_model.safetensors"))
    ib = load_file(str(tmp_path / "ib" / "adapter_model.safetensors"))
    assert ft.keys() == ib0.keys()
    assert all(torch.equal(ft[k], ib0[k]) for k in ft)              # bit for bit (dropout on: RNG streams agree)
    assert any(not torch.equal(ft[k], ib[k]) for k in ft)           # and alpha > 0 does change the weights
    metrics = [json.loads(x) for x in (tmp_path / "ib" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert {"loss", "ce", "kl", "ce_ib", "lr", "grad_norm", "tokens_per_s"} <= metrics[0].keys()
    assert (tmp_path / "ib" / "vib.safetensors").exists() and (tmp_path / "ib" / "adapter_config.json").exists()


def test_sigkill_and_resume_is_bit_identical(tmp_path, tiny_ckpt):
    data = write_data(tmp_path / "d.jsonl", n=16)
    common = ["--model", tiny_ckpt, "--data", data, "--max-steps", 30, "--lr", 1e-3, "--layer", 2,
              "--method", "ibft", "--save-every", 3, "--epochs", 20]
    run_train(*common, "--out", tmp_path / "full")
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, common), "--out", str(out)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120                                    # kill as soon as the first checkpoint is there
    while time.time() < deadline and not (out / "checkpoint" / "trainer_state.pt").exists():
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    run_train(*common, "--out", out, "--resume")
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    va, vb = load_file(str(tmp_path / "full" / "vib.safetensors")), load_file(str(out / "vib.safetensors"))
    assert all(torch.equal(va[k], vb[k]) for k in va)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))                              # no step logged twice


def test_two_process_ddp_matches_one_process(tmp_path, tiny_ckpt):
    data = write_data(tmp_path / "d.jsonl", n=16)
    common = ["--model", tiny_ckpt, "--data", data, "--max-steps", 3, "--lr", 1e-3, "--layer", 2, "--method", "ibft",
              "--lora-dropout", 0]
    run_train(*common, "--batch-size", 4, "--out", tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", str(REPO / "train.py"), *map(str, common), "--batch-size", "2", "--out",
                        str(tmp_path / "two")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)    # it trained
    la = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)


def test_grand_per_example_norms_equal_one_at_a_time_loop(tiny_ckpt):
    m = M.load_model(tiny_ckpt)
    L.inject_lora(m, r=4, alpha=8, dropout=0.05, generator=torch.Generator().manual_seed(0))
    for lin in L.lora_layers(m).values():
        torch.nn.init.normal_(lin.lora_B, std=0.05)                 # both A and B gradients non-zero
    m.train()
    examples = [([5, 6, 7, 8, 9, 10, 11], 3), ([12, 13, 14, 15], 1), ([20, 21, 22, 23, 24, 25, 26, 27, 28], 5)]
    batched = T.grand_scores(m, examples, pad_id=2, batch_size=3)
    assert m.training                                               # mode restored
    params = [p for p in m.parameters() if p.requires_grad]
    m.eval()
    for ex, score in zip(examples, batched):
        ids, attn, label, tgt = T.collate([ex], 2, "cpu")
        loss = F.cross_entropy(m(ids, attention_mask=attn, logits_at=label), tgt)
        grads = torch.autograd.grad(loss, params)
        ref = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert score == pytest.approx(float(ref), rel=1e-4)


def test_prune_flags_train_on_the_kept_fraction(tmp_path, tiny_ckpt):
    data = write_data(tmp_path / "d.jsonl", n=10)
    for how in ("grand", "mink"):
        if how == "mink":
            pytest.importorskip("mink")
        run_train("--model", tiny_ckpt, "--data", data, "--max-steps", 1, "--method", "ft", "--prune", how,
                  "--keep", 0.8, "--grand-seeds", 2, "--out", tmp_path / how)
        cfg = json.loads((tmp_path / how / "config.json").read_text())
        assert cfg["kept_examples"] == 8


@pytest.mark.parametrize("extra, message", [
    (["--method", "sft"], "--method must be ft or ibft"),
    (["--layer", 4], "--layer must be in 1..3"),
    (["--layer", 0], "--layer must be in 1..3"),
])
def test_bad_flags(tmp_path, tiny_ckpt, extra, message):
    data = write_data(tmp_path / "d.jsonl")
    p = run_train("--model", tiny_ckpt, "--data", data, "--out", tmp_path / "r", *extra, check=False)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_bad_data(tmp_path, tiny_ckpt):
    bad = write_data(tmp_path / "bad.jsonl", bad_line=4)
    p = run_train("--model", tiny_ckpt, "--data", bad, "--layer", 2, "--out", tmp_path / "r", check=False)
    assert p.returncode == 2 and f"{bad}:5: invalid JSON" in p.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "x", "response": "  "}) + "\n")
    p = run_train("--model", tiny_ckpt, "--data", empty, "--layer", 2, "--out", tmp_path / "r", check=False)
    assert p.returncode == 2 and f"{empty}:1: empty response" in p.stderr
    assert not (tmp_path / "r" / "adapter_model.safetensors").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_ckpt):
    data = write_data(tmp_path / "d.jsonl", n=16)
    out = tmp_path / "r"
    p = run_train("--model", tiny_ckpt, "--data", data, "--out", out, "--method", "ft", "--lr", 1e30,
                  "--warmup-ratio", 0, "--max-grad-norm", 1e30, "--save-every", 1, "--max-steps", 8, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "non-finite loss at step" in p.stderr and "Last good checkpoint" in p.stderr
    step = int(p.stderr.split("non-finite loss at step ")[1].split()[0])
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == step - 1
    assert not (out / "adapter_model.safetensors").exists()


def test_prune_mink_with_a_dropped_example(tmp_path, tiny_ckpt):
    pytest.importorskip("mink")
    data = write_data(tmp_path / "d.jsonl", n=10)
    rows = data.read_text().splitlines()
    rows[3] = json.dumps({"instruction": "long " * 300, "response": "x"})    # its prompt alone exceeds --max-len
    data.write_text("\n".join(rows) + "\n")
    run_train("--model", tiny_ckpt, "--data", data, "--max-steps", 1, "--method", "ft", "--prune", "mink",
              "--keep", 0.8, "--max-len", 200, "--out", tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["data_stats"]["dropped"] == 1 and cfg["kept_examples"] == 7            # round(0.8 * 9)
