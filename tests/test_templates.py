"""tokenizer.py's chat templates against the real ones: for each checkpoint in tests/fixtures/chat_templates.json (the
verbatim `chat_template` strings of Qwen2/2.5/3, Mistral v0.1-v0.3, Llama-3, DeepSeek-Coder, CodeLlama, SmolLM2),
the family load_tokenizer detects must render every conversation to the text the template itself renders (jinja2,
as transformers does: scripts/render_chat_template.py), and encode_messages must train exactly the assistant turns."""
import json
import sys
from pathlib import Path

import pytest

import data
from cli import CheckpointError
from conftest import make_checkpoint
from tokenizer import FAMILIES, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from render_chat_template import render  # noqa: E402

FIXTURES = json.loads((ROOT / "tests" / "fixtures" / "chat_templates.json").read_text())
FAMILY = {"Qwen/Qwen2.5-Coder-7B-Instruct": "chatml", "Qwen/Qwen2.5-Coder-7B": "chatml", "Qwen/Qwen2.5-7B": "chatml",
          "Qwen/Qwen2-7B-Instruct": "chatml", "Qwen/Qwen3-8B": "chatml", "Qwen/Qwen3-8B-Base": "chatml",
          "mistralai/Mistral-7B-Instruct-v0.1": "mistral-v1", "mistralai/Mistral-7B-Instruct-v0.2": "mistral-v1",
          "mistralai/Mistral-7B-Instruct-v0.3": "mistral", "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
          "deepseek-ai/deepseek-coder-7b-instruct-v1.5": "deepseek-coder",
          "codellama/CodeLlama-7b-Instruct-hf": "codellama", "HuggingFaceTB/SmolLM2-135M-Instruct": "chatml"}
SYS, U1, A1, U2, A2 = "SYS", "Write add(a, b).", "def add(a, b):\n    return a + b", "Now sub.", "def sub(a, b): ..."
CONVERSATIONS = {                                    # name -> (messages, add_generation_prompt)
    "system+user": ([{"role": "system", "content": SYS}, {"role": "user", "content": U1}], True),
    "user": ([{"role": "user", "content": U1}], True),
    "system+user+assistant": ([{"role": "system", "content": SYS}, {"role": "user", "content": U1},
                               {"role": "assistant", "content": A1}], False),
    "two turns": ([{"role": "user", "content": U1}, {"role": "assistant", "content": A1},
                   {"role": "user", "content": U2}, {"role": "assistant", "content": A2}], False),
    "system + two turns": ([{"role": "system", "content": SYS}, {"role": "user", "content": U1},
                            {"role": "assistant", "content": A1}, {"role": "user", "content": U2},
                            {"role": "assistant", "content": A2}], False),
    "two turns, then a prompt": ([{"role": "system", "content": SYS}, {"role": "user", "content": U1},
                                  {"role": "assistant", "content": A1}, {"role": "user", "content": U2}], True),
}


def checkpoint(tmp_path, name):
    """A tiny checkpoint whose tokenizer knows the checkpoint's special tokens and carries its real template."""
    entry = FIXTURES[name]
    specials = [t for t in (entry["bos_token"], entry["eos_token"], "<|eot_id|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|EOT|>") if t]
    path = make_checkpoint(tmp_path / "ckpt", chat_template=entry["chat_template"])
    tj = json.loads((path / "tokenizer.json").read_text())
    have = {t["content"] for t in tj["added_tokens"]}
    for t in dict.fromkeys(specials):
        if t not in have:
            i = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
            tj["added_tokens"].append({"id": i, "content": t, "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(tj))
    tcfg = json.loads((path / "tokenizer_config.json").read_text())
    tcfg.update(bos_token=entry["bos_token"], eos_token=entry["eos_token"], pad_token=entry["eos_token"])
    tcfg["add_bos_token"] = entry["bos_token"] is not None and FAMILY[name] not in ("chatml",)
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return path, entry


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_family_detected(name, tmp_path):
    path, _ = checkpoint(tmp_path, name)
    tok = load_tokenizer(path)
    assert tok.family == FAMILY[name]
    assert tok.think == ("Qwen3" in name)


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_render_equals_the_real_template(name, conv, tmp_path):
    path, entry = checkpoint(tmp_path, name)
    tok = load_tokenizer(path)
    messages, gen = CONVERSATIONS[conv]
    # Qwen3's prompt is its non-thinking mode (what a fine-tuned answer follows: an empty thought).
    extra = {"enable_thinking": False} if tok.think else {}
    want = render(entry["chat_template"], messages, add_generation_prompt=gen, bos_token=entry["bos_token"],
                  eos_token=entry["eos_token"], **extra)
    assert tok.render(messages, add_generation_prompt=gen) == want


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_prompt_is_the_template_with_a_generation_prompt(name, tmp_path):
    path, entry = checkpoint(tmp_path, name)
    tok = load_tokenizer(path)
    bos = entry["bos_token"] if tok.family not in ("chatml", "alpaca") else ""
    extra = {"enable_thinking": False} if tok.think else {}
    for system in (None, SYS):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": U1}]
        want = render(entry["chat_template"], messages, add_generation_prompt=True, bos_token=entry["bos_token"],
                      eos_token=entry["eos_token"], **extra)
        assert bos + tok.prompt(U1, system=system) == want


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_encode_messages_trains_the_assistant_turns_only(name, tmp_path):
    path, entry = checkpoint(tmp_path, name)
    tok = load_tokenizer(path)
    messages, _ = CONVERSATIONS["system + two turns"]
    ids, trained = tok.encode_messages(messages)
    assert len(ids) == len(trained) and not trained[0]
    text = tok.decode(ids, skip_special_tokens=False)
    want = render(entry["chat_template"], messages, bos_token=entry["bos_token"], eos_token=entry["eos_token"])
    assert want.startswith(text) and want[len(text):].strip() == ""        # the untrained tail ("\n") is left out
    got = tok.decode([i for i, t in zip(ids, trained) if t], skip_special_tokens=False)
    for answer in (A1, A2):                                                   # both answers, nothing of the prompts
        assert answer.strip() in got
    for prompt in (U1, U2, SYS):
        assert prompt not in got
    spans = sum(1 for a, b in zip([False] + trained, trained) if b and not a)
    assert spans == 2                                                         # one trained run per assistant turn
    # Each trained run ends with the token that ends the turn (EOS, <|im_end|>, <|eot_id|>, <|EOT|>): a stop id.
    ends = [ids[i] for i in range(len(ids)) if trained[i] and (i + 1 == len(ids) or not trained[i + 1])]
    assert all(e in tok.eos_ids for e in ends)


def test_alpaca_input_joins_the_instruction(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt, family="alpaca")
    plain = tok.render([{"role": "user", "content": "Sort it."}], add_generation_prompt=True)
    rec = {"instruction": "Sort it.", "input": "[3, 1]", "output": "[1, 3]"}
    fmt = data.detect_format([rec], "d.jsonl")
    assert fmt.kind == "alpaca"
    user = fmt.messages(rec, "d.jsonl:1")[0]
    assert user["content"] == "Sort it.\n\n[3, 1]"                              # what a chat template sees
    with_input = tok.render([user], add_generation_prompt=True)
    assert "### Input:" not in plain and "### Instruction:\nSort it.\n\n### Input:\n[3, 1]\n\n### Response:\n" in with_input


def test_bad_conversations_are_refused(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    for messages, match in [([], "non-empty"), ([{"role": "assistant", "content": "x"}], "alternate"),
                            ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
                            ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "system"),
                            ([{"role": "bot", "content": "a"}], "role"),
                            ([{"role": "user", "content": 3}], "content")]:
        with pytest.raises(ValueError, match=match):
            tok.encode_messages(messages)
    with pytest.raises(ValueError, match="no assistant turn"):
        tok.encode_messages([{"role": "user", "content": "a"}])


# ----------------------------------------------------------------------------------------------------------------
# Where the template is read from, and a checkpoint without one (or with one of no family here)
# ----------------------------------------------------------------------------------------------------------------

LLAMA3 = FIXTURES["meta-llama/Meta-Llama-3-8B-Instruct"]["chat_template"]


def test_chat_template_jinja_is_read_and_wins_over_tokenizer_config(tmp_path):
    only = make_checkpoint(tmp_path / "jinja-only", chat_template=None)      # tokenizer_config: "chat_template": null
    (only / "chat_template.jinja").write_text(LLAMA3, encoding="utf-8")
    assert load_tokenizer(only).family == "llama3"
    both = make_checkpoint(tmp_path / "both")                                # tokenizer_config: ChatML
    assert load_tokenizer(both).family == "chatml"
    (both / "chat_template.jinja").write_text(LLAMA3, encoding="utf-8")
    assert load_tokenizer(both).family == "llama3"                          # transformers' order: the .jinja first


@pytest.mark.parametrize("case", ["none", "unknown in tokenizer_config", "unknown in jinja"])
def test_no_template_or_an_unknown_one_is_an_error_naming_template(tmp_path, case):
    path = make_checkpoint(tmp_path / "c", chat_template="{{ messages[0]['content'] }}" if "config" in case else None)
    if "jinja" in case:
        (path / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m.content }}>>{% endfor %}")
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(path)
    msg = str(e.value)
    where = {"none": f"{path}: no chat template", "unknown in tokenizer_config": str(path / "tokenizer_config.json"),
             "unknown in jinja": str(path / "chat_template.jinja")}[case]
    assert msg.startswith(where) and "\n" not in msg
    assert "--template" in msg and all(f in msg for f in FAMILIES)
    assert load_tokenizer(path, family="chatml").family == "chatml"          # the flag overrides


def test_template_alpaca_on_a_base_model_without_template(tmp_path):
    path = make_checkpoint(tmp_path / "base", chat_template=None)
    tok = load_tokenizer(path, family="alpaca")
    assert tok.family == "alpaca"
    assert tok.prompt("Sort it.") == "Below is an instruction that describes a task. Write a response that " \
        "appropriately completes the request.\n\n### Instruction:\nSort it.\n\n### Response:\n"


def test_evaluate_and_train_stop_on_a_checkpoint_without_template(tmp_path, shared_dir, capsys):
    """The command lines: one line naming --template, exit status 2, nothing written; --template alpaca gets past."""
    import evaluate as E
    import train as T
    path = make_checkpoint(tmp_path / "base", chat_template=None)
    samples, out = tmp_path / "s.jsonl", tmp_path / "r.json"
    argv = ["--benchmark", "humaneval", "--data-dir", str(shared_dir / "data" / "humaneval"), "--samples", str(samples),
            "--out", str(out), "--generate", "--model", str(path), "--limit", "1", "--n", "1", "--k", "1", "--m", "1",
            "--max-new-tokens", "2"]
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evaluate.py: error: {path}: no chat template") and "--template" in err
    assert len(err.strip().splitlines()) == 1 and not samples.exists() and not out.exists()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "response": f"{i}"}) + "\n" for i in range(4)))
    run = tmp_path / "run"
    train_argv = ["--model", str(path), "--data", str(data), "--out", str(run), "--method", "ft", "--max-steps", "1",
                  "--batch-size", "2"]
    with pytest.raises(SystemExit) as e:
        T.main(train_argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no chat template" in err and "--template" in err and not run.exists()
    T.main(train_argv + ["--template", "alpaca"])
    assert json.loads((run / "config.json").read_text())["template"] == "alpaca"
