"""Discriminator on frozen teacher features (the LADD design, as in SD3-Turbo / FLUX-schnell, and the one
Turbo++'s distribution-aligned adversarial learning uses).

D(x0, c) = heads(teacher.features(x_σ, σ, c)) with x_σ = (1 − σ)x0 + σε re-noised to a random σ.
The teacher backbone is frozen and NOT a submodule (so optimizers, checkpoints and DDP see only the heads);
gradients still flow through it to the *input* when the student is trained against D.

Heads (one per chosen block):
  grid   — tokens reshaped to their h×w grid (h = H/p, w = W/p of the sample re-noised in `features`: any aspect
           ratio) → 1×1 conv → GroupNorm+SiLU → FiLM(σ) → 3×3 conv → per-token logit
           (+ a projection term ⟨h_token, W·pooled caption⟩ when text_cond), so D judges local structure;
  pooled — mean over tokens → MLP (an ablation).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import flow
from .backbones.zimage import ZImageBackbone
from .errors import UserError


def check_blocks(blocks, num_blocks: int, key: str = "blocks") -> list[int]:
    """The sorted distinct teacher block indices `blocks` (of a teacher with `num_blocks` blocks). An entry outside
    0 .. num_blocks − 1 is a UserError naming `key`, never taken modulo the count."""
    def index(b):
        try:
            i = operator.index(b)
        except TypeError:
            return None
        return i if 0 <= i < num_blocks else None

    idx = [index(b) for b in blocks]
    if None in idx:
        bad = list(blocks)[idx.index(None)]
        fix = sorted({i for i in idx if i is not None}) or [num_blocks - 1]
        raise UserError(f"{key}={list(blocks)}: block {bad!r} is out of range for a teacher with {num_blocks} "
                        f"block{'s' * (num_blocks != 1)}; use indices 0 to {num_blocks - 1} (e.g. --set {key}={fix})")
    return sorted(set(idx))


def sigma_embedding(sigma: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Sinusoidal embedding of σ ∈ [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    a = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


class GridHead(nn.Module):
    def __init__(self, dim: int, hidden: int, text_dim: int, text_cond: bool):
        super().__init__()
        self.inp = nn.Conv2d(dim, hidden, 1)
        self.norm = nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden)
        self.film = nn.Linear(32, 2 * hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 1)
        self.text = nn.Linear(text_dim, hidden) if text_cond else None
        nn.init.zeros_(self.film.weight); nn.init.zeros_(self.film.bias)

    def forward(self, tokens: torch.Tensor, s_emb: torch.Tensor, text_vec: torch.Tensor | None,
                grid: tuple[int, int]) -> torch.Tensor:
        """tokens [B, h·w, dim] in row-major order of their `grid` (h, w) → per-token logits [B, h·w]."""
        b, n, d = tokens.shape
        gh, gw = grid
        if gh * gw != n:
            raise ValueError(f"{n} image tokens do not fill a {gh}x{gw} grid")
        h = tokens.transpose(1, 2).reshape(b, d, gh, gw)
        h = F.silu(self.norm(self.inp(h)))
        scale, shift = self.film(s_emb).chunk(2, dim=1)
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = F.silu(self.conv(h))
        logit = self.out(h).flatten(1)                                   # [B, h·w] per-token logits
        if self.text is not None and text_vec is not None:               # projection discriminator term
            proj = self.text(text_vec)                                   # [B, hidden]
            logit = logit + (h * proj[:, :, None, None]).sum(1).flatten(1) / math.sqrt(h.shape[1])
        return logit


class PooledHead(nn.Module):
    def __init__(self, dim: int, hidden: int, text_dim: int, text_cond: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 1)
        self.text = nn.Linear(text_dim, hidden) if text_cond else None

    def forward(self, tokens, s_emb, text_vec, grid=None):
        h = self.mlp(torch.cat([tokens.mean(1), s_emb], dim=1))
        logit = self.out(h)
        if self.text is not None and text_vec is not None:
            logit = logit + (h * self.text(text_vec)).sum(1, keepdim=True) / math.sqrt(h.shape[1])
        return logit


class Discriminator(nn.Module):
    def __init__(self, teacher: ZImageBackbone, blocks=(1, 2, 3), head: str = "grid", hidden: int = 64,
                 text_cond: bool = True, sigma_dist: str = "logit_normal", sigma_mean: float = 0.0,
                 sigma_std: float = 1.0, text_dim: int | None = None):
        super().__init__()
        self._teacher = [teacher]  # frozen feature extractor, deliberately not registered as a submodule
        self.blocks = check_blocks(blocks, teacher.num_blocks)
        dim = int(teacher.transformer.config.dim)
        text_dim = text_dim or teacher.cap_feat_dim
        Head = GridHead if head == "grid" else PooledHead
        self.heads = nn.ModuleList([Head(dim, hidden, text_dim, text_cond) for _ in self.blocks])
        self.sigma_dist, self.sigma_mean, self.sigma_std = sigma_dist, sigma_mean, sigma_std
        self.grid: tuple[int, int] | None = None  # (H/p, W/p) of the samples `features` last saw

    @classmethod
    def from_config(cls, teacher: ZImageBackbone, d, blocks=None) -> "Discriminator":
        """The discriminator of a config's `disc` section (blocks: d.blocks unless given)."""
        return cls(teacher, d.blocks if blocks is None else blocks, d.head, d.hidden, d.text_cond, d.sigma_dist,
                   d.sigma_mean, d.sigma_std)

    @property
    def teacher(self) -> ZImageBackbone:
        return self._teacher[0]

    def sample_sigma(self, b: int, device, generator=None) -> torch.Tensor:
        if self.sigma_dist == "uniform":
            s = torch.rand(b, generator=generator)
        else:  # logit-normal (SD3 / LADD); a positive mean biases towards high noise
            s = torch.sigmoid(self.sigma_mean + self.sigma_std * torch.randn(b, generator=generator))
        return s.clamp(1e-3, 0.999).to(device)

    def features(self, x0: torch.Tensor, text, sigma: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
        """Frozen-teacher image-token features of x0 re-noised to σ (grad flows to x0, never to the teacher).
        Records the token grid (H/p, W/p) of x0 for the grid heads."""
        p = self.teacher.patch_size
        self.grid = (x0.shape[-2] // p, x0.shape[-1] // p)
        return self.teacher.features(flow.add_noise(x0, noise, sigma), sigma, text, self.blocks)

    def heads_logits(self, feats: list[torch.Tensor], sigma, text) -> torch.Tensor:
        s_emb = sigma_embedding(sigma).to(feats[0].dtype)
        text_vec = torch.stack([t.mean(0) for t in text]).to(feats[0].dtype)
        if self.grid is None:
            raise ValueError("heads_logits needs the token grid: call features() on the samples first")
        return torch.cat([h(f, s_emb, text_vec, self.grid) for h, f in zip(self.heads, feats)], dim=1)

    def forward(self, x0: torch.Tensor, text, sigma: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, K] (K = per-token logits of every head); real > 0 > fake after training."""
        b = x0.shape[0]
        sigma = self.sample_sigma(b, x0.device) if sigma is None else sigma
        noise = torch.randn_like(x0) if noise is None else noise
        return self.heads_logits(self.features(x0, text, sigma, noise), sigma, text)


# -- GAN losses (Goodfellow et al. 2014 non-saturating; Lim & Ye 2017 hinge) -------------------------------

def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: torch.Tensor, kind: str = "ns") -> torch.Tensor:
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def accuracy(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[float, float]:
    """Fraction of real logits > 0 and fake logits < 0 (per token); 0.5/0.5 means D sits at chance."""
    return (real_logits > 0).float().mean().item(), (fake_logits < 0).float().mean().item()


def feature_distance(disc: Discriminator, a: torch.Tensor, b: torch.Tensor, text,
                     sigma: torch.Tensor | None = None) -> torch.Tensor:
    """A perceptual distance without pretrained LPIPS: MSE between the frozen teacher's features of a and b,
    both re-noised with the same ε to the same random σ (features normalised per channel of b)."""
    n = a.shape[0]
    sigma = disc.sample_sigma(n, a.device) if sigma is None else sigma
    noise = torch.randn_like(a)
    fa = disc.features(a, text, sigma, noise)
    with torch.no_grad():
        fb = disc.features(b, text, sigma, noise)
    total = 0.0
    for x, y in zip(fa, fb):
        scale = y.std(dim=(0, 1), keepdim=True) + 1e-6
        total = total + ((x - y) / scale).square().mean()
    return total / len(fa)


def mismatched_captions(text) -> tuple[list, torch.Tensor]:
    """The batch's captions rolled by one (row i gets row i+1's caption) and a mask of the rows whose rolled
    caption really differs from their own (a repeated prompt is no mismatch)."""
    rolled = list(text[1:]) + list(text[:1])
    keep = torch.tensor([not (a.shape == b.shape and torch.equal(a, b)) for a, b in zip(text, rolled)])
    return rolled, keep


def critic_gan_loss(critic, real: torch.Tensor, text, fake: torch.Tensor, fake_text=None, kind: str = "ns",
                    r1: float = 0.0, mismatch: float = 0.0):
    """The discriminator update shared by Turbo++, LADD and Diffusion2GAN: real and (detached) fake re-noised
    to random σ, GAN loss, optional R1 (Mescheder et al. 2018) on the heads' inputs for real samples only.
    `mismatch` > 0: the matching-aware discriminator of GAN-INT-CLS (Reed et al. 2016, "Generative adversarial
    text to image synthesis", §4.1): real images with a wrong caption are extra fakes, weighted by `mismatch`, so
    the critic must read the caption to call an image real.
    `critic` is any module with sample_sigma / features / heads_logits / forward (features may be nested lists,
    as for a multi-scale discriminator). Returns (loss, logs)."""
    sig_r = critic.sample_sigma(real.shape[0], real.device)
    with torch.no_grad():
        feats_r = critic.features(real, text, sig_r, torch.randn_like(real))
    leaves = []
    if r1 > 0:
        def grad_leaf(f):
            if isinstance(f, (list, tuple)):
                return [grad_leaf(x) for x in f]
            f = f.detach().requires_grad_(True)
            leaves.append(f)
            return f
        feats_r = grad_leaf(feats_r)
    logits_r = critic.heads_logits(feats_r, sig_r, text)
    logits_f = critic(fake.detach(), text if fake_text is None else fake_text)
    loss = d_loss(logits_r, logits_f, kind)
    logs = {}
    if mismatch > 0:
        wrong_text, keep = mismatched_captions(text)
        if keep.any():
            rows = keep.nonzero().flatten().tolist()
            logits_m = critic(real[rows].detach(), [wrong_text[i] for i in rows])
            fake_term = F.relu(1 + logits_m).mean() if kind == "hinge" else F.softplus(logits_m).mean()
            loss = loss + mismatch * fake_term
            logs["d_acc_mismatch"] = (logits_m.detach() < 0).float().mean().item()
    if r1 > 0:
        grads = torch.autograd.grad(logits_r.sum(), leaves, create_graph=True)
        penalty = sum(g.square().sum(dim=(1, 2)).mean() for g in grads)
        loss = loss + 0.5 * r1 * penalty
        logs["r1"] = penalty.item()
    acc_r, acc_f = accuracy(logits_r.detach(), logits_f.detach())
    logs.update({"d_loss": loss.item(), "d_acc_real": acc_r, "d_acc_fake": acc_f})
    return loss, logs
