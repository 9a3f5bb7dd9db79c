"""LoRA: low-rank adapters on the frozen linear layers of a causal LM (Hu et al., 2022), named as PEFT names them.

Both FT and IB-FT train only LoRA adapters (Appendix C.1: r = 32, dropout 0.05, alpha 32 on OriGen and 64 on
Evol-CodeAlpaca). One adapted linear layer computes

        x ──────────────────────► W  (out, in), frozen ─────────────────────┐
        │                                                                  (+) ──► y
        └──► dropout ──► A (r, in) ──► × scaling ──► B (out, r) ───────────┘

        y = x W^T + scaling * dropout(x) A^T B^T,     scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so an adapted model starts out computing exactly the base model.
Merging folds the update into the weight, W' = W + scaling * B A, so inference costs nothing extra.
Dropout masks come from the global RNG, or, inside keyed_dropout (as train.py trains), from a key per example and
module, so that N DDP processes draw the masks one process would.

Module names, parameter shapes and target matching follow PEFT (lora_state_dict's keys are PEFT's,
`base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)); the files, adapter_model.safetensors
and adapter_config.json, and merging an adapter into a checkpoint folder are peft_io.py's.

References:
  - Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685 (Sec. 4.1:
    h = W_0 x + B A x, the update scaled by alpha / r, B zero at the start, W_0 + B A merged for inference).
  - microsoft/LoRA's loralib (`loralib/layers.py`: Linear with lora_A, lora_B, lora_dropout, scaling, merge).
  - Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023, arXiv:2312.03732 (rsLoRA).
  - huggingface/peft (`src/peft/tuners/lora/layer.py`, `model.py`): module names, Kaiming-uniform A, target rules.
"""
import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import CheckpointError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Appendix C.1
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel) .model (the transformer)


# --------------------------------------------------------------------------------------------------------------
# The adapted linear layer
# --------------------------------------------------------------------------------------------------------------

class LoRADropout(nn.Module):
    """Inverted dropout, x * (u >= p) / (1 - p) with u ~ U[0, 1): the same distribution as nn.Dropout, but its mask
    comes from torch.rand, which on the CPU costs about 60% of what nn.Dropout's Bernoulli draw does (measured: a
    (1055, 1536) fp32 mask in 6.3 ms vs 10.9 ms on one core). Seven of these per layer were 9% of a LoRA step.

    By default u comes from the global RNG. Inside `keyed_dropout` (train.py) each row b of x (B, T, in) draws its
    own u for its real positions only, from a generator seeded by mix64(key_b, this module's index): the mask then
    depends on neither the process holding the row, nor its batch companions, nor the padding, and activation
    checkpointing's recomputation draws it again exactly (it restores the global RNG only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.rows = None   # keyed_dropout: (a seed per row, its real length); None: the global RNG

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.rows is None:
            drop = torch.rand_like(x) < self.p                 # a bool mask: autograd keeps 1 byte per element
        else:
            drop = row_masks(x, *self.rows, self.p)
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
# Dropout keyed by example: the same masks for a row on any number of processes (DDP)
# --------------------------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def mix64(*xs: int) -> int:
    """A 64-bit hash of the integers xs: one SplitMix64 step per integer (Steele, Lea and Flood, OOPSLA 2014)."""
    z = 0
    for x in xs:
        z = ((z ^ (x & _M64)) + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        z ^= z >> 31
    return z


def row_masks(x: torch.Tensor, seeds, lengths, p: float) -> torch.Tensor:
    """(B, T, in) bool drop mask of a right-padded x: u < p, where row b's first lengths[b] positions draw u from a
    generator seeded with seeds[b], as one contiguous (lengths[b], in) block, which padding does not change (CUDA's
    Philox output depends on the size drawn); padding is never dropped. The CPU generator (mt19937) uses the seed's
    low 32 bits only."""
    if x.dim() != 3 or x.shape[0] != len(seeds):
        raise ValueError(f"lora.py: keyed dropout needs (B, T, in) input with one key per row: got {tuple(x.shape)} "
                         f"for {len(seeds)} keys")
    u = torch.ones(x.shape, dtype=torch.float32, device=x.device)
    g = torch.Generator(x.device)
    for b, (seed, n) in enumerate(zip(seeds, lengths)):
        u[b, :n].uniform_(generator=g.manual_seed(seed))                   # (n, in), contiguous
    return u < p


@contextlib.contextmanager
def keyed_dropout(model: nn.Module, keys, lengths):
    """Within the block, the i-th LoRADropout of `model` (module order) draws row b's mask from mix64(keys[b], i) and
    lengths[b], the row's real tokens (see LoRADropout). Keep the backward pass inside too: activation checkpointing
    recomputes the forward there."""
    mods = [m for m in model.modules() if isinstance(m, LoRADropout)]
    for i, m in enumerate(mods):
        m.rows = ([mix64(k, i) for k in keys], list(lengths))
    try:
        yield
    finally:
        for m in mods:
            m.rows = None


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


def inject_lora(model: nn.Module, r: int = LoRAConfig.r, alpha: float = LoRAConfig.alpha,
                dropout: float = LoRAConfig.dropout,
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
# The adapter's tensors under PEFT's names (peft_io.py writes and reads them as files)
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
