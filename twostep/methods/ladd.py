"""LADD — Latent Adversarial Diffusion Distillation (Sauer et al. 2024; SD3-Turbo, FLUX.1-schnell), as a peer.

Adversarial only. What defines it, and where it happens here:
  - discriminator: small heads on the FROZEN TEACHER's features at several blocks
    (twostep.discriminator.Discriminator, the same class Turbo++ uses), inputs re-noised to a random σ drawn
    logit-normal with a positive mean (high noise; configs/ladd.yaml sets disc.sigma_mean = 1.0);
  - REAL = teacher-generated samples (the cached 8-step samples, batch["teacher_final"]);
  - one set of parameters for both steps (student.decoupling = shared);
  - per sample a random student step k ∈ {1, 2}. k = 1: input ε at σ = 1. k = 2: the input x_m is produced
    by the student's own step 1 under torch.no_grad (rolled out without gradient) and re-noised to σm exactly
    as at inference (same-noise by default); the student's prediction at step k is the fake. So no gradient
    ever crosses from step 2 into step 1 — the contrast with Turbo++'s end-to-end training
    (Method.at_random_step → TwoStepStudent.at_step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..discriminator import Discriminator, critic_gan_loss, g_loss
from .base import Method


class LADD(Method):
    name = "ladd"
    shared_only = True
    log_keys = ("g_loss", "g_adv", "d_loss", "d_acc_real", "d_acc_fake", "r1", "frac_step2", "mse_vs_teacher")

    def build_critic(self, cfg, teacher):
        # heads on frozen teacher features (the teacher is the extractor object itself, not a copy)
        return Discriminator.from_config(teacher, cfg.disc)

    # ---- discriminator update: REAL = teacher samples, FAKE = student predictions ------------------------
    def critic_loss(self, batch):
        d = self.cfg.disc
        with torch.no_grad():
            fake, _ = self.at_random_step(batch)
        return critic_gan_loss(self.critic, batch[self.real_key()], batch["text"], fake, None, d.loss, d.r1, d.mismatch_weight)

    # ---- student update: adversarial only -----------------------------------------------------------------
    def student_loss(self, batch):
        fake, k = self.at_random_step(batch)
        with self.critic_frozen():
            adv = g_loss(self.critic(fake, batch["text"]), self.cfg.disc.loss)
        logs = {"g_adv": adv.item(), "g_loss": adv.item(), "frac_step2": (k == 2).float().mean().item()}
        if "teacher_final" in batch:
            with torch.no_grad():
                m = k == 2
                if m.any():
                    logs["mse_vs_teacher"] = F.mse_loss(fake[m], batch["teacher_final"][m]).item()
        return adv, logs
