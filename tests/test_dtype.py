"""--dtype bf16 for sampling (evaluate.py --generate) and scoring (mink.py score): the bf16 sampler gives fp32's
greedy tokens where fp32's choice is clear, its probabilities come from fp32, scores stay close to fp32's, and bf16 is
refused (one line, exit status 2, nothing written) on a CPU without native bf16 (model.resolve_dtype)."""
import json

import pytest
import torch

import checkpoint as C
import evaluate as E
import generate as G
import mink
import model as M

NATIVE = {"sse4_2", "avx2", "avx512f", "avx512_bf16", "amx_bf16"}        # a CPU with native bf16
EMULATED = {"sse4_2", "avx", "avx2", "fma", "avx512f"}                   # one without
# A prompt on which fp32's greedy choice leads the runner-up by >= 0.15 in every one of 8 steps (tests/conftest's
# tiny checkpoint, seed 0), where bf16's logits differ from fp32's by ~0.03: the two greedy runs must agree.
PROMPT = [314, 256, 237, 225, 193, 278, 94, 109]
TOL = 0.07                                                                # bf16 vs fp32 logits, at most


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXAMPLES = [{"instruction": f"Write function {i}.", "response": f"def f{i}(x):\n    return x * {i}\n"}
            for i in range(4)]


def test_bf16_greedy_sampling_gives_fp32_tokens_where_the_margin_is_clear(tiny_ckpt):
    m32 = C.load_model(tiny_ckpt, dtype=torch.float32, device="cpu")
    m16 = C.load_model(tiny_ckpt, dtype=torch.bfloat16, device="cpu")
    assert m16.new_caches(1, 4)[0].k.dtype == torch.bfloat16                  # the KV cache follows the weights
    out32 = G.generate(m32, [PROMPT], 8, eos_ids=())[0]
    out16 = G.generate(m16, [PROMPT], 8, eos_ids=())[0]
    ids = torch.tensor([PROMPT + out32[:-1]])
    with torch.no_grad():
        l32 = m32(ids)[0, len(PROMPT) - 1:]                                  # (8, V): the logits of each choice
        l16 = m16(ids)[0, len(PROMPT) - 1:].float()
    top2 = l32.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 2 * TOL, "the fixture changed: pick a prompt with clear margins"
    assert (l16 - l32).abs().max() < TOL
    assert out16 == out32
    # Nucleus sampling in bf16 runs too, and draws tokens of the vocabulary.
    outs = G.generate(m16, [PROMPT], 6, temperature=0.8, top_p=0.9, n=3, eos_ids=(), seed=1)
    assert [len(o) for o in outs] == [6, 6, 6] and all(0 <= t < 320 for o in outs for t in o)


def test_the_sampler_turns_bf16_logits_into_probabilities_in_fp32():
    """sample_next on bf16 logits draws exactly what it draws on the same values in fp32: the softmax, the top-k
    pre-selection and the nucleus all run in fp32 (in bf16, probabilities would round and the picks would move)."""
    logits = (torch.randn(32, 320, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    for temperature, top_p in ((0.2, 0.95), (1.0, 0.9), (0.7, 1.0)):
        a = G.sample_next(logits, temperature, top_p, [torch.Generator().manual_seed(i) for i in range(32)])
        b = G.sample_next(logits.float(), temperature, top_p, [torch.Generator().manual_seed(i) for i in range(32)])
        assert torch.equal(a, b)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert M.cpu_flags(x86) == {"fpu", "sse4_2", "avx2", "amx_bf16"}
    assert M.cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert M.cpu_flags(tmp_path / "missing") == set()


def test_resolve_dtype(monkeypatch):
    monkeypatch.setattr(M, "cpu_flags", lambda: NATIVE)
    assert M.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert M.resolve_dtype("fp32", "cpu") == torch.float32
    assert M.resolve_dtype(None, "cpu") == torch.float32                      # load_model's default on the CPU
    monkeypatch.setattr(M, "cpu_flags", lambda: EMULATED)
    assert M.resolve_dtype("fp32", "cpu") == torch.float32                    # fp32 is always offered
    with pytest.raises(M.UsageError) as e:
        M.resolve_dtype("bf16", "cpu")
    assert str(e.value).startswith("--dtype bf16: this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16")
    assert "found: sse4_2 avx avx2 fma avx512f" in str(e.value)
    monkeypatch.setattr(M, "cpu_flags", lambda: set())
    with pytest.raises(M.UsageError, match="no flags readable"):
        M.resolve_dtype("bf16", "cpu")


def test_mink_score_in_bf16_stays_close_to_fp32(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setattr(M, "cpu_flags", lambda: NATIVE)                      # bf16 runs anywhere; emulated is slow
    data = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    got = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.jsonl"
        argv = ["--model", str(tiny_ckpt), "--data", str(data), "--out", str(out), "--device", "cpu", "--dtype", dtype]
        assert mink.main(argv) == 0
        got[dtype] = [json.loads(x)["score"] for x in out.read_text().splitlines()]
    assert got["bf16"] == pytest.approx(got["fp32"], abs=0.05)                # Min-K% in nats; bf16 rounds ~0.01
    assert got["bf16"] != got["fp32"]                                          # and it did run in bf16


def test_bf16_is_refused_without_native_support(tmp_path, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setattr(M, "cpu_flags", lambda: EMULATED)
    data, out = write_jsonl(tmp_path / "d.jsonl", EXAMPLES), tmp_path / "s.jsonl"
    assert mink.main(["--model", str(tiny_ckpt), "--data", str(data), "--out", str(out), "--device", "cpu",
                      "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mink.py: error: --dtype bf16: this CPU has no native bf16") and err.count("\n") == 1
    assert "found: sse4_2 avx avx2 fma avx512f" in err and not out.exists()
    samples = tmp_path / "samples.jsonl"
    argv = ["--benchmark", "humaneval", "--samples", str(samples), "--out", str(tmp_path / "r.json"), "--generate",
            "--model", str(tiny_ckpt), "--device", "cpu", "--dtype", "bf16"]
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: --dtype bf16: this CPU has no native bf16") and err.count("\n") == 1
    assert not samples.exists()
    assert E.main([a for a in argv if a != "--generate"]) == 2                 # --dtype is a generation flag
    assert "only apply with --generate" in capsys.readouterr().err


def test_evaluate_generates_with_bf16_weights(tmp_path, shared_dir, tiny_ckpt, monkeypatch):
    monkeypatch.setattr(M, "cpu_flags", lambda: NATIVE)
    loaded, real = [], C.load_model
    monkeypatch.setattr(C, "load_model", lambda *a, **k: loaded.append(k.get("dtype")) or real(*a, **k))
    samples = tmp_path / "s.jsonl"
    assert E.main(["--benchmark", "humaneval", "--samples", str(samples), "--out", str(tmp_path / "r.json"),
                   "--data-dir", str(shared_dir / "data" / "humaneval"), "--generate", "--model", str(tiny_ckpt),
                   "--device", "cpu", "--dtype", "bf16", "--greedy", "--limit", "1", "--max-new-tokens", "4",
                   "--workers", "1", "--bootstrap", "0"]) == 0
    assert loaded == [torch.bfloat16] and len(samples.read_text().splitlines()) == 1
