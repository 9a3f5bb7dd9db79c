"""Reading a Hugging Face checkpoint folder into model.py's Transformer; writing tiny random ones for the tests.

model.py holds the decoder's math; this file holds what a checkpoint folder looks like on disk:

    config.json                  -> model_args: model.ModelArgs (family switches by model_type, both RoPE layouts);
                                    anything model.py does not compute is refused, naming the key
    generation_config.json       -> checkpoint_eos_ids: the EOS ids it adds to config.json's
    model.safetensors            -> load_model: tensor by tensor into a Transformer built on the meta device,
    (or *.index.json + shards)      so loading never holds a second copy of the model

random_weights and make_tiny_checkpoint write random checkpoints in the same layout (the tests' fixtures, the smoke
preset of reproduce.py), named and shaped by model.Transformer itself.

Public API: load_model, model_args, read_config, open_safetensors, checkpoint_eos_ids, random_weights,
make_tiny_checkpoint.

References:
  - transformers' `src/transformers/models/llama/configuration_llama.py` (config.json's fields) and
    `src/transformers/modeling_rope_utils.py` (the rope_scaling / rope_parameters layouts and their rope types).
  - The safetensors format and index (huggingface/safetensors; transformers' `model.safetensors.index.json` shards).
  - Meta's llama `llama/generation.py` (Llama.build): checkpoint loading kept apart from the model's math.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from cli import CheckpointError, write_json
from default_model import default_model_path
from model import SUPPORTED_ROPE_TYPES, ModelArgs, Transformer, default_device, default_dtype


# ----------------------------------------------------------------------------------------------------------------
# config.json -> ModelArgs
# ----------------------------------------------------------------------------------------------------------------

# What distinguishes each supported family (config.json's model_type) from the Llama layout, as ModelArgs switches.
FAMILY_FLAGS = {
    "llama": {},                        # Llama 2/3, CodeLlama, DeepSeek-Coder v1.5, SmolLM2
    "mistral": {},                      # the Llama layout; its sliding_window (a size or null) is read below
    "qwen2": {"qkv_bias": True},        # Qwen2, Qwen2.5, Qwen2.5-Coder: biases on q/k/v, none on o
    "qwen3": {"qk_norm": True},         # Qwen3: RMSNorm over head_dim on q and k, per head, before RoPE
}


def model_args(cfg: dict, where: str = "config.json") -> ModelArgs:
    """model.ModelArgs from an HF config dict (config.json); both the `rope_theta`+`rope_scaling` and transformers 5's
    `rope_parameters` layouts are read. Anything that would change the math and is not implemented is refused."""
    def need(key):
        if key not in cfg:
            raise CheckpointError(f"{where}: missing key '{key}'")
        return cfg[key]

    model_type = need("model_type")
    if model_type not in FAMILY_FLAGS:
        raise CheckpointError(f"{where}: model_type '{model_type}' is not supported (supported: "
                              f"{', '.join(FAMILY_FLAGS)})")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{where}: {key}=true is not implemented (Llama without biases only)")
    window = _sliding_window(cfg, model_type, where)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act '{act}' is not implemented (silu only)")
    if cfg.get("quantization_config"):
        raise CheckpointError(f"{where}: quantized checkpoints are not supported")

    # Two layouts: legacy (rope_theta + rope_scaling) and transformers 5 (rope_parameters holds both).
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{where}: rope type '{rope_type}' is not implemented "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type != "default" and "factor" not in scaling:
        raise CheckpointError(f"{where}: rope scaling '{rope_type}' needs a 'factor'")
    if scaling.get("attention_factor") not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: rope attention_factor != 1 is not implemented")

    n_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = cfg.get("head_dim") or hidden // n_heads
    n_kv = cfg.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise CheckpointError(f"{where}: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {n_kv}")
    return ModelArgs(
        vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=need("num_hidden_layers"),
        num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
        intermediate_size=need("intermediate_size"), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **scaling},
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), sliding_window=window,
        eos_token_ids=tuple(_ids(cfg.get("eos_token_id"))), **FAMILY_FLAGS[model_type],
    )


def _ids(value) -> list:
    """An id field of config.json / generation_config.json (an int, a list of ints or null) as a list."""
    return [value] if isinstance(value, int) else [v for v in value or () if isinstance(v, int)]


def _sliding_window(cfg: dict, model_type: str, where: str) -> Optional[int]:
    """The attention window of every layer, or None for full attention. Mistral: `sliding_window` (a size, or null).
    Qwen2/Qwen3 write a `sliding_window` size but use it only with `use_sliding_window: true` (then on some layers
    only, which is not implemented); with false it is ignored, as transformers does. Llama has no window."""
    size = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
            raise CheckpointError(f"{where}: use_sliding_window=true is not implemented (Qwen's per-layer window)")
        return None
    if size is None or size is False:
        return None
    if model_type != "mistral" or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{where}: sliding_window={size} is not implemented for model_type '{model_type}'")
    return size


# ----------------------------------------------------------------------------------------------------------------
# The folder's files and the weights
# ----------------------------------------------------------------------------------------------------------------

def _weight_files(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{index}: shard '{f}' is missing from {path}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                          f"(only safetensors checkpoints are read)")


def open_safetensors(f: Path):
    """safe_open of one weights file; a truncated or corrupt file is a CheckpointError naming it (peft_io.py too)."""
    from safetensors import safe_open
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except Exception as e:                        # SafetensorError (not an OSError): header too small, incomplete, ...
        raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt ({e})") from None


def read_config(path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: not found (is {path} a Hugging Face checkpoint folder?)")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None


def checkpoint_eos_ids(path: Path, ids=()) -> list:
    """ids + the EOS ids generation_config.json lists (Qwen2.5 instruct: <|im_end|> and <|endoftext|>), in order."""
    gen_file = Path(path) / "generation_config.json"
    try:
        gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    except ValueError as e:
        raise CheckpointError(f"{gen_file}: invalid JSON ({e})") from None
    return list(dict.fromkeys([*ids, *_ids(gen.get("eos_token_id"))]))


def load_model(path=None, dtype=None, device=None) -> Transformer:
    """Load a Llama-family HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct) in eval mode."""
    path = Path(path) if path is not None else default_model_path()
    device = torch.device(device) if device else default_device()
    dtype = dtype or default_dtype(device)
    args = model_args(read_config(path), where=str(path / "config.json"))
    args.path = str(path)
    args.eos_token_ids = tuple(checkpoint_eos_ids(path, args.eos_token_ids))
    with torch.device("meta"):
        model = Transformer(args)
    params = dict(model.named_parameters())
    expected = set(params) - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    seen = set()
    for f in _weight_files(path):
        with open_safetensors(f) as st:
            names = list(st.keys())
        for name in names:
            if name.endswith("rotary_emb.inv_freq"):
                continue                                              # old checkpoints saved this buffer
            if name == "lm_head.weight" and args.tie_word_embeddings:
                continue
            if name not in params:
                raise CheckpointError(f"{f}: unexpected tensor '{name}' (not a Llama parameter)")
            # One short-lived memory map per tensor: when the tensor is converted (bf16 file -> fp32 model) or
            # moved to the GPU, its source pages are unmapped right away, so peak RSS stays near the model's size.
            # Same dtype on the CPU: the tensor keeps pointing into the (copy-on-write) map, with no copy at all.
            with open_safetensors(f) as st:
                t = st.get_tensor(name)
            want = tuple(params[name].shape)
            if tuple(t.shape) != want:
                raise CheckpointError(f"{f}: tensor '{name}' has shape {tuple(t.shape)}, config.json "
                                      f"implies {want}")
            _assign(model, name, t.to(device=device, dtype=dtype))
            seen.add(name)
            del t
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensors in the safetensors files: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _assign(model, name, tensor):
    *parents, leaf = name.split(".")
    mod = model
    for p in parents:
        mod = getattr(mod, p)
    setattr(mod, leaf, nn.Parameter(tensor, requires_grad=False))


# ----------------------------------------------------------------------------------------------------------------
# Tiny random checkpoints (the tests' fixtures, reproduce.py's smoke preset)
# ----------------------------------------------------------------------------------------------------------------

def random_weights(cfg: dict, seed: int = 0, std: float = 0.08) -> dict:
    """Random tensors for a config.json dict, named and shaped by model.Transformer itself (so a family switch that
    adds tensors adds them here too): norms 1 + N(0, std^2), the rest N(0, std^2); no lm_head when it is tied."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(model_args(cfg)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        w = torch.randn(shape, generator=g) * std
        out[name] = (1 + w if name.endswith("norm.weight") else w).contiguous()
    return out


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A 4-layer random Llama (hidden 64, GQA 4/2) with the default model's tokenizer, in HF layout."""
    if (path / "config.json").exists():
        return path
    src = default_model_path()
    vocab_size = json.loads((src / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(random_weights(cfg, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write_json(tmp / "config.json", cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, tmp / name)
    os.replace(tmp, path)
    return path
