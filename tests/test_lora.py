"""lora.py: LoRALinear math, injection, merge/unmerge; peft_io.py: PEFT-format save/load and the merge CLI.

Everything runs on the tiny random checkpoints of conftest.make_checkpoint. Cross-checks against peft and
transformers run only where those are installed (pytest.importorskip); CI does not install them.
"""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint import load_model
from cli import CheckpointError
from conftest import REPO, make_checkpoint
from lora import DEFAULT_TARGETS, LoRALinear, inject_lora, lora_layers, lora_state_dict, merge, unmerge
from peft_io import load_adapter, main, save_adapter

TOKENS = torch.tensor([[5, 17, 200, 31, 99, 4, 250, 7, 64, 3], [1, 80, 81, 82, 300, 12, 13, 14, 2, 2]])
MASK = torch.tensor([[1] * 10, [1] * 8 + [0] * 2])


def logits(model):
    with torch.no_grad():
        return model(TOKENS, attention_mask=MASK)


def hf_logits(hf_model):
    """transformers' logits at the real (non-padding) positions, (N, V); padding rows are not comparable."""
    with torch.no_grad():
        return hf_model(input_ids=TOKENS, attention_mask=MASK).logits[MASK.bool()]


@torch.no_grad()
def randomize_B(model, seed=1, std=0.05):
    """B = 0 makes the adapter a no-op; give it values so that the checks below mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in lora_layers(model).values():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def adapted(path, seed=0, dtype=None, **kw):
    model = load_model(path, dtype=dtype, device="cpu")
    inject_lora(model, generator=torch.Generator().manual_seed(seed), **kw)
    randomize_B(model, seed + 1)
    return model


# --- LoRALinear and injection --------------------------------------------------------------------------------

def test_layer_math_and_init():
    base = torch.nn.Linear(48, 24, bias=True)
    lin = LoRALinear(base, r=8, alpha=16, dropout=0.0, generator=torch.Generator().manual_seed(0))
    assert lin.weight is base.weight and lin.bias is base.bias and not lin.weight.requires_grad
    assert lin.lora_A.shape == (8, 48) and lin.lora_B.shape == (24, 8) and torch.all(lin.lora_B == 0)
    assert lin.lora_A.abs().max() <= 1 / math.sqrt(48) and lin.lora_A.std() > 0.5 / math.sqrt(3 * 48)  # U(+-1/sqrt(in))
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(3, 5, 48)
    want = x @ base.weight.T + base.bias + 2.0 * (x @ lin.lora_A.T @ lin.lora_B.T)  # scaling = 16 / 8
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    assert LoRALinear(base, r=16, alpha=16, rslora=True).scaling == pytest.approx(4.0)  # alpha / sqrt(r)


def test_inject_targets_freezes_and_seeds(tiny_ckpt):
    model = load_model(tiny_ckpt, device="cpu")
    before = logits(model)
    names = inject_lora(model, generator=torch.Generator().manual_seed(3))
    assert len(names) == 4 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
    assert {n.rsplit(".", 1)[1] for n in names} == set(DEFAULT_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # checkpoint keys unchanged
    assert torch.equal(logits(model), before)  # B = 0: exactly the base model right after injection
    m = model.model.layers[0].self_attn.q_proj
    assert (m.r, m.scaling, m.lora_dropout.p) == (32, 1.0, 0.05)  # Appendix C.1 defaults
    other = load_model(tiny_ckpt, device="cpu")
    inject_lora(other, generator=torch.Generator().manual_seed(3))
    third = load_model(tiny_ckpt, device="cpu")
    inject_lora(third, generator=torch.Generator().manual_seed(4))
    a = lambda mdl: mdl.model.layers[2].mlp.down_proj.lora_A
    assert torch.equal(a(model), a(other)) and not torch.equal(a(model), a(third))


def test_layers_subset_and_errors(tiny_ckpt):
    model = load_model(tiny_ckpt, device="cpu")
    names = inject_lora(model, targets=("q_proj", "v_proj"), layers=[1, 3])
    assert names == [f"model.layers.{i}.self_attn.{t}" for i in (1, 3) for t in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model)
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        inject_lora(load_model(tiny_ckpt, device="cpu"), targets=("qkv",))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        inject_lora(load_model(tiny_ckpt, device="cpu"), targets=("mlp",))
    tied = load_model(make_checkpoint(tiny_ckpt.parent / "tied", tie_word_embeddings=True), device="cpu")
    with pytest.raises(ValueError, match="lm_head shares its weight"):
        inject_lora(tied, targets=("lm_head",))


def test_gradients_dropout_and_mixed_precision(tiny_ckpt):
    model = adapted(tiny_ckpt).train()
    torch.manual_seed(0)
    a, b = model(TOKENS), model(TOKENS)
    assert not torch.equal(a, b)  # dropout 0.05 on the adapter input is active in training
    a.float().logsumexp(-1).mean().backward()
    for m in lora_layers(model).values():
        assert m.lora_A.grad is not None and m.lora_B.grad is not None and m.weight.grad is None
    # A bf16 model with fp32 LoRA master weights, without autocast: the adapter runs in bf16, grads come back fp32.
    bf = adapted(tiny_ckpt, dtype=torch.bfloat16).train()
    out = bf(TOKENS)
    assert out.dtype == torch.bfloat16
    out.float().mean().backward()
    q = bf.model.layers[0].self_attn.q_proj
    assert q.lora_A.dtype == torch.float32 and q.lora_B.grad.dtype == torch.float32
    # fp32 model under CPU autocast: runs in bf16 and stays close to fp32.
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model)
    assert auto.dtype == torch.bfloat16
    torch.testing.assert_close(auto.float(), logits(model), atol=0.1, rtol=0.05)


# --- merge / unmerge ---------------------------------------------------------------------------------------------

def test_merge_unmerge_fp32(tiny_ckpt):
    model = adapted(tiny_ckpt)
    base = load_model(tiny_ckpt, device="cpu")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    params = {n: p for n, p in model.named_parameters()}
    unmerged = logits(model)
    assert (unmerged - logits(base)).abs().max() > 1e-2  # the adapter does change the model
    merge(model)
    assert all(m.merged for m in lora_layers(model).values())
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, weights["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    assert all(p is params[n] for n, p in model.named_parameters())  # merged in place: same Parameter objects
    unmerge(model)
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, weights[n]), n  # bit-identical base weights
    assert torch.equal(logits(model), unmerged)
    merge(model, keep_base=False)
    with pytest.raises(RuntimeError, match="keep_base=False"):
        unmerge(model)


def test_bf16_merge_does_fp32_arithmetic(tiny_ckpt):
    model = adapted(tiny_ckpt, dtype=torch.bfloat16, alpha=64)
    orig = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    merge(model)
    for n, m in lora_layers(model).items():
        A, B = m.lora_A.float(), m.lora_B.float()
        want = (orig[n].float() + 2.0 * (B @ A)).to(torch.bfloat16)  # scaling = 64 / 32
        assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, want), n
    unmerge(model)
    assert all(torch.equal(m.weight, orig[n]) for n, m in lora_layers(model).items())


# --- PEFT format -------------------------------------------------------------------------------------------------

def test_adapter_round_trip(tiny_ckpt, tmp_path):
    model = adapted(tiny_ckpt, alpha=64, rslora=True, targets=("q_proj", "down_proj"), layers=[0, 2])
    out = save_adapter(model, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (32, 64, 0.05, True)
    assert cfg["target_modules"] == ["q_proj", "down_proj"] and cfg["layers_to_transform"] == [0, 2]
    assert cfg["base_model_name_or_path"] == str(tiny_ckpt)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 2
    assert keys == set(lora_state_dict(model))
    loaded = load_adapter(load_model(tiny_ckpt, device="cpu"), out)
    assert sorted(lora_layers(loaded)) == sorted(lora_layers(model))
    assert torch.equal(logits(loaded), logits(model))
    rng = torch.get_rng_state()
    load_adapter(load_model(tiny_ckpt, device="cpu"), out)
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws nothing from the global RNG


def test_default_named_keys_load(tiny_ckpt, tmp_path):
    model = adapted(tiny_ckpt)
    out = save_adapter(model, tmp_path / "run")
    sd = load_file(str(out / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in sd.items()}, str(out / "adapter_model.safetensors"))
    assert torch.equal(logits(load_adapter(load_model(tiny_ckpt, device="cpu"), out)), logits(model))


def test_load_errors(tiny_ckpt, tmp_path):
    fresh = lambda: load_model(tiny_ckpt, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter(fresh(), tmp_path / "nope")
    out = save_adapter(adapted(tiny_ckpt), tmp_path / "run")
    wfile, cfile = out / "adapter_model.safetensors", out / "adapter_config.json"
    cfg, sd = json.loads(cfile.read_text()), load_file(str(wfile))

    def write(config=cfg, state=sd):
        cfile.write_text(json.dumps(config))
        save_file(state, str(wfile))

    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    write(state={k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: missing key {key}"):
        load_adapter(fresh(), out)
    write(state={**sd, "base_model.model.lm_head.lora_A.weight": torch.zeros(32, 64)})
    with pytest.raises(ValueError, match="unexpected key base_model.model.lm_head.lora_A.weight"):
        load_adapter(fresh(), out)
    write(state={**sd, key: torch.zeros(128, 16)})
    with pytest.raises(ValueError, match=rf"{key} has shape \(128, 16\), the model needs \(128, 32\)"):
        load_adapter(fresh(), out)
    for bad, msg in [({"bias": "all"}, "bias='all'"), ({"use_dora": True}, "use_dora=True"),
                     ({"peft_type": "IA3"}, "peft_type 'IA3'"), ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                     ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"), ({"r": 0}, "r must be")]:
        write(config={**cfg, **bad})
        with pytest.raises(ValueError, match=f"adapter_config.json: {msg}"):
            load_adapter(fresh(), out)
    model = fresh()
    write(state={**sd, key: torch.zeros(128, 16)})
    with pytest.raises(ValueError):
        load_adapter(model, out)
    assert not lora_layers(model)  # a rejected adapter leaves the model untouched
    cfile.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        load_adapter(fresh(), out)
    wfile.unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: missing"):
        load_adapter(fresh(), out)


FAMILY_CHECKPOINTS = {           # model_type -> make_checkpoint overrides of a tiny checkpoint of that family
    "llama": {},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 32},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 6},
}


@pytest.mark.parametrize("family", sorted(FAMILY_CHECKPOINTS))
def test_our_adapter_loads_in_peft(family, tmp_path):
    """Every family: our PEFT files load in peft and give our logits (biases stay frozen and are not saved)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ckpt = make_checkpoint(tmp_path / "base", **FAMILY_CHECKPOINTS[family])
    model = adapted(ckpt, alpha=64, rslora=True, layers=[1, 2])
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))
    out = save_adapter(model, tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    theirs, real = hf_logits(pm), MASK.bool()
    assert (theirs - logits(load_model(ckpt, device="cpu"))[real]).abs().max() > 1e-2  # the adapter took effect
    torch.testing.assert_close(theirs, logits(model)[real], rtol=0, atol=1e-5)


def test_peft_adapter_loads_here(tiny_ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "up_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")  # False: random B, a visible adapter
    pm = peft.get_peft_model(hf, config).eval()
    pm.save_pretrained(tmp_path / "peft")
    theirs = hf_logits(pm)
    ours = load_adapter(load_model(tiny_ckpt, device="cpu"), tmp_path / "peft")
    assert len(lora_layers(ours)) == 4 * 3 and ours.model.layers[0].self_attn.q_proj.scaling == 2.0
    torch.testing.assert_close(logits(ours)[MASK.bool()], theirs, rtol=0, atol=1e-5)


# --- merge CLI ---------------------------------------------------------------------------------------------------

def merge_with_cli(tmp_path, **ckpt_overrides):
    """python peft_io.py merge (in-process) on a fresh tiny checkpoint; returns (adapted model, base, merged folder)."""
    ckpt = make_checkpoint(tmp_path / "base", **ckpt_overrides)
    model = adapted(ckpt)
    save_adapter(model, tmp_path / "run")
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(ckpt), "--adapter", str(tmp_path / "run"), "--out", str(out)]) == 0
    return model, ckpt, out


MERGE_CASES = {"untied": {}, "tied": {"tie_word_embeddings": True}, **{f: FAMILY_CHECKPOINTS[f]
                                                                      for f in ("qwen2", "qwen3", "mistral")}}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_cli(tmp_path, case):
    """Merged checkpoints keep the base layout (Qwen2's biases, Qwen3's q/k norms, a tied head stored once)."""
    model, ckpt, out = merge_with_cli(tmp_path, **MERGE_CASES[case])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "config.json").read_text() == (ckpt / "config.json").read_text()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())  # the base checkpoint's layout: no LoRA tensors, tied lm_head stored once
    merged = load_model(out, device="cpu")
    assert not lora_layers(merged)
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_merge_cli_output_loads_in_transformers(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    model, _, out = merge_with_cli(tmp_path, **MERGE_CASES[case])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(hf_logits(hf), logits(model)[MASK.bool()], rtol=0, atol=1e-5)


def test_merge_cli_keeps_checkpoint_dtype(tmp_path):
    model, ckpt, out = merge_with_cli(tmp_path, torch_dtype="bfloat16")  # --dtype auto: config.json's dtype
    base = load_file(str(ckpt / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    q = model.model.layers[3].self_attn.q_proj
    want = (base["model.layers.3.self_attn.q_proj.weight"].to(torch.bfloat16).float() + q.delta_weight())
    assert torch.equal(merged["model.layers.3.self_attn.q_proj.weight"], want.to(torch.bfloat16))
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"].to(torch.bfloat16))
    out32 = tmp_path / "merged32"
    assert main(["merge", "--model", str(ckpt), "--adapter", str(tmp_path / "run"), "--out", str(out32),
                 "--dtype", "float32"]) == 0
    assert json.loads((out32 / "config.json").read_text())["torch_dtype"] == "float32"
    assert load_file(str(out32 / "model.safetensors"))["model.norm.weight"].dtype == torch.float32


def test_merge_cli_errors(tiny_ckpt, tmp_path, capsys):
    run = save_adapter(adapted(tiny_ckpt), tmp_path / "run")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", "--model", str(tiny_ckpt), "--adapter", str(run), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # A bad adapter through the real entry point: one line on stderr, exit 2, no output folder, no temp folder.
    (run / "adapter_config.json").write_text(json.dumps({**json.loads((run / "adapter_config.json").read_text()),
                                                         "use_dora": True}))
    proc = subprocess.run([sys.executable, str(REPO / "peft_io.py"), "merge", "--model", str(tiny_ckpt),
                           "--adapter", str(run), "--out", str(tmp_path / "m2")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "use_dora=True is not supported" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run", "tiny"]


@pytest.mark.slow
def test_merge_cli_default_model(tmp_path):
    """The README's path on the real default model (SmolLM2-135M-Instruct, tied embeddings): no --model given."""
    from default_model import default_model_path
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    model = load_model(default_model_path(), device="cpu")
    with torch.no_grad():
        before = model(ids)
    inject_lora(model, alpha=64, generator=torch.Generator().manual_seed(0))
    randomize_B(model, std=0.02)
    save_adapter(model, tmp_path / "run")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(default_model_path())
    with torch.no_grad():
        want, got = model(ids), load_model(out, device="cpu")(ids)
    assert (want - before).abs().max() > 1e-2  # the adapter took effect
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-4)  # 30 fp32 layers, |logits| up to ~35
