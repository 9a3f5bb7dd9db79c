"""The GPU check: IB-FT training and sampling throughput at DeepSeek-Coder-7B-v1.5's shape, random weights, bf16.

    python bench/bench_gpu.py [--parts train,generate,hf] [--out FILE] [--peak-tflops 989] [--steps 5]
    python bench/bench_gpu.py --tiny --device cpu          # the same code on a tiny shape, seconds on a CPU

No checkpoint on disk: the model (hidden 4096, 30 layers, 32 heads, intermediate 11008, vocab 102400, llama) is
built on the meta device and materialized on the device in bf16, its weights drawn there (norms 1 + N(0, s^2), the
rest N(0, s^2), named by model.Transformer itself as checkpoint.random_weights does). One JSON object goes to stdout
and to --out; progress to stderr. Parts (--parts), each on a fresh model:
  train     LoRA r 32 / alpha 32 / dropout 0.05 on the seven projections (lora.inject_lora), batch 2 x 2048 random
            tokens, every next token a label; train.py's step on CUDA (bf16 autocast, the LoRA dropout masks keyed by
            example as train.optimizer_step draws them, the loss through bottleneck.ibft_loss / kl_count, gradient
            clipping, AdamW): IB-FT at layer 20 (a VariationalBottleneck, d 256) and plain FT, each without and with
            gradient checkpointing. Per configuration: the median step time of --steps after --warmup, tokens/s, MFU
            and peak memory (torch.cuda.max_memory_allocated).
  generate  generate.generate at 64 slots: 64 random prompts of 128 tokens, 512 new tokens each (EOS disabled),
            T 0.2, top-p 0.95: new tokens/s over the whole call (prefill included), and the decode rate without the
            prefill (the 512-token call minus a 1-token call).
  hf        the same training (FT only) and sampling shapes with transformers' LlamaForCausalLM + peft LoRA, when
            both import; otherwise a note says why not.

MFU = tokens/s x (6 N + 12 L H T) / peak: N the weights every token multiplies in the forward pass (the frozen
projections, LoRA's A and B, the LM head; IB-FT adds q_phi, g_phi and its second LM head pass), 12 L H T the attention
scores and values (PaLM's count, the causal half not subtracted), backward = 2 x forward for frozen weights too (the
"6 x" convention); the recomputation of gradient checkpointing is not counted. --peak-tflops: H200 bf16 dense, 989.
"""
import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import checkpoint as C  # noqa: E402
import cli  # noqa: E402
import generate as G  # noqa: E402
import lora as L  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402
from bottleneck import IBConfig, VariationalBottleneck, ibft_loss, kl_count  # noqa: E402

TARGETS = L.DEFAULT_TARGETS
# DeepSeek-Coder-7B-Instruct-v1.5's config.json shape (bos/eos unused: EOS is disabled); the weights are random.
FULL = dict(config=dict(model_type="llama", vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
                        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
                        tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100015),
            batch=2, seq=2048, layer=20, ib_dim=256, slots=64, prompt_len=128, new_tokens=512, std=0.02,
            steps=5, warmup=2)
TINY = dict(config=dict(FULL["config"], vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                        bos_token_id=1, eos_token_id=2),
            batch=2, seq=32, layer=1, ib_dim=16, slots=4, prompt_len=8, new_tokens=8, std=0.08, steps=2, warmup=1)
LORA = dict(r=32, alpha=32, dropout=0.05)
SAMPLING = dict(temperature=0.2, top_p=0.95)
MFU_FORMULA = ("MFU = tokens/s x (6 N + 12 L H T) / peak; N = weights every token multiplies in the forward pass "
               "(frozen projections + LoRA A, B + LM head; IB-FT adds q_phi, g_phi and a second LM head pass), "
               "12 L H T = attention (PaLM's count, causal half not subtracted); checkpointing's recompute not counted")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device) -> float:
    """torch.cuda.max_memory_allocated on CUDA; on the CPU the process's peak RSS (VmHWM, never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmHWM")).split()[1]) / 2 ** 20


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def random_model(cfg: dict, device, std: float, seed: int = 0) -> M.Transformer:
    """model.Transformer for a config.json dict, built on the meta device and materialized on `device` in bf16 with
    random weights drawn there: frozen, in eval mode, as load_model returns it."""
    args = C.model_args(cfg, where="bench_gpu.py shape")
    with torch.device("meta"):
        model = M.Transformer(args).to(torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std, generator=g)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    model.requires_grad_(False)
    return model.eval()


def forward_weights(objective) -> int:
    """N of the MFU formula: the weights every token multiplies in the forward pass (module docstring)."""
    n = 0
    for mod in objective.modules():
        if isinstance(mod, L.LoRALinear):
            n += mod.weight.numel() + mod.lora_A.numel() + mod.lora_B.numel()
        elif isinstance(mod, nn.Linear):
            n += mod.weight.numel()
    if objective.vib is not None:
        n += objective.model.lm_head.weight.numel()                  # CE_IB: the LM head once more
    return n


def train_batch(shape, vocab, device):
    """batch x seq random tokens (no padding); every position but each row's last predicts a label (train.collate)."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, vocab, (shape["batch"], shape["seq"]), generator=g).tolist()
    return T.collate([(r, [True] * len(r)) for r in rows], 0, device)


def bench_train_config(model, vib, batch, shape, device, checkpointing, peak_tflops) -> dict:
    """train.py's optimizer step (bf16 autocast; on the CPU too, as --precision bf16) on one configuration."""
    ids, attn, label, tgt = batch
    objective = T.Objective(model, vib, shape["layer"])
    model.gradient_checkpointing = checkpointing
    params = [[p for p in model.parameters() if p.requires_grad], list(vib.parameters()) if vib is not None else []]
    opt = torch.optim.AdamW([{"params": params[0]}, {"params": params[1]}], lr=1e-4)
    cfg = vib.cfg if vib is not None else None
    n_label, n_real, n_rows = float(label.sum()), float(attn.sum()), float(ids.shape[0])
    n_kl = kl_count(cfg, n_real, n_rows) if cfg is not None else 1.0
    keys = T.dropout_keys(0, 0, [list(range(ids.shape[0]))])[0]       # one key per row, as train.step_batches gives

    def loss_fn():
        ce_sum, kl_sum, ce_ib_sum, _ = objective(ids, attn, label, tgt)
        return ibft_loss(ce_sum, kl_sum, ce_ib_sum, n_label, n_kl, cfg)[0]

    c = model.config
    flops = 6 * forward_weights(objective) + 12 * c.num_layers * c.hidden_size * ids.shape[1]
    return {"impl": "ours", "method": "ibft" if vib is not None else "ft", "gradient_checkpointing": checkpointing,
            **timed_steps(loss_fn, lambda: T.clip_gradients(params, 1.0), opt, ids.numel(), flops, shape, device,
                          peak_tflops, lambda: L.keyed_dropout(model, keys, attn.sum(1).tolist()))}


def timed_steps(loss_fn, clip, opt, tokens, flops, shape, device, peak_tflops,
                dropout=contextlib.nullcontext) -> dict:
    """The same optimizer step for both sides (bf16 autocast forward, backward, clipping, AdamW), timed: the median
    of shape["steps"] after shape["warmup"], tokens/s, MFU, peak memory and the last loss. dropout() is entered around
    forward and backward (ours: lora.keyed_dropout, as in train.optimizer_step; peft draws its own masks)."""
    def step():
        with dropout():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    reset_memory(device)
    runs = [timed(step, device) for _ in range(shape["warmup"] + shape["steps"])]     # (loss, seconds)
    s = statistics.median(t for _, t in runs[shape["warmup"]:])
    return {"step_s": s, "tokens_per_s": tokens / s, "mfu": tokens / s * flops / (peak_tflops * 1e12),
            "flops_per_token": flops, "peak_memory_gib": peak_memory_gib(device), "loss": runs[-1][0]}


def part_train(shape, device, peak_tflops) -> dict:
    model = random_model(shape["config"], device, shape["std"])
    L.inject_lora(model, targets=TARGETS, generator=torch.Generator().manual_seed(0), **LORA)
    model.train()
    vib = VariationalBottleneck(model.hidden_size, IBConfig(layer=shape["layer"], dim=shape["ib_dim"]),
                                device=device).train()
    batch = train_batch(shape, model.config.vocab_size, device)
    out = []
    for v in (vib, None):
        for checkpointing in (False, True):
            name = f"{'IB-FT' if v is not None else 'FT'}, gradient checkpointing {'on' if checkpointing else 'off'}"
            log(f"train: {name}")
            try:
                out.append(bench_train_config(model, v, batch, shape, device, checkpointing, peak_tflops))
            except torch.cuda.OutOfMemoryError as e:
                out.append({"impl": "ours", "method": "ibft" if v is not None else "ft",
                            "gradient_checkpointing": checkpointing, "error": f"out of memory: {str(e)[:200]}"})
            model.zero_grad(set_to_none=True)
            vib.zero_grad(set_to_none=True)
            log(f"  {out[-1]}")
    return {"lora": dict(LORA, targets=list(TARGETS)), "ib": {"layer": shape["layer"], "dim": shape["ib_dim"]},
            "configs": out}


def random_prompts(shape, vocab):
    g = torch.Generator().manual_seed(2)
    return torch.randint(3, vocab, (shape["slots"], shape["prompt_len"]), generator=g).tolist()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def sampling_result(impl, shape, new_tokens, seconds, first_seconds) -> dict:
    decode = shape["slots"] * (shape["new_tokens"] - 1) / max(seconds - first_seconds, 1e-9)
    return {"impl": impl, "slots": shape["slots"], "prompt_len": shape["prompt_len"],
            "new_tokens": shape["new_tokens"], "tokens": new_tokens, "seconds": seconds,
            "tokens_per_s": new_tokens / seconds, "decode_tokens_per_s": decode, **SAMPLING}


def part_generate(shape, device) -> dict:
    model = random_model(shape["config"], device, shape["std"])
    prompts = random_prompts(shape, model.config.vocab_size)

    def run(k):
        return G.generate(model, prompts, k, n=1, eos_ids=(), seed=0, batch_size=shape["slots"], **SAMPLING)

    log("generate: ours")
    run(2)                                                             # warm-up
    _, t1 = timed(lambda: run(1), device)
    reset_memory(device)
    outs, t = timed(lambda: run(shape["new_tokens"]), device)
    res = sampling_result("ours", shape, sum(len(o) for o in outs), t, t1)
    res["peak_memory_gib"] = peak_memory_gib(device)
    log(f"  {res}")
    return res


def hf_model(shape, device):
    """transformers' LlamaForCausalLM at the shape, built on `device` in bf16 (its own random init)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = shape["config"]
    config = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                         intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                         num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                         max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
                         tie_word_embeddings=False, bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"],
                         pad_token_id=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return hf.to(device=device, dtype=torch.bfloat16)


def hf_train_config(base, ids, shape, device, checkpointing, peak_tflops) -> dict:
    """FT of `base` (a LlamaForCausalLM) with peft's LoRA, the same step as ours: labels = the input ids (transformers
    shifts them), every next token a label; bf16 autocast, gradient clipping, AdamW."""
    from peft import LoraConfig, get_peft_model
    base.config.use_cache = False                                       # training: no KV cache built
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = get_peft_model(base, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                          target_modules=list(TARGETS), task_type="CAUSAL_LM")).train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    attn = torch.ones_like(ids)

    # N as ours counts it: the frozen linear weights, LoRA's A and B and the LM head (every 2-d weight but embeddings)
    n_fwd = sum(p.numel() for n, p in net.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    c = shape["config"]
    flops = 6 * n_fwd + 12 * c["num_hidden_layers"] * c["hidden_size"] * ids.shape[1]
    return {"impl": "transformers+peft", "method": "ft", "gradient_checkpointing": checkpointing,
            **timed_steps(lambda: net(input_ids=ids, attention_mask=attn, labels=ids).loss,
                          lambda: torch.nn.utils.clip_grad_norm_(trainable, 1.0), opt, ids.numel(), flops, shape,
                          device, peak_tflops)}


def part_hf(shape, device, peak_tflops) -> dict:
    try:
        import peft
        import transformers
    except ImportError as e:
        return {"skipped": f"transformers and peft are not both importable ({e})"}
    hf = hf_model(shape, device).eval()
    out = {"transformers": transformers.__version__, "peft": peft.__version__,
           "attn_implementation": getattr(hf.config, "_attn_implementation", None)}
    prompts = torch.tensor(random_prompts(shape, hf.config.vocab_size), device=device)

    def run(k):
        with torch.no_grad():
            return hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                               max_new_tokens=k, min_new_tokens=k, pad_token_id=0, **SAMPLING)

    log("generate: transformers")
    run(2)
    _, t1 = timed(lambda: run(1), device)
    reset_memory(device)
    y, t = timed(lambda: run(shape["new_tokens"]), device)
    out["generate"] = sampling_result("transformers", shape, (y.shape[1] - prompts.shape[1]) * y.shape[0], t, t1)
    out["generate"]["peak_memory_gib"] = peak_memory_gib(device)
    log(f"  {out['generate']}")

    ids = train_batch(shape, hf.config.vocab_size, device)[0]
    out["train"] = []
    for checkpointing in (False, True):
        log(f"train: transformers + peft FT, gradient checkpointing {'on' if checkpointing else 'off'}")
        base, hf = hf if hf is not None else hf_model(shape, device), None     # peft adapts it in place: fresh each
        try:
            out["train"].append(hf_train_config(base, ids, shape, device, checkpointing, peak_tflops))
        except torch.cuda.OutOfMemoryError as e:
            out["train"].append({"impl": "transformers+peft", "method": "ft", "gradient_checkpointing": checkpointing,
                                 "error": f"out of memory: {str(e)[:200]}"})
        base = None
        reset_memory(device)
        log(f"  {out['train'][-1]}")
    return out


PARTS = ("train", "generate", "hf")


def environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    else:
        env.update(cpu_threads=torch.get_num_threads())
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (hidden 64, 2 layers, vocab 320, batch 2 x 32, "
                    "4 slots x 8 new tokens) that runs on a CPU in seconds: the script's own test")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak for MFU "
                    "(default: H200 SXM, 989)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per configuration (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    args = ap.parse_args(argv)
    shape = dict(TINY if args.tiny else FULL)
    try:
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise cli.UsageError(f"--parts {args.parts}: expected some of {', '.join(PARTS)}")
        for flag in ("steps", "warmup"):
            value = getattr(args, flag)
            if value is not None and value < (1 if flag == "steps" else 0):
                raise cli.UsageError(f"--{flag} must be >= {1 if flag == 'steps' else 0}")
            shape[flag] = shape[flag] if value is None else value
        if args.peak_tflops <= 0:
            raise cli.UsageError("--peak-tflops must be > 0")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise cli.UsageError(f"--device {args.device}: CUDA is not available (torch {torch.__version__}); "
                                 f"--tiny --device cpu runs the script on the CPU")
    except (cli.UsageError, RuntimeError) as e:
        return cli.fail("bench_gpu.py", e)
    c = shape["config"]
    result = {"environment": environment(device),
              "shape": {"model": "random weights, DeepSeek-Coder-7B-v1.5's shape" if not args.tiny else "tiny",
                        **{k: c[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "intermediate_size", "vocab_size")},
                        **{k: shape[k] for k in ("batch", "seq", "slots", "prompt_len", "new_tokens", "steps",
                                                 "warmup")}},
              "dtype": "bf16 weights; training under bf16 autocast with fp32 LoRA and bottleneck weights",
              "peak_tflops": args.peak_tflops, "mfu_formula": MFU_FORMULA}
    t0 = time.time()
    if "train" in parts:
        result["train"] = part_train(shape, device, args.peak_tflops)
        reset_memory(device)
    if "generate" in parts:
        result["generate"] = part_generate(shape, device)
        reset_memory(device)
    if "hf" in parts:
        result["hf"] = part_hf(shape, device, args.peak_tflops)
    result["seconds"] = time.time() - t0
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        cli.write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
