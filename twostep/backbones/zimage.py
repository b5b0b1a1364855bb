"""Adapter over diffusers' ZImageTransformer2DModel (the tiny teacher and the real 6B model alike).

Hides: list-of-tensors I/O ([C, 1, H, W] per sample), t = 1 − σ, the raw output u = x0 − ε, and the
pad-token initialisation (diffusers creates x_pad_token / cap_pad_token without a meaningful value).
All conventions come from twostep.flow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .. import flow
from ..errors import UserError


def tiny_zimage_config(in_channels: int = 3, dim: int = 128, n_layers: int = 4, n_heads: int = 2,
                       n_refiner_layers: int = 1, cap_feat_dim: int = 384, patch_size: int = 4) -> dict:
    """A small ZImageTransformer2DModel config. dim / n_heads must equal sum(axes_dims)."""
    head = dim // n_heads
    if head * n_heads != dim or head % 8:
        raise UserError(f"dim {dim} / n_heads {n_heads} must be an integer multiple of 8; pick other values")
    side = 3 * head // 8 // 2 * 2  # RoPE axes (frame, row, col); each even, as in [32, 48, 48] of the 6B model
    axes = [head - 2 * side, side, side]
    return dict(all_patch_size=[patch_size], all_f_patch_size=[1], in_channels=in_channels, dim=dim,
                n_layers=n_layers, n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads,
                norm_eps=1e-5, qk_norm=True, cap_feat_dim=cap_feat_dim, rope_theta=256.0, t_scale=1000.0,
                axes_dims=axes, axes_lens=[1024, 64, 64])


class ZImageBackbone(nn.Module):
    """`denoise(x_sigma, sigma, text) -> x0_hat` and `features(...)` over a ZImageTransformer2DModel.

    text: a list of [L_i, cap_feat_dim] tensors (valid tokens only), one per sample.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.patch_size = int(cfg.all_patch_size[0])
        self.in_channels = int(cfg.in_channels)
        self.cap_feat_dim = int(cfg.cap_feat_dim)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, seed: int = 0) -> "ZImageBackbone":
        from diffusers import ZImageTransformer2DModel

        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            tr = ZImageTransformer2DModel(**config)
            init_pad_tokens(tr)
        return cls(tr)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.layers)

    # -- the one call ---------------------------------------------------------------------------------
    def raw_output(self, x_sigma: torch.Tensor, sigma: torch.Tensor, text: Sequence[torch.Tensor]) -> torch.Tensor:
        """u = x0 − ε as the transformer returns it, batched back to [B, C, H, W]."""
        if x_sigma.ndim != 4 or x_sigma.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, H, W], got {tuple(x_sigma.shape)}")
        if len(text) != x_sigma.shape[0]:
            raise ValueError(f"{len(text)} caption feature tensors for a batch of {x_sigma.shape[0]}")
        sigma = torch.as_tensor(sigma, dtype=x_sigma.dtype, device=x_sigma.device).expand(x_sigma.shape[0])
        t = flow.sigma_to_t(sigma)
        xs = list(x_sigma.unsqueeze(2).unbind(0))  # [C, 1, H, W] per sample (F = 1 frame)
        caps = [c.to(x_sigma.dtype) for c in text]
        out = self.transformer(xs, t, caps, patch_size=self.patch_size, return_dict=False)[0]
        return torch.stack(out, 0).squeeze(2)

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor, text: Sequence[torch.Tensor]) -> torch.Tensor:
        """x̂0 = x_σ + σ·u (flow.x0_from_u)."""
        u = self.raw_output(x_sigma, sigma, text)
        return flow.x0_from_u(x_sigma, sigma, u)

    forward = denoise

    # -- features for discriminators ------------------------------------------------------------------
    def features(self, x_sigma: torch.Tensor, sigma: torch.Tensor, text: Sequence[torch.Tensor],
                 blocks: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states of the image tokens after the given main blocks: list of [B, N_img, dim].

        Uses forward hooks on transformer.layers[i]; the unified sequence is [image tokens, caption tokens],
        so the first H·W/p² positions are the image grid (row-major). Stops after the last requested block.
        """
        blocks = sorted(set(int(b) % self.num_blocks for b in blocks))
        n_img = (x_sigma.shape[-2] // self.patch_size) * (x_sigma.shape[-1] // self.patch_size)
        got: dict[int, torch.Tensor] = {}

        class _Stop(Exception):
            pass

        def hook(idx):
            def fn(_m, _inp, out):
                got[idx] = out[:, :n_img]
                if idx == blocks[-1]:
                    raise _Stop
            return fn

        handles = [self.transformer.layers[i].register_forward_hook(hook(i)) for i in blocks]
        try:
            self.raw_output(x_sigma, sigma, text)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return [got[i] for i in blocks]


def init_pad_tokens(transformer: nn.Module, std: float = 0.02) -> None:
    """diffusers leaves the pad tokens without a trained value; give them a small random one (fresh models)."""
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token"):
            p = getattr(transformer, name, None)
            if p is not None:
                p.normal_(0.0, std)


# -- save / load (safetensors + JSON config) -------------------------------------------------------------

def save_backbone(backbone: ZImageBackbone, folder: Path, state_dict: dict | None = None, filename="model.safetensors"):
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else backbone.transformer.state_dict()
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    tmp = folder / (filename + ".tmp")
    save_file(sd, str(tmp))
    tmp.replace(folder / filename)


def load_backbone(config: dict, weights: Path) -> ZImageBackbone:
    from safetensors.torch import load_file

    weights = Path(weights)
    if not weights.exists():
        raise UserError(f"{weights}: weights file missing; point --teacher/--model at a folder written by twostep")
    bb = ZImageBackbone.from_config(config)
    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"{weights}: cannot read safetensors ({e}); re-create or re-download the file")
    missing, unexpected = bb.transformer.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: does not match its config (missing {list(missing)[:3]}, unexpected "
                        f"{list(unexpected)[:3]}); the folder's config.json and weights come from different models")
    return bb
