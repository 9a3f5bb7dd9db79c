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
(the resolved run config), metrics.jsonl, and checkpoint/ (resumable with --resume).
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lora as L
from bottleneck import IBConfig, VariationalBottleneck, ib_terms
from model import default_model_path, linear_cross_entropy, load_model, load_tokenizer

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data" / "default_instruct.jsonl"
FIELD_PAIRS = [("instruction", "response"), ("Instruction", "Response"), ("instruction", "output")]


class UsageError(Exception):
    """Bad input: printed as one line `train.py: error: ...`, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Command line (defaults: Appendix C.1)
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA fine-tuning: FT or IB-FT (information-bottleneck regularized).")
    p.add_argument("--method", default="ibft", help="ft (Eq. (1)) or ibft (Eq. (IB-FT))")
    p.add_argument("--layer", type=int, default=20, help="l*: bottleneck the output of this decoder block (1..L-1)")
    p.add_argument("--model", default=None, help="HF checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="JSONL or JSON instruction data (default: data/default_instruct.jsonl)")
    p.add_argument("--instruction-field", default=None, help="field of the instruction (auto: instruction/Instruction)")
    p.add_argument("--response-field", default=None, help="field of the response (auto: response/Response/output)")
    p.add_argument("--template", default=None, help="prompt template family: chatml, deepseek, codellama, alpaca (auto)")
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
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--rslora", action="store_true", help="scale LoRA by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--alpha", type=float, default=0.1,
                   help="IB weight alpha in Eq. (IB-FT) (paper: 0.1; the authors' released code runs 0.2)")
    p.add_argument("--beta", type=float, default=0.02,
                   help="IB trade-off beta in Eq. (6) (paper: 0.02 OriGen, 0.01 Evol-CodeAlpaca; the authors' released "
                        "code runs 0.01)")
    p.add_argument("--bottleneck-dim", type=int, default=256, help="latent size d")
    p.add_argument("--kl-reduction", default="mean", choices=["mean", "sum"],
                   help="mean over latent dims and tokens (authors' code) or sum over dims")
    p.add_argument("--kl-normalizer", default="real", choices=["real", "padded"],
                   help="what the KL sum is divided by: real: the real (non-padding) tokens of the step; padded: "
                        "micro-batch rows x --kl-pad-to, as the authors' code, whose KL mean runs over batches padded "
                        "to 2048 tokens (an effective KL weight of about alpha x T_real / 2048). Either way x latent "
                        "dims under --kl-reduction mean")
    p.add_argument("--kl-pad-to", type=int, default=2048,
                   help="the padded length per row that --kl-normalizer padded divides by (authors' code: 2048)")
    p.add_argument("--logvar-clamp", type=float, default=4.0, help="clamp log sigma^2 to [-c, c]; 0 disables")
    p.add_argument("--ib-head-norm", action="store_true", help="apply the final RMSNorm before the IB branch's LM head")
    p.add_argument("--ib-raw-input", action="store_true",
                   help="feed q_phi the raw hidden state, as the paper and the authors' code do (default: "
                        "RMS-normalized, a choice of this implementation)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler (the paper's setting: "
                        "'mixed float16 precision')")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint")
    p.add_argument("--prune", default="none", choices=["none", "mink", "grand"],
                   help="FT w/ Min-K%% or FT w/ GRAND (Table 1): train on a selected subset")
    p.add_argument("--keep", type=float, default=0.8, help="fraction kept by --prune (Table 1: 0.8)")
    p.add_argument("--mink-k", type=float, default=20, help="K of Min-K%% Prob for --prune mink")
    p.add_argument("--grand-seeds", type=int, default=3, help="LoRA initializations GRAND scores are averaged over")
    p.add_argument("--log-every", type=int, default=1)
    args = p.parse_args(argv)
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
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: instruction/response pairs -> token ids with labels on the response only
# ----------------------------------------------------------------------------------------------------------------

def read_records(path: Path) -> list:
    """JSONL (one object per line) or a JSON list. Each record remembers its line for error messages."""
    if not path.exists():
        raise UsageError(f"--data: {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise UsageError(f"{path}: invalid JSON ({e})") from None
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise UsageError(f"{path}: expected a JSON list of objects")
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise UsageError(f"{path}: item {i} is not a JSON object")
        return [dict(r, _where=f"{path}: item {i}") for i, r in enumerate(rows)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{path}:{lineno}: invalid JSON ({e})") from None
        if not isinstance(r, dict):
            raise UsageError(f"{path}:{lineno}: expected a JSON object")
        records.append(dict(r, _where=f"{path}:{lineno}"))
    if not records:
        raise UsageError(f"{path}: no examples")
    return records


def pick_fields(records, instruction_field, response_field, path):
    if instruction_field and response_field:
        return instruction_field, response_field
    for i, r in FIELD_PAIRS:
        if i in records[0] and r in records[0]:
            return instruction_field or i, response_field or r
    raise UsageError(f"{path}: cannot find instruction/response fields in {sorted(k for k in records[0] if k != '_where')}"
                     f" (use --instruction-field and --response-field)")


def tokenize(records, tok, fields, max_len):
    """-> examples [(ids, n_prompt)], the index of each one's record, stats. The loss sees response tokens (and the
    EOS after them) only."""
    fi, fr = fields
    examples, source, truncated, dropped = [], [], 0, 0
    for n, r in enumerate(records):
        if fi not in r or fr not in r:
            raise UsageError(f"{r['_where']}: missing field '{fi if fi not in r else fr}'")
        if not isinstance(r[fr], str) or not r[fr].strip():
            raise UsageError(f"{r['_where']}: empty response")
        prompt_ids, response_ids = tok.encode_example(str(r[fi]), r[fr])
        ids = prompt_ids + response_ids
        if len(ids) > max_len:
            truncated += 1
            ids = ids[:max_len]
            if len(prompt_ids) >= max_len:   # nothing of the response is left to learn from
                dropped += 1
                continue
        examples.append((ids, len(prompt_ids)))
        source.append(n)
    return examples, source, {"examples": len(examples), "truncated": truncated, "dropped": dropped}


def collate(examples, pad_id, device):
    """Right-padded (B, T) ids and attention mask; label_mask[b, t] is True where position t predicts a response
    token (t + 1 >= n_prompt); targets are those next tokens, in row-major order."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    label = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, (row, n_prompt) in enumerate(examples):
        ids[b, :len(row)] = torch.tensor(row)
        attn[b, :len(row)] = 1
        label[b, n_prompt - 1:len(row) - 1] = True
    targets = ids[:, 1:][label[:, :-1]]
    return ids.to(device), attn.to(device), label.to(device), targets.to(device)


def micro_batches(n, batch_size, world, epochs, seed):
    """The whole run's sequence of global micro-batches (lists of example indices), epoch after epoch; each
    epoch is a fresh seeded permutation. Rank r takes slice r of each global micro-batch."""
    out, g = [], batch_size * world
    for epoch in range(math.ceil(epochs)):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches = [perm[i:i + g] for i in range(0, n, g)]
        batches = [b for b in batches if len(b) >= world]          # every process needs at least one example
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

def select_mink(model, tok, records, fields, keep, k):
    """Drop the most memorized examples (lowest Min-K% Prob on the base model, Sec. 3), keep the fraction `keep`."""
    import mink
    scores = mink.score_examples(model, tok, [{"p": r[fields[0]], "r": r[fields[1]]} for r in records], k=k,
                                 prompt_field="p", response_field="r")
    return mink.prune_indices(scores, 1.0 - keep), scores                 # the same subset as `mink.py prune`


def grand_scores(model, examples, pad_id, batch_size=4):
    """GraNd (Paul et al., 2021): the norm of each example's loss gradient w.r.t. the LoRA parameters, here at
    LoRA initialization (step 0) and without dropout. The per-example gradients of a LoRA layer follow from its
    input x and output gradient g in one batched backward pass:
        dL_i/dB = s * sum_t g_t (A x_t)^T        dL_i/dA = s * sum_t (B^T g_t) x_t^T
    where L_i is example i's mean token loss (rows of a batch never interact, so dL/dy on row i is dL_i/dy)."""
    layers = L.lora_layers(model)
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
        for m in L.lora_layers(model).values():
            m.reset_parameters(g)
        total += torch.tensor(grand_scores(model, examples, pad_id, args.batch_size))
    scores = (total / seeds).tolist()
    return mink.prune_indices(scores, 1.0 - keep), scores         # drop the lowest scores, as --prune mink does


# ----------------------------------------------------------------------------------------------------------------
# The objective: Eq. (1) and Eq. (IB-FT) for one micro-batch, as token sums
# ----------------------------------------------------------------------------------------------------------------

class Objective(nn.Module):
    """model + optional bottleneck in one module, so that DDP sees every trainable parameter."""

    def __init__(self, model, vib, layer):
        super().__init__()
        self.model, self.vib, self.layer = model, vib, layer

    def forward(self, ids, attn, label, targets, noise_slice=None):
        h, h_layer = self.model.trunk(ids, attn, hidden_layer=self.layer if self.vib is not None else None)
        rows = self.model.model.norm(h[label])                                   # (N, H): label positions only
        ce_sum = linear_cross_entropy(rows, self.model.lm_head.weight, targets)  # Eq. (1)
        if self.vib is None:
            zero = ce_sum.new_zeros(())
            return ce_sum, zero, zero
        kl_sum, _, ce_ib_sum = ib_terms(self.model, self.vib, h_layer, attn, label, targets, noise_slice)  # Eq. (4), (5)
        return ce_sum, kl_sum, ce_ib_sum


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

def save_checkpoint(run_dir: Path, model, vib, opt, sched, scaler, step, base_path):
    tmp, final, old = run_dir / ".checkpoint.tmp", run_dir / "checkpoint", run_dir / ".checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    L.save_adapter(model, tmp, base_path)
    if vib is not None:
        save_vib(vib, tmp / "vib.safetensors", model.hidden_size)
    state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8),
             "rng_vib": vib.generator.get_state() if vib is not None else torch.zeros(0, dtype=torch.uint8),
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {}}
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, model, vib, opt, sched, scaler):
    ck = run_dir / "checkpoint"
    if not ck.exists() and (run_dir / ".checkpoint.old").exists():       # killed between the two renames
        ck = run_dir / ".checkpoint.old"
    if not (ck / "trainer_state.pt").exists():
        raise UsageError(f"--resume: no checkpoint in {run_dir}")
    L.load_lora_state_dict(model, load_file(str(ck / L.ADAPTER_WEIGHTS)), str(ck / L.ADAPTER_WEIGHTS))
    if vib is not None:
        vib.load_state_dict(load_file(str(ck / "vib.safetensors")))
    state = torch.load(ck / "trainer_state.pt", weights_only=True)
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
    L.atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def write_text_atomic(path: Path, text: str):
    L.atomic_write(path, lambda p: p.write_text(text))


def write_json_atomic(path: Path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

RESUME_KEYS = ("method", "layer", "model", "data", "batch_size", "grad_accum", "global_batch_size", "lr", "epochs",
               "max_len", "seed", "lora_r", "lora_alpha", "lora_dropout", "alpha", "beta", "bottleneck_dim",
               "kl_normalizer", "kl_pad_to", "hf_warmup", "prune", "keep")


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


def train(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    grad_accum = resolve_grad_accum(args, world)

    precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision != "fp32" and not cuda:
        raise UsageError(f"--precision {precision} needs CUDA (on the CPU train in fp32)")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model_path = Path(args.model) if args.model else default_model_path()
    data_path = Path(args.data) if args.data else DEFAULT_DATA
    run_dir = Path(args.out)

    torch.manual_seed(args.seed)
    model = load_model(model_path, dtype=amp_dtype or torch.float32, device=device)
    n_layers = model.config.num_layers
    if args.method == "ibft" and not 1 <= args.layer <= n_layers - 1:
        raise UsageError(f"--layer must be in 1..{n_layers - 1} for this model ({n_layers} layers), got {args.layer}")
    tok = load_tokenizer(model_path, family=args.template)
    records = read_records(data_path)
    fields = pick_fields(records, args.instruction_field, args.response_field, data_path)
    examples, source, stats = tokenize(records, tok, fields, args.max_len)
    if not examples:
        raise UsageError(f"{data_path}: no example has a response token left within --max-len {args.max_len}")

    kept = list(range(len(examples)))
    if args.prune == "mink":
        kept, _ = select_mink(model, tok, [records[i] for i in source], fields, args.keep, args.mink_k)
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    L.inject_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets,
                  rslora=args.rslora, generator=torch.Generator().manual_seed(args.seed))
    if args.prune == "grand":
        init = {k: v.clone() for k, v in L.lora_state_dict(model).items()}
        kept, _ = select_grand(model, examples, tok.pad_id, args.keep, args.grand_seeds, args)
        L.load_lora_state_dict(model, init, "initial LoRA weights")
    examples = [examples[i] for i in kept]
    model.gradient_checkpointing = args.gradient_checkpointing
    model.train()

    vib = None
    if args.method == "ibft":
        ib = IBConfig(layer=args.layer, dim=args.bottleneck_dim, alpha=args.alpha, beta=args.beta,
                      kl_reduction=args.kl_reduction, logvar_clamp=args.logvar_clamp or None,
                      head_norm=args.ib_head_norm, input_norm=not args.ib_raw_input, seed=args.seed)
        vib = VariationalBottleneck(model.hidden_size, ib, device=device).train()
    torch.manual_seed(args.seed + rank)                 # dropout stream of this process
    objective = Objective(model, vib, args.layer)
    ddp = nn.parallel.DistributedDataParallel(objective, device_ids=[local_rank] if cuda else None) if world > 1 \
        else objective

    lora_params = [p for p in model.parameters() if p.requires_grad]
    vib_params = list(vib.parameters()) if vib is not None else []
    opt = torch.optim.AdamW([{"params": lora_params}, {"params": vib_params}], lr=args.lr,
                            betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay)
    plan = micro_batches(len(examples), args.batch_size, world, args.epochs, args.seed)
    total_steps = math.ceil(len(plan) / grad_accum)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if total_steps < 1:
        raise UsageError(f"{data_path}: not enough examples for one batch of {args.batch_size * world}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total_steps, args.warmup_ratio,
                                                                      hf=args.hf_warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    config = {k: v for k, v in vars(args).items()}
    config.update(model=str(model_path), data=str(data_path), precision=precision, world_size=world,
                  grad_accum=grad_accum, global_batch_size=args.batch_size * world * grad_accum,
                  total_steps=total_steps, data_stats=stats, kept_examples=len(examples), fields=list(fields),
                  template=tok.family, lora_targets=list(targets))
    if args.prune != "none":      # which records (0-based, in file order) the run trained on
        config["kept_records"] = [source[i] for i in kept]
    start_step = 0
    if args.resume:
        saved = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
        for k in RESUME_KEYS:
            if k in saved and saved[k] != config[k]:
                raise UsageError(f"--resume: --{k.replace('_', '-')} is {config[k]!r} but the run was started "
                                 f"with {saved[k]!r}")
        start_step = load_checkpoint(run_dir, model, vib, opt, sched, scaler)
        log(f"resumed {run_dir} at step {start_step}")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config)
        metrics = run_dir / "metrics.jsonl"
        if not args.resume:
            metrics.unlink(missing_ok=True)
        elif metrics.exists():   # drop what a killed run logged after its last checkpoint: those steps run again
            keep = [x for x in metrics.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= start_step]
            write_text_atomic(metrics, "".join(x + "\n" for x in keep))
    log(f"{args.method} | model {model_path.name} ({n_layers} layers, {tok.family} template) | "
        f"{len(examples)} examples ({stats['truncated']} truncated, {stats['dropped']} dropped) | "
        f"{total_steps} steps of {args.batch_size * world * grad_accum} examples | {precision} on {device}"
        + (f" x{world}" if world > 1 else ""))

    n_kl_per_token = args.bottleneck_dim if args.kl_reduction == "mean" else 1
    t0, tokens_seen, last_good = time.time(), 0, (start_step if args.resume else None)
    first_loss = loss_value = None
    for step in range(start_step, total_steps):
        global_batches = plan[step * grad_accum:(step + 1) * grad_accum]
        batches = [collate([examples[i] for i in shard(b, rank, world)], tok.pad_id, device) for b in global_batches]
        # Label rows of each process's slice, so that every process draws the bottleneck noise of the whole
        # global micro-batch and uses its own rows of it (see VariationalBottleneck.sample).
        noise = []
        for b in global_batches:
            n = [sum(len(examples[i][0]) - examples[i][1] for i in shard(b, r, world)) for r in range(world)]
            noise.append((sum(n[:rank]), sum(n)))
        # Normalizers over the whole step (all micro-batches, all processes), known before the forward passes.
        counts = torch.tensor([float(sum(int(lab.sum()) for _, _, lab, _ in batches)),
                               float(sum(int(attn.sum()) for _, attn, _, _ in batches)),
                               float(sum(ids.shape[0] for ids, _, _, _ in batches))], device=device)
        if world > 1:
            dist.all_reduce(counts)
        n_label, n_real, n_rows = counts[0].item(), counts[1].item(), counts[2].item()
        # KL: real tokens (default), or every row counted as padded to --kl-pad-to tokens (the authors' code).
        kl_den = (n_real if args.kl_normalizer == "real" else n_rows * args.kl_pad_to) * n_kl_per_token
        sums = torch.zeros(3, device=device)
        ts = time.time()
        for j, (ids, attn, label, tgt) in enumerate(batches):
            sync = j == len(batches) - 1 or world == 1
            ctx = ddp.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                ce_sum, kl_sum, ce_ib_sum = ddp(ids, attn, label, tgt, noise[j])
                loss = ce_sum / n_label                                             # Eq. (1)
                if vib is not None:                                                 # Eq. (IB-FT), Eq. (6)
                    loss = loss + args.alpha * (kl_sum / kl_den + args.beta * ce_ib_sum / n_label)
                scaler.scale(loss * world).backward()     # DDP averages gradients over processes: undo the 1/world
            sums += torch.stack([ce_sum.detach().float(), kl_sum.detach().float(), ce_ib_sum.detach().float()])
            tokens_seen += int(attn.sum())
        if world > 1:
            dist.all_reduce(sums)
        ce = sums[0].item() / n_label
        kl = sums[1].item() / kl_den
        ce_ib = sums[2].item() / n_label
        loss_value = ce + (args.alpha * (kl + args.beta * ce_ib) if vib is not None else 0.0)
        if not math.isfinite(loss_value):
            where = f"{run_dir / 'checkpoint'} (step {last_good})" if last_good is not None else "none saved"
            raise UsageError(f"non-finite loss at step {step + 1} (ce={ce}, kl={kl}, ce_ib={ce_ib}); stopped. "
                             f"Last good checkpoint: {where}")
        first_loss = loss_value if first_loss is None else first_loss
        scaler.unscale_(opt)
        gnorm = clip_gradients([lora_params, vib_params], args.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        elapsed = time.time() - t0
        tps = int(counts[1].item() / max(time.time() - ts, 1e-9))
        if main:
            rec = {"step": done, "loss": loss_value, "ce": ce, "kl": kl, "ce_ib": ce_ib,
                   "lr": sched.get_last_lr()[0], "grad_norm": gnorm, "tokens_per_s": tps}
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if done % args.log_every == 0 or done == total_steps:
                eta = elapsed / (done - start_step) * (total_steps - done)
                ib_part = f" kl {kl:.4f} ce_ib {ce_ib:.3f}" if vib is not None else ""
                print(f"step {done}/{total_steps} | loss {loss_value:.4f} ce {ce:.4f}{ib_part} | lr {rec['lr']:.2e} | "
                      f"gnorm {gnorm:.3f} | {tps} tok/s | ETA {fmt_time(eta)}", flush=True)
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            if main:
                save_checkpoint(run_dir, model, vib, opt, sched, scaler, done, str(model_path))
            last_good = done
            if world > 1:
                dist.barrier()

    if main:
        L.save_adapter(model, run_dir, str(model_path))
        if vib is not None:
            save_vib(vib, run_dir / "vib.safetensors", model.hidden_size)
        save_checkpoint(run_dir, model, vib, opt, sched, scaler, total_steps, str(model_path))
        elapsed = time.time() - t0
        print("\n".join([
            "",
            f"done: {args.method} on {model_path.name}, {total_steps - start_step} steps in {fmt_time(elapsed)} "
            f"({tokens_seen / max(elapsed, 1e-9):.0f} tok/s)",
            f"  loss {first_loss if first_loss is not None else float('nan'):.4f} -> {loss_value if loss_value is not None else float('nan'):.4f}"
            + (f"  (alpha {args.alpha}, beta {args.beta}, layer {args.layer}, d {args.bottleneck_dim})" if vib is not None else ""),
            f"  run dir   {run_dir}/",
            f"  adapter   adapter_model.safetensors + adapter_config.json (PEFT format; inference uses base + LoRA only)",
            f"  also      {'vib.safetensors, ' if vib is not None else ''}config.json, metrics.jsonl, checkpoint/",
            f"  next      python evaluate.py --benchmark humaneval --generate --adapter {run_dir} "
            f"--samples {run_dir}/humaneval_samples.jsonl --out {run_dir}/humaneval.json",
        ]))
    if world > 1:
        dist.destroy_process_group()
    return run_dir


def main(argv=None):
    try:
        train(parse_args(argv))
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as e:       # e.g. model.CheckpointError: already names the file
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
