"""model.py: KV-cache decoding, batching with padding, selective logits, sampling determinism and bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint as C
import model as M
import generate as G
from tokenizer import load_tokenizer
from conftest import make_checkpoint


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


def test_family_switches_qkv_bias_and_qk_norm(tiny_ckpt):
    """The family switches (ModelArgs.qkv_bias, qk_norm) add their tensors and run through every path: the model
    names the new tensors (so checkpoints load them), and the KV-cache decoder agrees with recomputation."""
    from conftest import TINY_CONFIG
    args = C.model_args(TINY_CONFIG)
    args.qkv_bias, args.qk_norm = True, True
    with torch.device("meta"):
        names = set(M.Transformer(args).state_dict())
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_norm.weight"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names                       # o has no bias
    m = M.Transformer(args)
    weights = C.random_weights(TINY_CONFIG, seed=3)
    weights.update({k: torch.randn(v.shape, generator=torch.Generator().manual_seed(4)) * 0.3
                    for k, v in m.state_dict().items() if k not in weights})
    m.load_state_dict(weights)
    m.eval().requires_grad_(False)
    prompt = [5, 17, 33, 101, 7]
    assert G.generate(m, [prompt], max_new_tokens=12, eos_ids=set())[0] == greedy_by_recompute(m, prompt, 12)
    plain = C.load_model(tiny_ckpt)
    assert not hasattr(plain.model.layers[0].self_attn, "q_norm")                 # llama: neither switch


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


def test_logits_at_and_hidden_layer(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    ids = torch.randint(3, 300, (2, 10))
    full, h2 = m(ids, hidden_layer=2)
    sel = torch.zeros(2, 10, dtype=torch.bool)
    sel[0, 4:] = True
    sel[1, 7] = True
    torch.testing.assert_close(m(ids, logits_at=sel), full[sel], rtol=0, atol=1e-5)
    assert h2.shape == (2, 10, 64)
    _, h_last = m(ids, hidden_layer=4)
    torch.testing.assert_close(m.logits(h_last), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_layer"):
        m(ids, hidden_layer=5)


def test_padding_does_not_change_real_positions(tiny_ckpt):
    m = C.load_model(tiny_ckpt)
    row = torch.randint(3, 300, (1, 7))
    alone = m(row)
    padded = torch.cat([torch.full((1, 4), 2), row], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 7])
    torch.testing.assert_close(m(padded, attention_mask=mask)[:, 4:], alone, rtol=0, atol=1e-5)


def test_sharded_checkpoint_and_dtypes(tmp_path, tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    out = tmp_path / "sharded"
    shutil.copytree(tiny_ckpt, out)
    (out / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(out / fname))
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = torch.randint(3, 300, (1, 8))
    torch.testing.assert_close(C.load_model(out)(ids), C.load_model(tiny_ckpt)(ids), rtol=0, atol=0)
    bf = C.load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert bf.lm_head.weight.dtype == torch.bfloat16
    assert torch.isfinite(bf(ids).float()).all()
    # a missing shard is named
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(C.CheckpointError, match="model-00002-of-00002.safetensors"):
        C.load_model(out)


def test_tied_embeddings_share_storage(tmp_path):
    p = make_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    m = C.load_model(p)
    assert m.lm_head.weight is m.model.embed_tokens.weight


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("hidden_size"), "missing key 'hidden_size'"),
    (lambda c: c.update(model_type="gemma"), "model_type 'gemma' is not supported"),
    (lambda c: c.update(model_type="qwen2_moe"), "model_type 'qwen2_moe'"),
    (lambda c: c.update(sliding_window=4096), "sliding_window=4096 is not implemented for model_type 'llama'"),
    (lambda c: c.update(model_type="qwen2", sliding_window=8, use_sliding_window=True), "use_sliding_window=true"),
    (lambda c: c.update(model_type="mistral", sliding_window=0), "sliding_window=0"),
    (lambda c: c.update(attention_bias=True), "attention_bias"),
    (lambda c: c.update(model_type="qwen3", attention_bias=True), "attention_bias"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
])
def test_bad_config_is_refused(tiny_ckpt, change, match):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    change(cfg)
    (tiny_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(C.CheckpointError, match=match) as e:
        C.load_model(tiny_ckpt)
    assert "config.json" in str(e.value)


def test_shape_mismatch_names_file_and_tensor(tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tiny_ckpt / "model.safetensors"))
    with pytest.raises(C.CheckpointError, match=r"model.safetensors.*up_proj.weight.*shape"):
        C.load_model(tiny_ckpt)


def test_missing_tensor_is_named(tiny_ckpt):
    sd = load_file(str(tiny_ckpt / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(tiny_ckpt / "model.safetensors"))
    with pytest.raises(C.CheckpointError, match="model.norm.weight"):
        C.load_model(tiny_ckpt)


def test_rope_parameters_layout_equals_legacy(tmp_path):
    legacy = make_checkpoint(tmp_path / "legacy", rope_theta=5e5,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    new = make_checkpoint(tmp_path / "new")
    cfg = json.loads((new / "config.json").read_text())
    for k in ("rope_theta", "rope_scaling"):
        cfg.pop(k)
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    (new / "config.json").write_text(json.dumps(cfg))
    a, b = C.load_model(legacy), C.load_model(new)
    assert a.config.rope_scaling == b.config.rope_scaling and a.config.rope_theta == b.config.rope_theta == 5e5
    ids = torch.randint(3, 300, (1, 40))
    torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)


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


def test_activation_checkpointing_gives_the_same_gradients(tiny_ckpt):
    m = C.load_model(tiny_ckpt).train()
    for p in m.model.norm.parameters():
        p.requires_grad_(True)
    for layer in m.model.layers:
        layer.mlp.up_proj.weight.requires_grad_(True)
    ids = torch.randint(3, 300, (2, 12))
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.zero_grad(set_to_none=True)
        m(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


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
