"""Write the golden-logits fixtures under tests/fixtures/golden/ (run once; needs transformers, see bench/requirements.txt).

Each case is a tiny random checkpoint (Llama; the family cases Qwen2, Qwen3, Mistral) built and run by Hugging Face
transformers (5.24.0), saved as a folder:
  config.json, generation_config.json, model.safetensors   what `save_pretrained(safe_serialization=True)` writes
  config_legacy.json (gqa_theta5e5, rope_linear, rope_llama3, rope_dynamic)  the same config in the pre-5.0 layout
  golden.safetensors                input_ids (2, 24) int64, attention_mask (2, 24) int64 (row 1 left-padded by 5),
                                    logits (2, 24, V) fp32, hidden_states_0 .. hidden_states_{L} (2, 24, H) fp32;
                                    family cases also greedy (8,) int64: generate()'s greedy continuation of row 0
tests/test_golden.py checks model.py against these with torch + safetensors only.

Config layouts. transformers 5 writes RoPE settings as one dict,
  "rope_parameters": {"rope_type": ..., "rope_theta": ..., <scaling keys>}      (no "rope_theta"/"rope_scaling" keys)
and names the weight dtype "dtype". Checkpoints written by transformers 4.x instead hold top-level
  "rope_theta": float, "rope_scaling": null | {"type" or "rope_type": ..., <scaling keys>}, "torch_dtype": ...
config_legacy.json is config.json rewritten that way (old-style "type" for linear/dynamic as in 2023-era configs,
"rope_type" for llama3 as in the Llama-3.1 configs); transformers itself is checked here to give bit-identical logits
from either layout.

Hidden states. The golden `hidden_states_l` is the raw output of decoder block l (1-indexed; 0 = token embeddings),
the model.py contract. transformers' `output_hidden_states=True` tuple agrees for l < L, but its LAST entry
(l = L) is `model.norm(...)` of block L's output (`capture_outputs(tie_last_hidden_states=True)` overwrites it with
`last_hidden_state`). So hidden_states_L is taken with a forward hook on the last decoder layer instead; the script
asserts that HF's last entry equals `model.norm(hidden_states_L)`.

Positions. Goldens are computed without position_ids, so transformers uses positions 0..T-1 for every row, including the
left-padded one. RoPE attention depends only on position differences, so a model that instead numbers each row's real
tokens from 0 (cumsum of the mask) gives the same logits at non-padding positions up to float rounding (~1e-6).

RoPE semantics in transformers 5.24 (modeling_rope_utils.py; d = head_dim, i = 0 .. d/2-1, all in float32):
  default:  inv_freq_i = 1 / theta^(2i/d)
  linear:   inv_freq_i / factor
  llama3:   wavelen_i = 2*pi / inv_freq_i, with lo = original_max_position_embeddings / low_freq_factor and
            hi = original_max_position_embeddings / high_freq_factor:
            wavelen < hi -> unchanged; wavelen > lo -> inv_freq / factor; otherwise (hi <= wavelen <= lo) with
            s = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor):
            (1 - s) * inv_freq / factor + s * inv_freq.   attention scaling 1.
  dynamic (NTK): with mpe = config max_position_embeddings and seq_len = max(position_ids) + 1, a single scalar over the
            whole batch (= T for a plain forward without cache):
            base = theta * (factor * max(seq_len, mpe) / mpe - (factor - 1)) ** (d / (d - 2)),
            inv_freq_i = 1 / base^(2i/d); so seq_len <= mpe gives plain RoPE. The module is STATEFUL in transformers:
            at init inv_freq is plain; a forward with seq_len > the cached length recomputes inv_freq for that seq_len
            and caches it; a later forward with mpe <= seq_len < cached length keeps the longer-length frequencies,
            and one with seq_len < mpe resets to plain. During cached decoding, keys already in the cache keep the
            rotation they got when written. The goldens use a fresh model and one full forward (T = 24 > mpe = 16),
            i.e. the stateless rule above with seq_len = 24: base = theta * (2 * 24/16 - 1) ** (d / (d - 2)).
            Attention scaling 1.

Reproducible: a fixed seed per case, one thread, eager attention; rerunning rewrites every file bit-for-bit.
Usage: python scripts/make_goldens.py [--out tests/fixtures/golden]
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    sys.exit("scripts/make_goldens.py: needs transformers (pip install -r bench/requirements.txt)")

REPO = Path(__file__).resolve().parent.parent
B, T, N_PAD = 2, 24, 5           # batch, sequence length, left padding of row 1
STD = 0.1                        # weight std: big enough that logits and attention patterns are far from uniform

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

# name -> (seed, config overrides, write config_legacy.json?[, model_type]); model_type defaults to llama.
CASES = {
    "gqa_theta5e5": (1, dict(num_hidden_layers=3, vocab_size=192,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), True),
    "tied": (2, dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=48, vocab_size=160,
                     tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
             False),
    "rope_linear": (3, dict(rms_norm_eps=1e-6, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                "rope_theta": 1000000.0}), True),
    "rope_llama3": (4, dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                             "rope_theta": 500000.0}), True),
    "head_dim": (5, dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), False),
    "rope_dynamic": (6, dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                          "rope_theta": 10000.0}), True),
    # The other families (checkpoint.FAMILY_FLAGS). Qwen2: q/k/v biases, tied, theta 1e6, use_sliding_window=false
    # (transformers then saves sliding_window as null; tests/test_golden.py puts a window of 4 back to check that
    # model.py ignores it too).
    "qwen2": (7, dict(tie_word_embeddings=True, sliding_window=4, use_sliding_window=False, max_window_layers=1,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), False, "qwen2"),
    # Qwen3: per-head q/k RMSNorm and an explicit head_dim (num_heads * head_dim != hidden_size).
    "qwen3": (8, dict(head_dim=32, sliding_window=None, use_sliding_window=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), False, "qwen3"),
    # Mistral with a window (8) shorter than the inputs (24) and the greedy continuation (24 + 8).
    "mistral_window": (9, dict(sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                       False, "mistral"),
}
GREEDY = 8                       # new tokens of the greedy continuation recorded for the family cases (row 0)


def legacy_config(cfg: dict) -> dict:
    """config.json in the transformers 4.x layout: rope_theta + rope_scaling, torch_dtype."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype")}
    rp = dict(cfg["rope_parameters"])
    out["rope_theta"] = rp.pop("rope_theta")
    kind = rp.pop("rope_type")
    if kind == "default":
        out["rope_scaling"] = None
    elif kind in ("linear", "dynamic"):
        out["rope_scaling"] = {"type": kind, **rp}        # 2023-era key name
    else:
        out["rope_scaling"] = {"rope_type": kind, **rp}   # Llama-3.1 style
    out["torch_dtype"] = cfg["dtype"]
    return dict(sorted(out.items()))


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Seeded re-init in a fixed order: linear/embedding weights N(0, STD^2), RMSNorm weights 1 + N(0, STD^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):   # tied lm_head appears once (as embed_tokens)
            noise = torch.randn(p.shape, generator=g) * STD
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)


def inputs(seed: int, vocab: int):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, vocab, (B, T), generator=g, dtype=torch.int64)   # padded slots keep random ids on purpose
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[1, :N_PAD] = 0
    return ids, mask


@torch.no_grad()
def run(model, ids, mask):
    """logits (B, T, V) and the raw block outputs [h_0 .. h_L], h_L taken before the final norm."""
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out))
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    hook.remove()
    hs = list(out.hidden_states)
    L = model.config.num_hidden_layers
    assert len(hs) == L + 1
    # transformers' last entry is the final-normed state; ours is the raw block output.
    assert torch.equal(hs[L], model.model.norm(captured["last"])), "HF last hidden state is not norm(block L)"
    hs[L] = captured["last"]
    return out.logits, hs


def rope_report(name: str, model) -> str:
    """A line describing the frequencies the case exercises (and checks for llama3 that all three bands occur)."""
    rp, cfg = model.config.rope_parameters, model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    plain = 1.0 / (rp["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    if rp["rope_type"] == "llama3":
        omp = rp["original_max_position_embeddings"]
        wl = 2 * math.pi / plain
        lo, hi = omp / rp["low_freq_factor"], omp / rp["high_freq_factor"]
        n_keep, n_scale = int((wl < hi).sum()), int((wl > lo).sum())
        n_mid = len(wl) - n_keep - n_scale
        assert n_keep and n_scale and n_mid, f"{name}: llama3 bands not all exercised ({n_keep}/{n_mid}/{n_scale})"
        return (f"wavelengths {[round(float(w), 1) for w in wl]}, band [{hi}, {lo}]: "
                f"{n_keep} unscaled, {n_mid} interpolated, {n_scale} divided by {rp['factor']}")
    if rp["rope_type"] == "dynamic":
        mpe, f = cfg.max_position_embeddings, rp["factor"]
        base = rp["rope_theta"] * (f * max(T, mpe) / mpe - (f - 1)) ** (d / (d - 2))
        ours = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        emb = model.model.rotary_emb
        assert torch.allclose(emb.inv_freq, ours, rtol=1e-6), f"{name}: dynamic inv_freq differs from the docstring"
        return f"T={T} > mpe={mpe}: base {rp['rope_theta']:g} -> {base:.6g}"
    return f"rope {rp}"


def classes(model_type: str):
    """(config class, causal LM class) of a model_type in transformers."""
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[model_type]
    return getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForCausalLM")


def build(name: str, seed: int, overrides: dict, model_type: str = "llama"):
    config_cls, model_cls = classes(model_type)
    cfg = config_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.config._attn_implementation = "eager"
    reinit_(model, seed)
    return model


def sensitivity(model, ids, mask, logits) -> float:
    """Max |logits - logits with plain theta=1e4 RoPE|: the goldens must tell the RoPE variants apart."""
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config_cls, model_cls = classes(cfg["model_type"])
    other = model_cls(config_cls(**cfg)).eval()
    other.config._attn_implementation = "eager"
    other.load_state_dict(model.state_dict())
    alt, _ = run(other, ids, mask)
    return float((alt - logits)[mask.bool()].abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "golden"), help="fixture root folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    for name, (seed, overrides, legacy, *family) in CASES.items():
        model_type = family[0] if family else "llama"
        model = build(name, seed, overrides, model_type)
        ids, mask = inputs(seed, model.config.vocab_size)
        logits, hs = run(model, ids, mask)
        real = mask.bool()
        tensors = {"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()}
        tensors.update({f"hidden_states_{l}": h.contiguous() for l, h in enumerate(hs)})
        if family:
            tensors["greedy"] = greedy(model, ids[:1])
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))   # write everything, then swap in
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            save_file(tensors, str(tmp / "golden.safetensors"), metadata={"format": "pt"})
            cfg = json.loads((tmp / "config.json").read_text())
            assert "rope_parameters" in cfg and "rope_theta" not in cfg and "rope_scaling" not in cfg
            if legacy:
                (tmp / "config_legacy.json").write_text(json.dumps(legacy_config(cfg), indent=2) + "\n")
                check_layouts(tmp, ids, mask, logits)
            reload = classes(model_type)[1].from_pretrained(tmp, dtype=torch.float32).eval()
            reload.config._attn_implementation = "eager"
            assert torch.equal(run(reload, ids, mask)[0], logits), f"{name}: reloaded checkpoint differs"
            dest = root / name
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
            os.chmod(dest, 0o755)   # mkdtemp made it private
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        size = sum(f.stat().st_size for f in (root / name).iterdir())
        rp = model.config.rope_parameters
        plain = rp["rope_type"] == "default" and rp["rope_theta"] == 10000.0
        sens = "" if plain else f", max|d logits| vs plain theta=1e4 RoPE {sensitivity(model, ids, mask, logits):.3g}"
        print(f"{name}: {size / 1024:.0f} KiB, logits std {float(logits[real].std()):.3f}{sens}; "
              f"{rope_report(name, model)}")


@torch.no_grad()
def greedy(model, prompt) -> torch.Tensor:
    """(GREEDY,) int64: transformers' greedy continuation of prompt (1, T), with no EOS stop, through its KV cache."""
    gen = model.generation_config
    eos, gen.eos_token_id = gen.eos_token_id, None
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GREEDY, min_new_tokens=GREEDY,
                         do_sample=False, pad_token_id=0)
    gen.eos_token_id = eos
    assert out.shape[1] == prompt.shape[1] + GREEDY
    return out[0, prompt.shape[1]:].contiguous()


def check_layouts(folder: Path, ids, mask, logits) -> None:
    """transformers must read config_legacy.json to the same model: bit-identical logits."""
    with tempfile.TemporaryDirectory() as d:
        for f in ("model.safetensors", "generation_config.json"):
            shutil.copy(folder / f, Path(d) / f)
        shutil.copy(folder / "config_legacy.json", Path(d) / "config.json")
        m = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        m.config._attn_implementation = "eager"
        assert torch.equal(run(m, ids, mask)[0], logits), f"{folder.name}: legacy config layout gives other logits"


if __name__ == "__main__":
    main()
