"""data.py and cli.read_records: the formats people bring (messages, Alpaca, OriGen, Evol-CodeAlpaca; JSONL, JSON,
Parquet), the loss on assistant turns only, one-line errors naming the file and line (or row), and train.py / mink.py
on multi-turn messages with tiny Qwen2 and Qwen3 checkpoints."""
import json
import subprocess
import sys

import pytest

import cli
import data
from conftest import REPO, make_checkpoint
from tokenizer import load_tokenizer

CHAT = [{"messages": [{"role": "system", "content": "You write Python."},
                      {"role": "user", "content": f"Write f{i}."},
                      {"role": "assistant", "content": f"def f{i}():\n    return {i}"},
                      {"role": "user", "content": "Now with a docstring."},
                      {"role": "assistant", "content": f'def f{i}():\n    """{i}."""\n    return {i}'}]}
        for i in range(8)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("record,kind,fields", [
    (CHAT[0], "messages", ("", "")),
    ({"instruction": "i", "input": "x", "output": "o"}, "alpaca", ("instruction", "output")),
    ({"Instruction": "i", "Response": "o"}, "pair", ("Instruction", "Response")),          # OriGen
    ({"instruction": "i", "output": "o"}, "pair", ("instruction", "output")),              # Evol-CodeAlpaca-V1
    ({"instruction": "i", "response": "o", "output": "x"}, "pair", ("instruction", "response")),
    ({"question": "q", "answer": "a"}, "pair", ("question", "answer")),                     # TOFU
])
def test_format_detected(record, kind, fields):
    fmt = data.detect_format([record], "d.jsonl")
    assert (fmt.kind, fmt.prompt, fmt.response) == (kind, *fields)


def test_fields_flags_win_and_unknown_formats_are_refused():
    rec = {"messages": [], "q": "a", "r": "b"}
    assert data.detect_format([rec], "d", "q", "r") == data.Format("pair", "q", "r")
    assert data.detect_format([{"instruction": "i", "answer": "a"}], "d", response="answer").response == "answer"
    with pytest.raises(cli.UsageError, match=r"d.jsonl: cannot tell the data format from the fields \['a', 'b'\]"):
        data.detect_format([{"a": 1, "b": 2}], "d.jsonl")


def test_alpaca_input_and_the_loss_on_every_assistant_turn(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    rows = [{"instruction": "Sort.", "input": "[2, 1]", "output": "[1, 2]"}, {"instruction": "Hi.", "input": "",
                                                                               "output": "Hello."}]
    fmt = data.detect_format(rows, "a.jsonl")
    (a, _), (b, _) = (fmt.messages(r, "a.jsonl:1") for r in rows)
    assert a["content"] == "Sort.\n\n[2, 1]" and b["content"] == "Hi." and "alpaca" not in b
    examples, source, stats = data.encode(tok, CHAT, ["c:1"] * len(CHAT), data.detect_format(CHAT, "c"), 4096)
    assert source == list(range(len(CHAT))) and stats == {"examples": 8, "truncated": 0, "dropped": 0}
    ids, trained = examples[0]
    text = tok.decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False)
    assert text == 'def f0():\n    return 0<|im_end|>def f0():\n    """0."""\n    return 0<|im_end|>'
    # Cut inside the first answer: kept (truncated); cut before any answer: dropped.
    first = trained.index(True)
    _, _, stats = data.encode(tok, CHAT[:1], ["c:1"], data.Format("messages"), first + 2)
    assert stats == {"examples": 1, "truncated": 1, "dropped": 0}
    _, _, stats = data.encode(tok, CHAT[:1], ["c:1"], data.Format("messages"), first)
    assert stats == {"examples": 0, "truncated": 1, "dropped": 1}


@pytest.mark.parametrize("record,message", [
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, "message 1 must be"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "alternate user/assistant"),
])
def test_bad_messages_name_the_line(tiny_ckpt, tmp_path, record, message):
    path = write_jsonl(tmp_path / "m.jsonl", [CHAT[0], record])
    rows, where = cli.read_records(path)
    with pytest.raises(cli.UsageError, match=f"{path}:2: .*{message}"):
        data.encode(load_tokenizer(tiny_ckpt), rows, where, data.detect_format(rows, path), 512)


def test_json_and_parquet_read_as_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")                     # in requirements.txt: CI runs this
    import pyarrow.parquet as pq
    rows = [{"instruction": f"i{i}", "response": f"r{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    chat = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(CHAT[:2]), chat)     # nested lists of structs come back as dicts
    assert cli.read_records(tmp_path / "d.json")[0] == rows
    got, where = cli.read_records(tmp_path / "d.parquet")
    assert got == rows and where == [f"{tmp_path / 'd.parquet'}: row {i}" for i in range(3)]
    assert cli.read_records(chat)[0] == CHAT[:2]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(cli.UsageError, match="bad.parquet: cannot be read as Parquet"):
        cli.read_records(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)        # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(cli.UsageError, match=r"d.parquet: reading Parquet needs the pyarrow package \(pip install"):
        cli.read_records(tmp_path / "d.parquet")


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    import gzip
    good = json.dumps({"instruction": "i", "response": "r"}).encode()
    bad = json.dumps({"instruction": "caf\u00e9", "response": "r"}, ensure_ascii=False).encode("latin-1")  # é: 0xe9
    lines = b"\n".join([good, good, bad, good]) + b"\n"
    files = {"d.jsonl": lines, "d.jsonl.gz": lines, "d.json": b"[" + b",\n".join([good, good, bad]) + b"]"}
    for name, text in files.items():
        (tmp_path / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
        with pytest.raises(cli.UsageError) as e:
            cli.read_records(tmp_path / name)
        at = text.index(b"\xe9")
        assert str(e.value) == f"{tmp_path / name}:3: not valid UTF-8 (byte 0xe9 at offset {at})"
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "d.jsonl.gz").read_bytes()[:20])
    with pytest.raises(cli.UsageError, match="cut.jsonl.gz: cannot be read"):
        cli.read_records(tmp_path / "cut.jsonl.gz")


def test_a_line_separator_inside_a_string_stays_in_its_record(tmp_path):
    """U+2028 is legal raw in a JSON string (cli.write_jsonl writes it so): it is not a line break of the file."""
    rows = [{"instruction": "a\u2028b\x0cc", "response": "r"}, {"instruction": "i", "response": "r"}]
    cli.write_jsonl(tmp_path / "d.jsonl", rows)
    assert "\u2028" in (tmp_path / "d.jsonl").read_text(encoding="utf-8")
    got, where = cli.read_records(tmp_path / "d.jsonl")
    assert got == rows and where == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:2"]


FAMILIES = {"qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
            "qwen3": {"model_type": "qwen3", "head_dim": 32}}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_and_score_messages_on_qwen(family, tmp_path):
    """python train.py --model DIR --method ibft --layer L --data messages.jsonl, then mink.py on the same file."""
    ckpt = make_checkpoint(tmp_path / family, **FAMILIES[family])
    path = write_jsonl(tmp_path / "messages.jsonl", CHAT)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "train.py", "--model", ckpt, "--method", "ibft", "--layer", "2", "--data",
                        path, "--out", out, "--max-steps", "2", "--batch-size", "2"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "messages" in p.stdout and json.loads((out / "config.json").read_text())["data_format"] == "messages"
    assert (out / "adapter_model.safetensors").exists() and (out / "vib.safetensors").exists()
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["kl"] > 0 and s["ce"] > 0 for s in steps)
    scores = tmp_path / "p1.jsonl"
    p = subprocess.run([sys.executable, "mink.py", "--model", ckpt, "--adapter", out, "--data", path, "--out", scores],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in scores.read_text().splitlines()]
    tok = load_tokenizer(ckpt)
    assert [r["n_tokens"] for r in rows] == [sum(tok.encode_messages(c["messages"])[1]) for c in CHAT]


def test_train_refuses_a_bad_record_and_writes_nothing(tiny_ckpt, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", CHAT[:3] + [{"messages": [{"role": "user", "content": "x"}]}])
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "train.py", "--model", tiny_ckpt, "--layer", "2", "--data", path, "--out", out],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == f"train.py: error: {path}:4: no assistant turn to learn from"
    assert not out.exists()
