"""train.py: the IB objective's gradient paths, bit-exact FT/IB-FT equivalence at alpha = 0,
SIGKILL + resume, GRAND's per-example gradients, and bad input. The math written out independently:
the first step's loss and gradient, accumulation = one big batch, which examples the
pruning baselines keep; and the protocol flags (--global-batch-size, --kl-normalizer padded, --hf-warmup)."""
import json
import math
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

import checkpoint as C
import cli
import lora as L
from tokenizer import load_tokenizer
import train as T
from bottleneck import IBConfig, VariationalBottleneck, kl_count

REPO = Path(__file__).resolve().parent.parent


def pair(ids, n_prompt):
    """An example (ids, trained) whose tokens from position n_prompt on are trained (one prompt, one response)."""
    return ids, [t >= n_prompt for t in range(len(ids))]


def write_data(path, n=12, bad_line=None):
    rows = [json.dumps({"instruction": f"Write function number {i} that returns {i * 7}.",
                        "response": f"def f{i}():\n    return {i * 7}\n"}) for i in range(n)]
    if bad_line is not None:
        rows[bad_line] = '{"instruction": "oops", "response": '
    path.write_text("\n".join(rows) + "\n")
    return path


STRICT_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}


def run_train(*args, check=True, env=None, timeout=300):
    """train.py in a subprocess; by default on one thread with MKL's strict mode, so that two runs compared bit for
    bit use repeatable CPU kernels (with two threads they sometimes differ: docs/train.md, "Checkpoints")."""
    env = STRICT_ENV if env is None else env
    p = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


# ---------------------------------------------------------------------------------------------------------------
# The IB gradient's path (Eq. (6))
# ---------------------------------------------------------------------------------------------------------------

def test_ib_gradient_reaches_lora_of_layers_up_to_l_star_only(tiny_ckpt):
    layer = 2                                                       # of 4
    m = C.load_model(tiny_ckpt)
    L.inject_lora(m, r=4, alpha=8, dropout=0.0, generator=torch.Generator().manual_seed(0))
    for lin in L.lora_layers(m).values():                           # non-zero B, so A gets gradients too
        torch.nn.init.normal_(lin.lora_B, std=0.05)
    vib = VariationalBottleneck(m.hidden_size, IBConfig(layer=layer, dim=8))
    ids, attn, label, tgt = T.collate([pair([5, 6, 7, 8, 9, 10], 2), pair([11, 12, 13, 14], 1)], 2, "cpu")
    _, kl_sum, ce_ib, _ = T.Objective(m, vib, layer)(ids, attn, label, tgt)
    (kl_sum / kl_count(vib.cfg, int(attn.sum()), 2) + 0.02 * ce_ib).backward()   # l_IB alone, Eq. (6)
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


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, tiny_ckpt, precision):
    """Also the GPU's mixed-precision path, run on the CPU: bf16 autocast, and fp16 with the gradient scaler, whose
    state (scale, growth tracker) is checkpointed and restored. Every run uses one thread and MKL's strict
    reproducibility mode: with two threads, torch's CPU kernels can differ from run to run (bf16/fp16 on a CPU with
    AMX: 3 of 4 plain reruns here; fp32 on one CI machine), which no resume could match bit for bit. Where the
    resumed run differs, a second uninterrupted run tells a resume bug (it agrees with the first) from kernels that
    are not deterministic on this CPU (it does not: skipped, with the size of the difference)."""
    data = write_data(tmp_path / "d.jsonl", n=16)
    common = ["--model", tiny_ckpt, "--data", data, "--max-steps", 30, "--lr", 1e-3, "--layer", 2,
              "--method", "ibft", "--save-every", 3, "--epochs", 20, "--precision", precision]
    env = STRICT_ENV
    run_train(*common, "--out", tmp_path / "full", env=env)
    state = torch.load(tmp_path / "full" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert bool(state["scaler"]) == (precision == "fp16")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["precision"] == precision
    losses = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, common), "--out", str(out)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120                                    # kill as soon as the first checkpoint is there
    while time.time() < deadline and not (out / "checkpoint" / "trainer_state.pt").exists():
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    run_train(*common, "--out", out, "--resume", env=env)

    def weights(run_dir):
        return {**load_file(str(run_dir / "adapter_model.safetensors")), **load_file(str(run_dir / "vib.safetensors"))}

    def max_diff(x, y):
        return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)

    a, b = weights(tmp_path / "full"), weights(out)
    if not all(torch.equal(a[k], b[k]) for k in a):
        run_train(*common, "--out", tmp_path / "again", env=env)
        c = weights(tmp_path / "again")
        if not all(torch.equal(a[k], c[k]) for k in a):
            pytest.skip(f"two uninterrupted {precision} runs differ on this CPU (max |diff| {max_diff(a, c):.2e}): "
                        "its kernels are not deterministic, so no resume can be checked bit for bit here")
        pytest.fail(f"the resumed run differs from the uninterrupted one (max |diff| {max_diff(a, b):.2e}), "
                    "which a second uninterrupted run matches bit for bit")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))                              # no step logged twice


def test_grand_per_example_norms_equal_one_at_a_time_loop(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    L.inject_lora(m, r=4, alpha=8, dropout=0.05, generator=torch.Generator().manual_seed(0))
    for lin in L.lora_layers(m).values():
        torch.nn.init.normal_(lin.lora_B, std=0.05)                 # both A and B gradients non-zero
    m.train()
    examples = [pair([5, 6, 7, 8, 9, 10, 11], 3), pair([12, 13, 14, 15], 1),
                pair([20, 21, 22, 23, 24, 25, 26, 27, 28], 5)]
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
    assert p.returncode == 2 and f"{bad}:5: not valid JSON" in p.stderr
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


# ---------------------------------------------------------------------------------------------------------------
# The math, written out independently of train.py and bottleneck.py
# ---------------------------------------------------------------------------------------------------------------

def train_here(*args):
    """train.py in this process (no interpreter start-up): the run directory."""
    return T.train(T.parse_args([str(a) for a in args]))


def read_metrics(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("normalizer,ib_input", [("real", "raw"), ("padded", "norm")])
def test_first_step_loss_and_gradient_are_ce_plus_alpha_kl_plus_beta_ce_ib(tmp_path, tiny_ckpt, normalizer, ib_input,
                                                                          monkeypatch):
    """One micro-batch of 4, fixed eps: loss = CE.mean() + alpha (KL mean + beta CE_IB.mean()), every term rebuilt
    here with plain torch ops from the model's logits and hidden states, the VIB weights and the bottleneck's
    generator state. Both what train.py logs and what it differentiates are checked: the optimizer is swapped for
    SGD at lr 1 without clipping or warmup, so the step moves every weight by exactly minus its gradient."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, lr, betas, weight_decay: torch.optim.SGD(groups, lr=lr))
    n, seed, layer, d, alpha, beta, pad_to = 4, 5, 2, 16, 0.3, 0.05, 256
    data = write_data(tmp_path / "d.jsonl", n=n)
    run = train_here("--model", tiny_ckpt, "--data", data, "--out", tmp_path / "r", "--method", "ibft",
                     "--layer", layer, "--bottleneck-dim", d, "--alpha", alpha, "--beta", beta, "--seed", seed,
                     "--batch-size", n, "--max-steps", 1, "--lr", 1, "--warmup-ratio", 0, "--max-grad-norm", 1e9,
                     "--lora-dropout", 0, "--max-len", pad_to, "--kl-normalizer", normalizer, "--kl-pad-to", pad_to,
                     "--ib-input", ib_input)
    got = read_metrics(run)[0]

    # The batch: epoch 0's seeded permutation, right-padded.
    m = C.load_model(tiny_ckpt)
    L.inject_lora(m, r=32, alpha=32, dropout=0.0, generator=torch.Generator().manual_seed(seed))   # B = 0
    tok = load_tokenizer(tiny_ckpt)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    enc = [tok.encode_example(rows[i]["instruction"], rows[i]["response"]) for i in order]
    Tmax = max(len(p) + len(r) for p, r in enc)
    ids = torch.full((n, Tmax), tok.pad_id)
    real = torch.zeros(n, Tmax, dtype=torch.bool)
    pos, tgt = [], []                                               # (row, t) predicting token t + 1 of the response
    for b, (p, r) in enumerate(enc):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        real[b, :len(p) + len(r)] = True
        for t in range(len(p) - 1, len(p) + len(r) - 1):
            pos.append((b, t))
            tgt.append(int(ids[b, t + 1]))
    tgt = torch.tensor(tgt)
    logits, h = m(ids, attention_mask=real.long(), hidden_layer=layer)          # (B, T, V), (B, T, H)
    ce = F.cross_entropy(torch.stack([logits[b, t] for b, t in pos]), tgt)     # mean over label tokens

    # q_phi on h (raw) or on RMS-normalized h (the default), log sigma^2 clamped to [-4, 4], KL to N(0, I) from its
    # formula. A random model has no attention sink: excluding sinks (the default) changes nothing here.
    vib0 = VariationalBottleneck(m.hidden_size, IBConfig(layer=layer, dim=d, seed=seed))   # the initial weights
    We, be = vib0.encoder.weight, vib0.encoder.bias
    Wd, bd = vib0.decoder.weight, vib0.decoder.bias
    hn = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) if ib_input == "norm" else h
    mu, logvar = (hn @ We.T + be).split(d, dim=-1)                             # (B, T, d) each
    logvar = logvar.clamp(-4, 4)
    kl_tok = 0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar)                   # (B, T, d)
    kl_sum = kl_tok[real].sum()
    kl = kl_sum / (int(real.sum()) * d) if normalizer == "real" else kl_sum / (n * pad_to * d)

    # eps: the bottleneck's private generator, seeded with --seed, after its init drew the four weight tensors.
    eps = torch.randn((len(pos), d), generator=vib0.generator)
    mu_l = torch.stack([mu[b, t] for b, t in pos])
    lv_l = torch.stack([logvar[b, t] for b, t in pos])
    z = mu_l + torch.exp(lv_l / 2) * eps
    h_bar = z @ Wd.T + bd
    ce_ib = F.cross_entropy(h_bar @ m.lm_head.weight.T, tgt)                    # s_IB = lm_head(h_bar), no norm

    loss = ce + alpha * (kl + beta * ce_ib)
    assert got["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert got["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert got["ce_ib"] == pytest.approx(ce_ib.item(), rel=1e-5)
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    if normalizer == "padded":                                      # = the real-token mean x T_real / (B x pad_to)
        assert got["kl"] == pytest.approx((kl_sum / (int(real.sum()) * d)).item() * int(real.sum()) / (n * pad_to))

    # The diagnostics of the first step: ib_share from the two terms' own gradients on the LoRA weights, the rate
    # (KL nats per real token, summed over latent dims, whatever the normalizer), no sink in a random model.
    lora_params = [p for lin in L.lora_layers(m).values() for p in (lin.lora_A, lin.lora_B)]
    g_ce = torch.autograd.grad(ce, lora_params, retain_graph=True)
    g_ib = [g if g is not None else torch.zeros_like(p) for g, p in zip(torch.autograd.grad(
        alpha * (kl + beta * ce_ib), lora_params, retain_graph=True, allow_unused=True), lora_params)]
    norm = lambda grads: torch.sqrt(sum(g.pow(2).sum() for g in grads))          # noqa: E731
    assert got["ib_share"] == pytest.approx((norm(g_ib) / norm(g_ce)).item(), rel=1e-4)
    cos = sum((a * b).sum() for a, b in zip(g_ib, g_ce)) / (norm(g_ib) * norm(g_ce))
    assert got["ib_cos"] == pytest.approx(cos.item(), rel=1e-3, abs=1e-5)
    assert got["rate"] == pytest.approx(kl_sum.item() / int(real.sum()), rel=1e-5)
    assert got["sink_share"] == 0.0

    loss.backward()
    after = load_file(str(run / "adapter_model.safetensors"))
    for name, lin in L.lora_layers(m).items():
        key = f"{L.PEFT_PREFIX}{name}"
        assert torch.equal(after[key + ".lora_A.weight"], lin.lora_A.detach())  # same init; zero gradient at B = 0
        torch.testing.assert_close(after[key + ".lora_B.weight"], -lin.lora_B.grad, rtol=1e-4, atol=1e-6,
                                   msg=f"{name}: lora_B moved by something other than minus its gradient")
    vib_after = load_file(str(run / "vib.safetensors"))
    for k, w in vib0.state_dict(keep_vars=True).items():
        torch.testing.assert_close(vib_after[k], (w - w.grad).detach(), rtol=1e-4, atol=1e-6, msg=k)
    assert any(lin.lora_B.grad.abs().max() > 1e-3 for lin in L.lora_layers(m).values())


@pytest.mark.parametrize("method", ["ft", "ibft"])
def test_grad_accum_2x2_and_global_batch_equal_one_batch_of_4(tmp_path, tiny_ckpt, method, monkeypatch):
    """Same examples per step: 1 x 4, 2 x 2 (--grad-accum) and 4 x 1 (--global-batch-size) give the same losses, the
    same gradient norms and the same weights after two steps. The optimizer is swapped for plain SGD without clipping,
    so the weights are a linear function of the gradients (Adam's first steps are ~lr x sign(g): blind to scale, and
    they blow float noise in near-zero gradients up to lr)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, lr, betas, weight_decay: torch.optim.SGD(groups, lr=lr))
    data = write_data(tmp_path / "d.jsonl", n=8)
    common = ["--model", tiny_ckpt, "--data", data, "--method", method, "--layer", 2, "--bottleneck-dim", 16,
              "--max-steps", 2, "--lr", 0.1, "--max-grad-norm", 1e9, "--lora-dropout", 0, "--alpha", 0.5,
              "--beta", 0.1]
    runs = {"1x4": train_here(*common, "--batch-size", 4, "--out", tmp_path / "a"),
            "2x2": train_here(*common, "--batch-size", 2, "--grad-accum", 2, "--out", tmp_path / "b"),
            "4x1": train_here(*common, "--batch-size", 1, "--global-batch-size", 4, "--out", tmp_path / "c")}
    for name, run in runs.items():
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["global_batch_size"] == 4 and cfg["grad_accum"] == {"1x4": 1, "2x2": 2, "4x1": 4}[name]
    ref = read_metrics(runs["1x4"])
    files = ["adapter_model.safetensors"] + (["vib.safetensors"] if method == "ibft" else [])
    for name in ("2x2", "4x1"):
        got = read_metrics(runs[name])
        for key in ("loss", "ce", "kl", "ce_ib", "grad_norm"):
            assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-5, abs=1e-9), (name, key)
        for f in files:
            a, b = load_file(str(runs["1x4"] / f)), load_file(str(runs[name] / f))
            for k in a:
                torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {f} {k}")
    assert ref[0]["grad_norm"] > 0 and ref[1]["loss"] != ref[0]["loss"]


# ---------------------------------------------------------------------------------------------------------------
# Which examples the pruning baselines keep (with known scores)
# ---------------------------------------------------------------------------------------------------------------

SCORES = [0.7, 0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0]               # record i's score


def test_grand_keeps_the_highest_scores(tmp_path, tiny_ckpt, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", n=10)
    tok = load_tokenizer(tiny_ckpt)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    by_ids = {tuple(sum(tok.encode_example(r["instruction"], r["response"]), [])): s for r, s in zip(rows, SCORES)}
    monkeypatch.setattr(T, "grand_scores", lambda model, examples, pad_id, batch_size=4:
                        [by_ids[tuple(ids)] for ids, _ in examples])
    run = train_here("--model", tiny_ckpt, "--data", data, "--method", "ft", "--prune", "grand", "--keep", 0.8,
                     "--grand-seeds", 2, "--max-steps", 1, "--out", tmp_path / "r")
    kept = json.loads((run / "config.json").read_text())["kept_records"]
    assert kept == [0, 2, 3, 4, 5, 7, 8, 9]                         # 0.1 (record 1) and 0.2 (record 6) go


def test_mink_prune_removes_the_lowest_scores(tmp_path, tiny_ckpt, monkeypatch):
    import mink
    data = write_data(tmp_path / "d.jsonl", n=10)
    # Example i's token log-probs: the single value -SCORES[i], so its Min-K% score is SCORES[i] whatever K is.
    monkeypatch.setattr(mink, "token_logprobs", lambda model, rows, scored, batch_size, normalize:
                        [torch.tensor([-s]) for s in SCORES[:len(rows)]])
    run = train_here("--model", tiny_ckpt, "--data", data, "--method", "ft", "--prune", "mink", "--keep", 0.7,
                     "--max-steps", 1, "--out", tmp_path / "r")
    kept = json.loads((run / "config.json").read_text())["kept_records"]
    assert kept == [0, 2, 3, 5, 7, 8, 9]                            # the most memorized (0.1, 0.2, 0.3) go


def test_mink_prune_with_real_scores_keeps_the_least_memorized(tmp_path, tiny_ckpt):
    import mink
    data = write_data(tmp_path / "d.jsonl", n=10)
    run = train_here("--model", tiny_ckpt, "--data", data, "--method", "ft", "--prune", "mink", "--keep", 0.8,
                     "--max-steps", 1, "--out", tmp_path / "r")
    kept = json.loads((run / "config.json").read_text())["kept_records"]
    scores = mink.score_examples(C.load_model(tiny_ckpt), load_tokenizer(tiny_ckpt), cli.read_records(data)[0])
    dropped = sorted(set(range(10)) - set(kept))
    assert len(kept) == 8 and max(scores[i] for i in dropped) < min(scores[i] for i in kept)


# ---------------------------------------------------------------------------------------------------------------
# Protocol flags: global batch size, warmup
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--batch-size", 3, "--global-batch-size", 4], "--global-batch-size 4 is not a multiple of --batch-size 3"),
    (["--batch-size", 2, "--global-batch-size", 8, "--grad-accum", 3], "means --grad-accum 4, but --grad-accum 3"),
    (["--global-batch-size", 0], "--global-batch-size must be >= 1"),
    (["--kl-normalizer", "padded", "--kl-pad-to", 512], "--kl-pad-to 512 is shorter than --max-len 2048"),
])
def test_protocol_flag_errors_are_one_line(tmp_path, tiny_ckpt, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        T.main(["--model", str(tiny_ckpt), "--out", str(tmp_path / "r"), *map(str, extra)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_warmup_schedules(tmp_path, tiny_ckpt):
    ours, hf = T.cosine_with_warmup(10, 0.3), T.cosine_with_warmup(10, 0.3, hf=True)    # w = ceil(3.0) = 3
    assert [ours(s) for s in range(3)] == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    assert [hf(s) for s in range(3)] == pytest.approx([0, 1 / 3, 2 / 3])                  # HF: the first step at lr 0
    for s in range(3, 11):
        assert ours(s) == hf(s) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 3) / 7)))
    assert T.cosine_with_warmup(30, 0.03)(0) == 0.5 and T.cosine_with_warmup(30, 0.03, hf=True)(0) == 0
    data = write_data(tmp_path / "d.jsonl", n=4)
    for hf in (False, True):                                        # the flag reaches the run: HF's step 1 is at lr 0
        run = train_here("--model", tiny_ckpt, "--data", data, "--method", "ft", "--max-steps", 1,
                         "--out", tmp_path / str(hf), *(["--hf-warmup"] if hf else []))
        moved = any(v.abs().sum() > 0 for k, v in load_file(str(run / "adapter_model.safetensors")).items()
                    if "lora_B" in k)
        assert moved != hf


# ---------------------------------------------------------------------------------------------------------------
# Diagnostics (ib_share, rate, sink_share, held-out NLL) and the attention sink
# ---------------------------------------------------------------------------------------------------------------

def test_rate_does_not_depend_on_the_kl_flags(tmp_path, tiny_ckpt):
    """The same first step under every KL reduction and normalizer: the loss's KL term differs, the rate does not."""
    data = write_data(tmp_path / "d.jsonl", n=4)
    common = ["--model", tiny_ckpt, "--data", data, "--method", "ibft", "--layer", 2, "--max-steps", 1,
              "--bottleneck-dim", 8, "--max-len", 256]
    firsts = {}
    for red, norm in (("mean", "real"), ("sum", "real"), ("mean", "padded"), ("sum", "padded")):
        out = tmp_path / f"{red}_{norm}"
        train_here(*common, "--kl-reduction", red, "--kl-normalizer", norm, "--kl-pad-to", 256, "--out", out)
        firsts[(red, norm)] = read_metrics(out)[0]
    rates = [r["rate"] for r in firsts.values()]
    assert max(rates) == pytest.approx(min(rates), rel=1e-9) and rates[0] > 0
    assert len({round(r["kl"], 9) for r in firsts.values()}) == 4
    assert firsts[("sum", "real")]["kl"] == pytest.approx(firsts[("mean", "real")]["kl"] * 8)
    assert firsts[("sum", "real")]["rate"] == pytest.approx(firsts[("sum", "real")]["kl"])  # sum/real: the same


def test_diagnostics_and_eval_leave_training_bit_identical(tmp_path, tiny_ckpt):
    """ib_share's extra backward pass and the held-out evaluations (dropout off, then on again) change nothing of
    the run; the records carry the diagnostics at the steps asked for."""
    data, held = write_data(tmp_path / "d.jsonl", n=8), write_data(tmp_path / "h.jsonl", n=3)
    common = ["--model", tiny_ckpt, "--data", data, "--method", "ibft", "--layer", 2, "--max-steps", 5,
              "--lr", 1e-3, "--epochs", 5]
    plain = train_here(*common, "--diag-every", 0, "--out", tmp_path / "plain")
    diag = train_here(*common, "--diag-every", 2, "--eval-data", held, "--eval-every", 2, "--out", tmp_path / "diag")
    for name in ("adapter_model.safetensors", "vib.safetensors"):
        a, b = load_file(str(plain / name)), load_file(str(diag / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    m_plain, m_diag = read_metrics(plain), read_metrics(diag)
    assert [r["loss"] for r in m_plain] == [r["loss"] for r in m_diag]
    assert [r["step"] for r in m_diag if "ib_share" in r] == [1, 2, 4]
    assert [r["step"] for r in m_diag if "eval_nll" in r] == [2, 4, 5]
    assert all("rate" in r and "sink_share" in r for r in m_plain) and not any("ib_share" in r for r in m_plain)


def test_eval_nll_is_mink_py_score_on_the_same_data(tmp_path, tiny_ckpt):
    """The held-out NLL logged at the end = the token-weighted mean of `mink.py score --k 100` (Min-100% Prob is an
    example's mean NLL) on the saved adapter, for FT too."""
    import mink
    data, held = write_data(tmp_path / "d.jsonl", n=8), write_data(tmp_path / "h.jsonl", n=5)
    run = train_here("--model", tiny_ckpt, "--data", data, "--method", "ft", "--max-steps", 3, "--lr", 1e-2,
                     "--eval-data", held, "--out", tmp_path / "ft")
    got = read_metrics(run)[-1]["eval_nll"]
    assert mink.main(["score", "--model", str(tiny_ckpt), "--adapter", str(run), "--data", str(held), "--k", "100",
                      "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    pooled = sum(r["score"] * r["n_tokens"] for r in rows) / sum(r["n_tokens"] for r in rows)
    assert got == pytest.approx(pooled, rel=1e-5)
    assert read_metrics(run)[0].get("eval_nll") is None                       # only at the end without --eval-every


def test_ib_setting_defaults_and_the_papers_one_flag_away():
    """The defaults come from IBConfig (the sweep's choice); --paper-ib gives the paper's raw input, sink kept and
    alpha 0.1; an explicit flag still wins over either."""
    args = T.parse_args([])
    assert (args.ib_input, args.ib_sink, args.alpha) == ("norm" if IBConfig.input_norm else "raw",
                                                         "exclude" if IBConfig.exclude_sink else "keep", IBConfig.alpha)
    paper = T.parse_args(["--paper-ib"])
    assert (paper.ib_input, paper.ib_sink, paper.alpha) == ("raw", "keep", 0.1)
    mixed = T.parse_args(["--paper-ib", "--alpha", "0.3", "--ib-sink", "exclude"])
    assert (mixed.ib_input, mixed.ib_sink, mixed.alpha) == ("raw", "exclude", 0.3)
