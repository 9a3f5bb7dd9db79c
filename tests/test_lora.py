"""lora.py: LoRALinear math, injection, merge/unmerge (the PEFT format and the merge CLI: test_peft_io.py).

Everything runs on the tiny random checkpoints of conftest.make_checkpoint.
"""
import math

import pytest
import torch

from checkpoint import load_model
from conftest import make_checkpoint
from lora import DEFAULT_TARGETS, LoRALinear, inject_lora, lora_layers, merge, unmerge

TOKENS = torch.tensor([[5, 17, 200, 31, 99, 4, 250, 7, 64, 3], [1, 80, 81, 82, 300, 12, 13, 14, 2, 2]])
MASK = torch.tensor([[1] * 10, [1] * 8 + [0] * 2])


def logits(model):
    with torch.no_grad():
        return model(TOKENS, attention_mask=MASK)


@torch.no_grad()
def randomize_B(model, seed=1, std=0.05):
    """B = 0 makes the adapter a no-op; give it values so that the checks below mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in lora_layers(model).values():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def adapted(path, seed=0, dtype=None, **kw):
    model = load_model(path, dtype=dtype, device="cpu")
    inject_lora(model, generator=torch.Generator().manual_seed(seed), **kw)
    randomize_B(model, seed + 1)
    return model


# --- LoRALinear and injection --------------------------------------------------------------------------------

def test_layer_math_and_init():
    base = torch.nn.Linear(48, 24, bias=True)
    lin = LoRALinear(base, r=8, alpha=16, dropout=0.0, generator=torch.Generator().manual_seed(0))
    assert lin.weight is base.weight and lin.bias is base.bias and not lin.weight.requires_grad
    assert lin.lora_A.shape == (8, 48) and lin.lora_B.shape == (24, 8) and torch.all(lin.lora_B == 0)
    assert lin.lora_A.abs().max() <= 1 / math.sqrt(48) and lin.lora_A.std() > 0.5 / math.sqrt(3 * 48)  # U(+-1/sqrt(in))
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(3, 5, 48)
    want = x @ base.weight.T + base.bias + 2.0 * (x @ lin.lora_A.T @ lin.lora_B.T)  # scaling = 16 / 8
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    assert LoRALinear(base, r=16, alpha=16, rslora=True).scaling == pytest.approx(4.0)  # alpha / sqrt(r)


def test_inject_targets_freezes_and_seeds(tiny_ckpt):
    model = load_model(tiny_ckpt, device="cpu")
    before = logits(model)
    names = inject_lora(model, generator=torch.Generator().manual_seed(3))
    assert len(names) == 4 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
    assert {n.rsplit(".", 1)[1] for n in names} == set(DEFAULT_TARGETS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()  # checkpoint keys unchanged
    assert torch.equal(logits(model), before)  # B = 0: exactly the base model right after injection
    m = model.model.layers[0].self_attn.q_proj
    assert (m.r, m.scaling, m.lora_dropout.p) == (32, 1.0, 0.05)  # Appendix C.1 defaults
    other = load_model(tiny_ckpt, device="cpu")
    inject_lora(other, generator=torch.Generator().manual_seed(3))
    third = load_model(tiny_ckpt, device="cpu")
    inject_lora(third, generator=torch.Generator().manual_seed(4))
    a = lambda mdl: mdl.model.layers[2].mlp.down_proj.lora_A
    assert torch.equal(a(model), a(other)) and not torch.equal(a(model), a(third))


def test_layers_subset_and_errors(tiny_ckpt):
    model = load_model(tiny_ckpt, device="cpu")
    names = inject_lora(model, targets=("q_proj", "v_proj"), layers=[1, 3])
    assert names == [f"model.layers.{i}.self_attn.{t}" for i in (1, 3) for t in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model)
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        inject_lora(load_model(tiny_ckpt, device="cpu"), targets=("qkv",))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        inject_lora(load_model(tiny_ckpt, device="cpu"), targets=("mlp",))
    tied = load_model(make_checkpoint(tiny_ckpt.parent / "tied", tie_word_embeddings=True), device="cpu")
    with pytest.raises(ValueError, match="lm_head shares its weight"):
        inject_lora(tied, targets=("lm_head",))


def test_gradients_dropout_and_mixed_precision(tiny_ckpt):
    model = adapted(tiny_ckpt).train()
    torch.manual_seed(0)
    a, b = model(TOKENS), model(TOKENS)
    assert not torch.equal(a, b)  # dropout 0.05 on the adapter input is active in training
    a.float().logsumexp(-1).mean().backward()
    for m in lora_layers(model).values():
        assert m.lora_A.grad is not None and m.lora_B.grad is not None and m.weight.grad is None
    # A bf16 model with fp32 LoRA master weights, without autocast: the adapter runs in bf16, grads come back fp32.
    bf = adapted(tiny_ckpt, dtype=torch.bfloat16).train()
    out = bf(TOKENS)
    assert out.dtype == torch.bfloat16
    out.float().mean().backward()
    q = bf.model.layers[0].self_attn.q_proj
    assert q.lora_A.dtype == torch.float32 and q.lora_B.grad.dtype == torch.float32
    # fp32 model under CPU autocast: runs in bf16 and stays close to fp32.
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model)
    assert auto.dtype == torch.bfloat16
    torch.testing.assert_close(auto.float(), logits(model), atol=0.1, rtol=0.05)


# --- merge / unmerge ---------------------------------------------------------------------------------------------

def test_merge_unmerge_fp32(tiny_ckpt):
    model = adapted(tiny_ckpt)
    base = load_model(tiny_ckpt, device="cpu")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    params = {n: p for n, p in model.named_parameters()}
    unmerged = logits(model)
    assert (unmerged - logits(base)).abs().max() > 1e-2  # the adapter does change the model
    merge(model)
    assert all(m.merged for m in lora_layers(model).values())
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, weights["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    assert all(p is params[n] for n, p in model.named_parameters())  # merged in place: same Parameter objects
    unmerge(model)
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, weights[n]), n  # bit-identical base weights
    assert torch.equal(logits(model), unmerged)
    merge(model, keep_base=False)
    with pytest.raises(RuntimeError, match="keep_base=False"):
        unmerge(model)


def test_bf16_merge_does_fp32_arithmetic(tiny_ckpt):
    model = adapted(tiny_ckpt, dtype=torch.bfloat16, alpha=64)
    orig = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    merge(model)
    for n, m in lora_layers(model).items():
        A, B = m.lora_A.float(), m.lora_B.float()
        want = (orig[n].float() + 2.0 * (B @ A)).to(torch.bfloat16)  # scaling = 64 / 32
        assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, want), n
    unmerge(model)
    assert all(torch.equal(m.weight, orig[n]) for n, m in lora_layers(model).items())
