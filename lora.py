"""LoRA: low-rank adapters on the frozen linear layers of a causal LM (Hu et al., 2022), saved in PEFT's format.

Both FT and IB-FT train only LoRA adapters (Appendix C.1: r = 32, dropout 0.05, alpha 32 on OriGen and 64 on
Evol-CodeAlpaca). One adapted linear layer computes

        x ──────────────────────► W  (out, in), frozen ─────────────────────┐
        │                                                                  (+) ──► y
        └──► dropout ──► A (r, in) ──► × scaling ──► B (out, r) ───────────┘

        y = x W^T + scaling * dropout(x) A^T B^T,     scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so an adapted model starts out computing exactly the base model.
Merging folds the update into the weight, W' = W + scaling * B A, so inference costs nothing extra.

Module names, parameter shapes and the file format follow PEFT, so an adapter trained here loads with
`PeftModel.from_pretrained` and an adapter trained with PEFT loads here:
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight  (r, in)
                                base_model.model.<module>.lora_B.weight  (out, r)
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules, ...

CLI: `python lora.py merge --model BASE --adapter RUN_DIR --out DIR` writes a merged Hugging Face checkpoint folder.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from cli import ADAPTER_HELP, MODEL_HELP, CheckpointError, atomic_write, fail
from default_model import default_model_path
from model import load_model, open_safetensors

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Appendix C.1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel) .model (the transformer)


# --------------------------------------------------------------------------------------------------------------
# The adapted linear layer
# --------------------------------------------------------------------------------------------------------------

class LoRADropout(nn.Module):
    """Inverted dropout, x * (u >= p) / (1 - p) with u ~ U[0, 1): the same distribution as nn.Dropout, but its mask
    comes from torch.rand, which on the CPU costs about 60% of what nn.Dropout's Bernoulli draw does (measured: a
    (1055, 1536) fp32 mask in 6.3 ms vs 10.9 ms on one core). Seven of these per layer were 9% of a LoRA step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        drop = torch.rand_like(x) < self.p                     # a bool mask: autograd keeps 1 byte per element
        return x.masked_fill(drop, 0.0).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self):
        return f"p={self.p}"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = x W^T + b + scaling * dropout(x) A^T B^T.

    `weight` (and `bias`) are the base layer's own Parameter objects, so the model's state_dict keeps the
    checkpoint's key `...q_proj.weight`; the adapter adds `...q_proj.lora_A` and `...q_proj.lora_B`.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)  # (out, in), the same Parameter object as the base's
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))      # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))     # (out, r)
        self.reset_parameters(generator)
        self.merged = False
        self._base_copy = None  # the exact pre-merge weight, kept on the CPU while merged (see merge_)
        self.train(base.training)  # an eval-mode model stays in eval mode (no dropout)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A: Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(in)), as nn.Linear and PEFT; B: zeros. A is drawn on the
        CPU from `generator` (or the global CPU RNG), then moved, so a seed gives the same A on every device."""
        a = torch.empty(self.r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y  # the update already lives in self.weight
        # The adapter runs in the input's dtype: with fp32 master weights and a bf16 model, A and B are cast
        # (differentiably) to bf16; under torch.autocast, F.linear casts them anyway; in fp32 nothing is cast.
        h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return y + F.linear(h * self.scaling, self.lora_B.to(x.dtype))  # scaling on the r-wide tensor: cheapest

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32, (out, in)."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merge_(self, keep_base: bool = True) -> None:
        """W <- W + scaling * B A, with the arithmetic in fp32 and one rounding to W's dtype.

        Exact unmerge: W + dW - dW is not W in floating point (and in bf16 far from it), so instead of
        subtracting, merge keeps a bit-exact copy of the original W on the CPU (off the accelerator's memory)
        and unmerge copies it back. keep_base=False skips the copy (e.g. to export a merged checkpoint).
        """
        if self.merged:
            return
        self._base_copy = self.weight.detach().to("cpu", copy=True) if keep_base else None
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))  # in place: same Parameter
        self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Restore the base weight bit for bit from the copy merge_ kept."""
        if not self.merged:
            return
        if self._base_copy is None:
            raise RuntimeError("lora.py: cannot unmerge a layer merged with keep_base=False (no copy of the base weight)")
        self.weight.copy_(self._base_copy)
        self._base_copy, self.merged = None, False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}")


# --------------------------------------------------------------------------------------------------------------
# Injection by module name
# --------------------------------------------------------------------------------------------------------------

@dataclass
class LoRAConfig:
    """What inject_lora did; saved as PEFT's adapter_config.json."""
    r: int = 32                                     # Appendix C.1
    alpha: float = 32                               # Appendix C.1: 32 (OriGen), 64 (Evol-CodeAlpaca)
    dropout: float = 0.05                           # Appendix C.1
    targets: tuple[str, ...] | str = DEFAULT_TARGETS  # module-name suffixes, or one regex matched against the full name
    rslora: bool = False
    layers: tuple[int, ...] | None = None           # decoder layer indices to adapt (None: all)
    layers_pattern: tuple[str, ...] | None = ("layers",)  # the name segment before the layer index (PEFT's semantics)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def _layer_index(name: str, patterns) -> int | None:
    """The decoder-layer index in a module name, found as PEFT does ('model.layers.3.mlp.up_proj' -> 3)."""
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(m.group("idx")) if m else None


def _is_target(name: str, cfg: LoRAConfig) -> bool:
    """PEFT's rule: a string is a regex for the full name; a list matches the name or its last dotted parts."""
    if isinstance(cfg.targets, str):
        return re.fullmatch(cfg.targets, name) is not None
    if name in cfg.targets:
        return True
    if not any(name.endswith("." + t) for t in cfg.targets):
        return False
    return cfg.layers is None or _layer_index(name, cfg.layers_pattern) in cfg.layers


def _find_targets(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules inject_lora would replace, in module order; errors for anything it cannot."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("lora.py: the model already has LoRA layers; load a fresh base model first")
    shared = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    found = []
    for name, module in model.named_modules():
        if not name or not _is_target(name, cfg):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"lora.py: target module {name} is a {type(module).__name__}, not an nn.Linear")
        if shared[id(module.weight)] > 1:  # e.g. a tied lm_head: merging would also change the embeddings
            raise ValueError(f"lora.py: target module {name} shares its weight with another module (tied); not supported")
        found.append((name, module))
    if not found:
        raise ValueError(f"lora.py: no nn.Linear module matches target_modules={cfg.targets!r} layers={cfg.layers!r}")
    return found


def inject_lora(model: nn.Module, r: int = 32, alpha: float = 32, dropout: float = 0.05,
                targets=DEFAULT_TARGETS, rslora: bool = False, layers=None,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every nn.Linear whose name matches `targets` (in `layers`, if given) by a LoRALinear; freeze
    everything else. LoRA weights are created in `dtype` (fp32 master weights by default, as PEFT) on the base
    weight's device; a seeded `generator` fixes A. Records the config as `model.lora_config`; returns the names."""
    cfg = LoRAConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                     targets=targets if isinstance(targets, str) else tuple(targets),
                     layers=None if layers is None else tuple(sorted(int(i) for i in layers)))
    return _inject(model, cfg, generator, dtype)


def _inject(model: nn.Module, cfg: LoRAConfig, generator, dtype) -> list[str]:
    found = _find_targets(model, cfg)
    model.requires_grad_(False)
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, dtype, generator))
    model.lora_config = cfg
    return [name for name, _ in found]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module, keep_base: bool = True) -> nn.Module:
    """Fold every adapter into its weight (see LoRALinear.merge_); keep_base=False makes it irreversible."""
    for m in lora_layers(model).values():
        m.merge_(keep_base)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge: every base weight is restored bit-identically from the copy merge kept."""
    for m in lora_layers(model).values():
        m.unmerge_()
    return model


# --------------------------------------------------------------------------------------------------------------
# PEFT format
# --------------------------------------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (detached; they share memory with the parameters)."""
    sd = {}
    for name, m in lora_layers(model).items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()  # (r, in)
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()  # (out, r)
    return sd


def _expected_shapes(named: list[tuple[str, nn.Module]], r: int) -> dict[str, tuple]:
    shapes = {}
    for name, m in named:
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, m.in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, r)
    return shapes


def _check_keys(expected: dict[str, tuple], got: dict[str, tuple], source: str) -> None:
    """Missing, unexpected or mis-shaped adapter tensors: one clear error naming the source and the key."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    for kind, keys in (("missing key", missing), ("unexpected key", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{source}: {kind} {keys[0]}{more}")
    for k, shape in expected.items():
        if tuple(got[k]) != tuple(shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(got[k])}, the model needs {tuple(shape)}")


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "LoRA state dict") -> None:
    """Copy PEFT-named tensors (as from lora_state_dict) into an adapted model; strict about keys and shapes."""
    layers = lora_layers(model)
    expected = _expected_shapes(list(layers.items()), next(iter(layers.values())).r if layers else 0)
    _check_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, source)
    for name, m in layers.items():
        m.lora_A.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
        m.lora_B.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])


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
        raise ValueError("lora.py: save_adapter needs a model prepared with inject_lora or load_adapter")
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
    parser = argparse.ArgumentParser(prog="lora.py", description=__doc__.split("\n")[0])
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
        return fail("lora.py merge", e)
    print(f"merged {args.adapter} into {args.model} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
