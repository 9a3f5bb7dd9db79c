"""Fine-tuning with LoRA: plain FT (Eq. (1)) or IB-FT (Eq. (IB-FT), Alg. 1), one plain PyTorch loop.

    python train.py --method ibft --layer 20            # the embedded default model and data, a few minutes on a CPU
    python train.py --method ft --model DIR --data origen.jsonl --out runs/ft
    torchrun --nproc_per_node 2 train.py ...            # DistributedDataParallel (nccl on CUDA, gloo on CPU)

Every hyperparameter of Appendix C.1 is a flag whose default is the paper's (OriGen setting: lr 5e-5, LoRA alpha 32,
beta 0.02; for Evol-CodeAlpaca use --lr 1e-4 --lora-alpha 64 --beta 0.01).

One optimizer step (Alg. 1):
    for each micro-batch (x, y):                       input ids, labels on response tokens only
        h_L, h_l* = f_theta+LoRA(x)                    one forward; h_l* is the output of block l*
        ce     = CE(lm_head(norm(h_L)), y)             Eq. (1), at label positions only
        kl, ce_ib = VIB(h_l*) -> lm_head(h_bar)        Eq. (4), (5)  (bottleneck.py)
        loss   = ce + alpha * (kl + beta * ce_ib)      Eq. (IB-FT) with Eq. (6)
        backward
    clip gradients, AdamW step, cosine schedule step

Token sums are divided by the token counts of the whole optimizer step (all micro-batches, all processes), so
gradient accumulation and DDP compute exactly the gradient of one big batch. That batch (the paper's "batch size of 4")
is --batch-size x processes x --grad-accum; --global-batch-size G sets it directly.
RUN_DIR (--out) gets: adapter_model.safetensors + adapter_config.json (PEFT format), vib.safetensors, config.json
(the resolved run config), metrics.jsonl, and checkpoint/ (every --save-minutes and at each epoch's end; the newest
--keep-checkpoints kept as checkpoint/, .checkpoint.old/, ...; resumable with --resume).

References:
  - The paper: Wang, Chen, Liu and Ding, 2025, arXiv:2510.16022v1: Eq. (1), Eq. (IB-FT), Alg. 1, Appendix C.1 (the
    hyperparameters), Table 1 (the Min-K% and GRAND baselines).
  - The authors' training script: https://github.com/OPTML-Group/MemorizationBarrier at commit 828050f5f3b2
    (train_ib.py, config/training_args.json: 2 per device, warmup 0.1, cosine, fp16, lr 1e-4), the padded KL mean.
  - LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685 (lora.py).
  - The loop's shape: karpathy/nanoGPT's train.py (a plain PyTorch loop, the optimizer step on one screen).
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
import lora
import peft_io
from cli import (UsageError, add_model_flags, atomic_write, fail, python_command, read_records, write_json,
                 write_text)
from bottleneck import SINK_RATIO, IBConfig, VariationalBottleneck, ib_penalty, ibft_loss, kl_count
from checkpoint import load_model
from default_model import default_model_path
from model import linear_cross_entropy
from tokenizer import FAMILIES, load_tokenizer

REPO = Path(__file__).resolve().parent
PAPER_ALPHA = 0.1                       # Appendix C.1 (--paper-ib)
DEFAULT_DATA = REPO / "data" / "default_instruct.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# Command line (defaults: Appendix C.1)
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA fine-tuning: FT or IB-FT (information-bottleneck regularized).")
    p.add_argument("--method", default="ibft", help="ft (Eq. (1)) or ibft (Eq. (IB-FT))")
    p.add_argument("--layer", type=int, default=IBConfig.layer,
                   help="l*: bottleneck the output of this decoder block (1..L-1)")
    add_model_flags(p, FAMILIES, adapter=False)
    p.add_argument("--data", default=None, help="JSONL or JSON instruction data (default: data/default_instruct.jsonl)")
    p.add_argument("--instruction-field", default=None, help="field of the instruction (default: the format is "
                   "detected: messages, Alpaca, instruction/response, Instruction/Response, instruction/output, ...)")
    p.add_argument("--response-field", default=None, help="field of the response (default: detected, see above)")
    p.add_argument("--out", default="runs/ibft", help="RUN_DIR")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=4,
                   help="examples per micro-batch PER PROCESS. The global batch of one optimizer step is batch-size x "
                        "processes x grad-accum; the paper's batch of 4 is global (2 GPUs x 2 in the authors' code)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step, per process (derived when --global-batch-size is given)")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="examples per optimizer step over all processes and micro-batches (the paper's 'batch size "
                        "of 4'); sets --grad-accum to G / (batch-size x processes), which must be a whole number")
    p.add_argument("--lr", type=float, default=5e-5,
                   help="peak learning rate (Appendix C.1 OriGen: 5e-5; the authors' released code runs 1e-4)")
    p.add_argument("--warmup-ratio", type=float, default=0.03,
                   help="warmup steps = ceil(ratio x total steps) (paper: 0.03; the authors' released code runs 0.1)")
    p.add_argument("--hf-warmup", action="store_true",
                   help="HF's warmup lr x s/w for step s < w (the first step runs at lr 0) instead of ours, "
                        "lr x (s+1)/(w+1)")
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=2048, help="truncate examples to this many tokens")
    p.add_argument("--group-by-length", action="store_true", help="micro-batches of similar lengths (less padding): "
                   "each epoch's permutation is sorted by length in windows of 16 micro-batches, cut, and the "
                   "micro-batches shuffled; every example still once per epoch")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-r", type=int, default=lora.LoRAConfig.r)
    p.add_argument("--lora-alpha", type=float, default=lora.LoRAConfig.alpha)
    p.add_argument("--lora-dropout", type=float, default=lora.LoRAConfig.dropout)
    p.add_argument("--lora-targets", default=",".join(lora.DEFAULT_TARGETS),
                   help="comma-separated module names LoRA adapts (Appendix C.1: all seven projections)")
    p.add_argument("--rslora", action="store_true", help="scale LoRA by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--dropout-masks", default="example", choices=("example", "process"),
                   help="where the LoRA dropout masks come from: example (default): keyed by (seed, step, example), "
                        "so N processes draw what one process would; process: each process's global RNG, seeded "
                        "seed + rank, as before keyed masks existed (the laptop study's protocol)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"IB weight alpha in Eq. (IB-FT) (default {IBConfig.alpha:g}, chosen by the sensitivity sweep for "
                        f"the normalized q_phi input (README, 'When does IB-FT act?'); the paper: 0.1 on the raw input, "
                        f"--paper-ib; the authors' code runs 0.2)")
    p.add_argument("--beta", type=float, default=IBConfig.beta,
                   help="IB trade-off beta in Eq. (6) (paper: 0.02 OriGen, 0.01 Evol-CodeAlpaca; the authors' released "
                        "code runs 0.01)")
    p.add_argument("--bottleneck-dim", type=int, default=IBConfig.dim, help="latent size d")
    p.add_argument("--kl-reduction", default=IBConfig.kl_reduction, choices=["mean", "sum"],
                   help="mean over latent dims and tokens (authors' code) or sum over dims")
    p.add_argument("--kl-normalizer", default=IBConfig.kl_normalizer, choices=["real", "padded"],
                   help="what the KL sum is divided by: real: the real (non-padding) tokens of the step; padded: "
                        "micro-batch rows x --kl-pad-to, as the authors' code, whose KL mean runs over batches padded "
                        "to 2048 tokens (an effective KL weight of about alpha x T_real / 2048). Either way x latent "
                        "dims under --kl-reduction mean")
    p.add_argument("--kl-pad-to", type=int, default=IBConfig.kl_pad_to,
                   help="the padded length per row that --kl-normalizer padded divides by (authors' code: 2048)")
    p.add_argument("--logvar-clamp", type=float, default=IBConfig.logvar_clamp,
                   help="clamp log sigma^2 to [-c, c]; 0 disables")
    p.add_argument("--ib-head-norm", action="store_true", help="apply the final RMSNorm before the IB branch's LM head")
    p.add_argument("--ib-input", default=None, choices=["raw", "norm"],
                   help="what q_phi reads: norm (default): the hidden state RMS-normalized first, chosen by the "
                        "sensitivity sweep; raw: as it is (the paper, the authors' code; its KL is the attention sink's "
                        "unless --ib-sink exclude)")
    p.add_argument("--ib-sink", default=None, choices=["exclude", "keep"],
                   help="exclude (default): attention-sink tokens (layer-l* norm > --ib-sink-ratio x their row's "
                        "median; on SmolLM2 the first token) stay out of the KL and CE_IB; keep: every real token "
                        "(the paper)")
    p.add_argument("--paper-ib", action="store_true",
                   help="the paper's IB-FT literally: q_phi on the raw state, the sink kept, alpha 0.1 (an explicit "
                        "--alpha, --ib-input or --ib-sink still wins)")
    p.add_argument("--ib-sink-ratio", type=float, default=SINK_RATIO,
                   help="the norm ratio above which a token is an attention sink (bottleneck.SINK_RATIO, measured)")
    p.add_argument("--diag-every", type=int, default=10,
                   help="IB-FT: measure ib_share (|grad of the IB terms| / |grad of CE| on the LoRA weights) at the "
                        "first step and every N steps (one extra backward pass through blocks 1..l*); 0: never")
    p.add_argument("--eval-data", default=None,
                   help="held-out data (any --data format): its response NLL, without dropout, is logged as eval_nll "
                        "every --eval-every steps and at the end (the same number as mink.py score's tokens)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: only at the end)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler (the paper's setting: "
                        "'mixed float16 precision'); bf16/fp16 also run on the CPU (slowly: for tests)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--save-minutes", type=float, default=30,
                   help="checkpoint when this many minutes have passed since the last one (rank 0's clock decides "
                        "for every process); 0: no time rule. A checkpoint is also written at the end of every epoch "
                        "and of the run")
    p.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps instead of by time (the epoch and final checkpoints stay); 0: the "
                        "time rule, --save-minutes")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="checkpoints kept, newest first: checkpoint/, .checkpoint.old/, .checkpoint.old2/, ... "
                        "(--resume falls back to the newest readable one)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write each step's metrics as TensorBoard scalars into DIR (needs the tensorboard "
                        "package)")
    p.add_argument("--prune", default="none", choices=["none", "mink", "grand"],
                   help="FT w/ Min-K%% or FT w/ GRAND (Table 1): train on a selected subset")
    p.add_argument("--keep", type=float, default=0.8, help="fraction kept by --prune (Table 1: 0.8)")
    p.add_argument("--mink-k", type=float, default=20, help="K of Min-K%% Prob for --prune mink")
    p.add_argument("--grand-seeds", type=int, default=3, help="LoRA initializations GRAND scores are averaged over")
    p.add_argument("--log-every", type=int, default=1)
    return p


def parse_args(argv=None):
    """The flags, checked: a bad value is a UsageError naming the flag."""
    args = build_parser().parse_args(argv)
    if args.method not in ("ft", "ibft"):
        raise UsageError(f"--method must be ft or ibft, got '{args.method}'")
    for flag in ("batch_size", "grad_accum", "max_len", "lora_r", "bottleneck_dim", "kl_pad_to"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.global_batch_size is not None and args.global_batch_size < 1:
        raise UsageError("--global-batch-size must be >= 1")
    if args.kl_normalizer == "padded" and args.kl_pad_to < args.max_len:
        raise UsageError(f"--kl-pad-to {args.kl_pad_to} is shorter than --max-len {args.max_len}: every row is counted "
                         f"as padded to --kl-pad-to tokens, so it must be >= --max-len")
    if not 0 < args.keep <= 1:
        raise UsageError("--keep must be in (0, 1]")
    for flag in ("diag_every", "eval_every", "save_every"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0")
    if not 0 <= args.save_minutes < math.inf:
        raise UsageError(f"--save-minutes must be a number >= 0, got {args.save_minutes}")
    if args.keep_checkpoints < 1:
        raise UsageError("--keep-checkpoints must be >= 1")
    if args.tensorboard is not None:
        if Path(args.tensorboard).exists() and not Path(args.tensorboard).is_dir():
            raise UsageError(f"--tensorboard {args.tensorboard}: exists and is not a folder")
        try:                                       # optional: imported only when the flag is given
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    if args.ib_sink_ratio <= 1:
        raise UsageError("--ib-sink-ratio must be > 1 (a sink is a token far above its row's median norm)")
    if args.eval_every and not args.eval_data:
        raise UsageError("--eval-every needs --eval-data")
    # The IB-FT setting: this project's defaults (IBConfig), or the paper's literal values under --paper-ib.
    if args.alpha is None:
        args.alpha = PAPER_ALPHA if args.paper_ib else IBConfig.alpha
    if args.ib_sink is None:
        args.ib_sink = "keep" if args.paper_ib or not IBConfig.exclude_sink else "exclude"
    if args.ib_input is None:
        args.ib_input = "raw" if args.paper_ib or not IBConfig.input_norm else "norm"
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: examples (data.py) -> right-padded batches with labels on the trained tokens only
# ----------------------------------------------------------------------------------------------------------------

def collate(examples, pad_id, device):
    """Examples (ids, trained) -> right-padded (B, T) ids and attention mask; label_mask[b, t] is True where
    position t predicts a trained token (trained[t + 1]: an assistant turn's); targets are those next tokens, in
    row-major order."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    label = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, (row, trained) in enumerate(examples):
        ids[b, :len(row)] = torch.tensor(row)
        attn[b, :len(row)] = 1
        label[b, :len(row) - 1] = torch.tensor(trained[1:], dtype=torch.bool)
    targets = ids[:, 1:][label[:, :-1]]
    return ids.to(device), attn.to(device), label.to(device), targets.to(device)


def micro_batches(n, batch_size, world, epochs, seed, lengths=None, window=16):
    """The whole run's sequence of global micro-batches (lists of example indices), epoch after epoch; each
    epoch is a fresh seeded permutation. Rank r takes slice r of each global micro-batch (shard); the plan depends on
    batch_size x world only, so N processes train on one process's micro-batches, a short last one included (a
    process whose slice of it is empty runs a dummy row weighted 0, step_batches).
    With lengths (--group-by-length: example i has lengths[i] tokens), each run of window x batch examples of the
    permutation is sorted by length, longest first, before it is cut, so a micro-batch pads its rows to a similar
    length; then the micro-batches are shuffled by the epoch's generator (a short last one stays last). An epoch
    still visits every example once, in micro-batches of the same size."""
    out, g = [], batch_size * world
    w = window * g
    for epoch in range(math.ceil(epochs)):
        gen = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        if lengths is not None:                                     # stable: equal lengths keep the permutation's order
            perm = [i for s in range(0, n, w) for i in sorted(perm[s:s + w], key=lambda i: -lengths[i])]
        batches = [perm[i:i + g] for i in range(0, n, g)]
        if lengths is not None:
            full = n // g                                           # the full micro-batches; a short one stays last
            batches = [batches[i] for i in torch.randperm(full, generator=gen).tolist()] + batches[full:]
        if epoch + 1 > epochs:                                      # a fractional last epoch
            batches = batches[:int(len(batches) * (epochs - epoch))]
        out += batches
    return out


def shard(batch, rank, world):
    per = math.ceil(len(batch) / world)
    return batch[rank * per:(rank + 1) * per]


# ----------------------------------------------------------------------------------------------------------------
# Data selection baselines (Table 1): FT w/ Min-K% and FT w/ GRAND
# ----------------------------------------------------------------------------------------------------------------

def select_mink(model, examples, keep, k):
    """Drop the most memorized examples (lowest Min-K% Prob of their trained tokens on the base model, Sec. 3),
    keep the fraction `keep`."""
    import mink
    scores = mink.score_tokens(model, [ids for ids, _ in examples], [t for _, t in examples], k)
    return mink.prune_indices(scores, 1.0 - keep), scores                 # the same subset as `mink.py prune`


def grand_scores(model, examples, pad_id, batch_size=4):
    """GraNd (Paul et al., 2021): the norm of each example's loss gradient w.r.t. the LoRA parameters, here at
    LoRA initialization (step 0) and without dropout. The per-example gradients of a LoRA layer follow from its
    input x and output gradient g in one batched backward pass:
        dL_i/dB = s * sum_t g_t (A x_t)^T        dL_i/dA = s * sum_t (B^T g_t) x_t^T
    where L_i is example i's mean token loss (rows of a batch never interact, so dL/dy on row i is dL_i/dy)."""
    layers = lora.lora_layers(model)
    was_training = model.training
    model.eval()
    store, handles = {}, []

    def hook(name):
        def fwd(mod, inp, out):
            x = inp[0].detach()
            store[name] = {"x": x}
            out.register_hook(lambda g: store[name].__setitem__("g", g.detach()))
        return fwd

    for name, m in layers.items():
        handles.append(m.register_forward_hook(hook(name)))
    device = model.lm_head.weight.device
    scores = []
    try:
        for s in range(0, len(examples), batch_size):
            ids, attn, label, targets = collate(examples[s:s + batch_size], pad_id, device)
            logits = model(ids, attention_mask=attn, logits_at=label)                          # (N, V)
            tok_loss = F.cross_entropy(logits.float(), targets, reduction="none")             # (N,)
            per_row = label.sum(1)                                                            # (B,)
            weights = (1.0 / per_row.float()).repeat_interleave(per_row)                      # mean per example
            model.zero_grad(set_to_none=True)
            (tok_loss * weights).sum().backward()
            sq = torch.zeros(ids.shape[0], device=device)
            for name, m in layers.items():
                x, g = store[name]["x"].float(), store[name]["g"].float()                     # (B,T,in), (B,T,out)
                A, B = m.lora_A.detach().float(), m.lora_B.detach().float()
                u = x @ A.t()                                                                 # (B, T, r)
                gB = m.scaling * torch.einsum("bto,btr->bor", g, u)                           # (B, out, r)
                gA = m.scaling * torch.einsum("btr,bti->bri", g @ B, x)                       # (B, r, in)
                sq += gB.pow(2).sum((1, 2)) + gA.pow(2).sum((1, 2))
            scores += sq.sqrt().tolist()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return scores


def select_grand(model, examples, pad_id, keep, seeds, args):
    """Average GraNd over `seeds` LoRA initializations; keep the highest-scoring fraction (Table 1 keeps 80%)."""
    import mink
    total = torch.zeros(len(examples))
    for s in range(seeds):
        g = torch.Generator().manual_seed(args.seed * 1000 + s)   # a fresh LoRA init per seed (B = 0, A ~ Kaiming)
        for m in lora.lora_layers(model).values():
            m.reset_parameters(g)
        total += torch.tensor(grand_scores(model, examples, pad_id, args.batch_size))
    scores = (total / seeds).tolist()
    return mink.prune_indices(scores, 1.0 - keep), scores         # drop the lowest scores, as --prune mink does


# ----------------------------------------------------------------------------------------------------------------
# The objective: Eq. (1) and Eq. (IB-FT) for one micro-batch, as token sums
# ----------------------------------------------------------------------------------------------------------------

class Objective(nn.Module):
    """model + optional bottleneck in one module, so that DDP sees every trainable parameter. Its forward is Alg. 1's
    for one micro-batch: the token sums that ibft_loss turns into Eq. (IB-FT) with the whole step's counts."""

    def __init__(self, model, vib, layer):
        super().__init__()
        self.model, self.vib, self.layer = model, vib, layer

    def forward(self, ids, attn, label, targets, noise_slice=None):
        """(ce_sum, kl_sum, ce_ib_sum, stats). ids/attn/label (B, T); targets (N,), the labels at label positions."""
        vib, head = self.vib, self.model.lm_head.weight
        h, h_l = self.model.trunk(ids, attn, hidden_layer=self.layer if vib is not None else None)  # one forward
        ce_sum = linear_cross_entropy(self.model.model.norm(h[label]), head, targets)  # Eq. (1), (N, H) rows
        if vib is None:                                                                # plain FT
            zero = ce_sum.new_zeros(())
            return ce_sum, zero, zero, {}
        kl_sum, h_bar, stats = vib(h_l, attn, label, noise_slice)      # q_phi, z = mu + sigma * eps, g_phi; Eq. (4)
        if vib.cfg.exclude_sink:                                       # the sinks' labels leave CE_IB too
            targets = targets[stats["labels_kept"]]
        if vib.cfg.head_norm:
            h_bar = self.model.model.norm(h_bar)
        ce_ib_sum = linear_cross_entropy(h_bar, head, targets)         # s_IB = lm_head(h_bar): -Eq. (5), summed
        return ce_sum, kl_sum, ce_ib_sum, stats


def clip_gradients(groups, max_norm):
    """Clip the global gradient norm over all groups; the norm of each group is computed separately and combined,
    so a group whose gradients are exactly zero (the bottleneck at alpha = 0) changes nothing, bit for bit."""
    norms = [torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in g if p.grad is not None]))
             for g in groups if any(p.grad is not None for p in g)]
    total = torch.stack([n.pow(2) for n in norms]).sum().sqrt() if norms else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in groups:
        for p in g:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return float(total)


def cosine_with_warmup(total_steps, warmup_ratio, hf=False):
    """The lr factor of 0-based step s: linear warmup over w = ceil(ratio x total) steps, then cosine decay to 0.
    Warmup is (s+1)/(w+1) here, so no step is wasted at lr 0; hf=True gives transformers'
    get_cosine_schedule_with_warmup, s/w, whose first step runs at lr 0. From step w on both are identical."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def f(step):
        if step < warmup:
            return step / warmup if hf else (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic folder swap; LoRA + VIB in safetensors, optimizer/RNG via torch.load(weights_only=True)
# ----------------------------------------------------------------------------------------------------------------

def checkpoint_slot(run_dir: Path, i: int) -> Path:
    """The folder of the i-th newest kept checkpoint: checkpoint/, .checkpoint.old/, .checkpoint.old2/, ..."""
    return run_dir / ("checkpoint" if i == 0 else ".checkpoint.old" if i == 1 else f".checkpoint.old{i}")


def checkpoint_dirs(run_dir: Path) -> list:
    """The checkpoint folders in run_dir, newest first (a gap, left by a killed rotation, is skipped)."""
    found = {0: run_dir / "checkpoint"} if (run_dir / "checkpoint").is_dir() else {}
    for d in run_dir.glob(".checkpoint.old*") if run_dir.is_dir() else ():
        rest = d.name[len(".checkpoint.old"):]
        i = 1 if rest == "" else int(rest) if rest.isdigit() else 0
        if i >= 1 and d.name == checkpoint_slot(run_dir, i).name and d.is_dir():
            found[i] = d
    return [found[i] for i in sorted(found)]


def write_checkpoint(run_dir: Path, fill, keep: int = 2):
    """fill(folder) writes a checkpoint's files into .checkpoint.tmp; they are synced to disk, then the kept ones move
    down a slot (oldest first: checkpoint/ -> .checkpoint.old -> .checkpoint.old2 ...), .checkpoint.tmp is renamed
    to checkpoint/, and all but the newest `keep` are deleted. Killed at any point, run_dir holds every checkpoint it
    held before, or the new one complete: no renamed, half-written folder."""
    tmp = run_dir / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    for f in tmp.iterdir():                  # on disk before the rename: a crash leaves no renamed, truncated file
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    for d in reversed(checkpoint_dirs(run_dir)):    # oldest first, each into the free slot after its own
        i = 0 if d.name == "checkpoint" else int(d.name[len(".checkpoint.old"):] or 1)
        d.rename(checkpoint_slot(run_dir, i + 1))
    tmp.rename(checkpoint_slot(run_dir, 0))
    for d in checkpoint_dirs(run_dir)[keep:]:
        shutil.rmtree(d)


def save_checkpoint(run_dir: Path, model, vib, opt, sched, scaler, step, base_path, keep: int = 2):
    """checkpoint/ (write_checkpoint): the LoRA adapter, the bottleneck, and the optimizer, schedule, RNG and scaler
    states; the `keep` - 1 before it stay as .checkpoint.old, .checkpoint.old2, ..., what --resume falls back on."""
    def fill(tmp):
        peft_io.save_adapter(model, tmp, base_path)
        if vib is not None:
            save_vib(vib, tmp / "vib.safetensors", model.hidden_size)
        none = torch.zeros(0, dtype=torch.uint8)
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else none,
                 "rng_vib": vib.generator.get_state() if vib is not None else none,
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}}
        torch.save(state, tmp / "trainer_state.pt")
    write_checkpoint(run_dir, fill, keep)


def load_checkpoint(run_dir: Path, model, vib, opt, sched, scaler):
    """--resume from checkpoint/, or from the newest older one kept (.checkpoint.old, .checkpoint.old2, ...) that can
    be read where checkpoint/ is missing or a file of it cannot be read (truncated, corrupt): a note on stderr names
    each file skipped and why. Every file is read before anything is restored. Returns the step the checkpoint holds."""
    names = [peft_io.ADAPTER_WEIGHTS, "trainer_state.pt"] + (["vib.safetensors"] if vib is not None else [])

    def read(ck) -> tuple:
        """({name: contents}, None) of a checkpoint folder, or (None, why) for its first missing or unreadable file."""
        got = {}
        for name in names:
            f = ck / name
            if not f.is_file():
                return None, f"{f}: missing"
            try:
                got[name] = torch.load(f, weights_only=True) if name.endswith(".pt") else load_file(str(f))
            except Exception as e:           # SafetensorError, or torch.load's RuntimeError / EOFError / pickle error
                reason = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0]
                return None, f"{f}: cannot be read ({reason})"
        return got, None

    skipped, kept = [], checkpoint_dirs(run_dir)    # checkpoint/ absent: killed between write_checkpoint's renames
    for ck in kept:
        got, why = read(ck)
        if got is not None:
            break
        skipped.append(why)
    else:
        if not skipped:
            raise UsageError(f"--resume: no checkpoint in {run_dir}")
        raise UsageError(f"--resume: {'; '.join(skipped)}"
                         + ("" if kept[-1].name != "checkpoint" else "; no .checkpoint.old to fall back on"))
    if skipped:
        print(f"note: --resume: {'; '.join('skipped ' + s for s in skipped)}; resuming from {ck}", file=sys.stderr)
    lora.load_lora_state_dict(model, got[peft_io.ADAPTER_WEIGHTS], str(ck / peft_io.ADAPTER_WEIGHTS))
    if vib is not None:
        vib.load_state_dict(got["vib.safetensors"])
    state = got["trainer_state.pt"]
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state["rng_cuda"].numel():
        torch.cuda.set_rng_state(state["rng_cuda"])
    if vib is not None:
        vib.generator.set_state(state["rng_vib"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def save_vib(vib, path: Path, hidden_size: int):
    """The bottleneck's weights (q_phi, g_phi) with its IBConfig in the safetensors metadata, written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in vib.state_dict().items()}
    meta = {"ib_config": json.dumps(vib.cfg.to_dict()), "hidden_size": str(hidden_size)}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

RESUME_KEYS = ("method", "layer", "model", "data", "batch_size", "grad_accum", "global_batch_size", "lr", "epochs",
               "max_len", "seed", "lora_r", "lora_alpha", "lora_dropout", "alpha", "beta", "bottleneck_dim",
               "kl_normalizer", "kl_pad_to", "hf_warmup", "prune", "keep", "ib_input", "ib_sink", "group_by_length",
               "ib_sink_ratio")


def resolve_grad_accum(args, world):
    """Micro-batches per optimizer step per process: --grad-accum, or derived from --global-batch-size."""
    if args.global_batch_size is None:
        return args.grad_accum
    per_micro = args.batch_size * world
    if args.global_batch_size % per_micro:
        raise UsageError(f"--global-batch-size {args.global_batch_size} is not a multiple of --batch-size "
                         f"{args.batch_size} x {world} process(es) = {per_micro}")
    accum = args.global_batch_size // per_micro
    if args.grad_accum not in (1, accum):
        raise UsageError(f"--global-batch-size {args.global_batch_size} with --batch-size {args.batch_size} x {world} "
                         f"process(es) means --grad-accum {accum}, but --grad-accum {args.grad_accum} was given")
    return accum


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Run:
    """What one training run holds from set-up to finish (train() reads it top to bottom)."""
    args: argparse.Namespace
    device: torch.device
    world: int                          # processes
    rank: int
    amp_dtype: Optional[torch.dtype]    # None: fp32
    model_path: Path
    run_dir: Path
    model: nn.Module
    tok: object
    vib: Optional[VariationalBottleneck]
    ddp: nn.Module                      # Objective, wrapped in DDP when world > 1
    examples: list                      # [(ids, trained)] kept for training (data.encode)
    plan: list                          # global micro-batches of the whole run
    grad_accum: int
    total_steps: int
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler
    start_step: int = 0
    eval_rows: Optional[list] = None    # --eval-data as mink.encode_examples gives it: token ids per example
    eval_scored: Optional[list] = None  # and which of its tokens are scored (the response's)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and prints."""
        return self.rank == 0

    def log(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs)


def init_process(args) -> tuple:
    """(world, rank, local_rank, device), joining the process group under torchrun."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return world, rank, local_rank, device


def load_examples(args, tok, data_path) -> tuple:
    """(format, examples, source, stats): the data file, read, its format detected and tokenized (data.py)."""
    records, where = read_records(data_path, "--data")
    if not records:
        raise UsageError(f"{data_path}: no examples")
    fmt = data.detect_format(records, data_path, args.instruction_field, args.response_field)
    examples, source, stats = data.encode(tok, records, where, fmt, args.max_len)
    if not examples:
        raise UsageError(f"{data_path}: no example has a response token left within --max-len {args.max_len}")
    return fmt, examples, source, stats


def load_eval_data(path: Path, tok) -> tuple:
    """--eval-data read as `mink.py score` reads its --data: (rows, scored)."""
    import mink
    records, where = read_records(path, "--eval-data")
    if not records:
        raise UsageError(f"{path}: no examples")
    try:
        return mink.encode_examples(tok, records, path=str(path))
    except mink.ExampleError as e:
        raise UsageError(f"{where[e.index]}: {e}") from None


def add_lora_and_select(args, model, examples, pad_id) -> tuple:
    """Inject LoRA (Appendix C.1) and apply --prune (Table 1's baselines). Returns (kept indices, targets)."""
    kept = list(range(len(examples)))
    if args.prune == "mink":                                    # scored on the base model, before LoRA
        kept, _ = select_mink(model, examples, args.keep, args.mink_k)
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    lora.inject_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets,
                  rslora=args.rslora, generator=torch.Generator().manual_seed(args.seed))
    if args.prune == "grand":                                   # scored at LoRA initializations, then reset
        init = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
        kept, _ = select_grand(model, examples, pad_id, args.keep, args.grand_seeds, args)
        lora.load_lora_state_dict(model, init, "initial LoRA weights")
    return kept, targets


def make_bottleneck(args, model, device) -> Optional[VariationalBottleneck]:
    """The VIB of Alg. 1 for --method ibft, configured from the flags; None for plain FT."""
    if args.method != "ibft":
        return None
    ib = IBConfig(layer=args.layer, dim=args.bottleneck_dim, alpha=args.alpha, beta=args.beta,
                  kl_reduction=args.kl_reduction, kl_normalizer=args.kl_normalizer, kl_pad_to=args.kl_pad_to,
                  logvar_clamp=args.logvar_clamp or None, head_norm=args.ib_head_norm,
                  input_norm=args.ib_input == "norm", exclude_sink=args.ib_sink == "exclude",
                  sink_ratio=args.ib_sink_ratio, seed=args.seed)
    return VariationalBottleneck(model.hidden_size, ib, device=device).train()


def start_run_dir(run: Run, config: dict):
    """Check a --resume against the saved config and load the checkpoint; write config.json and trim
    metrics.jsonl to the steps the checkpoint holds."""
    args, run_dir = run.args, run.run_dir
    if args.resume:
        saved = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
        for k in RESUME_KEYS:
            if k in saved and saved[k] != config[k]:
                raise UsageError(f"--resume: --{k.replace('_', '-')} is {config[k]!r} but the run was started "
                                 f"with {saved[k]!r}")
        run.start_step = load_checkpoint(run_dir, run.model, run.vib, run.opt, run.sched, run.scaler)
        run.log(f"resumed {run_dir} at step {run.start_step}")
    if run.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config, indent=2)
        metrics = run_dir / "metrics.jsonl"
        if not args.resume:
            metrics.unlink(missing_ok=True)
        elif metrics.exists():   # drop what a killed run logged after its last checkpoint: those steps run again
            keep = [x for x in metrics.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= run.start_step]
            write_text(metrics, "".join(x + "\n" for x in keep))


def setup(args) -> Run:
    """Model, data, LoRA, bottleneck, optimizer and schedule, in the order that fixes every random stream."""
    world, rank, local_rank, device = init_process(args)
    grad_accum = resolve_grad_accum(args, world)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision != "fp32" and device.type == "cpu" and rank == 0:
        # The same mixed-precision path as on a GPU (torch's CPU autocast; fp16 with a CPU GradScaler), so that it
        # is tested without one; bf16 matrix products are ~100x slower than fp32 on a CPU without AMX.
        print(f"note: --precision {precision} on the CPU runs the GPU's mixed-precision code path; it is much slower "
              f"than fp32 here", file=sys.stderr)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model_path = Path(args.model) if args.model else default_model_path()
    data_path = Path(args.data) if args.data else DEFAULT_DATA

    # The base model (frozen) and the tokenized data.
    torch.manual_seed(args.seed)
    model = load_model(model_path, dtype=amp_dtype or torch.float32, device=device)
    n_layers = model.config.num_layers
    if args.method == "ibft" and not 1 <= args.layer <= n_layers - 1:
        raise UsageError(f"--layer must be in 1..{n_layers - 1} for this model ({n_layers} layers), got {args.layer}")
    tok = load_tokenizer(model_path, family=args.template)
    fmt, examples, source, stats = load_examples(args, tok, data_path)

    # LoRA, the data selection baselines, the bottleneck; then this process's global RNG (the LoRA dropout masks of
    # training do not draw from it: they are keyed by example, dropout_keys).
    kept, targets = add_lora_and_select(args, model, examples, tok.pad_id)
    examples = [examples[i] for i in kept]
    model.gradient_checkpointing = args.gradient_checkpointing
    model.train()
    vib = make_bottleneck(args, model, device)
    torch.manual_seed(args.seed + rank)
    objective = Objective(model, vib, args.layer)
    ddp = nn.parallel.DistributedDataParallel(objective, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else objective

    # AdamW over LoRA + bottleneck, the run's micro-batches, cosine schedule with warmup.
    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params}, {"params": list(vib.parameters()) if vib is not None else []}],
                            lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay)
    plan = micro_batches(len(examples), args.batch_size, world, args.epochs, args.seed,
                         [len(ids) for ids, _ in examples] if args.group_by_length else None)
    total_steps = math.ceil(len(plan) / grad_accum)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if total_steps < 1:
        raise UsageError(f"{data_path}: not enough examples for one batch of {args.batch_size * world}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total_steps, args.warmup_ratio,
                                                                      hf=args.hf_warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    run = Run(args, device, world, rank, amp_dtype, model_path, Path(args.out), model, tok, vib, ddp, examples,
              plan, grad_accum, total_steps, opt, sched, scaler)
    if args.eval_data:
        run.eval_rows, run.eval_scored = load_eval_data(Path(args.eval_data), tok)

    # The resolved config beside the run; resume.
    config = dict(vars(args), model=str(model_path), data=str(data_path), precision=precision, world_size=world,
                  grad_accum=grad_accum, global_batch_size=args.batch_size * world * grad_accum,
                  total_steps=total_steps, data_stats=stats, kept_examples=len(examples), data_format=fmt.describe(),
                  template=tok.family, lora_targets=list(targets))
    if args.prune != "none":      # which records (0-based, in file order) the run trained on
        config["kept_records"] = [source[i] for i in kept]
    start_run_dir(run, config)
    run.log(f"{args.method} | model {model_path.name} ({n_layers} layers, {tok.family} template) | "
            f"{len(examples)} examples ({stats['truncated']} truncated, {stats['dropped']} dropped) | "
            f"{total_steps} steps of {args.batch_size * world * grad_accum} examples | {precision} on {device}"
            + (f" x{world}" if world > 1 else ""))
    return run


def dropout_keys(seed: int, step: int, global_batches) -> list:
    """One LoRA dropout key per example of each global micro-batch of optimizer step `step`: mix64 of the seed, the
    step, the example's index and how often it came earlier in the step (a step may span two epochs). A process
    keys its rows with its shard of them (lora.keyed_dropout), so N processes draw the masks one process would."""
    seen, keys = {}, []
    for b in global_batches:
        keys.append([lora.mix64(seed, step, i, seen.get(i, 0)) for i in b])
        for i in b:
            seen[i] = seen.get(i, 0) + 1
    return keys


def step_batches(run: Run, step: int) -> tuple:
    """This process's micro-batches of optimizer step `step`, whether each is real (not a dummy row), each one's
    bottleneck noise slice and dropout keys and row lengths, and the step's token counts over all micro-batches and
    processes (label, real, rows), known before any forward pass."""
    world, rank, examples = run.world, run.rank, run.examples
    global_batches = run.plan[step * run.grad_accum:(step + 1) * run.grad_accum]
    keys = dropout_keys(run.args.seed, step, global_batches)
    # A process whose slice of a global micro-batch is empty (an epoch's last one can hold fewer examples than
    # processes) still runs forward and backward, as DDP's all-reduce needs every process: on a dummy row, the
    # micro-batch's first example, weighted 0.0 (real[j] False: optimizer_step zeroes its sums, the counts skip it).
    mine = [(shard(b, rank, world), shard(k, rank, world)) for b, k in zip(global_batches, keys)]
    real = [bool(s) for s, _ in mine]
    mine = [(s, k) if s else (b[:1], bk[:1]) for (s, k), b, bk in zip(mine, global_batches, keys)]
    batches = [collate([examples[i] for i in s], run.tok.pad_id, run.device) for s, _ in mine]
    # Label rows of each process's slice, so that every process draws the bottleneck noise of the whole
    # global micro-batch and uses its own rows of it (see VariationalBottleneck.sample); a dummy row, the first's.
    noise = []
    for b, ok in zip(global_batches, real):
        n = [sum(sum(examples[i][1]) for i in shard(b, r, world)) for r in range(world)]
        noise.append((sum(n[:rank]) if ok else 0, sum(n)))
    rows = [(k, [len(examples[i][0]) for i in s]) for s, k in mine]
    counted = [x for x, ok in zip(batches, real) if ok]
    counts = torch.tensor([float(sum(int(lab.sum()) for _, _, lab, _ in counted)),
                           float(sum(int(attn.sum()) for _, attn, _, _ in counted)),
                           float(sum(ids.shape[0] for ids, _, _, _ in counted))], device=run.device)
    if world > 1:
        dist.all_reduce(counts)
    return batches, real, noise, rows, counts.tolist()


def optimizer_step(run: Run, step: int, last_good) -> dict:
    """Alg. 1 for one optimizer step: forward and backward every micro-batch of the step with the loss normalized
    by the whole step's counts, then clip, AdamW and the schedule. Returns the step's metrics record."""
    batches, real, noise, rows, (n_label, n_real, n_rows) = step_batches(run, step)
    ib_cfg = run.vib.cfg if run.vib is not None else None                 # None: plain FT
    n_kl = kl_count(ib_cfg, n_real, n_rows) if ib_cfg is not None else 1.0
    diag = ib_cfg is not None and run.args.diag_every > 0 and (step == 0 or (step + 1) % run.args.diag_every == 0)
    sums, stats, g_ib, ts = torch.zeros(6, device=run.device), None, None, time.time()
    for j, (ids, attn, label, tgt) in enumerate(batches):
        sync = j == len(batches) - 1 or run.world == 1
        ctx = run.ddp.no_sync() if (run.world > 1 and not sync) else contextlib.nullcontext()
        keyed = lora.keyed_dropout(run.model, *rows[j]) if run.args.dropout_masks == "example" \
            else contextlib.nullcontext()                   # --dropout-masks process: the global RNG, as nn.Dropout
        with ctx, keyed:                                    # the backward too: checkpointing redraws the masks
            with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                ce_sum, kl_sum, ce_ib_sum, stats = run.ddp(ids, attn, label, tgt, noise[j])
                if not real[j]:                            # a dummy row (step_batches): it counts for nothing
                    ce_sum, kl_sum, ce_ib_sum = ce_sum * 0.0, kl_sum * 0.0, ce_ib_sum * 0.0
                    stats = {k: v * 0.0 for k, v in stats.items() if k != "labels_kept"}
                loss, *_ = ibft_loss(ce_sum, kl_sum, ce_ib_sum, n_label, n_kl, ib_cfg)  # Eq. (1) or (IB-FT)
            if diag:                                       # the IB terms' own gradient, while the graph is alive
                g_ib = ib_gradient(run, ib_penalty(kl_sum, ce_ib_sum, n_label, n_kl, ib_cfg), g_ib)
            run.scaler.scale(loss * run.world).backward()  # DDP averages gradients over processes: undo the 1/world
        extra = [stats["kl_all"], stats["kl_sink"], stats["n_sink"]] if stats else [ce_sum.new_zeros(())] * 3
        sums += torch.stack([x.detach().float() for x in (ce_sum, kl_sum, ce_ib_sum, *extra)])
    if run.world > 1:
        dist.all_reduce(sums)
    loss_value, ce, kl, ce_ib = ibft_loss(*sums[:3].tolist(), n_label, n_kl, ib_cfg)   # the same, to log
    if not math.isfinite(loss_value):
        where = f"{run.run_dir / 'checkpoint'} (step {last_good})" if last_good is not None else "none saved"
        raise UsageError(f"non-finite loss at step {step + 1} (ce={ce}, kl={kl}, ce_ib={ce_ib}); stopped. "
                         f"Last good checkpoint: {where}")
    run.scaler.unscale_(run.opt)
    shares = gradient_shares(run, g_ib) if diag else {}
    gnorm = clip_gradients([group["params"] for group in run.opt.param_groups], run.args.max_grad_norm)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    rec = {"step": step + 1, "loss": loss_value, "ce": ce, "kl": kl, "ce_ib": ce_ib, "lr": run.sched.get_last_lr()[0],
           "grad_norm": gnorm, "tokens_per_s": int(n_real / max(time.time() - ts, 1e-9)), "real_tokens": n_real}
    if ib_cfg is not None:
        rec.update(bottleneck_stats(ib_cfg, *sums[3:].tolist(), n_real), **shares)
    return rec


def bottleneck_stats(cfg: IBConfig, kl_all, kl_sink, n_sink, n_real) -> dict:
    """rate: the KL in nats per token in the bottleneck, summed over latent dims (whatever --kl-reduction and
    --kl-normalizer: it is read off the sums, not the loss); sink_share: the share of all real tokens' KL that sits
    on attention sinks (bottleneck.sink_mask), whether they are excluded or not."""
    kl_in, n_in = (kl_all - kl_sink, n_real - n_sink) if cfg.exclude_sink else (kl_all, n_real)
    return {"rate": kl_in / max(n_in, 1.0), "sink_share": kl_sink / kl_all if kl_all > 0 else 0.0}


def ib_gradient(run: Run, ib_loss, acc):
    """The gradient of alpha * l_IB alone on the LoRA weights (this process's share), added to acc. One backward
    pass through blocks 1..l* only, which leaves the graph for the step's own backward."""
    params = run.opt.param_groups[0]["params"]
    grads = torch.autograd.grad(ib_loss, params, retain_graph=True, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten() for g, p in zip(grads, params)])
    return flat if acc is None else acc + flat


def gradient_shares(run: Run, g_ib) -> dict:
    """ib_share = |grad of alpha * l_IB| / |grad of CE| on the LoRA weights, before clipping, and the cosine between
    the two. CE's gradient is the step's whole gradient minus the IB terms'."""
    if run.world > 1:
        dist.all_reduce(g_ib)
    total = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                       for p in run.opt.param_groups[0]["params"]])
    g_ce = total - g_ib
    return {"ib_share": float(g_ib.norm() / g_ce.norm().clamp_min(1e-30)),
            "ib_cos": float(F.cosine_similarity(g_ib, g_ce, dim=0))}


def heldout_nll(run: Run) -> float:
    """The mean NLL of --eval-data's response tokens (all tokens pooled), without dropout: mink.token_logprobs,
    the numbers `mink.py score` reads, on the model as it is now."""
    import mink
    model = run.model
    model.eval()
    values = mink.token_logprobs(model, run.eval_rows, run.eval_scored, mink.default_batch_size(model))
    model.train()
    return -float(torch.cat(values).double().mean())


TENSORBOARD_SCALARS = ("loss", "ce", "kl", "ce_ib", "lr", "grad_norm", "rate", "sink_share", "ib_share", "eval_nll")


def log_step(run: Run, rec: dict, elapsed: float, tb=None):
    """Append the record to metrics.jsonl (and its TENSORBOARD_SCALARS to tb, a SummaryWriter); print it every
    --log-every steps with an ETA."""
    done, total = rec["step"], run.total_steps
    with open(run.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: v for k, v in rec.items() if k != "real_tokens"}) + "\n")
    if tb is not None:
        for k in TENSORBOARD_SCALARS:
            if k in rec:
                tb.add_scalar(k, rec[k], done)
    if done % run.args.log_every == 0 or done == total:
        eta = elapsed / (done - run.start_step) * (total - done)
        ib_part = f" kl {rec['kl']:.4f} ce_ib {rec['ce_ib']:.3f}" if run.vib is not None else ""
        diag = (f" | rate {rec['rate']:.1f} sink {100 * rec['sink_share']:.0f}%" if "rate" in rec else "") + \
               (f" ib_share {rec['ib_share']:.3f}" if "ib_share" in rec else "") + \
               (f" | eval_nll {rec['eval_nll']:.4f}" if "eval_nll" in rec else "")
        print(f"step {done}/{total} | loss {rec['loss']:.4f} ce {rec['ce']:.4f}{ib_part}{diag} | lr {rec['lr']:.2e} | "
              f"gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']} tok/s | ETA {fmt_time(eta)}", flush=True)


def diagnostics_summary(metrics: Path) -> list:
    """The summary's lines on the bottleneck and the held-out data, from the whole run's metrics.jsonl."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    lines, shares = [], [r["ib_share"] for r in recs if "ib_share" in r]
    if shares:
        lines.append(f"  IB        ib_share median {statistics.median(shares):.3f} over {len(shares)} measurements "
                     f"(|grad alpha*l_IB| / |grad CE|); rate {recs[-1]['rate']:.2f} nats/token, "
                     f"sink_share {100 * recs[-1]['sink_share']:.1f}% at the last step")
    evals = [(r["step"], r["eval_nll"]) for r in recs if "eval_nll" in r]
    if evals:
        lines.append("  held-out  NLL " + ", ".join(f"{v:.4f} (step {s})" for s, v in evals))
    return lines


def finish(run: Run, first_loss, last_loss, elapsed: float, tokens_seen: float):
    """The PEFT adapter, the bottleneck's weights and a final checkpoint in RUN_DIR, and a one-screen summary."""
    args, run_dir, vib = run.args, run.run_dir, run.vib
    peft_io.save_adapter(run.model, run_dir, str(run.model_path))
    if vib is not None:
        save_vib(vib, run_dir / "vib.safetensors", run.model.hidden_size)
    save_checkpoint(run_dir, run.model, vib, run.opt, run.sched, run.scaler, run.total_steps, str(run.model_path),
                    args.keep_checkpoints)
    older = [d.name + "/" for d in checkpoint_dirs(run_dir)[1:]]
    nan = float("nan")
    print("\n".join([
        "",
        f"done: {args.method} on {run.model_path.name}, {run.total_steps - run.start_step} steps in "
        f"{fmt_time(elapsed)} ({tokens_seen / max(elapsed, 1e-9):.0f} tok/s)",
        f"  loss {nan if first_loss is None else first_loss:.4f} -> {nan if last_loss is None else last_loss:.4f}"
        + (f"  (alpha {args.alpha}, beta {args.beta}, layer {args.layer}, d {args.bottleneck_dim})" if vib is not None else ""),
        *diagnostics_summary(run_dir / "metrics.jsonl"),
        f"  run dir   {run_dir}/",
        "  adapter   adapter_model.safetensors + adapter_config.json (PEFT format; inference uses base + LoRA only)",
        f"  also      {'vib.safetensors, ' if vib is not None else ''}config.json, metrics.jsonl, checkpoint/"
        + (f" ({', '.join(older)}: the ones before)" if older else ""),
        f"  next      {python_command()} evaluate.py --benchmark humaneval --generate --adapter {run_dir} "
        f"--samples {run_dir}/humaneval_samples.jsonl --out {run_dir}/humaneval.json",
    ]))


def epoch_end_steps(run: Run) -> set:
    """The optimizer steps (1-based) during which an epoch's last micro-batch runs."""
    per_epoch = len(micro_batches(len(run.examples), run.args.batch_size, run.world, 1, run.args.seed))
    return {math.ceil(k / run.grad_accum) for k in range(per_epoch, len(run.plan) + 1, per_epoch)} if per_epoch \
        else set()


def save_due(run: Run, done: int, since_save: float, epoch_ends: set) -> bool:
    """Whether to checkpoint after step `done` (finish() writes the last one): at an epoch's end; and every
    --save-every steps, or, without it, once --save-minutes have passed since the last checkpoint. The clock is rank
    0's, broadcast, so that every process takes the same decision (they meet at the barrier after the save)."""
    args = run.args
    if done >= run.total_steps:
        return False
    if done in epoch_ends:
        return True
    if args.save_every or not args.save_minutes:
        return bool(args.save_every) and done % args.save_every == 0
    due = since_save >= 60 * args.save_minutes
    if run.world > 1:
        flag = torch.tensor([float(due)], device=run.device)
        dist.broadcast(flag, 0)
        due = bool(flag.item())
    return due


def tensorboard_writer(run: Run):
    """--tensorboard's SummaryWriter; a resumed run first drops the events of the steps after its checkpoint, which
    run again (as metrics.jsonl is trimmed)."""
    from torch.utils.tensorboard import SummaryWriter             # optional: parse_args checked it is installed
    return SummaryWriter(run.args.tensorboard, purge_step=run.start_step + 1 if run.args.resume else None)


def train(args):
    """Set up, then optimizer steps (checkpointed by save_due), then finish."""
    run = setup(args)
    tb = tensorboard_writer(run) if args.tensorboard and run.is_main else None
    epoch_ends = epoch_end_steps(run)
    t0, tokens_seen = time.time(), 0
    last_save = t0
    last_good = run.start_step if args.resume else None             # the newest checkpoint on disk
    first_loss = last_loss = None
    try:
        for step in range(run.start_step, run.total_steps):
            rec = optimizer_step(run, step, last_good)
            if run.eval_rows is not None and run.is_main and (
                    step + 1 == run.total_steps or (args.eval_every and (step + 1) % args.eval_every == 0)):
                te = time.time()
                rec["eval_nll"] = heldout_nll(run)
                rec["eval_seconds"] = round(time.time() - te, 2)
            first_loss = rec["loss"] if first_loss is None else first_loss
            last_loss, tokens_seen = rec["loss"], tokens_seen + rec["real_tokens"] / run.world
            if run.is_main:
                log_step(run, rec, time.time() - t0, tb)
            done = rec["step"]
            if save_due(run, done, time.time() - last_save, epoch_ends):
                if run.is_main:
                    save_checkpoint(run.run_dir, run.model, run.vib, run.opt, run.sched, run.scaler, done,
                                    str(run.model_path), args.keep_checkpoints)
                last_good = done
                if run.world > 1:
                    dist.barrier()
                last_save = time.time()
        if run.is_main:
            finish(run, first_loss, last_loss, time.time() - t0, tokens_seen)
    finally:
        if tb is not None:
            tb.close()
    if run.world > 1:
        dist.destroy_process_group()
    return run.run_dir


def main(argv=None):
    try:
        train(parse_args(argv))
    except (UsageError, ValueError, FileNotFoundError) as e:     # model.CheckpointError (a ValueError) names its file
        sys.exit(fail("train.py", e))


if __name__ == "__main__":
    main()
