"""Z-Image Turbo++ ("High-Fidelity Two-Step Image Generation via Teacher-Aligned End-to-End Distillation",
2026), reconstructed; the paper gives no equations, so every choice below is a config option (docs/method.md).

The three ideas, where they happen:
  (1) Distribution-aligned adversarial learning — `critic_loss`: the discriminator's REAL images are the
      teacher's own cached 8-step samples (disc.real=teacher); its FAKE images are the student's outputs.
  (2) Step-decoupled parameters — `self.student` (twostep.student.TwoStepStudent, built from cfg.student by
      methods.base.Method): θ1 runs step 1 (σ = 1), θ2 runs step 2 (σ = σm); full copies, per-step LoRA, or
      shared (ablation).
  (3) End-to-end training with iterative regularisation — `student_loss`: the final-image adversarial loss
      back-propagates through step 2 and x_m into θ1 (loss.gradient=end_to_end; `detach` is the ablation),
      while an explicit step-1 loss keeps x̂0₁ meaningful (loss.step1_loss = traj | adv | none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import flow
from ..config import NON_NEGATIVE, choice, opt
from ..discriminator import Discriminator, critic_gan_loss, feature_distance, g_loss
from .base import Method


@dataclass
class LossConfig:
    """Turbo++'s student losses (YAML section `loss`)."""
    gradient: str = choice("end_to_end", ["end_to_end", "detach"], "whether the final-image loss reaches θ1 "
                           "through x_m (end_to_end) or stops at x_m (detach, ablation)")
    adv_weight: float = opt(1.0, "weight of the final-image adversarial loss", range=NON_NEGATIVE)
    step1_loss: str = choice("adv", ["adv", "traj", "consistency", "none"], "iterative regularisation of step 1: "
                             "adversarial on x̂0₁, regression to the teacher's state at σm, regression to the "
                             "student's own sg(x̂0₂), or none (ablation)")
    step1_weight: float = opt(1.0, "weight of the step-1 loss", range=NON_NEGATIVE)
    traj_distance: str = choice("mse", ["mse", "perceptual"], "distance of step1_loss=traj|consistency: pixel MSE or MSE "
                                "of the discriminator's frozen teacher features")
    paired_weight: float = opt(0.0, "optional paired regression of x̂0₂ to the teacher's final sample",
                                range=NON_NEGATIVE)
    paired_distance: str = choice("mse", ["mse", "perceptual"], "distance of the paired regression")


class TurboPP(Method):
    name = "turbopp"
    sections = {"loss": LossConfig}
    log_keys = ("g_loss", "g_adv", "step1", "paired", "d_loss", "d_acc_real", "d_acc_fake", "d_acc_mismatch", "r1",
                "mse_vs_teacher")

    # (2) step-decoupled parameters: Method.__init__ builds self.student (θ1, θ2) from cfg.student
    def build_critic(self, cfg, teacher):
        return Discriminator.from_config(teacher, cfg.disc)   # heads on the frozen teacher's features

    def needs(self) -> set[str]:
        keys = super().needs()
        if self.cfg.loss.step1_loss == "traj":
            keys.add("teacher_mid")
        if self.cfg.loss.paired_weight > 0:
            keys.add("teacher_final")
        return keys

    def _fakes(self, out) -> torch.Tensor:
        fakes = [out["x0_2"]]
        if self.cfg.loss.step1_loss == "adv":
            fakes.append(out["x0_1"])
        return torch.cat(fakes)

    # ---- (1) distribution-aligned adversarial learning: the discriminator update ------------------------
    def critic_loss(self, batch):
        d = self.cfg.disc
        text = batch["text"]
        with torch.no_grad():
            out = self.student(batch["noise"], text, fresh_noise=batch.get("fresh_noise"))
        fake = self._fakes(out).detach()
        fake_text = list(text) * (fake.shape[0] // len(text))
        real = batch[self.real_key()]                                   # REAL = the teacher's samples
        return critic_gan_loss(self.critic, real, text, fake, fake_text, d.loss, d.r1, d.mismatch_weight)

    # ---- (2)+(3) the student update: end-to-end through both decoupled steps -----------------------------
    def student_loss(self, batch):
        c = self.cfg.loss
        text, noise = batch["text"], batch["noise"]
        out = self.student(noise, text, gradient=c.gradient, fresh_noise=batch.get("fresh_noise"))
        with self.critic_frozen():  # the student's adversarial loss must not train the discriminator
            # final-image adversarial loss on x̂0₂: reaches θ2 and, end to end through x_m, θ1
            adv = g_loss(self.critic(out["x0_2"], text), self.cfg.disc.loss)
            loss = c.adv_weight * adv
            logs = {"g_adv": adv.item()}
            # iterative regularisation: an explicit loss on step 1 alone (reaches θ1 only)
            if c.step1_loss == "adv":
                s1 = g_loss(self.critic(out["x0_1"], text), self.cfg.disc.loss)
            elif c.step1_loss == "traj":
                # the teacher's own state at σm from the same ε, as the clean image it implies
                target = flow.x0_from_state(batch["teacher_mid"], self.cfg.student.sigma_mid, noise)
                s1 = self._distance(out["x0_1"], target, text, c.traj_distance)
            elif c.step1_loss == "consistency":
                # x̂0₁ regressed onto the final image it leads to, detached (step 2 is a refinement, not a redraw)
                s1 = self._distance(out["x0_1"], out["x0_2"].detach(), text, c.traj_distance)
            else:
                s1 = None
            if s1 is not None:
                loss = loss + c.step1_weight * s1
                logs["step1"] = s1.item()
            if c.paired_weight > 0:  # optional Diffusion2GAN-style paired regression (off by default)
                p = self._distance(out["x0_2"], batch["teacher_final"], text, c.paired_distance)
                loss = loss + c.paired_weight * p
                logs["paired"] = p.item()
        with torch.no_grad():
            if "teacher_final" in batch:
                logs["mse_vs_teacher"] = F.mse_loss(out["x0_2"], batch["teacher_final"]).item()
        logs["g_loss"] = loss.item()
        return loss, logs

    def _distance(self, a, b, text, kind):
        if kind == "perceptual":
            return feature_distance(self.critic, a, b, text)
        return F.mse_loss(a, b)
