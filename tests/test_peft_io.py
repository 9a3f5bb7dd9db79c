"""peft_io.py: PEFT-format adapter save/load (round trip, peft interop where installed, errors) and merge CLI."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint import load_model
from cli import CheckpointError
from conftest import REPO, make_checkpoint
from lora import inject_lora, lora_layers, lora_state_dict
from peft_io import load_adapter, main, save_adapter
from test_lora import MASK, TOKENS, adapted, logits, randomize_B


def hf_logits(hf_model):
    """transformers' logits at the real (non-padding) positions, (N, V); padding rows are not comparable."""
    with torch.no_grad():
        return hf_model(input_ids=TOKENS, attention_mask=MASK).logits[MASK.bool()]


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
