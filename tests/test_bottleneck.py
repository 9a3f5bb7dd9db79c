"""bottleneck.py: the KL (Eq. (4)), its reduction and clamp, Eq. (IB-FT), sample()'s std, and the sink rule."""
import pytest
import torch

import checkpoint as C
import cli
from conftest import REPO
from tokenizer import load_tokenizer
import train as T
from bottleneck import IBConfig, VariationalBottleneck, gaussian_kl, ibft_loss, kl_count


def test_kl_closed_form_matches_torch_distributions_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 8, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 8, generator=g, dtype=torch.float64).clamp(-2, 2)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p), rtol=1e-12, atol=1e-12)
    # Monte Carlo: E_q[log q(z) - log p(z)] with 400k samples; the standard error of each estimate is < 0.01 here,
    # so a tolerance of 0.05 (> 5 standard errors) cannot fail by chance.
    z = q.sample((400_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    assert (mc - gaussian_kl(mu, logvar)).abs().max() < 0.05
    assert gaussian_kl(torch.zeros(3), torch.zeros(3)).abs().max() == 0


def test_kl_reduction_and_clamp():
    h = torch.randn(2, 5, 16) * 50
    real = torch.ones(2, 5, dtype=torch.bool)
    real[1, 3:] = False
    label = real.clone()
    label[:, 0] = False
    for red, per_tok in (("mean", 4), ("sum", 1)):
        vib = VariationalBottleneck(16, IBConfig(dim=4, kl_reduction=red, logvar_clamp=4.0, input_norm=False))
        kl_sum, h_bar, _ = vib(h, real, label)
        mu, logvar = vib.encode(h[real])
        assert logvar.abs().max() <= 4.0
        assert kl_count(vib.cfg, int(real.sum()), 2) == int(real.sum()) * per_tok    # padding never counts
        padded = IBConfig(dim=4, kl_reduction=red, kl_normalizer="padded", kl_pad_to=16)
        assert kl_count(padded, int(real.sum()), 2) == 2 * 16 * per_tok           # the authors': rows x pad length
        torch.testing.assert_close(kl_sum, gaussian_kl(mu, logvar).sum())
        assert h_bar.shape == (int(label.sum()), 16)
    unclamped = VariationalBottleneck(16, IBConfig(dim=4, logvar_clamp=None, input_norm=False))
    assert unclamped.encode(h)[1].abs().max() > 4.0


def test_ibft_loss_is_eq_ibft_on_tensors_and_floats():
    cfg = IBConfig(alpha=0.3, beta=0.05)
    sums, counts = (torch.tensor(12.0, requires_grad=True), torch.tensor(40.0), torch.tensor(30.0)), (8.0, 64.0)
    loss, ce, kl, ce_ib = ibft_loss(*sums, *counts, cfg)
    assert loss.item() == pytest.approx(12 / 8 + 0.3 * (40 / 64 + 0.05 * 30 / 8))
    assert (float(ce), float(kl), float(ce_ib)) == pytest.approx((12 / 8, 40 / 64, 30 / 8))
    loss.backward()
    assert float(sums[0].grad) == pytest.approx(1 / 8)
    as_floats = ibft_loss(12.0, 40.0, 30.0, *counts, cfg)
    assert as_floats[0] == pytest.approx(float(loss))
    assert ibft_loss(12.0, 40.0, 30.0, *counts, None) == (1.5, 1.5, 0.0, 0.0)     # plain FT: Eq. (1) alone


def test_sample_has_standard_deviation_exp_half_logvar():
    d = 5
    vib = VariationalBottleneck(8, IBConfig(dim=d, seed=3))
    mu = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0]).expand(200_000, d)
    logvar = torch.tensor([-3.0, -1.0, 0.0, 1.5, 3.0]).expand(200_000, d)
    z = vib.sample(mu, logvar)
    sd = torch.exp(logvar[0] / 2)                                   # 0.22, 0.61, 1, 2.12, 4.48
    # relative standard error of a sample sd over 2e5 draws: 1 / sqrt(4e5) = 0.16%; 1% is > 6 of them
    torch.testing.assert_close(z.std(0), sd, rtol=0.01, atol=0)
    assert ((z.mean(0) - mu[0]).abs() < 6 * sd / 200_000 ** 0.5).all()


def test_sink_mask_marks_massive_norms_only():
    from bottleneck import sink_mask
    h = torch.ones(2, 6, 4)
    h[0, 0] *= 100                                   # massive: marked
    h[0, 3] *= 5                                     # large, not massive
    h[1, 4:] *= 1000                                 # padding: never marked, never in the median
    real = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    assert sink_mask(h, real).tolist() == [[True] + [False] * 5, [False] * 6]
    assert sink_mask(h, real, ratio=4).tolist()[0] == [True, False, False, True, False, False]


def test_exclude_sink_removes_exactly_the_sinks_terms():
    """With a massive first token: the KL sum without the sink is the full sum less the sink's KL; every other
    number (the label rows' latent samples and h_bar) is the same. Without a sink the flag changes nothing."""
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[1, 5:] = False
    label = real.clone()
    label[:, :2] = False                             # the sink carries no label (as in chat data)
    for massive in (True, False):
        hh = h.clone()
        if massive:
            hh[:, 0] *= 500
        kept = VariationalBottleneck(16, IBConfig(dim=4, input_norm=False, seed=1, exclude_sink=False))
        out = VariationalBottleneck(16, IBConfig(dim=4, input_norm=False, seed=1, exclude_sink=True))
        kl_k, hb_k, st_k = kept(hh, real, label)
        kl_o, hb_o, st_o = out(hh, real, label)
        assert int(st_k["n_sink"]) == (2 if massive else 0) and int(st_o["n_sink"]) == int(st_k["n_sink"])
        torch.testing.assert_close(kl_o, kl_k - st_k["kl_sink"], rtol=0, atol=1e-6 * float(kl_k))   # fp32 sums
        assert torch.equal(hb_k, hb_o) and torch.equal(st_k["kl_all"], st_o["kl_all"])
        if not massive:
            assert torch.equal(kl_o, kl_k)
    assert float(st_k["kl_sink"]) == 0.0


@pytest.mark.slow
def test_the_sink_rule_marks_position_0_on_the_default_model():
    """bottleneck.SINK_RATIO on SmolLM2-135M-Instruct at layer 20 (docs/train.md, "The attention sink"): the first
    token of every example and nothing else."""
    from bottleneck import sink_mask
    from default_model import default_model_path
    try:
        path = default_model_path()
    except (ImportError, ValueError, FileNotFoundError) as e:
        pytest.skip(f"default model unavailable: {e}")
    m, tok = C.load_model(path), load_tokenizer(path)
    records, where = cli.read_records(REPO / "data" / "default_instruct.jsonl")
    import data as D
    examples, _, _ = D.encode(tok, records[:6], where[:6], D.detect_format(records, "d"), 2048)
    ids, attn, _, _ = T.collate(examples, tok.pad_id, "cpu")
    with torch.no_grad():
        _, h = m.trunk(ids, attn, hidden_layer=20)
    mask = sink_mask(h, attn)
    assert mask[:, 0].all() and not mask[:, 1:].any()
