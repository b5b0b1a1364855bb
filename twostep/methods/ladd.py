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
    ever crosses from step 2 into step 1 — the contrast with Turbo++'s end-to-end training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import flow
from ..discriminator import Discriminator, critic_gan_loss, g_loss
from ..errors import UserError
from ..student import TwoStepStudent


def require_shared(cfg, name: str):
    if cfg.student.decoupling != "shared":
        raise UserError(f"method {name} is defined with one set of parameters for both steps; set "
                        f"student.decoupling=shared (configs/{name}.yaml does), got {cfg.student.decoupling!r}")


def step_input(student: TwoStepStudent, noise, text, k: torch.Tensor, fresh_noise=None):
    """(x_in, σ_in) of step k per sample: ε at σ = 1 for k = 1; for k = 2 the state x_m made by the student's
    own step 1 — computed under no_grad (never requires grad) — and re-noised to σm as at inference
    (TwoStepStudent.forward: same ε, or the fresh ε' when student.mid_noise = fresh)."""
    b = noise.shape[0]
    sigma = torch.ones(b, dtype=noise.dtype, device=noise.device)
    sigma[k == 2] = student.sigma_mid
    x_in = noise.clone()
    two = (k == 2).nonzero().flatten()
    if len(two):
        sub_text = [text[i] for i in two.tolist()]
        with torch.no_grad():
            x0_1 = student.step_backbone(1).denoise(noise[two], sigma.new_ones(len(two)), sub_text)
            if student.mid_noise == "same":
                eps_m = noise[two]
            else:
                eps_m = fresh_noise[two] if fresh_noise is not None else torch.randn_like(noise[two])
            x_in[two] = flow.add_noise(x0_1, eps_m, student.sigma_mid)
    elif student.sharded:  # FSDP: this rank drew no k = 2 sample, but the others may run step 1; join their
        with torch.no_grad():  # all-gathers with a 1-sample call whose result is unused (no RNG drawn)
            student.step_backbone(1).denoise(noise[:1], sigma.new_ones(1), [text[0]])
    return x_in.detach(), sigma


def student_at_step(student: TwoStepStudent, noise, text, k: torch.Tensor, fresh_noise=None):
    """The student's x̂0 at step k per sample, gradient through that step only (earlier step under no_grad)."""
    if student.decoupling != "shared":
        raise UserError("student_at_step runs both steps in one call: it needs student.decoupling=shared")
    x_in, sigma = step_input(student, noise, text, k, fresh_noise)
    return student.step_backbone(2).denoise(x_in, sigma, text)

class LADD:
    name = "ladd"

    def __init__(self, cfg, teacher):
        require_shared(cfg, self.name)
        self.cfg = cfg
        s, d = cfg.student, cfg.disc
        self.teacher = teacher                   # frozen ZImageBackbone; never updated
        self.student = TwoStepStudent(teacher, s.decoupling, s.sigma_mid, s.mid_noise, s.lora_rank,
                                      s.lora_alpha, s.lora_targets)
        # heads on frozen teacher features (the teacher is the extractor object itself, not a copy)
        self.critic = Discriminator(teacher, d.blocks, d.head, d.hidden, d.text_cond, d.sigma_dist,
                                    d.sigma_mean, d.sigma_std)

    def student_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]

    def critic_parameters(self):
        return list(self.critic.parameters())

    def needs(self) -> set[str]:
        return {"noise", "text", "teacher_final" if self.cfg.disc.real == "teacher" else "data_real"}

    # ---- the student at a random step, with its earlier step rolled out without gradient -----------------
    def sample_steps(self, b: int, device) -> torch.Tensor:
        """Which step (1 or 2) each sample trains; uniform. Tests replace this to pin a path."""
        return torch.randint(1, 3, (b,), device=device)

    def rollout_input(self, noise, text, k: torch.Tensor, fresh_noise=None):
        return step_input(self.student, noise, text, k, fresh_noise)

    def fake(self, batch, k: torch.Tensor | None = None):
        """The student's prediction x̂0 at step k (per sample); gradient flows through that one step only."""
        noise, text = batch["noise"], batch["text"]
        k = self.sample_steps(noise.shape[0], noise.device) if k is None else k
        return student_at_step(self.student, noise, text, k, batch.get("fresh_noise")), k

    # ---- discriminator update: REAL = teacher samples, FAKE = student predictions ------------------------
    def critic_loss(self, batch):
        d = self.cfg.disc
        text = batch["text"]
        with torch.no_grad():
            fake, _ = self.fake(batch)
        real = batch["teacher_final"] if d.real == "teacher" else batch["data_real"]
        return critic_gan_loss(self.critic, real, text, fake, None, d.loss, d.r1)

    # ---- student update: adversarial only -----------------------------------------------------------------
    def student_loss(self, batch):
        fake, k = self.fake(batch)
        self.critic.requires_grad_(False)
        try:
            adv = g_loss(self.critic(fake, batch["text"]), self.cfg.disc.loss)
        finally:
            self.critic.requires_grad_(True)
        logs = {"g_adv": adv.item(), "g_loss": adv.item(), "frac_step2": (k == 2).float().mean().item()}
        if "teacher_final" in batch:
            with torch.no_grad():
                m = k == 2
                if m.any():
                    logs["mse_vs_teacher"] = F.mse_loss(fake[m], batch["teacher_final"][m]).item()
        return adv, logs
