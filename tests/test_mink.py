"""mink.py: Min-K% Prob and Min-K%++ (hand-computed and from the full distribution), K rounding, batching invariance,
pruning, the representation geometry and the CLI (scores, report, prune, geometry, bad input)."""
import json
import math
import random

import pytest
import torch
import torch.nn as nn

import cli
import checkpoint as C
import mink
from default_model import default_model_path
from tokenizer import load_tokenizer
from conftest import make_checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Min-K% arithmetic
# ----------------------------------------------------------------------------------------------------------------

LOGPS = torch.tensor([-0.1, -2.0, -0.5, -3.0, -0.2, -1.0, -0.05, -0.3, -0.7, -4.0])


def test_min_k_hand_computed():
    assert mink.min_k(LOGPS, 20) == pytest.approx((4.0 + 3.0) / 2)        # 20% of 10 tokens = the 2 least likely
    assert mink.min_k(LOGPS, 30) == pytest.approx((4.0 + 3.0 + 2.0) / 3)
    assert mink.min_k(LOGPS, 100) == pytest.approx(-float(LOGPS.mean()))  # K = 100%: the mean NLL
    assert mink.min_k(LOGPS[torch.randperm(10)], 20) == pytest.approx(3.5)  # order does not matter


def test_k_rounding_edge_cases():
    assert mink.n_lowest(10, 20) == 2
    assert mink.n_lowest(9, 20) == 1                 # floor(1.8), as Shi et al.'s int()
    assert mink.n_lowest(4, 20) == 1                 # K*T = 0.8 < 1: still one token, never an empty mean
    assert mink.n_lowest(1, 20) == 1
    assert mink.min_k(torch.tensor([-1.25]), 20) == pytest.approx(1.25)
    assert mink.min_k(torch.tensor([-0.5, -2.5, -1.0, -0.1]), 20) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        mink.min_k(torch.tensor([]), 20)


class TableModel(nn.Module):
    """A bigram 'LM' with known log-probs: the logits at position t are log P[x_t, :], so
    log p(x_{t+1} | x_<=t) = log P[x_t, x_{t+1}] exactly; padding handling is exercised through trunk's mask."""

    def __init__(self, probs):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(probs.log())
        self.lm_head = nn.Linear(1, 1)                       # only its device is read
        self.config = type("C", (), {"max_position_embeddings": 64})()

    def trunk(self, input_ids, attention_mask=None, hidden_layer=None):
        return self.table(input_ids), None

    def logits(self, h):
        return h


def test_token_logprobs_hand_computed():
    P = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    m = TableModel(P)
    rows, starts = [[0, 1, 2, 3, 1], [3, 3, 0]], [2, 1]
    got = mink.token_logprobs(m, rows, starts, batch_size=2)
    want0 = [math.log(0.25), math.log(0.1), math.log(0.05)]       # P[1,2], P[2,3], P[3,1]
    want1 = [math.log(0.8), math.log(0.05)]                        # P[3,3], P[3,0]
    assert got[0].tolist() == pytest.approx(want0, rel=1e-5)
    assert got[1].tolist() == pytest.approx(want1, rel=1e-5)
    # Min-20% of 3 tokens is the single least likely one: NLL = -log 0.05
    assert mink.min_k(got[0], 20) == pytest.approx(-math.log(0.05), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Scoring a tiny random checkpoint
# ----------------------------------------------------------------------------------------------------------------

EXAMPLES = [
    {"instruction": "Add two numbers.", "response": "def add(a, b):\n    return a + b", "text": "the cat sat"},
    {"instruction": "Say hi", "response": "hi", "text": "in the beginning there was the word and the word was"},
    {"instruction": "Write a loop that prints the numbers from one to ten, one per line.",
     "response": "for i in range(1, 11):\n    print(i)\n", "text": "ab"},
    {"instruction": "x", "response": "A longer answer: there are several things to consider here, then the end.",
     "text": "rest and tea at ten"},
    {"instruction": "Return the reverse of a string", "response": "s[::-1]", "text": "on the other hand"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("mink") / "tiny", seed=3)
    return path, C.load_model(path), load_tokenizer(path)


def mask(spec, n):
    """A row's scored tokens as bools: encode_examples' mask, or the int position of the first scored token."""
    return [t >= spec for t in range(n)] if isinstance(spec, int) else spec


def direct_values(model, rows, starts, normalize=False):
    """One unpadded example at a time, full logits, float64 log-softmax over every position."""
    out = []
    for ids, s in zip(rows, starts):
        logits = model(torch.tensor([ids]))[0, :-1].double()           # (T-1, V)
        logp = logits.log_softmax(-1)
        lp = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        if normalize:
            p = logp.exp()
            mu = (p * logp).sum(-1)
            sigma = ((p * logp ** 2).sum(-1) - mu ** 2).sqrt()
            lp = (lp - mu) / sigma
        out.append(lp[torch.tensor(mask(s, len(ids))[1:])])
    return out


def test_token_logprobs_match_full_unbatched_computation(tiny):
    _, m, tok = tiny
    rows, starts = mink.encode_examples(tok, EXAMPLES)
    got = mink.token_logprobs(m, rows, starts, batch_size=3, chunk_tokens=7)   # chunking across examples too
    for g, w in zip(got, direct_values(m, rows, starts)):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def test_scores_do_not_depend_on_batch_companions(tiny):
    _, m, tok = tiny
    for fields in ({}, {"text_field": "text"}):
        alone = mink.score_examples(m, tok, EXAMPLES, batch_size=1, **fields)
        batched = mink.score_examples(m, tok, EXAMPLES, batch_size=3, **fields)
        perm = list(range(len(EXAMPLES)))
        random.Random(0).shuffle(perm)
        shuffled = mink.score_examples(m, tok, [EXAMPLES[i] for i in perm], batch_size=2, **fields)
        unshuffled = [shuffled[perm.index(i)] for i in range(len(EXAMPLES))]
        assert batched == pytest.approx(alone, abs=1e-5)
        assert unshuffled == pytest.approx(alone, abs=1e-5)
        assert all(math.isfinite(s) and s > 0 for s in alone)


def test_what_is_scored(tiny):
    _, m, tok = tiny
    rows, starts = mink.encode_examples(tok, EXAMPLES[:1])
    p, r = tok.encode_example(EXAMPLES[0]["instruction"], EXAMPLES[0]["response"])
    assert rows[0] == p + r and r[-1] == tok.eos_id                               # response tokens only, EOS included
    assert starts[0] == [False] * len(p) + [True] * len(r)
    rows, starts = mink.encode_examples(tok, EXAMPLES[:1], text_field="text")
    assert rows[0] == tok.encode("the cat sat")                                    # every token after the first
    assert starts[0] == [False] + [True] * (len(rows[0]) - 1)
    # a two-token text has one scored token: its score is that token's NLL whatever K is
    two = [{"t": "ab"}]
    rows, _ = mink.encode_examples(tok, two, text_field="t")
    assert len(rows[0]) == 2
    nll = -float(direct_values(m, rows, [1])[0][0])
    for k in (1, 20, 100):
        assert mink.score_examples(m, tok, two, k=k, text_field="t")[0] == pytest.approx(nll, abs=1e-5)
    with pytest.raises(mink.ExampleError, match="no token to score"):
        mink.score_examples(m, tok, [{"t": "a"}], text_field="t")
    with pytest.raises(cli.UsageError, match="cannot tell the data format"):
        mink.score_examples(m, tok, [{"q": "q", "a": "a"}])


def test_minkpp_matches_full_distribution(tiny):
    _, m, tok = tiny
    rows, starts = mink.encode_examples(tok, EXAMPLES)
    got = mink.score_examples(m, tok, EXAMPLES, k=20, score="minkpp", batch_size=2)
    for g, z in zip(got, direct_values(m, rows, starts, normalize=True)):
        n = max(1, int(len(z) * 0.2))
        want = -float(z.sort().values[:n].mean())                      # negated: lower = more memorized
        assert g == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="unknown score"):
        mink.score_examples(m, tok, EXAMPLES, score="zlib")


# ----------------------------------------------------------------------------------------------------------------
# Pruning, overlap, geometry helpers
# ----------------------------------------------------------------------------------------------------------------

def test_prune_removes_lowest_and_keeps_order():
    examples = [{"id": i} for i in range(10)]
    scores = [5.0, 1.0, 7.0, 0.5, 9.0, 3.0, 3.0, 8.0, 2.0, 6.0]
    kept = mink.prune(examples, scores, 0.3)                           # the 3 lowest: indices 3, 1, 8
    assert [e["id"] for e in kept] == [0, 2, 4, 5, 6, 7, 9]
    assert mink.prune(examples, scores, 0.0) == examples
    assert len(mink.prune(examples, scores, 1 - 0.9)) == 9              # 0.0999... * 10 rounds to one removal
    assert [e["id"] for e in mink.prune(examples, scores, 0.4)] == [0, 2, 4, 6, 7, 9]   # tie 3.0: earlier one goes
    with pytest.raises(ValueError):
        mink.prune(examples, scores[:-1], 0.2)
    with pytest.raises(ValueError):
        mink.prune(examples, scores[:-1] + [float("nan")], 0.2)


def test_overlap_coefficient():
    a = [0.0, 1.0, 2.0, 3.0]
    assert mink.overlap(a, a) == pytest.approx(1.0)
    assert mink.overlap([0.0, 0.1], [10.0, 10.1]) == pytest.approx(0.0)
    assert mink.overlap([0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], bins=2) == pytest.approx(0.75)


def test_pair_geometry_and_groups():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    l2, ang = mink.pair_geometry(hidden, [(0, 1), (0, 2)], {0: 0, 1: 1, 2: 2})
    assert l2.tolist() == pytest.approx([math.sqrt(5), 2.0])
    assert ang.tolist() == pytest.approx([90.0, 0.0], abs=1e-6)
    most, least = mink.memorization_groups([0.3, 0.1, 0.9, 0.5, 0.7], 0.4)
    assert most == [1, 0] and least == [4, 2]
    pairs = mink.draw_pairs(most, least, 50, seed=1)
    assert pairs == mink.draw_pairs(most, least, 50, seed=1)
    assert all(i in most and j in least for i, j in pairs)


def test_pooled_hidden_is_the_mean_over_scored_tokens(tiny):
    _, m, tok = tiny
    rows, starts = mink.encode_examples(tok, EXAMPLES)
    got = mink.pooled_hidden(m, rows, layer=2, pool_from=starts, batch_size=3)
    for g, r, s in zip(got, rows, starts):
        _, h = m(torch.tensor([r]), hidden_layer=2)                     # (1, T, H), no padding
        torch.testing.assert_close(g, h[0, torch.tensor(s)].mean(0), atol=1e-5, rtol=1e-5)
    got = mink.pooled_hidden(m, rows, layer=0, batch_size=2)          # default: every token after the first
    for g, r in zip(got, rows):
        torch.testing.assert_close(g, m.model.embed_tokens.weight[r[1:]].mean(0), atol=1e-6, rtol=1e-6)


def test_pooled_hidden_at_the_last_layer_is_the_pre_norm_state(tiny):
    """hidden_layer = L is block L's raw output, not transformers' hidden_states[L] (= model.norm of it)."""
    _, m, tok = tiny
    rows, starts = mink.encode_examples(tok, EXAMPLES[:2])
    got = mink.pooled_hidden(m, rows, layer=m.num_layers, pool_from=starts)
    for g, r, s in zip(got, rows, starts):
        ids = torch.tensor([r])
        h_final, h_last = m.trunk(ids, hidden_layer=m.num_layers)
        assert torch.equal(h_last, h_final)
        torch.testing.assert_close(m.logits(h_final), m(ids))           # the final norm comes after it
        torch.testing.assert_close(g, h_final[0, torch.tensor(s)].mean(0), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(g, m.model.norm(h_final)[0, torch.tensor(s)].mean(0), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_scores_in_input_order(tiny, tmp_path):
    path, m, tok = tiny
    data = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    out = tmp_path / "s.jsonl"
    assert mink.main(["--model", str(path), "--data", str(data), "--out", str(out), "--batch-size", "2"]) == 0
    lines = read_jsonl(out)
    assert [x["index"] for x in lines] == list(range(len(EXAMPLES)))
    assert [x["score"] for x in lines] == pytest.approx(mink.score_examples(m, tok, EXAMPLES, batch_size=1), abs=1e-5)
    assert all(x["score_kind"] == "mink" and x["k"] == 20 and "reference" not in x for x in lines)
    # a JSON list, --text-field, --limit, --reference, Min-K%++
    data2 = tmp_path / "d.json"
    data2.write_text(json.dumps(EXAMPLES))
    assert mink.main(["--model", str(path), "--data", str(data2), "--out", str(out), "--text-field", "text",
                      "--limit", "3", "--reference", "--score", "minkpp", "--k", "50"]) == 0
    lines = read_jsonl(out)
    want = mink.score_examples(m, tok, EXAMPLES[:3], k=50, score="minkpp", text_field="text")
    assert [x["score"] for x in lines] == pytest.approx(want, abs=1e-5)
    assert all(x["reference"] for x in lines)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_rejects_bad_input_naming_file_and_line(tiny, tmp_path, capsys):
    path, _, _ = tiny
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(EXAMPLES[0]) + "\n\n" + '{"instruction": "x", "response": \n')
    out = tmp_path / "s.jsonl"
    assert mink.main(["--model", str(path), "--data", str(data), "--out", str(out)]) == 2
    assert f"{data}:3: not valid JSON" in capsys.readouterr().err
    assert not out.exists()
    write_jsonl(data, [EXAMPLES[0], {"question": "q", "answer": "a"}])
    assert mink.main(["--model", str(path), "--data", str(data), "--out", str(out)]) == 2
    assert f"{data}:2: example 1: missing field 'instruction'" in capsys.readouterr().err
    assert not out.exists()
    assert mink.main(["--data", str(data), "--out", str(out), "--text-field", "t", "--prompt-field", "q"]) == 2
    assert "--text-field excludes --prompt-field" in capsys.readouterr().err


def make_adapter(base_path, out_dir, scale):
    """A LoRA adapter folder for the tiny checkpoint with B = scale * N(0, 1) (scale 0: the base model exactly)."""
    lora = pytest.importorskip("lora")
    peft_io = pytest.importorskip("peft_io")
    fresh = C.load_model(base_path)
    lora.inject_lora(fresh, r=4, alpha=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in lora.lora_layers(fresh).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)) * scale)
    return peft_io.save_adapter(fresh, out_dir)


def test_cli_adapter_changes_scores_and_zero_adapter_does_not(tiny, tmp_path):
    path, m, tok = tiny
    data = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    base = mink.score_examples(m, tok, EXAMPLES)
    for name, scale in (("zero", 0.0), ("trained", 0.5)):
        adapter = make_adapter(path, tmp_path / name, scale)
        out = tmp_path / f"{name}.jsonl"
        assert mink.main(["--model", str(path), "--adapter", str(adapter), "--data", str(data), "--out", str(out)]) == 0
        got = [x["score"] for x in read_jsonl(out)]
        if scale == 0:
            assert got == pytest.approx(base, abs=1e-5)
        else:
            assert max(abs(a - b) for a, b in zip(got, base)) > 1e-3


def test_cli_prune_sweep(tmp_path, capsys):
    examples = [{"instruction": f"i{i}", "response": f"r{i}"} for i in range(20)]
    data = write_jsonl(tmp_path / "train.jsonl", examples)
    scores = [((7 * i) % 20) / 10 for i in range(20)]
    sfile = write_jsonl(tmp_path / "s.jsonl", [{"index": i, "score": s} for i, s in enumerate(scores)])
    assert mink.main(["prune", "--data", str(data), "--scores", str(sfile), "--remove", "0.1", "0.25",
                      "--out-dir", str(tmp_path / "out")]) == 0
    for r, name in ((0.1, "train_remove10.jsonl"), (0.25, "train_remove25.jsonl")):
        kept = read_jsonl(tmp_path / "out" / name)
        assert kept == mink.prune(examples, scores, r)
        assert len(kept) == 20 - round(20 * r)
    # scores that do not cover the data are refused
    write_jsonl(sfile, [{"index": i, "score": s} for i, s in enumerate(scores[:5])])
    assert mink.main(["prune", "--data", str(data), "--scores", str(sfile), "--out-dir", str(tmp_path / "o2")]) == 2
    assert "5 scores for 20 examples" in capsys.readouterr().err


def test_cli_report(tmp_path, capsys):
    def scores_file(name, xs, ref=False):
        return write_jsonl(tmp_path / name, [{"index": i, "score": x, "score_kind": "mink", "k": 20,
                                              **({"reference": True} if ref else {})} for i, x in enumerate(xs)])
    p0 = scores_file("p0.jsonl", [1.0 + 0.01 * i for i in range(100)])
    p1 = scores_file("p1.jsonl", [0.5 + 0.01 * i for i in range(100)])
    p2 = scores_file("p2.jsonl", [5.0 + 0.01 * i for i in range(100)], ref=True)
    png = tmp_path / "f.png"
    assert mink.main(["report", "--p0", str(p0), "--p1", str(p1), "--p2", str(p2), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "p0 (data on base)" in out and "p2 (reference on base)" in out
    assert "1.495" in out                                   # median of p0
    assert "overlap(p0, p2) = 0.000" in out
    ovl = float(out.split("overlap(p0, p1) = ")[1].split()[0])
    assert 0.3 < ovl < 0.7
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 0
    except ImportError:
        assert not png.exists()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"index": 1, "score": 0.1}])
    assert mink.main(["report", "--p0", str(bad)]) == 2


def test_cli_geometry(tiny, tmp_path, capsys):
    path, m, tok = tiny
    examples = EXAMPLES * 2
    data = write_jsonl(tmp_path / "d.jsonl", examples)
    sfile = tmp_path / "s.jsonl"
    assert mink.main(["--model", str(path), "--data", str(data), "--out", str(sfile)]) == 0
    argv = ["geometry", "--model", str(path), "--data", str(data), "--scores", str(sfile), "--layer", "2",
            "--group", "0.3", "--pairs", "50"]
    zero, ft = make_adapter(path, tmp_path / "zero", 0.0), make_adapter(path, tmp_path / "ft", 0.5)
    assert mink.main(argv + ["--adapter", str(zero), "--adapter", str(ft)]) == 0
    out = capsys.readouterr().out
    assert "l2 distance" in out and "angle (degrees)" in out
    # the same numbers from the library functions; a zero adapter reproduces the base rows, a nonzero one does not
    scores = [x["score"] for x in read_jsonl(sfile)]
    most, least = mink.memorization_groups(scores, 0.3)
    pairs = mink.draw_pairs(most, least, 50, seed=0)
    rows, starts = mink.encode_examples(tok, examples)
    hidden = mink.pooled_hidden(m, rows, 2, starts)
    l2, ang = mink.pair_geometry(hidden, pairs, {i: i for i in range(len(rows))})
    lines = [line for line in out.splitlines() if line.startswith(("base ", "+zero ", "+ft "))]
    assert [line.split()[0] for line in lines] == ["base", "+zero", "+ft", "base", "+zero", "+ft"]
    assert lines[0].split()[2] == f"{float(l2.mean()):.3f}" and lines[3].split()[2] == f"{float(ang.mean()):.2f}"
    assert lines[1].split()[2:] == lines[0].split()[2:] and lines[4].split()[2:] == lines[3].split()[2:]
    assert lines[2].split()[2:] != lines[0].split()[2:]
    assert mink.main(argv[:-6] + ["--layer", "9"]) == 2                 # the tiny model has 4 layers
    assert "--layer 9" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_scores(shared_dir):
    path = default_model_path()
    m, tok = C.load_model(path, dtype=torch.float32, device="cpu"), load_tokenizer(path)
    examples = []
    with open(shared_dir / "data" / "train" / "python_instruct.jsonl") as f:
        for line in f:
            examples.append(json.loads(line))
            if len(examples) == 3:
                break
    examples = [dict(e, response=e["response"][:300]) for e in examples]   # keep it quick
    batched = mink.score_examples(m, tok, examples, batch_size=3)
    alone = mink.score_examples(m, tok, examples, batch_size=1)
    assert batched == pytest.approx(alone, abs=1e-4)
    assert all(0.0 < s < 20.0 for s in batched)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    rows, starts = mink.encode_examples(tok, examples)
    for s, ids, start in zip(batched, rows, starts):
        with torch.no_grad():
            logp = hf(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
        lp = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)[torch.tensor(start[1:])]
        assert s == pytest.approx(mink.min_k(lp, 20), abs=1e-4)
