"""PEFT's adapter files: a LoRA adapter (lora.py) saved and loaded in huggingface/peft's format, merged into its base.

The file format, so that an adapter trained here loads with `PeftModel.from_pretrained` and an adapter trained with
PEFT loads here:
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight  (r, in)
                                base_model.model.<module>.lora_B.weight  (out, r)
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, ...
An adapter_config.json asking for anything lora.py does not compute (DoRA, biases, rank patterns, ...) is refused.

CLI: `python peft_io.py merge --model BASE --adapter RUN_DIR --out DIR` writes a merged Hugging Face checkpoint folder.

References:
  - huggingface/peft: adapter_config.json is LoraConfig's fields (`src/peft/tuners/lora/config.py`);
    adapter_model.safetensors holds get_peft_model_state_dict's keys (`src/peft/utils/save_and_load.py`);
    the merged checkpoint is what `merge_and_unload` gives (`src/peft/tuners/lora/model.py`).
"""
import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from checkpoint import load_model, open_safetensors
from cli import ADAPTER_HELP, MODEL_HELP, CheckpointError, atomic_write, fail
from default_model import default_model_path
from lora import (LoRAConfig, _check_keys, _expected_shapes, _find_targets, _inject, load_lora_state_dict, lora_layers,
                  lora_state_dict, merge)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


# --------------------------------------------------------------------------------------------------------------
# PEFT format
# --------------------------------------------------------------------------------------------------------------

def peft_config(cfg: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json as PEFT 0.21 writes it, limited to the fields that carry meaning here."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets),
        "layers_to_transform": None if cfg.layers is None else list(cfg.layers),
        "layers_pattern": None if cfg.layers is None else list(cfg.layers_pattern),
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "init_lora_weights": True,
        "modules_to_save": None, "exclude_modules": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_model.safetensors and adapter_config.json (PEFT's format) into out_dir, each atomically.
    base_model_name_or_path defaults to model.config.path (the folder the base model was loaded from)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_layers(model):
        raise ValueError("peft_io.py: save_adapter needs a model prepared with inject_lora or load_adapter")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "path", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(peft_config(cfg, None if base_model_name_or_path is None else str(base_model_name_or_path)),
                      indent=2) + "\n"
    atomic_write(out / ADAPTER_CONFIG, lambda p: p.write_text(text))
    return out


# adapter_config.json fields that must hold these neutral values, because anything else changes the math
# (or needs weights beyond A and B); fields not listed here and not read below must be empty/false/null.
_NEUTRAL = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
            "rank_pattern": None, "alpha_pattern": None, "exclude_modules": None, "layer_replication": None,
            "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
            "use_qalora": False, "use_bdlora": None, "kasa_config": None, "monteclora_config": None,
            "velora_config": None, "arrow_config": None}
# Fields that only matter at initialization, for bookkeeping, or for other back ends: ignored.
_IGNORED = {"peft_version", "revision", "inference_mode", "auto_mapping", "base_model_name_or_path", "loftq_config",
            "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core", "qalora_group_size",
            "ensure_weight_tying", "init_lora_weights"}
_READ = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
         "layers_to_transform", "layers_pattern"}


def config_from_peft(raw: dict, source: str) -> LoRAConfig:
    """Validate a PEFT adapter_config.json and turn it into a LoRAConfig; refuse what this file cannot compute."""
    def bad(msg):
        return CheckpointError(f"{source}: {msg}")
    if raw.get("peft_type") != "LORA":
        raise bad(f"peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    if raw.get("task_type") not in ("CAUSAL_LM", None):
        raise bad(f"task_type {raw['task_type']!r} is not supported (only CAUSAL_LM)")
    for key, value in raw.items():
        if key in _READ or key in _IGNORED:
            continue
        if value != _NEUTRAL.get(key) and value not in (None, False, {}, []):
            raise bad(f"{key}={value!r} is not supported")
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):  # pissa / olora / loftq / corda also rewrite the base weights
        raise bad(f"init_lora_weights={init!r} is not supported (it changes the base weights)")
    r, targets = raw.get("r"), raw.get("target_modules")
    if not isinstance(r, int) or r <= 0:
        raise bad(f"r must be a positive integer, got {r!r}")
    if not targets or not isinstance(targets, (str, list)):
        raise bad(f"target_modules must be a non-empty list or a regex string, got {targets!r}")
    layers, pattern = raw.get("layers_to_transform"), raw.get("layers_pattern")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(pattern, str):
        pattern = [pattern] if pattern else None
    return LoRAConfig(r=r, alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                      targets=targets if isinstance(targets, str) else tuple(targets),
                      rslora=bool(raw.get("use_rslora", False)),
                      layers=tuple(layers) if layers else None, layers_pattern=tuple(pattern) if pattern else None)


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Inject LoRA into a fresh base model as adapter_dir's adapter_config.json says and load its weights.
    The adapter is checked completely (config, keys, shapes) before the model is touched. A missing, truncated or
    malformed file of it is a CheckpointError naming the file."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not d.is_dir():
        raise CheckpointError(f"adapter folder {d} does not exist")
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = " (adapter_model.bin is a pickle and is not read; convert it to safetensors)" \
                if p == w_path and (d / "adapter_model.bin").exists() else ""
            raise CheckpointError(f"{p}: missing{hint}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:                                              # invalid JSON or invalid UTF-8
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    cfg = config_from_peft(raw, str(cfg_path))
    with open_safetensors(w_path) as f:
        # PEFT writes `...lora_A.weight`; states taken before PEFT strips adapter names hold `...lora_A.default.weight`.
        state = {re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", k): f.get_tensor(k) for k in f.keys()}
    _check_keys(_expected_shapes(_find_targets(model, cfg), cfg.r), {k: v.shape for k, v in state.items()},
                str(w_path))
    _inject(model, cfg, torch.Generator().manual_seed(0), torch.float32)  # A is overwritten; keep the global RNG untouched
    load_lora_state_dict(model, state, str(w_path))
    return model


# --------------------------------------------------------------------------------------------------------------
# CLI: merge an adapter into its base model and write a Hugging Face checkpoint folder
# --------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
           "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
           "chat_template.json")  # everything of a HF folder but its weights


def merge_checkpoint(base, adapter_dir, out, dtype: str = "auto") -> Path:
    """Base + adapter -> out/ (model.safetensors, plus base's config.json, generation and tokenizer files).
    Written into a temporary folder beside out, then renamed: out appears complete or not at all."""
    base, out = Path(base), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder")
    cfg = json.loads((base / "config.json").read_text())
    stored = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    dtype = stored if dtype == "auto" else dtype  # merge_ does its arithmetic in fp32 whatever this is
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    model = load_adapter(load_model(base, dtype=_DTYPES[dtype], device="cpu"), adapter_dir)
    merge(model, keep_base=False)
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:  # tied lm_head.weight is embed_tokens.weight: HF checkpoints store it once
            continue
        seen.add(ptr)
        tensors[k] = v.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name in _COPIED:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        if dtype != stored:  # say what the weights now are
            cfg.update({k: dtype for k in ("torch_dtype", "dtype") if k in cfg} or {"torch_dtype": dtype})
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="peft_io.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("merge", help="merge an adapter into its base model; write a Hugging Face checkpoint folder")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    p.add_argument("--out", required=True, help="new folder for the merged checkpoint")
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                   help="dtype of the written weights (default: the base checkpoint's)")
    args = parser.parse_args(argv)
    try:
        if args.model is None:
            args.model = default_model_path()
        if not (Path(args.model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {args.model}: no config.json there")
        out = merge_checkpoint(args.model, args.adapter, args.out, args.dtype)
    except (OSError, ValueError, RuntimeError) as e:
        return fail("peft_io.py merge", e)
    print(f"merged {args.adapter} into {args.model} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
