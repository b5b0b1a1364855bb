"""The one module that owns the σ / t / sign conventions of Z-Image (see docs/method.md).

Conventions (diffusers' ZImagePipeline / ZImageTransformer2DModel):
  x_σ = (1 − σ)·x0 + σ·ε          σ = 1 pure noise, σ = 0 clean
  t   = 1 − σ                      the time the transformer is called with (t = 1 is clean)
  u   = x0 − ε                     the transformer's raw output (the pipeline negates it for Euler)
  x̂0  = x_σ + σ·u,   ε̂ = x_σ − (1 − σ)·u
  Euler step σ → σ':  x_σ' = x_σ + (σ − σ')·u
  shifted grid: σ' = s·σ / (1 + (s − 1)·σ)   (s = 3 for Turbo, no dynamic shift)
  CFG (Z-Image form): pred = pos + g·(pos − neg); g = 0 means no guidance. NFE counts every forward pass.

Nothing else in twostep re-derives these formulas: samplers, backbones and methods import them from here.
A `denoiser` everywhere is a callable `denoiser(x_sigma, sigma, text) -> x0_hat` (k-diffusion style), where
sigma is a tensor of shape [B] and `text` is whatever the backbone takes (a list of per-sample features).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]

DEFAULT_SHIFT = 3.0


def _bcast(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """σ as a tensor broadcastable against `like` ([B] → [B, 1, 1, 1])."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (like.ndim - 1)))


# ---- interpolation and parameterisation conversions -------------------------------------------------

def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def sigma_to_t(sigma):
    """Model time t = 1 − σ (t = 1 is clean)."""
    return 1 - sigma


def t_to_sigma(t):
    return 1 - t


def x0_from_u(x_sigma: torch.Tensor, sigma, u: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_σ + σ·u, with u = x0 − ε the transformer's raw output."""
    return x_sigma + _bcast(sigma, x_sigma) * u


def u_from_x0(x_sigma: torch.Tensor, sigma, x0: torch.Tensor) -> torch.Tensor:
    """Inverse of x0_from_u (undefined at σ = 0)."""
    return (x0 - x_sigma) / _bcast(sigma, x_sigma)


def eps_from_x0(x_sigma: torch.Tensor, sigma, x0: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_σ − (1 − σ)·x̂0) / σ (undefined at σ = 0)."""
    s = _bcast(sigma, x_sigma)
    return (x_sigma - (1 - s) * x0) / s


def x0_from_state(x_sigma: torch.Tensor, sigma, noise: torch.Tensor) -> torch.Tensor:
    """The clean image implied by a state and its known noise: x0 = (x_σ − σ·ε) / (1 − σ) (σ < 1)."""
    s = _bcast(sigma, x_sigma)
    return (x_sigma - s * noise) / (1 - s)


def velocity_from_u(u: torch.Tensor) -> torch.Tensor:
    """dx/dσ = ε − x0 = −u: the sign the pipeline applies before the scheduler's Euler step."""
    return -u


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching regression target for the raw output: u* = x0 − ε."""
    return x0 - noise


def euler_step(x_sigma: torch.Tensor, sigma, sigma_next, x0_hat: torch.Tensor) -> torch.Tensor:
    """x_σ' = x_σ + (σ − σ')·u, with u recovered from x̂0; exact at σ' = 0 (returns x̂0)."""
    s, sn = _bcast(sigma, x_sigma), _bcast(sigma_next, x_sigma)
    u = (x0_hat - x_sigma) / s
    return x_sigma + (s - sn) * u


def apply_guidance(pos: torch.Tensor, neg: torch.Tensor, guidance: float) -> torch.Tensor:
    """Z-Image CFG: pred = pos + g·(pos − neg). Linear, so it applies to u and to x̂0 alike."""
    return pos + guidance * (pos - neg)


# ---- σ grids ------------------------------------------------------------------------------------------

def shift_sigma(sigma, shift: float = DEFAULT_SHIFT):
    """σ' = s·σ / (1 + (s − 1)·σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_grid(steps: int, shift: float = DEFAULT_SHIFT, dtype=torch.float64) -> torch.Tensor:
    """The steps+1 σ values from 1 to 0 that an N-step Z-Image sampler visits (linear in σ, then shifted).

    8 steps, shift 3 → 1, .9545, .9, .8333, .75, .6429, .5, .3, 0;  2 steps → 1, .75, 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_sigma(base, shift).to(dtype)


def two_step_sigmas(sigma_mid: float) -> list[float]:
    """The 2-step student's σ grid [1, σm, 0]: step 1 denoises ε at σ = 1, step 2 the mid state x_m at σm."""
    return [1.0, float(sigma_mid), 0.0]


def nfe(steps: int, guidance: float) -> int:
    """Truthful count of forward passes: CFG (g ≠ 0) doubles every step."""
    return steps * (2 if guidance != 0 else 1)


# ---- the 2-step rollout's mid state -----------------------------------------------------------------
# twostep.student.TwoStepStudent (training and sampling) and twostep.pipeline (the exported diffusers pipeline,
# which the export ships with a copy of this file) both use these two functions.

def mid_state(x0_1: torch.Tensor, noise: torch.Tensor, sigma_mid: float, mid_noise: str = "same",
              fresh_noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_m = (1 − σm)·x̂0₁ + σm·ε_m, the state step 2 starts from: ε_m is the initial noise ε
    (mid_noise="same") or a fresh ε' (mid_noise="fresh": `fresh_noise`, or drawn with randn_like when None)."""
    eps_m = noise if mid_noise == "same" else fresh_noise
    if eps_m is None:
        eps_m = torch.randn_like(noise)
    return add_noise(x0_1, eps_m, sigma_mid)


def inference_fresh_noise(noise: torch.Tensor, mid_noise: str) -> torch.Tensor | None:
    """The ε' of mid_noise="fresh" at inference: drawn from a CPU generator seeded by the initial noise, so that
    one seed gives one image (None for mid_noise="same")."""
    if mid_noise != "fresh":
        return None
    seed = int(noise.flatten()[:4].abs().sum().item() * 1e6) % (2 ** 31)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(noise.shape, generator=g).to(device=noise.device, dtype=noise.dtype)


# ---- sampling -----------------------------------------------------------------------------------------

@dataclass
class SampleResult:
    x0: torch.Tensor
    nfe: int
    sigmas: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)  # x at every σ of the grid (x_1 = noise)


def guided(denoiser: Denoiser, neg_text, guidance: float) -> Denoiser:
    """Wrap a denoiser with Z-Image CFG; batches positive and negative in one call (still 2 NFE per step)."""
    if guidance == 0:
        return denoiser

    def fn(x, sigma, text):
        b = x.shape[0]
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), list(text) + list(neg_text))
        return apply_guidance(out[:b], out[b:], guidance)

    return fn


@torch.no_grad()
def sample_euler(denoiser: Denoiser, noise: torch.Tensor, text, sigmas: Sequence[float] | torch.Tensor,
                 guidance: float = 0.0, neg_text=None, return_trajectory: bool = False,
                 callback: Callable[[int, torch.Tensor], None] | None = None) -> SampleResult:
    """Euler sampler over any σ grid (1 → 0), k-diffusion style: x ← x + (σ − σ')·u at each step.

    `noise` is ε (the state at σ = 1 when sigmas[0] == 1). Returns the final x0, the truthful NFE and,
    on request, the state at every σ of the grid (trajectory[i] is x at sigmas[i]).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if guidance != 0 and neg_text is None:
        raise ValueError("guidance != 0 needs neg_text (the unconditional features)")
    model = guided(denoiser, neg_text, guidance)
    x = noise
    traj = [x] if return_trajectory else []
    count = 0
    b = x.shape[0]
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        sig = torch.full((b,), s, dtype=x.dtype, device=x.device)
        x0_hat = model(x, sig, text)
        count += 2 if guidance != 0 else 1
        x = euler_step(x, s, sn, x0_hat)
        if return_trajectory:
            traj.append(x)
        if callback is not None:
            callback(i, x)
    return SampleResult(x0=x, nfe=count, sigmas=sigmas, trajectory=traj)
