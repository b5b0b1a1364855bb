"""A model folder (teacher or student): `config.json` + `model.safetensors`, loaded behind one `Generator`
interface that samples images from prompts. Text features come from the encoder the config names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import flow
from .backbones.zimage import ZImageBackbone, load_backbone
from .errors import UserError
from .text import get_encoder

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def read_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass a model folder written by `twostep teacher train` or `distill`")
    p = folder / CONFIG
    if not p.exists():
        raise UserError(f"{p}: missing; the model folder is incomplete (train it again or copy the whole folder)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e.msg} at line {e.lineno}); restore the file")


@dataclass
class Teacher:
    """A flow model sampled with an Euler grid; default sampling (steps, shift, guidance) from its config."""

    backbone: ZImageBackbone
    config: dict
    folder: Path | None = None

    @property
    def sampling(self) -> dict:
        return self.config.get("sampling", {"steps": 8, "shift": flow.DEFAULT_SHIFT, "guidance": 0.0})

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    @property
    def channels(self) -> int:
        return int(self.config["transformer"]["in_channels"])

    def encode(self, prompts):
        return get_encoder().encode(prompts)

    def null_text(self, n: int):
        return get_encoder().encode([""] * n)

    def noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(n, self.channels, self.resolution, self.resolution, generator=g)

    @torch.no_grad()
    def sample(self, text, noise: torch.Tensor, steps: int | None = None, guidance: float | None = None,
               shift: float | None = None, return_trajectory: bool = False) -> flow.SampleResult:
        s = self.sampling
        steps = int(s["steps"] if steps is None else steps)
        guidance = float(s["guidance"] if guidance is None else guidance)
        shift = float(s.get("shift", flow.DEFAULT_SHIFT) if shift is None else shift)
        sig = flow.sigma_grid(steps, shift)
        neg = self.null_text(noise.shape[0]) if guidance != 0 else None
        self.backbone.eval()
        return flow.sample_euler(self.backbone.denoise, noise, text, sig, guidance=guidance, neg_text=neg,
                                 return_trajectory=return_trajectory)


def load_teacher(folder: Path) -> Teacher:
    folder = Path(folder)
    cfg = read_config(folder)
    if "transformer" not in cfg:
        raise UserError(f"{folder / CONFIG}: has no 'transformer' section; not a twostep teacher folder")
    bb = load_backbone(cfg["transformer"], folder / WEIGHTS)
    bb.requires_grad_(False).eval()
    return Teacher(bb, cfg, folder)


def batched(n: int, bs: int):
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


def save_model_folder(backbone: ZImageBackbone, config: dict, folder: Path):
    """Write config.json + model.safetensors (atomically)."""
    from .ckpt import atomic_save_tensors, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(backbone.transformer.state_dict(), folder / WEIGHTS)
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1))
