"""Shared test helpers: tiny random Llama checkpoints in HF layout, written to temporary folders.

`make_checkpoint(dir, **config_overrides)` writes config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (a byte-level BPE with a few merges and ChatML special tokens), exactly the files
a real Hugging Face checkpoint folder holds, so tests exercise the same loading path as real models.
"""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TINY_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=320, hidden_size=64,
    intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu",
    attention_bias=False, mlp_bias=False, torch_dtype="float32",
)


def tiny_tokenizer_json() -> dict:
    """A byte-level BPE: ids 0-2 special, then the 256 byte symbols, then a handful of merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    alphabet.sort()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("Ġ", "Ġ"),
              ("ĠĠ", "ĠĠ"), ("r", "e"), ("o", "n"), ("d", "e"), ("Ġ", "s"), ("e", "n"), ("a", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return json.loads(tok.to_str())


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.08) -> dict:
    """Random weights for every tensor model.Transformer has under this config (checkpoint.random_weights)."""
    from checkpoint import random_weights
    return random_weights(cfg, seed, std)


def make_checkpoint(path, seed: int = 0, chat_template: str = CHATML, **overrides) -> Path:
    """Write a tiny random Llama checkpoint folder (HF layout) and return its path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_CONFIG, **overrides}
    save_file(random_state_dict(cfg, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json()))
    tcfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
            "add_bos_token": False, "chat_template": chat_template}
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    return path


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A fresh tiny random checkpoint folder (4 layers, GQA 4/2, vocab 320, ChatML template)."""
    return make_checkpoint(tmp_path / "tiny")


@pytest.fixture
def shared_dir():
    """The read-only ../shared folder, or a skip with a clear message when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED}: this test reads the shared data in place")
    return SHARED


def pytest_configure(config):
    # Tests run on 2 cores; keep torch from oversubscribing when xdist-style parallelism is absent.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
