"""model.py: the family switches, selective logits and hidden layers, padding, activation checkpointing and the
chunked linear cross-entropy (decoding: test_generate.py; loading: test_checkpoint.py; goldens: test_golden.py)."""
import pytest
import torch
import torch.nn.functional as F

import checkpoint as C
import model as M
import generate as G
from test_generate import greedy_by_recompute


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


def test_linear_cross_entropy_equals_reference():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (37,), generator=g)
    ours = M.linear_cross_entropy(h, W, y, chunk=8)
    (gh,) = torch.autograd.grad(ours * 3, h)
    ref = F.cross_entropy(h @ W.t(), y, reduction="sum")
    (rh,) = torch.autograd.grad(ref * 3, h)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, rh)
