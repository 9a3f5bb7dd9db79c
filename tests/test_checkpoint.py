"""checkpoint.py: loading checkpoint folders (sharded, dtypes, tied, rope layout) and refusing bad ones by name."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint as C
from conftest import make_checkpoint


def test_sharded_checkpoint_and_dtypes(tmp_path, tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    out = tmp_path / "sharded"
    shutil.copytree(tiny_ckpt, out)
    (out / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(out / fname))
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = torch.randint(3, 300, (1, 8))
    torch.testing.assert_close(C.load_model(out)(ids), C.load_model(tiny_ckpt)(ids), rtol=0, atol=0)
    bf = C.load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert bf.lm_head.weight.dtype == torch.bfloat16
    assert torch.isfinite(bf(ids).float()).all()
    # a missing shard is named
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(C.CheckpointError, match="model-00002-of-00002.safetensors"):
        C.load_model(out)


def test_tied_embeddings_share_storage(tmp_path):
    p = make_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    m = C.load_model(p)
    assert m.lm_head.weight is m.model.embed_tokens.weight


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("hidden_size"), "missing key 'hidden_size'"),
    (lambda c: c.update(model_type="gemma"), "model_type 'gemma' is not supported"),
    (lambda c: c.update(model_type="qwen2_moe"), "model_type 'qwen2_moe'"),
    (lambda c: c.update(sliding_window=4096), "sliding_window=4096 is not implemented for model_type 'llama'"),
    (lambda c: c.update(model_type="qwen2", sliding_window=8, use_sliding_window=True), "use_sliding_window=true"),
    (lambda c: c.update(model_type="mistral", sliding_window=0), "sliding_window=0"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c.update(model_type="qwen3", attention_bias=True), "attention_bias"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
])
def test_bad_config_is_refused(tiny_ckpt, change, match):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    change(cfg)
    (tiny_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(C.CheckpointError, match=match) as e:
        C.load_model(tiny_ckpt)
    assert "config.json" in str(e.value)


def test_shape_mismatch_names_file_and_tensor(tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tiny_ckpt / "model.safetensors"))
    with pytest.raises(C.CheckpointError, match=r"model.safetensors.*up_proj.weight.*shape"):
        C.load_model(tiny_ckpt)


def test_missing_tensor_is_named(tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(tiny_ckpt / "model.safetensors"))
    with pytest.raises(C.CheckpointError, match="model.norm.weight"):
        C.load_model(tiny_ckpt)


def test_rope_parameters_layout_equals_legacy(tmp_path):
    legacy = make_checkpoint(tmp_path / "legacy", rope_theta=5e5,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    new = make_checkpoint(tmp_path / "new")
    cfg = json.loads((new / "config.json").read_text())
    for k in ("rope_theta", "rope_scaling"):
        cfg.pop(k)
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    (new / "config.json").write_text(json.dumps(cfg))
    a, b = C.load_model(legacy), C.load_model(new)
    assert a.config.rope_scaling == b.config.rope_scaling and a.config.rope_theta == b.config.rope_theta == 5e5
    ids = torch.randint(3, 300, (1, 40))
    torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)
