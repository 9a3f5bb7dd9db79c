"""Cross-check default_model.py (the GGUF conversion) against Hugging Face transformers (a script, not a test).

Needs transformers (not a project requirement). Converts the embedded SmolLM2-135M-Instruct GGUF, then:
  1. compares every converted weight with transformers' own GGUF loader (which dequantizes and un-permutes itself);
  2. loads the folder with LlamaForCausalLM + PreTrainedTokenizerFast in fp32 and reports the mean next-token NLL of
     a fixed Python snippet (about 0.5 nats/token; with q/k left permuted it is several times worse);
  3. runs an independent llama.cpp-style forward on the raw GGUF tensors and compares logits;
  4. compares token ids with the tokenizer transformers builds straight from the GGUF;
  5. greedily generates 20 tokens for a ChatML prompt.
Usage: python scripts/check_default_model.py [--gguf PATH] [--out DIR]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))        # a script imports the library
from default_model import convert, find_default_gguf, unpermute  # noqa: E402

SNIPPET = ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
           '    return fibonacci(n - 1) + fibonacci(n - 2)\n')
PROMPT = '<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n'
STRINGS = [SNIPPET, "x = 12345 + 0.5e-10  # 2024-01-31", "naïve café — 日本語 🙂 Привет",
           "<|im_start|>system\nHi<|im_end|>\n<|im_start|>user\n", "a  b   c\n\n\n\td    \n  e",
           "<file_sep><repo_name>foo<|endoftext|>", "  leading spaces and trailing   "]


@torch.no_grad()
def nll(model, ids) -> float:
    x = torch.tensor([ids])
    return torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:]).item()


def llama_cpp_logits(gguf_path: Path, ids: list, cfg) -> torch.Tensor:
    """Independent reference: a plain forward on the raw GGUF tensors (q/k still permuted) with llama.cpp's
    interleaved RoPE (rotates pairs (x0, x1), (x2, x3), ...). Shares no code with the converter or transformers."""
    import gguf
    from gguf.quants import dequantize
    W = {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32").reshape(
        tuple(int(n) for n in reversed(t.shape)))) for t in gguf.GGUFReader(str(gguf_path)).tensors}
    T, nh, nkv, hd, eps = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    ang = torch.arange(T)[:, None] * cfg.rope_parameters["rope_theta"] ** (-torch.arange(0, hd, 2) / hd)
    cos, sin = ang.cos(), ang.sin()  # (T, hd/2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def heads(h, w, n, rope=True):  # (T, H) -> (nh, T, hd), kv heads repeated for GQA
        x = (h @ w.T).view(T, n, hd).transpose(0, 1)
        if rope:
            a, b = x[..., 0::2], x[..., 1::2]
            x = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
        return x.repeat_interleave(nh // n, 0)
    x = W["token_embd.weight"][ids]  # (T, H)
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q, k, v = heads(h, W[p + "attn_q.weight"], nh), heads(h, W[p + "attn_k.weight"], nkv), \
            heads(h, W[p + "attn_v.weight"], nkv, rope=False)
        att = torch.softmax(q @ k.transpose(1, 2) / hd ** 0.5 + causal, -1) @ v  # (nh, T, hd)
        x = x + att.transpose(0, 1).reshape(T, -1) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        x = x + (torch.nn.functional.silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)) \
            @ W[p + "ffn_down.weight"].T
    return rms(x, W["output_norm.weight"]) @ W["token_embd.weight"].T  # (T, V), tied head


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="conversion folder (default: a temporary one)")
    args = ap.parse_args()
    gguf = args.gguf or find_default_gguf()
    if args.out:
        return check(gguf, args.out)
    with tempfile.TemporaryDirectory(prefix="ibft-check-") as tmp:
        return check(gguf, Path(tmp) / "smollm2")


def check(gguf: Path, out: Path) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
    t0 = time.perf_counter()
    convert(gguf, out)
    print(f"converted {gguf.name} -> {out} in {time.perf_counter() - t0:.1f} s")

    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys(), set(ours) ^ set(theirs)
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"weights vs transformers' GGUF loader: {len(ours)} tensors, max |diff| = {diff:.3g}")
    del ref

    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    ids = tok(SNIPPET)["input_ids"]
    print(f"snippet NLL: {nll(model, ids):.4f} nats/token over {len(ids) - 1} predictions")
    cfg = model.config
    with torch.no_grad():
        hf_logits, ref_logits = model(torch.tensor([ids])).logits[0], llama_cpp_logits(gguf, ids, cfg)
    ref_nll = torch.nn.functional.cross_entropy(ref_logits[:-1], torch.tensor(ids[1:])).item()
    print(f"independent llama.cpp-style forward on the raw GGUF: NLL {ref_nll:.4f}, "
          f"max |logit diff| vs converted model {(hf_logits - ref_logits).abs().max().item():.2g}")
    for layer in model.model.layers:  # put q/k back in llama.cpp's order: what skipping the un-permutation costs
        for proj, heads in [(layer.self_attn.q_proj, cfg.num_attention_heads),
                            (layer.self_attn.k_proj, cfg.num_key_value_heads)]:
            w = proj.weight.data
            perm = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
            assert torch.equal(torch.from_numpy(unpermute(perm.numpy(), heads)), w)
            proj.weight.data = perm
    print(f"snippet NLL with q/k left in llama.cpp's permuted order: {nll(model, ids):.4f} nats/token")
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    # transformers builds its GGUF tokenizer with a plain ByteLevel pre-tokenizer (no Digits split for 'smollm');
    # the ids still agree because this vocabulary has no multi-digit or space+digit tokens.
    gtok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    print(f"tokenizer vs transformers' GGUF tokenizer ({type(gtok).__name__}):")
    mismatches = 0
    for s in STRINGS:
        a, b = tok(s)["input_ids"], gtok(s)["input_ids"]
        mismatches += a != b
        print(f"  {s[:40]!r:44} {len(a):3} ids  {'same' if a == b else f'DIFFERENT ({len(b)} ids)'}"
              f"  round-trip {'ok' if tok.decode(a) == s else 'FAIL'}")
    print(f"  '12345' -> ours {tok('12345')['input_ids']}, gguf {gtok('12345')['input_ids']}; "
          f"{mismatches} mismatching strings of {len(STRINGS)}")

    prompt = tok(PROMPT)["input_ids"]
    gen = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=2)
    print(f"greedy 20 tokens: {tok.decode(gen[0, len(prompt):])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
