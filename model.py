"""A Llama-family decoder, the f_theta of Eq. (1): the math only; checkpoint.py reads it from a checkpoint folder.

This is the base model f_theta of the paper (Sec. 2, Eq. (1)); LoRA (lora.py) and the variational bottleneck
(bottleneck.py, Alg. 1) attach to it. It covers the paper's base models (DeepSeek-Coder-7B-Instruct-v1.5,
DeepSeek-Coder-7B-base-v1.5, CodeLlama-7B-Instruct, Meta-Llama-3-8B) and the embedded default, SmolLM2-135M-Instruct,
and the families that differ from Llama by a switch (ModelArgs.qkv_bias / qk_norm / sliding_window, set from
config.json's model_type by checkpoint.FAMILY_FLAGS): Qwen2/2.5(-Coder) (q/k/v biases), Qwen3 (per-head q/k norms)
and Mistral (sliding-window attention).

    input_ids (B, T)
      -> embed_tokens                         h_0 (B, T, H)
      -> L x [ h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h)) ]   h_l = output of block l (Alg. 1's h^(l*))
      -> RMSNorm -> lm_head                   logits (B, T, V)

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...) and RoPE uses HF's rotate-half
layout, so checkpoints load as they are (checkpoint.load_model: built on the meta device, weights assigned tensor by
tensor, never a second copy of the model).

Public API: ModelArgs, Transformer, linear_cross_entropy, resolve_dtype (a --dtype flag), default_device. Loading a
checkpoint folder is checkpoint.py's, the tokenizer and prompt templates are in tokenizer.py, sampling in
generate.py, the embedded default model in default_model.py.

References:
  - transformers' `src/transformers/models/llama/modeling_llama.py` (the layout, parameter names, rotate-half RoPE,
    RMSNorm's order of casts) and `src/transformers/modeling_rope_utils.py` (linear / dynamic / llama3 scaling);
    the Qwen2, Qwen3 and Mistral modeling files there for the family switches.
  - Meta's llama `llama/model.py` (Transformer, Attention, FeedForward, the KV cache).
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cli import UsageError


# ----------------------------------------------------------------------------------------------------------------
# Config: the shapes and switches the math reads (checkpoint.model_args fills them from config.json)
# ----------------------------------------------------------------------------------------------------------------

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")   # the RoPE variants rope_inv_freq computes


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
    qkv_bias: bool = False               # biases on q/k/v (not on o)
    qk_norm: bool = False                # an RMSNorm over head_dim on q and on k, per head, before RoPE
    sliding_window: Optional[int] = None  # a key is visible to a query at most sliding_window - 1 positions back
    eos_token_ids: tuple = ()            # config.json's (+ generation_config.json's, load_model) EOS ids
    path: str = ""


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


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor, dtype, inv=None) -> tuple:
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T), computed in fp32. inv: rope_inv_freq's
    frequencies when the caller has them (a compiled decode step: no data-dependent max inside the graph)."""
    if inv is None:
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

    def copy_row(self, dst, src, length, src_cache=None):
        """Row dst, positions 0..length-1 := row src of src_cache (default: this cache)."""
        src_cache = self if src_cache is None else src_cache
        self.k[dst, :, :length] = src_cache.k[src, :, :length]
        self.v[dst, :, :length] = src_cache.v[src, :, :length]


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = c = config
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.cache: Optional[KVCache] = None

    def qkv(self, x):
        """x (..., H) -> q (..., nh, D), k and v (..., nkv, D), with the per-head q/k norms where the family has them."""
        c = self.config
        q = self.q_proj(x).unflatten(-1, (c.num_heads, c.head_dim))
        k = self.k_proj(x).unflatten(-1, (c.num_kv_heads, c.head_dim))
        v = self.v_proj(x).unflatten(-1, (c.num_kv_heads, c.head_dim))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, cos, sin, mask, start=0):
        B, T, _ = x.shape
        c = self.config
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x))                       # (B, nh or nkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)                                    # (B, nkv, S, D)
        gqa = c.num_heads != c.num_kv_heads
        if mask is None:  # no padding, no cache: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.num_heads * c.head_dim))

    def decode(self, x, cos, sin, bias, kv, pos):
        """One new token per sampler slot: x (A, 1, H) for slots 0..A-1 at positions pos (A,). Writes the token's
        k, v into the slot's row of kv (a KVCache's k and v tensors) and attends to that row's positions 0..S-1
        with bias (A, 1, 1, S): 0 where visible (key position <= pos), -inf after. Grouped-query attention without
        repeating k, v: the g = nh/nkv query heads of a kv head are its rows of one matmul."""
        A, c = x.shape[0], self.config
        nkv, D = c.num_kv_heads, c.head_dim
        q, k, v = self.qkv(x[:, 0])                                                   # (A, nh or nkv, D)
        q, k = apply_rope(q[:, :, None], cos, sin), apply_rope(k[:, :, None], cos, sin)   # (A, nh or nkv, 1, D)
        cache_k, cache_v = kv                                                         # (rows, nkv, S_max, D)
        rows = torch.arange(A, device=x.device)
        cache_k[rows, :, pos] = k.view(A, nkv, D)                                     # row b at its position pos[b]
        cache_v[rows, :, pos] = v
        S = bias.shape[-1]
        keys, values = cache_k[:A, :, :S], cache_v[:A, :, :S]                         # (A, nkv, S, D), views
        q = q.view(A, nkv, c.num_heads // nkv, D) * D ** -0.5                         # (A, nkv, g, D)
        scores = torch.matmul(q, keys.transpose(-1, -2)) + bias                       # (A, nkv, g, S)
        y = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)  # (A, nkv, g, D)
        return self.o_proj(y.view(A, 1, c.num_heads * D))


class MLP(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, bias, kv, pos):
        """forward() for one new token per sampler slot (Attention.decode)."""
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, bias, kv, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def attention_mask_4d(attention_mask, T, start, S, window=None):
    """Boolean (B, 1, T, S) mask: query i (absolute position start+i) sees key j <= start+i that is not padding
    (and, with a sliding window, j > start+i - window). A padding query also sees itself, so that no row is fully
    masked (which would give NaN)."""
    q_pos = torch.arange(start, start + T, device=attention_mask.device)[:, None]    # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]                   # (1, S)
    causal = k_pos <= q_pos                                                          # (T, S)
    if window is not None:
        causal = causal & (k_pos > q_pos - window)                                   # Mistral's sliding window
    real = attention_mask[:, None, None, :S].bool()                                  # (B, 1, 1, S)
    return (causal & real) | (k_pos == q_pos)


class Transformer(nn.Module):
    """Llama-style causal LM. Call it as model(input_ids, attention_mask=None, hidden_layer=None, logits_at=None)."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        window = self.config.sliding_window
        window = window if window is not None and start + T > window else None     # shorter: the window sees all
        if attention_mask is not None or start > 0 or window is not None:
            am = attention_mask if attention_mask is not None else torch.ones(B, start + T, device=x.device)
            mask = attention_mask_4d(am, T, start, start + T, window)
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
        p, c = self.lm_head.weight, self.config
        return [KVCache(batch, c.num_kv_heads, max_len, c.head_dim, p.dtype, p.device) for _ in range(c.num_layers)]

    def prefill(self, prompts) -> tuple:
        """Run prompts (lists of ids) as one right-padded causal batch. Returns (logits (P, V) at each prompt's last
        token, caches): per layer a KVCache whose row i holds prompt i's k, v at positions 0..len(prompt i)-1."""
        device = self.lm_head.weight.device
        T = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):                          # right padding: plain causal attention (trunk)
            ids[i, :len(p)] = torch.tensor(p, device=device)
            mask[i, :len(p)] = 1
        caches = self.new_caches(len(prompts), T)
        for layer, cache in zip(self.model.layers, caches):
            layer.self_attn.cache = cache
        try:
            h, _ = self.trunk(ids, mask)
        finally:
            for layer in self.model.layers:
                layer.self_attn.cache = None
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        return self.logits(h[torch.arange(len(prompts), device=device), last]), caches

    def decode(self, tokens, pos, caches, step=None):
        """One decoding step for sampler slots 0..A-1: tokens (A,) at positions pos (A,) (= the slot's cache length).
        Returns logits (A, V). The data-dependent part (how far the longest slot reaches) is worked out here; the
        rest is decode_step, or `step`, a compiled decode_step (generate's compile=True)."""
        S = int(pos.max()) + 1                                    # attend to no more cache than the longest slot
        inv = rope_inv_freq(self.config, S, pos.device)           # (D/2,)
        key_pos = torch.arange(S, device=pos.device)
        bias = torch.zeros((len(pos), 1, 1, S), dtype=self.model.embed_tokens.weight.dtype, device=pos.device)
        hidden = key_pos > pos[:, None]                           # (A, S): the future
        if self.config.sliding_window is not None:
            hidden |= key_pos <= pos[:, None] - self.config.sliding_window   # and what left the window
        bias.masked_fill_(hidden[:, None, None], float("-inf"))
        return (step or self.decode_step)(tokens, pos, inv, bias, [(c.k, c.v) for c in caches])

    def decode_step(self, tokens, pos, inv, bias, kv):
        """decode() once the longest slot is known, with plain tensors only (what torch.compile can treat as
        dynamic): RoPE frequencies inv (D/2,), the additive mask bias (A, 1, 1, S), 0 where a slot sees a key, -inf
        elsewhere, and per layer its cache's (k, v) tensors."""
        x = self.model.embed_tokens(tokens)[:, None]              # (A, 1, H)
        cos, sin = rope_cos_sin(self.config, pos[:, None], x.dtype, inv)   # (A, 1, 1, D)
        for layer, layer_kv in zip(self.model.layers, kv):
            x = layer.decode(x, cos, sin, bias, layer_kv, pos)
        return self.step_logits(x[:, 0])

    def step_logits(self, h, chunk=2048):
        """logits(h) for a decoding step's rows h (A, H) -> (A, V), the LM head applied a slice of the vocabulary
        at a time: the same values, faster on CPU for few rows and a large vocabulary (measured on SmolLM2-135M,
        60 rows, one thread: 48 ms instead of 67 ms per step)."""
        if type(self.lm_head) is not nn.Linear:                  # e.g. a LoRA-wrapped head: call it as it is
            return self.logits(h)
        h, w = self.model.norm(h), self.lm_head.weight
        if torch.compiler.is_compiling():                        # matmul(out=) breaks a compiled graph
            return torch.cat([h @ w[i:i + chunk].t() for i in range(0, w.shape[0], chunk)], dim=-1)
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
# Device and dtype: where the model runs, in which precision
# ----------------------------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# bf16 weights pay off only where the hardware multiplies bf16 natively; elsewhere torch emulates bf16 matrix
# products, many times slower than fp32. On x86 CPUs these /proc/cpuinfo flags say it is native (AVX512-BF16, AMX).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# The vector and matrix instruction sets a refusal lists as found (the ones that decide torch's CPU kernels).
CPU_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                 "avx512_fp16", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "bf16")


def cpu_flags(path="/proc/cpuinfo") -> set:
    """The first processor's instruction-set flags in /proc/cpuinfo (x86 "flags", Arm "Features"); an empty set
    where the file cannot be read (not Linux)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_dtype(name, device=None, flag="--dtype") -> torch.dtype:
    """The weights' dtype for a `--dtype fp32|bf16` flag on `device` (default: default_device()); None keeps
    load_model's default (fp32 on the CPU, bf16 on CUDA). bf16 is refused, as one line naming the flag, where it is
    not native: a CUDA device without bf16 support, or a CPU whose /proc/cpuinfo lists neither avx512_bf16 nor
    amx_bf16 (the line says which instruction sets it does list)."""
    device = torch.device(device) if device else default_device()
    if name is None:
        return default_dtype(device)
    if name == "fp32":
        return torch.float32
    if name != "bf16":
        raise UsageError(f"{flag} {name}: expected fp32 or bf16")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise UsageError(f"{flag} bf16: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has "
                         f"no native bf16; use {flag} fp32")
    if device.type == "cpu":
        flags = cpu_flags()
        if not flags & set(CPU_BF16_FLAGS):
            found = " ".join(f for f in CPU_ISA_FLAGS if f in flags) or "no vector extension it knows"
            seen = f"found: {found}" if flags else "no flags readable there"
            raise UsageError(f"{flag} bf16: this CPU has no native bf16 (neither {' nor '.join(CPU_BF16_FLAGS)} in "
                             f"/proc/cpuinfo; {seen}), so torch would emulate it, many times slower than fp32; "
                             f"use {flag} fp32")
    return torch.bfloat16
