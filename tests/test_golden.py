"""model.py against golden logits and hidden states recorded from Hugging Face transformers 5.24.

The fixtures under tests/fixtures/golden/ (tiny random Llama checkpoints + golden.safetensors) were written once by
scripts/make_goldens.py; its docstring records how each case was produced and the RoPE semantics they pin down.
This test needs only torch and safetensors.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint import load_model

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
EXPECTED = ["gqa_theta5e5", "head_dim", "mistral_window", "qwen2", "qwen3", "rope_dynamic", "rope_linear", "rope_llama3",
            "tied"]
FAMILIES = ["mistral_window", "qwen2", "qwen3"]       # cases with a greedy continuation from transformers' generate
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.safetensors").is_file()) if GOLDEN.is_dir() else []
LEGACY = [c for c in CASES if (GOLDEN / c / "config_legacy.json").is_file()]
ATOL = 1e-4


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_abs(actual, expected)
    assert err <= atol, f"{what}: max |diff| {err:.3g} > {atol:g}"


def folder_for(case: str, layout: str, tmp_path: Path) -> Path:
    """The fixture folder, or (legacy layout) a copy whose config.json is config_legacy.json."""
    src = GOLDEN / case
    if layout == "rope_parameters":
        return src
    dst = tmp_path / case
    dst.mkdir()
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    shutil.copy(src / "config_legacy.json", dst / "config.json")
    return dst


@pytest.fixture(scope="module")
def goldens():
    return {c: load_file(str(GOLDEN / c / "golden.safetensors")) for c in CASES}


def test_fixtures_present():
    assert CASES == EXPECTED, f"golden fixtures in {GOLDEN}: {CASES}; rerun scripts/make_goldens.py"
    assert {"gqa_theta5e5", "rope_linear"} <= set(LEGACY)


@pytest.mark.parametrize("case,layout", [(c, "rope_parameters") for c in CASES] + [(c, "legacy") for c in LEGACY])
@torch.no_grad()
def test_logits_and_hidden_states(case, layout, goldens, tmp_path):
    g = goldens[case]
    ids, mask = g["input_ids"], g["attention_mask"]
    real = mask.bool()                                       # (B, T): compare only non-padding positions
    model = load_model(folder_for(case, layout, tmp_path), dtype=torch.float32)
    n_layers = json.loads((GOLDEN / case / "config.json").read_text())["num_hidden_layers"]
    assert model.num_layers == n_layers
    for layer in range(n_layers + 1):
        logits, hidden = model(ids, attention_mask=mask, hidden_layer=layer)
        check(logits[real], g["logits"][real], f"{case}/{layout}: logits (hidden_layer={layer})")
        check(hidden[real], g[f"hidden_states_{layer}"][real], f"{case}/{layout}: hidden_states[{layer}]")
    logits = model(ids, attention_mask=mask)
    check(logits[real], g["logits"][real], f"{case}/{layout}: logits")


@pytest.mark.parametrize("case", LEGACY)
@torch.no_grad()
def test_legacy_layout_gives_identical_logits(case, goldens, tmp_path):
    """config.json with rope_parameters (transformers 5) and with rope_theta + rope_scaling (4.x) load the same model."""
    g = goldens[case]
    new = load_model(GOLDEN / case, dtype=torch.float32)(g["input_ids"], attention_mask=g["attention_mask"])
    old = load_model(folder_for(case, "legacy", tmp_path), dtype=torch.float32)(
        g["input_ids"], attention_mask=g["attention_mask"])
    real = g["attention_mask"].bool()
    assert torch.equal(new[real], old[real]), f"{case}: layouts differ by {max_abs(new[real], old[real]):.3g}"


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_logits_at_selects_rows(case, goldens):
    g = goldens[case]
    ids, mask = g["input_ids"], g["attention_mask"]
    sel = mask.bool() & (torch.arange(ids.shape[1]) % 3 == 1)   # a scattered subset of real positions
    sel[:, -1] = True                                           # plus each row's last token
    model = load_model(GOLDEN / case, dtype=torch.float32)
    out = model(ids, attention_mask=mask, logits_at=sel)        # (N, V)
    full = model(ids, attention_mask=mask)                      # (B, T, V)
    check(out, full[sel], f"{case}: logits_at vs full logits", atol=1e-5)
    check(out, g["logits"][sel], f"{case}: logits_at vs golden")


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_no_mask_matches_unpadded_row(case, goldens):
    """Row 0 of the goldens has no padding, so attention_mask=None must reproduce it."""
    g = goldens[case]
    assert bool(g["attention_mask"][0].all())
    model = load_model(GOLDEN / case, dtype=torch.float32)
    check(model(g["input_ids"][:1])[0], g["logits"][0], f"{case}: logits without attention_mask")


@pytest.mark.parametrize("case", CASES)
def test_config_and_module_tree(case):
    cfg = json.loads((GOLDEN / case / "config.json").read_text())
    model = load_model(GOLDEN / case, dtype=torch.float32)
    c = model.config
    got = (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
           c.intermediate_size, c.max_position_embeddings, c.tie_word_embeddings)
    want = (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            cfg["intermediate_size"], cfg["max_position_embeddings"],
            cfg["tie_word_embeddings"])
    assert got == want
    assert c.rope_theta == cfg["rope_parameters"]["rope_theta"]
    assert model.hidden_size == cfg["hidden_size"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == cfg["tie_word_embeddings"]
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (cfg["num_attention_heads"] * c.head_dim,
                                                                   cfg["hidden_size"])


@pytest.mark.parametrize("case", FAMILIES)
@torch.no_grad()
def test_greedy_tokens_equal_transformers(case, goldens):
    """The sampler (prefill + KV-cache decode, generate.py) continues row 0 greedily as transformers' generate does;
    for mistral_window the 24 + 8 positions run well past the window of 8, in the prefill and in the cache."""
    from generate import generate
    g = goldens[case]
    assert "greedy" in g, f"{case}: no greedy tokens; rerun scripts/make_goldens.py"
    model = load_model(GOLDEN / case, dtype=torch.float32)
    out = generate(model, [g["input_ids"][0].tolist()], max_new_tokens=len(g["greedy"]), eos_ids=())
    assert out[0] == g["greedy"].tolist()


def test_family_switches_matter(goldens, tmp_path):
    """The goldens can tell the switches apart: Mistral without its window, Qwen2 without its biases and Qwen3
    without its q/k norms give other logits; a Qwen2 sliding_window with use_sliding_window=false is ignored."""
    def logits_with(case, edit=None, drop=()):
        folder = tmp_path / f"{case}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(GOLDEN / case, folder)
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **(edit or {})}))
        model = load_model(folder, dtype=torch.float32)
        for name in drop:                                   # zero a family's own tensors
            for n, p in model.named_parameters():
                if n.endswith(name):
                    p.data.fill_(1.0 if "norm" in name else 0.0)
        g = goldens[case]
        return max_abs(model(g["input_ids"], attention_mask=g["attention_mask"])[g["attention_mask"].bool()],
                       g["logits"][g["attention_mask"].bool()])
    assert logits_with("mistral_window") <= ATOL
    assert logits_with("mistral_window", {"sliding_window": None}) > 100 * ATOL
    assert logits_with("qwen2", {"sliding_window": 4, "use_sliding_window": False}) <= ATOL
    assert logits_with("qwen2", drop=("q_proj.bias", "k_proj.bias", "v_proj.bias")) > 100 * ATOL
    assert logits_with("qwen3", drop=("q_norm.weight", "k_norm.weight")) > 100 * ATOL
