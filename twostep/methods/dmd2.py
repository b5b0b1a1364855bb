"""DMD2 — Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024), as a peer.

What defines it, and where it happens here:
  - fake score: a trainable copy of the teacher backbone, trained ONLINE by ordinary flow matching
    (flow.add_noise / flow.flow_target on its raw output) on the student's DETACHED outputs — `critic_loss`;
    two time-scale: train.d_updates = 5 fake-score/critic updates per generator update (configs/dmd2.yaml);
  - real score: the frozen teacher WITH CFG (dmd.guidance, Z-Image form pos + g·(pos − neg)) — `real_x0`;
  - generator loss at σ ~ U[dmd.sigma_min, dmd.sigma_max] of x re-noised (DMD2's `compute_distribution_matching_loss`):
        p_real = x − x̂0_real,  p_fake = x − x̂0_fake
        grad   = (p_real − p_fake) / mean_{C,H,W}|p_real|          (per sample)
        loss   = ½·mean((x − sg(x − grad))²)   ⇒   ∂loss/∂x = grad / N   (N = number of elements)
  - GAN: a classifier head on the FAKE-SCORE network's features (not the teacher's), REAL = real data
    (disc.real = data, batch["data_real"]), FAKE = the student's detached output; the classifier loss trains the
    head and the fake-score trunk (critic_loss, weight dmd.critic_gan_weight); the generator gets the
    non-saturating loss with weight dmd.gan_weight (5e-3);
  - multi-step by backward simulation: per sample a random student step k ∈ {1, 2}; for k = 2 the input x_m
    comes from the student's own step 1 under no_grad, and the gradient flows only through step k;
  - one set of parameters for both steps (student.decoupling = shared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import flow
from ..config import NON_NEGATIVE, SIGMA, Rule, opt
from ..discriminator import Discriminator, accuracy, d_loss, g_loss
from ..errors import UserError
from ..text import get_encoder
from ..student import _trainable_copy
from .base import Method


@dataclass
class DMDConfig:
    """DMD2's own settings (YAML section `dmd`)."""
    guidance: float = opt(2.0, "DMD2: CFG scale of the real score (Z-Image form pos + g·(pos − neg); g = 0 is "
                          "no guidance); set it to the teacher's tuned value", range=NON_NEGATIVE)
    gan_weight: float = opt(5e-3, "DMD2: weight of the GAN generator loss (DMD2 SDXL: 5e-3)", range=NON_NEGATIVE)
    critic_gan_weight: float = opt(1e-2, "DMD2: weight of the GAN classifier loss in the critic update "
                                   "(DMD2 SDXL: 1e-2)", range=NON_NEGATIVE)
    sigma_min: float = opt(0.02, "DMD2: lowest σ of the uniform re-noising of the DMD term and fake-score loss",
                            range=SIGMA)
    sigma_max: float = opt(0.98, "DMD2: highest σ of the uniform re-noising", range=SIGMA)

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("sigma_min", "sigma_max"), lambda c: c.sigma_min <= c.sigma_max, "sigma_min must not exceed sigma_max"),)


class DMD2Critic(nn.Module):
    """The fake-score network (a trainable copy of the teacher) + GAN heads on ITS features."""

    def __init__(self, teacher, d):
        super().__init__()
        # fp32 master weights; inside student.trainable_copies_on_meta (the training loop) on the meta device like
        # the student's copies, filled from the teacher by the loop (under FSDP: each process only its shards,
        # train.distributed.shard_critic)
        self.fake = _trainable_copy(teacher)
        # Discriminator keeps its extractor unregistered; here the extractor is `self.fake` (registered above),
        # so state_dict/parameters hold the fake score once and the heads once.
        self.gan = Discriminator.from_config(self.fake, d)


class DMD2(Method):
    name = "dmd2"
    sections = {"dmd": DMDConfig}
    shared_only = True
    log_keys = ("g_loss", "g_dmd", "g_adv", "fake_fm", "d_loss", "d_acc_real", "d_acc_fake", "critic_loss",
                "frac_step2")

    null_caption: torch.Tensor | None = None     # caption features of "" (CFG's negative branch of the real score)

    def check_config(self, cfg):
        super().check_config(cfg)
        if cfg.disc.r1 > 0:
            raise UserError("method dmd2 has no R1 penalty; set disc.r1=0")

    def build_critic(self, cfg, teacher):
        return DMD2Critic(teacher, cfg.disc)     # the real score is self.teacher (frozen); this is the fake one

    def setup(self, teacher):
        """A ZImagePipeline teacher's "" caption comes from its own encoder, loaded only when the real score uses
        CFG (dmd.guidance != 0; without CFG the negative branch is never run and zeros stand in). A pixel-space
        teacher's MiniLM "" is encoded on first use (null_text)."""
        if teacher.parts is not None:
            self.null_caption = (teacher.null_text(1)[0] if self.cfg.dmd.guidance != 0
                                 else torch.zeros(1, teacher.backbone.cap_feat_dim))

    # ---- pieces --------------------------------------------------------------------------------------------
    def null_text(self) -> torch.Tensor:
        """The unconditional caption: "" encoded as the teacher was trained with for CFG dropout."""
        if self.null_caption is None:
            self.null_caption = get_encoder().encode([""])[0]
        return self.null_caption

    def sample_sigma(self, b: int, device) -> torch.Tensor:
        c = self.cfg.dmd
        return (c.sigma_min + (c.sigma_max - c.sigma_min) * torch.rand(b)).to(device)

    @torch.no_grad()
    def real_x0(self, x_t, sigma, text) -> torch.Tensor:
        """Real score: the teacher with CFG (positive and negative batched in one call, 2 NFE)."""
        null = self.null_text().to(device=x_t.device, dtype=x_t.dtype)
        self.teacher.eval()
        return flow.guided(self.teacher.denoise, [null] * len(text), self.cfg.dmd.guidance)(x_t, sigma, text)

    @torch.no_grad()
    def fake_x0(self, x_t, sigma, text) -> torch.Tensor:
        return self.critic.fake.denoise(x_t, sigma, text)

    def dmd_loss(self, x, text, sigma=None, noise=None):
        """(loss, grad): DMD2's distribution-matching loss on the generator output x."""
        b = x.shape[0]
        sigma = self.sample_sigma(b, x.device) if sigma is None else sigma
        noise = torch.randn_like(x) if noise is None else noise
        with torch.no_grad():
            x_t = flow.add_noise(x.detach(), noise, sigma)
            p_real = x.detach() - self.real_x0(x_t, sigma, text)
            p_fake = x.detach() - self.fake_x0(x_t, sigma, text)
            grad = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
            grad = torch.nan_to_num(grad)
        loss = 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")
        return loss, grad

    # ---- critic: fake score by flow matching on sg(student output) + GAN classifier ------------------------
    def critic_loss(self, batch):
        text = batch["text"]
        with torch.no_grad():
            x, _ = self.at_random_step(batch)
        x = x.detach()
        b = x.shape[0]
        sigma = self.sample_sigma(b, x.device)
        eps = torch.randn_like(x)
        u = self.critic.fake.raw_output(flow.add_noise(x, eps, sigma), sigma, text)
        fm = F.mse_loss(u, flow.flow_target(x, eps))
        real = batch[self.real_key()]
        logits_r = self.critic.gan(real, text)
        logits_f = self.critic.gan(x, text)
        cls = d_loss(logits_r, logits_f, self.cfg.disc.loss)
        loss = fm + self.cfg.dmd.critic_gan_weight * cls
        acc_r, acc_f = accuracy(logits_r.detach(), logits_f.detach())
        return loss, {"fake_fm": fm.item(), "d_loss": cls.item(), "d_acc_real": acc_r, "d_acc_fake": acc_f,
                      "critic_loss": loss.item()}

    # ---- generator: DMD gradient + GAN on the fake-score features -----------------------------------------
    def student_loss(self, batch):
        c = self.cfg.dmd
        text = batch["text"]
        x, k = self.at_random_step(batch)                # backward simulation: the earlier step under no_grad
        dmd, _ = self.dmd_loss(x, text)
        loss = dmd
        logs = {"g_dmd": dmd.item()}
        if c.gan_weight > 0:
            with self.critic_frozen():   # the generator's GAN loss must not train the critic
                adv = g_loss(self.critic.gan(x, text), self.cfg.disc.loss)
            loss = loss + c.gan_weight * adv
            logs["g_adv"] = adv.item()
        logs["g_loss"] = loss.item()
        logs["frac_step2"] = (k == 2).float().mean().item()
        return loss, logs
