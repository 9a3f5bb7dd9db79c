"""tokenizer.py: encoding, digit splitting and the template families (the real chat templates: test_templates.py)."""
import pytest

from tokenizer import load_tokenizer


def test_tokenizer_templates(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    assert tok.family == "chatml" and tok.eos_id == 2 and tok.pad_id == 2 and not tok.adds_bos
    p, r = tok.encode_example("Add two numbers.", "def add(a, b):\n    return a + b")
    assert p[0] == 1 and r[-1] == 2
    assert tok.decode(p + r, skip_special_tokens=False) == (
        "<|im_start|>user\nAdd two numbers.<|im_end|>\n<|im_start|>assistant\n"
        "def add(a, b):\n    return a + b<|im_end|>")
    assert len(tok.encode("123")) == 3  # digits split one by one
    for fam, head in [("alpaca", "Below is an instruction"), ("codellama", "[INST] "), ("deepseek", "User: "),
                      ("mistral", "[INST] x[/INST]"), ("mistral-v1", " [INST] x [/INST]"),
                      ("deepseek-coder", "You are an AI programming assistant"), ("llama3", "<|start_header_id|>")]:
        t = load_tokenizer(tiny_ckpt, family=fam)
        assert t.prompt("x").startswith(head)
    with pytest.raises(ValueError, match="family"):
        load_tokenizer(tiny_ckpt, family="nope")
