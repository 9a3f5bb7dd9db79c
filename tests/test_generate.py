"""generate.py: KV-cache decoding, batching, sampling determinism, stop rules, continuous batching and top-p."""
import json

import torch

import checkpoint as C
import generate as G
from tokenizer import load_tokenizer


def greedy_by_recompute(m, prompt, steps):
    """Reference decoder: recompute the whole sequence at every step, no cache."""
    ids = list(prompt)
    for _ in range(steps):
        logits = m(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cache_greedy_equals_recompute(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    prompt = [5, 17, 33, 101, 7, 250, 11]
    got = G.generate(m, [prompt], max_new_tokens=20, temperature=0.0, eos_ids=set())
    assert got[0] == greedy_by_recompute(m, prompt, 20)


def test_batched_left_padding_equals_alone(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    prompts = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 100, 200], [42] * 5]
    together = G.generate(m, prompts, max_new_tokens=12, temperature=0.0, eos_ids=set())
    for p, got in zip(prompts, together):
        assert got == G.generate(m, [p], max_new_tokens=12, temperature=0.0, eos_ids=set())[0]
    # sampling: each row is a function of (seed, prompt, sample index) only
    sampled = G.generate(m, prompts, max_new_tokens=12, temperature=0.8, top_p=0.95, n=3, seed=7, eos_ids=set())
    assert len(sampled) == 9
    for i, p in enumerate(prompts):
        alone = G.generate(m, [p], max_new_tokens=12, temperature=0.8, top_p=0.95, n=3, seed=7, eos_ids=set())
        assert sampled[3 * i:3 * i + 3] == alone
    again = G.generate(m, prompts, max_new_tokens=12, temperature=0.8, top_p=0.95, n=3, seed=7, eos_ids=set())
    assert again == sampled
    other = G.generate(m, prompts, max_new_tokens=12, temperature=0.8, top_p=0.95, n=3, seed=8, eos_ids=set())
    assert other != sampled


def test_generation_stops_at_eos_and_drops_finished_rows(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    prompt = [5, 17, 33, 101]
    free = G.generate(m, [prompt], max_new_tokens=15, temperature=0.0, eos_ids=set())[0]
    stop_tok = free[4]
    cut = G.generate(m, [prompt, [9, 9, 9]], max_new_tokens=15, temperature=0.0, eos_ids={stop_tok})
    assert cut[0] == free[:free.index(stop_tok) + 1]
    # the other row keeps going after the first row finished (it was dropped from the batch)
    alone = G.generate(m, [[9, 9, 9]], max_new_tokens=15, temperature=0.0, eos_ids={stop_tok})[0]
    assert cut[1] == alone


def test_generation_stops_at_the_checkpoints_eos_ids_without_a_tokenizer(tiny_ckpt):
    """Every EOS id of config.json and generation_config.json (Qwen2.5-Instruct lists two) ends a sample, also
    when generate() is called without a tokenizer; eos_ids=() turns them off."""
    prompt = [5, 17, 33, 101]
    free = G.generate(C.load_model(tiny_ckpt), [prompt], max_new_tokens=15, eos_ids=())[0]
    a, b = list(dict.fromkeys(free))[:2]                    # the first two distinct tokens, a first
    ia, ib = free.index(a), free.index(b)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    (tiny_ckpt / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 999}))
    (tiny_ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [b, a]}))
    m = C.load_model(tiny_ckpt)
    assert m.config.eos_token_ids == (999, b, a)
    assert G.generate(m, [prompt], max_new_tokens=15)[0] == free[:ia + 1]
    (tiny_ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": b}))
    assert G.generate(C.load_model(tiny_ckpt), [prompt], max_new_tokens=15)[0] == free[:ib + 1]
    assert G.generate(m, [prompt], max_new_tokens=15, eos_ids=())[0] == free


def test_stop_strings(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    tok = load_tokenizer(tiny_ckpt)
    prompt = tok.encode("def f():")
    free = G.generate(m, [prompt], max_new_tokens=20, temperature=0.0, eos_ids=set())[0]
    text = tok.decode(free, skip_special_tokens=False)
    stop = text[6:8]
    got = G.generate(m, [prompt], max_new_tokens=20, temperature=0.0, eos_ids=set(), stop_strings=[stop],
                     tokenizer=tok)[0]
    assert stop in tok.decode(got, skip_special_tokens=False)
    assert stop not in tok.decode(got[:-1], skip_special_tokens=False)


def test_stop_when_ends_a_sample_after_the_token_it_accepts(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    prompts = [[5, 6, 7], [8, 9]]
    free = G.generate(m, prompts, max_new_tokens=12, temperature=0.8, n=3, eos_ids=set(), seed=1)
    got = G.generate(m, prompts, max_new_tokens=12, temperature=0.8, n=3, eos_ids=set(), seed=1, batch_size=2,
                     stop_when=lambda t: len(t) == 6 or t[-1] % 5 == 0)
    assert any(len(g) < 6 for g in got) and any(len(g) == 6 for g in got)    # both conditions were met
    for f, g in zip(free, got):
        k = next(i + 1 for i in range(12) if i + 1 == 6 or f[i] % 5 == 0)
        assert g == f[:k]                   # the tokens before the stop are the unstopped sample's


def test_continuous_batching_refills_and_equals_alone(tiny_ckpt, monkeypatch):
    """Fewer slots than samples and rows of very different lengths: every sample is the one it is alone, whatever
    the batch size, and each prompt is prefilled once."""
    m = C.load_model(tiny_ckpt)
    prompts = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 100, 200, 31, 77], [42] * 5]
    stop = set(range(3, 40))                                    # about 1 token in 8 ends a row
    kw = dict(max_new_tokens=25, temperature=1.0, top_p=0.9, n=3, seed=3, eos_ids=stop)
    prefilled = []
    real_prefill = m.prefill
    monkeypatch.setattr(m, "prefill", lambda ps: prefilled.extend(map(tuple, ps)) or real_prefill(ps))
    small = G.generate(m, prompts, batch_size=2, **kw)
    assert sorted(prefilled) == sorted(map(tuple, prompts))    # each prompt prefilled once, shared by its samples
    lengths = [len(o) for o in small]
    assert min(lengths) < 5 and max(lengths) > 12              # very different lengths: slots were refilled
    assert all(o[-1] in stop or len(o) == 25 for o in small)
    assert all(t not in stop for o in small for t in o[:-1])
    for bs in (1, 4, 64):
        assert G.generate(m, prompts, batch_size=bs, **kw) == small
    for i, p in enumerate(prompts):
        assert G.generate(m, [p], batch_size=3, **kw) == small[3 * i:3 * i + 3]


def test_continuous_batching_greedy_equals_recompute(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    prompts = [[5, 17, 33, 101, 7], [9, 9, 9], [250, 11, 42, 42, 8, 1, 19, 23]]
    refs = [greedy_by_recompute(m, p, 16) for p in prompts]
    eos = {refs[0][2]}                                          # prompt 0 ends early, freeing its slot
    want = [r[:next((k + 1 for k, t in enumerate(r) if t in eos), len(r))] for r in refs]
    assert len(want[0]) <= 3 < max(len(w) for w in want)
    got = G.generate(m, prompts, max_new_tokens=16, temperature=0.0, eos_ids=eos, batch_size=2)
    assert got == want


def test_top_p_fast_path_picks_what_the_full_sort_picks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    V = 1000
    logits = torch.randn(12, V, generator=g) * 0.1              # flat rows: the nucleus is far outside the top 8
    logits[:6, :5] += torch.tensor([6.0, 5.0, 4.5, 4.5, 3.0])   # peaked rows (one with a tie): inside the top 8
    logits[6, 7] = logits[6, 3] = 9.0                           # a tie between the two most likely tokens
    logits[7, [10, 11, 12, 13, 14, 15, 16, 17, 18]] = 6.0       # a tie straddling the 8th place: must fall back
    calls = []
    real_pick = G._nucleus_pick
    monkeypatch.setattr(G, "_nucleus_pick", lambda p, *a: calls.append(p.shape) or real_pick(p, *a))
    for temperature, top_p in [(0.7, 0.95), (0.2, 0.95), (1.0, 0.5)]:
        gens = lambda: [torch.Generator().manual_seed(100 + r) for r in range(len(logits))]  # noqa: E731
        calls.clear()
        fast = G.sample_next(logits, temperature, top_p, gens(), k=8)
        assert (8 in {s[-1] for s in calls}) and (V in {s[-1] for s in calls})   # both paths were taken
        full = G.sample_next(logits, temperature, top_p, gens(), k=V)            # the full sort for every row
        assert torch.equal(fast, full)
        # and the same tokens as sorting everything by hand (ties: lower id first)
        probs = torch.softmax(logits / temperature, -1)
        for r, gen in enumerate(gens()):
            order = sorted(range(V), key=lambda t: (-float(probs[r, t]), t))
            p = probs[r, order]
            cum = p.double().cumsum(0).float()
            keep = int((cum - p < top_p).sum())
            u = torch.rand((), generator=gen) * cum[keep - 1]
            assert int(fast[r]) == order[min(int((cum[:keep] < u).sum()), keep - 1)]
