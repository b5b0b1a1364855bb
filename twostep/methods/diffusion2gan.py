"""Diffusion2GAN — "Distilling Diffusion Models into Conditional GANs" (Kang et al., ECCV 2024), as a peer.

What defines it, and where it happens here:
  - paired noise → image translation on the cached teacher ODE pairs: the student's image for batch["noise"]
    regresses to the teacher's sample FOR THAT SAME NOISE (batch["teacher_final"]);
  - the regression distance is perceptual, in the model's own space, with differentiable augmentations
    (E-LatentLPIPS): the SAME random flip + translation is applied to both images (`paired_augment`), then the
    frozen-teacher feature distance twostep.discriminator.feature_distance (no pretrained LPIPS exists for
    these latents; the teacher's features play LPIPS's role);
  - conditional (text) GAN, REAL = the paired teacher outputs, FAKE = the student's outputs for the same noise
    and prompts; multi-scale discriminator built from the teacher backbone: heads on several blocks (d2g.blocks,
    [] = all) at every input scale in d2g.scales (k = downsampled k× then upsampled back);
  - the paper's student is one-step; here it runs at 2 steps with shared parameters, the loss on the final
    image, gradient through both steps (the student's full rollout, end to end).
The discriminator trunk is the frozen teacher (LADD-style heads), not a fine-tuned copy as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BLOCKS_OR_ALL, NON_NEGATIVE, SCALES, UNIT_RIGHT_OPEN, opt
from ..discriminator import Discriminator, critic_gan_loss, feature_distance, g_loss
from ..errors import UserError
from .base import Method


@dataclass
class D2GConfig:
    """Diffusion2GAN's own settings (YAML section `d2g`)."""
    regression_weight: float = opt(1.0, "Diffusion2GAN: weight of the paired perceptual regression",
                                    range=NON_NEGATIVE)
    gan_weight: float = opt(0.5, "Diffusion2GAN: weight of the conditional GAN generator loss", range=NON_NEGATIVE)
    blocks: list = opt([], "Diffusion2GAN: teacher blocks the multi-scale discriminator reads ([] = all blocks)",
                        range=BLOCKS_OR_ALL)
    scales: list = opt([1, 2], "Diffusion2GAN: input scales of the discriminator (k = downsampled k× then "
                       "upsampled back)", range=SCALES)
    translate: float = opt(0.125, "Diffusion2GAN: max translation of the paired augmentation (fraction of the side)",
                            range=UNIT_RIGHT_OPEN)
    flip: bool = opt(True, "Diffusion2GAN: random horizontal flip in the paired augmentation")


# ---- paired differentiable augmentation (same parameters for both images) --------------------------------

def draw_augment(b: int, size: int, translate: float, flip: bool, generator=None) -> dict:
    """Per-sample parameters: horizontal flip, integer shift (dy, dx) within ±translate·size."""
    m = int(round(translate * size))
    return {"flip": (torch.rand(b, generator=generator) < 0.5) if flip else torch.zeros(b, dtype=torch.bool),
            "dy": torch.randint(-m, m + 1, (b,), generator=generator),
            "dx": torch.randint(-m, m + 1, (b,), generator=generator), "pad": m}


def apply_augment(x: torch.Tensor, p: dict) -> torch.Tensor:
    """Flip then translate with zero fill; differentiable w.r.t. x (indexing only)."""
    m = p["pad"]
    h, w = x.shape[-2:]
    xp = F.pad(x, (m, m, m, m)) if m else x
    out = []
    for i in range(x.shape[0]):
        xi = xp[i].flip(-1) if bool(p["flip"][i]) else xp[i]
        dy, dx = int(p["dy"][i]), int(p["dx"][i])
        out.append(xi[:, m - dy:m - dy + h, m - dx:m - dx + w])
    return torch.stack(out)


def paired_augment(a: torch.Tensor, b: torch.Tensor, translate: float, flip: bool, generator=None):
    """The same random augmentation applied to both images of each pair."""
    p = draw_augment(a.shape[0], a.shape[-1], translate, flip, generator)
    return apply_augment(a, p), apply_augment(b, p)


# ---- multi-scale discriminator on the teacher backbone ---------------------------------------------------

class MultiScaleDiscriminator(nn.Module):
    """One set of heads (on teacher blocks `blocks`) per input scale; logits of all scales concatenated.
    Every scale sees the image re-noised with the same σ and ε (the noise is added after rescaling)."""

    def __init__(self, teacher, d, blocks, scales):
        super().__init__()
        blocks = list(blocks) or list(range(teacher.num_blocks))
        self.scales = [int(s) for s in scales]
        if not self.scales or any(s < 1 for s in self.scales):
            raise UserError(f"d2g.scales={scales}: need a non-empty list of integers >= 1")
        self.discs = nn.ModuleList([Discriminator.from_config(teacher, d, blocks) for _ in self.scales])

    @property
    def teacher(self):
        return self.discs[0].teacher

    def sample_sigma(self, b, device):
        return self.discs[0].sample_sigma(b, device)

    @staticmethod
    def rescale(x: torch.Tensor, s: int) -> torch.Tensor:
        if s == 1:
            return x
        if x.shape[-1] % s or x.shape[-2] % s:
            raise UserError(f"d2g.scales: {s} does not divide the image size {tuple(x.shape[-2:])}")
        return F.interpolate(F.avg_pool2d(x, s), scale_factor=s, mode="bilinear", align_corners=False)

    def features(self, x0, text, sigma, noise) -> list[list[torch.Tensor]]:
        return [d.features(self.rescale(x0, s), text, sigma, noise) for d, s in zip(self.discs, self.scales)]

    def heads_logits(self, feats, sigma, text) -> torch.Tensor:
        return torch.cat([d.heads_logits(f, sigma, text) for d, f in zip(self.discs, feats)], dim=1)

    def forward(self, x0, text, sigma=None, noise=None) -> torch.Tensor:
        sigma = self.sample_sigma(x0.shape[0], x0.device) if sigma is None else sigma
        noise = torch.randn_like(x0) if noise is None else noise
        return self.heads_logits(self.features(x0, text, sigma, noise), sigma, text)


class Diffusion2GAN(Method):
    name = "diffusion2gan"
    sections = {"d2g": D2GConfig}
    shared_only = True
    block_keys = ("d2g.blocks",)   # its heads read d2g.blocks ([] = all); disc.blocks is not used
    log_keys = ("g_loss", "paired", "g_adv", "d_loss", "d_acc_real", "d_acc_fake", "r1", "mse_vs_teacher")

    def build_critic(self, cfg, teacher):
        return MultiScaleDiscriminator(teacher, cfg.disc, cfg.d2g.blocks, cfg.d2g.scales)

    def needs(self) -> set[str]:
        return {"noise", "text", "teacher_final"}   # real = the paired teacher outputs, whatever disc.real says

    def augment(self, a, b):
        return paired_augment(a, b, self.cfg.d2g.translate, self.cfg.d2g.flip)

    def regression(self, x, target, text) -> torch.Tensor:
        """E-LatentLPIPS-like: the same augmentation on both, then the frozen-teacher feature distance."""
        a, b = self.augment(x, target)
        return feature_distance(self.critic.discs[0], a, b, text)

    # ---- discriminator: REAL = the paired teacher outputs, FAKE = the student's for the same noise ----------
    def critic_loss(self, batch):
        d = self.cfg.disc
        text = batch["text"]
        with torch.no_grad():
            fake = self.student(batch["noise"], text, fresh_noise=batch.get("fresh_noise"))["x0_2"]
        real = batch["teacher_final"]
        return critic_gan_loss(self.critic, real, text, fake, None, d.loss, d.r1, d.mismatch_weight)

    # ---- student: paired perceptual regression + conditional GAN, through the full 2-step rollout ----------
    def student_loss(self, batch):
        c = self.cfg.d2g
        text = batch["text"]
        x = self.student(batch["noise"], text, gradient="end_to_end", fresh_noise=batch.get("fresh_noise"))["x0_2"]
        reg = self.regression(x, batch["teacher_final"], text)
        loss = c.regression_weight * reg
        logs = {"paired": reg.item()}
        if c.gan_weight > 0:
            with self.critic_frozen():
                adv = g_loss(self.critic(x, text), self.cfg.disc.loss)
            loss = loss + c.gan_weight * adv
            logs["g_adv"] = adv.item()
        with torch.no_grad():
            logs["mse_vs_teacher"] = F.mse_loss(x, batch["teacher_final"]).item()
        logs["g_loss"] = loss.item()
        return loss, logs
