"""generate(compile=True): the torch.compile'd decode step (generate.CompiledStep) against the eager one.

Greedy tokens must be identical and every step's logits within 1e-4; a run whose slots finish at different times and
are refilled (so the slot count A and the attended length S change from step to step) must compile the step once,
and a second run on the same model not at all."""
import re
import shutil

import pytest
import torch

import checkpoint as C
import generate as G
from conftest import make_checkpoint

pytestmark = [
    pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                       reason="torch.compile's CPU backend (inductor) needs a C++ compiler; none on PATH"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),  # inductor's
]
TOL = 1e-4


def record_decode(m):
    """Make m.decode keep a copy of every step's logits; returns the list it appends to."""
    steps = []

    def decode(tokens, pos, caches, step=None):
        out = type(m).decode(m, tokens, pos, caches, step)
        steps.append(out.clone())
        return out
    m.decode = decode
    return steps


def compiles(err) -> int:
    """The compilation count generate(compile=True) printed to stderr."""
    found = re.findall(r"compiled decode step: (\d+) compilation\(s\) in [0-9.]+ s over (\d+) steps", err)
    assert len(found) == 1, err
    return int(found[0][0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return C.load_model(make_checkpoint(tmp_path_factory.mktemp("compile") / "tiny"))


def test_compiled_greedy_equals_eager_and_compiles_once(tiny, capsys):
    """Seven prompts of lengths 1-12 through 3 slots: samples end at different lengths (stop_when), slots are refilled
    and the batch drains to one slot, so A runs 3..1 and S grows and shrinks. One compilation serves all of it."""
    prompts = [[5 + i] * (1 + (5 * i) % 12) + [17, 33][:i % 3] for i in range(7)]
    stop = lambda t: len(t) >= 4 + (t[0] % 9)                                      # noqa: E731
    kw = dict(max_new_tokens=16, temperature=0.0, eos_ids=set(), batch_size=3, stop_when=stop)
    torch.compiler.reset()                                    # what an earlier test compiled is forgotten
    eager_logits = record_decode(tiny)
    eager = G.generate(tiny, prompts, **kw)
    assert len({len(o) for o in eager}) > 2                   # the samples do end at different times
    compiled_logits = record_decode(tiny)
    capsys.readouterr()
    compiled = G.generate(tiny, prompts, **kw, compile=True)
    n = compiles(capsys.readouterr().err)
    assert compiled == eager
    assert len(compiled_logits) == len(eager_logits)
    assert {a.shape[0] for a in eager_logits} == {1, 2, 3}
    for a, b in zip(eager_logits, compiled_logits):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=TOL), (a - b).abs().max()
    assert n == 1
    # a second run, other prompts, more slots than samples: nothing to compile again
    again = G.generate(tiny, [[7, 8, 9, 10], [3] * 20], max_new_tokens=9, temperature=0.0, eos_ids=set(),
                       batch_size=8, compile=True)
    assert compiles(capsys.readouterr().err) == 0
    assert again == G.generate(tiny, [[7, 8, 9, 10], [3] * 20], max_new_tokens=9, temperature=0.0, eos_ids=set(),
                               batch_size=8)


def test_compiled_sampling_runs_with_n_samples(tiny, capsys):
    """Nucleus sampling through the compiled step: n samples per prompt, each its own generator. The per-step logits
    differ from eager only by rounding, so the samples are eager's unless a draw lands within rounding of a nucleus
    boundary (none does here)."""
    prompts = [[5, 17, 33], [9, 8, 7, 6, 5]]
    kw = dict(max_new_tokens=10, temperature=0.8, top_p=0.95, n=3, seed=7, eos_ids=set(), batch_size=4)
    compiled = G.generate(tiny, prompts, **kw, compile=True)
    assert compiles(capsys.readouterr().err) <= 1
    assert len(compiled) == 6 and all(len(o) == 10 for o in compiled)
    assert compiled == G.generate(tiny, prompts, **kw)


@pytest.mark.parametrize("case", ["mistral_window", "qwen2", "qwen3", "rope_dynamic"])
def test_family_switches_compiled(case, capsys):
    """The golden fixtures' family switches through the compiled step (tests/test_golden.py): Mistral's sliding
    window (8, passed by far), Qwen2's q/k/v biases, Qwen3's q/k norms, dynamic NTK RoPE (its frequencies change
    with the attended length: one compilation all the same). Row 0 continues as transformers' generate does, where
    the fixture has its greedy tokens; every step's logits are within 1e-4 of eager."""
    from safetensors.torch import load_file
    from test_golden import GOLDEN
    g = load_file(str(GOLDEN / case / "golden.safetensors"))
    m = C.load_model(GOLDEN / case, dtype=torch.float32)
    prompts = [g["input_ids"][0].tolist(), g["input_ids"][1, :13].tolist(), g["input_ids"][1, :5].tolist()]
    kw = dict(max_new_tokens=12, temperature=0.0, eos_ids=(), batch_size=2)      # a refill, then one slot
    torch.compiler.reset()
    eager_logits = record_decode(m)
    eager = G.generate(m, prompts, **kw)
    compiled_logits = record_decode(m)
    capsys.readouterr()
    compiled = G.generate(m, prompts, **kw, compile=True)
    assert compiles(capsys.readouterr().err) == 1
    assert compiled == eager
    if "greedy" in g:
        assert compiled[0][:8] == g["greedy"].tolist()
    for a, b in zip(eager_logits, compiled_logits, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=TOL), (a - b).abs().max()


@pytest.mark.slow
def test_default_model_golden_greedy_compiled():
    """The embedded default model's golden greedy answer (tests/test_default_model.py) through the compiled step,
    every step's logits within 1e-4 of eager. About 10 s of compiling with a warm inductor cache, a minute cold."""
    from default_model import default_model_path
    from test_default_model import GOLDEN_GREEDY
    from tokenizer import load_tokenizer
    try:
        path = default_model_path()
    except (ImportError, ValueError, FileNotFoundError) as e:
        pytest.skip(f"default model unavailable: {e}")
    m, tok = C.load_model(path), load_tokenizer(path)
    torch.compiler.reset()
    prompt = tok.encode(tok.prompt("Write a Python function that returns the square of a number."))
    eager_logits = record_decode(m)
    eager = G.generate(m, [prompt], max_new_tokens=40, temperature=0.0, tokenizer=tok)[0]
    compiled_logits = record_decode(m)
    compiled = G.generate(m, [prompt], max_new_tokens=40, temperature=0.0, tokenizer=tok, compile=True)[0]
    assert tok.decode(eager) == GOLDEN_GREEDY and compiled == eager
    for a, b in zip(eager_logits, compiled_logits, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=TOL), (a - b).abs().max()


def test_evaluate_compile_flag(tmp_path, shared_dir, tiny_ckpt, capsys):
    """evaluate.py --generate --compile writes the samples that eager generation writes, and says what it compiled;
    --compile without --generate is refused."""
    import evaluate as E
    base = ["--benchmark", "humaneval", "--data-dir", str(shared_dir / "data" / "humaneval"), "--workers", "2",
            "--bootstrap", "0", "--limit", "2"]
    gen = [*base, "--generate", "--model", str(tiny_ckpt), "--greedy", "--max-new-tokens", "6", "--batch-size", "2"]
    eager, compiled = tmp_path / "eager.jsonl", tmp_path / "compiled.jsonl"
    assert E.main([*gen, "--samples", str(eager), "--out", str(tmp_path / "eager.json")]) == 0
    capsys.readouterr()
    assert E.main([*gen, "--compile", "--samples", str(compiled), "--out", str(tmp_path / "compiled.json")]) == 0
    compiles(capsys.readouterr().err)
    assert compiled.read_text() == eager.read_text()
    assert E.main([*base, "--compile", "--samples", str(eager), "--out", str(tmp_path / "r.json")]) == 2
    assert "--compile only apply with --generate" in capsys.readouterr().err
