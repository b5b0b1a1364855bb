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

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import flow
from ..discriminator import Discriminator, accuracy, d_loss, g_loss
from ..errors import UserError
from ..student import TwoStepStudent
from .ladd import require_shared, student_at_step


class DMD2Critic(nn.Module):
    """The fake-score network (a trainable copy of the teacher) + GAN heads on ITS features."""

    def __init__(self, teacher, d):
        super().__init__()
        self.fake = copy.deepcopy(teacher).requires_grad_(True).train()
        # Discriminator keeps its extractor unregistered; here the extractor is `self.fake` (registered above),
        # so state_dict/parameters hold the fake score once and the heads once.
        self.gan = Discriminator(self.fake, d.blocks, d.head, d.hidden, d.text_cond, d.sigma_dist,
                                 d.sigma_mean, d.sigma_std)


class DMD2:
    name = "dmd2"

    def __init__(self, cfg, teacher, null_text: torch.Tensor | None = None):
        require_shared(cfg, self.name)
        if cfg.disc.r1 > 0:
            raise UserError("method dmd2 has no R1 penalty; set disc.r1=0")
        self.cfg = cfg
        s = cfg.student
        self.teacher = teacher                   # frozen ZImageBackbone: the real score; never updated
        self.student = TwoStepStudent(teacher, s.decoupling, s.sigma_mid, s.mid_noise, s.lora_rank,
                                      s.lora_alpha, s.lora_targets)
        self.critic = DMD2Critic(teacher, cfg.disc)
        self._null = null_text                   # caption features of "" (CFG's negative branch)

    def student_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]

    def critic_parameters(self):
        return list(self.critic.parameters())

    def needs(self) -> set[str]:
        return {"noise", "text", "data_real" if self.cfg.disc.real == "data" else "teacher_final"}

    # ---- pieces --------------------------------------------------------------------------------------------
    def null_text(self) -> torch.Tensor:
        """The unconditional caption: "" encoded as the teacher was trained with for CFG dropout."""
        if self._null is None:
            from ..text import get_encoder
            self._null = get_encoder().encode([""])[0]
        return self._null

    def sample_steps(self, b: int, device) -> torch.Tensor:
        """Which student step (1 or 2) each sample trains; uniform (DMD2 picks a random step of the schedule)."""
        return torch.randint(1, 3, (b,), device=device)

    def generate(self, batch, k: torch.Tensor | None = None):
        """Backward simulation: x̂0 of the student at step k, earlier step under no_grad."""
        noise = batch["noise"]
        k = self.sample_steps(noise.shape[0], noise.device) if k is None else k
        return student_at_step(self.student, noise, batch["text"], k, batch.get("fresh_noise")), k

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
            x, _ = self.generate(batch)
        x = x.detach()
        b = x.shape[0]
        sigma = self.sample_sigma(b, x.device)
        eps = torch.randn_like(x)
        u = self.critic.fake.raw_output(flow.add_noise(x, eps, sigma), sigma, text)
        fm = F.mse_loss(u, flow.flow_target(x, eps))
        real = batch["data_real"] if self.cfg.disc.real == "data" else batch["teacher_final"]
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
        x, k = self.generate(batch)
        dmd, _ = self.dmd_loss(x, text)
        loss = dmd
        logs = {"g_dmd": dmd.item()}
        if c.gan_weight > 0:
            self.critic.requires_grad_(False)   # the generator's GAN loss must not train the critic
            try:
                adv = g_loss(self.critic.gan(x, text), self.cfg.disc.loss)
            finally:
                self.critic.requires_grad_(True)
            loss = loss + c.gan_weight * adv
            logs["g_adv"] = adv.item()
        logs["g_loss"] = loss.item()
        logs["frac_step2"] = (k == 2).float().mean().item()
        return loss, logs
