"""The token-wise variational information bottleneck of IB-FT (Sec. 4, Eq. (2)-(6), Appendix B, Alg. 1).

At a chosen layer l* the decoder's hidden states h (B, T, H) pass through a stochastic bottleneck:

    h_t --q_phi--> (mu_t, log sigma_t^2) in R^d      encoder, d << H           Alg. 1, line "q_phi(h_t)"
    z_t = mu_t + sigma_t * eps_t,  eps_t ~ N(0, I)   reparameterization          (eps from this module's own generator)
    h_bar_t = g_phi(z_t) in R^H                      decoder
    s_IB = lm_head(h_bar)                            the model's own (frozen) LM head, a second prediction branch

    l_compress = KL(q_phi(z|h) || N(0, I))           Eq. (4), closed form, over real (non-padding) tokens
    l_predict  = -CE(s_IB, y)                        Eq. (5)
    l_IB = l_compress - beta * l_predict             Eq. (6)  = KL + beta * CE_IB
    loss = CE(s_orig, y) + alpha * l_IB              Eq. (IB-FT); train.py adds the first term

The bottleneck is a training-time regularizer: its output never feeds the rest of the network, so inference and
evaluation use the base model + LoRA only. Its weights are still saved with a run (vib.safetensors).

Choices that follow the authors' released code (defaults) and the alternatives offered as flags:
  - KL reduction: mean over latent dims and tokens (`kl_reduction="mean"`); "sum" sums over dims, means over tokens.
  - log sigma^2 is clamped to [-4, 4] (`logvar_clamp=4.0`); None disables the clamp.
  - s_IB = lm_head(h_bar) without the final RMSNorm (`head_norm=False`); True applies the model's final norm first.
Not in the paper, choices of this implementation, each chosen by the sensitivity sweep (README, "When does IB-FT
act?"), each with its flag for the paper's:
  - q_phi RMS-normalizes the hidden state before its linear map (`input_norm=True`), and alpha is 2: on SmolLM2 this
    acts (the regularizer's gradient 5-11% of CE's) without costing held-out NLL; `input_norm=False` is the paper's
    q_phi on the raw state, whose KL the attention sink swamps.
  - attention-sink tokens stay out of the KL and CE_IB (`exclude_sink=True`, sink_mask): on the raw state they carry
    ~98% of the KL, on the normalized one ~1%; `exclude_sink=False` is the paper's bottleneck over every real token.

References:
  - The paper: Wang, Chen, Liu and Ding, "Breaking Memorization Barriers in LLM Code Fine-Tuning via Information
    Bottleneck for Improved Generalization", 2025, arXiv:2510.16022v1 (Sec. 4, Appendix B, Alg. 1).
  - The variational bottleneck: Alemi, Fischer, Dillon and Murphy, "Deep Variational Information Bottleneck",
    ICLR 2017, arXiv:1612.00410 (Eq. (3)-(4)'s closed-form KL to N(0, I), the reparameterization).
  - The authors' code: https://github.com/OPTML-Group/MemorizationBarrier at commit 828050f5f3b2 (util/ModelWithIB.py,
    train_ib.py): the KL reduction, the log-variance clamp, the LM head without the final norm, the padded KL mean.
  - Attention sinks / massive activations: Sun, Chen, Kolter and Liu, "Massive Activations in Large Language Models",
    2024, arXiv:2402.17762.
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn


# A token is an attention sink when its layer-l* hidden state's norm exceeds SINK_RATIO x the median norm of the real
# tokens in its row (massive activations, Sun et al., 2024, arXiv:2402.17762). Measured with scripts/sink_norms.py
# (docs/train.md, "The attention sink"): on SmolLM2-135M-Instruct the first token's ratio is 15-171 at layers 12-29
# and no other token's exceeds 1.6 there; at layers 1-11 no token's exceeds 11.1 (none is massive). On the golden
# fixtures' random checkpoints no token's exceeds 1.9. 12 separates the two at every layer.
SINK_RATIO = 12.0


@dataclass
class IBConfig:
    layer: int = 20                 # l*: the output of this decoder block (1-indexed) is bottlenecked
    dim: int = 256                  # d, the latent size (Appendix B: d << H)
    alpha: float = 2.0              # weight of l_IB in Eq. (IB-FT): the sensitivity sweep's choice with input_norm
                                    # (README); the paper's 0.1 on the raw state (Appendix C.1) is train.py --paper-ib
    beta: float = 0.02              # compression/prediction trade-off of Eq. (6); 0.02 OriGen, 0.01 Evol-CodeAlpaca
    kl_reduction: str = "mean"      # "mean" over dims and tokens (authors' code) | "sum" over dims, mean over tokens
    kl_normalizer: str = "real"     # the tokens the KL mean runs over: "real" ones | "padded": rows x kl_pad_to
    kl_pad_to: int = 2048           # the authors' code pads every row to 2048 tokens and averages over all of them
    logvar_clamp: Optional[float] = 4.0
    head_norm: bool = False         # apply the final RMSNorm before the LM head in the IB branch
    input_norm: bool = True         # q_phi RMS-normalizes h before its linear map (see VariationalBottleneck); the
                                    # paper's q_phi reads the raw state (train.py --ib-input raw, --paper-ib)
    exclude_sink: bool = True       # keep attention-sink tokens (sink_mask) out of the KL and CE_IB
    sink_ratio: float = SINK_RATIO  # sink_mask's threshold
    seed: int = 0

    def to_dict(self):
        return asdict(self)


def sink_mask(h, real_mask, ratio: float = SINK_RATIO):
    """(B, T) bool: the real tokens whose hidden-state norm exceeds `ratio` x the median norm of their row's real
    tokens, the attention sinks (massive activations). h (B, T, H); real_mask (B, T)."""
    norm = h.detach().float().norm(dim=-1)                                   # (B, T)
    real = real_mask.bool()
    median = norm.masked_fill(~real, float("nan")).nanmedian(dim=1, keepdim=True).values   # (B, 1)
    return real & (norm > ratio * median)


def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per latent dim: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2). Eq. (3)-(4)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class VariationalBottleneck(nn.Module):
    """q_phi (encoder H -> 2d) and g_phi (decoder d -> H), with a private generator for eps and for its init,
    so adding the bottleneck never shifts the global random stream (LoRA init, dropout) of a run.

    Decoder hidden states carry a few massive activations: at layer 20 of SmolLM2-135M the first token's norm is
    25,011 and the median token's 215 (measured on the default data). On the raw state a linear encoder then puts
    ~98% of the KL on that one constant token, which swamps Eq. (IB-FT); sink_mask finds it and `exclude_sink` keeps
    it out. `input_norm=True` (--ib-input norm, the default) RMS-normalizes h first (no weights), which tames the sink:
    the KL then measures what a token carries, not its scale (at alpha 0.1 the regularizer's gradient is ~0.5% of
    CE's, at the default alpha 2 5-11%)."""

    def __init__(self, hidden_size: int, cfg: IBConfig, device=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(hidden_size, 2 * cfg.dim, device=device)     # -> (mu, log sigma^2)
        self.decoder = nn.Linear(cfg.dim, hidden_size, device=device)
        self.generator = torch.Generator(device=device or "cpu").manual_seed(cfg.seed)
        with torch.no_grad():                                                 # nn.Linear's default init, private RNG
            for lin in (self.encoder, self.decoder):
                bound = 1.0 / math.sqrt(lin.in_features)
                lin.weight.uniform_(-bound, bound, generator=self.generator)
                lin.bias.uniform_(-bound, bound, generator=self.generator)

    def encode(self, h):
        if self.cfg.input_norm:
            h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
        mu, logvar = self.encoder(h).chunk(2, dim=-1)                         # (..., d) each
        if self.cfg.logvar_clamp is not None:
            logvar = logvar.clamp(-self.cfg.logvar_clamp, self.cfg.logvar_clamp)
        return mu, logvar

    def sample(self, mu, logvar, noise_slice=None):
        """z = mu + sigma * eps. noise_slice = (offset, total): draw eps for `total` rows and use rows offset.., so
        processes that each hold a slice of one global batch use the noise one process would (DDP = one process)."""
        offset, total = noise_slice or (0, mu.shape[0])
        eps = torch.randn((total, mu.shape[1]), generator=self.generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps[offset:offset + mu.shape[0]]

    def forward(self, h, real_mask, label_mask, noise_slice=None):
        """h (B, T, H) from layer l*; real_mask (B, T) marks non-padding tokens; label_mask (B, T) marks positions that
        predict a label. Returns (kl_sum, h_bar, stats): the KL summed over real tokens and dims (kl_count normalizes
        it), h_bar (N, H) at label positions, and stats (detached, for the logs): the KL over all real tokens
        ("kl_all"), over the attention sinks among them ("kl_sink"), the sinks' count ("n_sink"), and which label
        positions h_bar holds ("labels_kept", (N_label,) bool: all of them unless a sink carries a label).
        With exclude_sink the sinks are left out of the KL sum and of h_bar's rows (and of CE_IB, which the caller,
        train.Objective, computes on those rows with the model's LM head: Eq. (5))."""
        real = real_mask.bool()
        is_sink = sink_mask(h, real, self.cfg.sink_ratio)[real]              # (N_real,)
        h_real = h[real]                                                      # (N_real, H)
        if not torch.is_autocast_enabled(h.device.type):                     # (under autocast nn.Linear casts)
            h_real = h_real.to(self.encoder.weight.dtype)
        mu, logvar = self.encode(h_real)                                      # (N_real, d) each
        kl = gaussian_kl(mu.float(), logvar.float())                          # (N_real, d)  Eq. (4)
        kl_sum = kl[~is_sink].sum() if self.cfg.exclude_sink else kl.sum()
        # The prediction branch only matters where there is a label: index the latent rows that carry one.
        rows = label_mask.bool()[real]                                        # label positions among real ones
        kept = ~is_sink[rows] if self.cfg.exclude_sink else torch.ones_like(is_sink[rows])   # (N_label,)
        rows = rows & ~is_sink if self.cfg.exclude_sink else rows
        z = self.sample(mu[rows], logvar[rows], noise_slice)                  # (N, d)
        stats = {"kl_all": kl.detach().sum(), "kl_sink": kl.detach()[is_sink].sum(), "n_sink": is_sink.sum(),
                 "labels_kept": kept}
        return kl_sum, self.decoder(z), stats                                 # h_bar: (N, H)


def kl_count(cfg: IBConfig, n_real: float, n_rows: float) -> float:
    """What one optimizer step's KL sum is divided by, so that Eq. (4) enters the loss as a mean: its real tokens
    (kl_normalizer "real"), or every row counted as kl_pad_to tokens ("padded", the authors' code, whose effective
    weight on real tokens is then about alpha x T_real / kl_pad_to); times the latent dims under kl_reduction "mean"."""
    tokens = n_real if cfg.kl_normalizer == "real" else n_rows * cfg.kl_pad_to
    return tokens * (cfg.dim if cfg.kl_reduction == "mean" else 1)


def ibft_loss(ce_sum, kl_sum, ce_ib_sum, n_label, n_kl, cfg: Optional[IBConfig]) -> tuple:
    """The objective of one optimizer step from its token sums and counts; tensors (for backward) or floats (to log).

        loss = CE / n_label + alpha * (KL / n_kl + beta * CE_IB / n_label)      Eq. (IB-FT) with Eq. (6)

    cfg None is plain FT, Eq. (1). Returns (loss, ce, kl, ce_ib), the last three as means."""
    ce = ce_sum / n_label
    if cfg is None:
        return ce, ce, 0.0, 0.0
    loss = ce + ib_penalty(kl_sum, ce_ib_sum, n_label, n_kl, cfg)
    return loss, ce, kl_sum / n_kl, ce_ib_sum / n_label


def ib_penalty(kl_sum, ce_ib_sum, n_label, n_kl, cfg: IBConfig):
    """alpha * l_IB = alpha * (KL / n_kl + beta * CE_IB / n_label): what Eq. (IB-FT) adds to CE."""
    return cfg.alpha * (kl_sum / n_kl + cfg.beta * ce_ib_sum / n_label)
