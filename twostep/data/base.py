"""The shared dataset interface: `ds.sample(n, seed, split) -> Examples`, deterministic for a seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

SPLIT_OFFSET = {"train": 0, "test": 10_000_019, "ref": 20_000_033}


@dataclass
class Examples:
    images: torch.Tensor            # [N, 3, H, W], float32 in [-1, 1]
    captions: list[str]
    labels: dict[str, torch.Tensor] | None = None  # attribute labels (shapes) or source index (photos)

    def __len__(self):
        return len(self.captions)


def split_seed(seed: int, split: str) -> int:
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_OFFSET)}")
    return int(seed) + SPLIT_OFFSET[split]


def get_dataset(name: str, resolution: int = 32, skip_bad: bool = False):
    """`shapes`, `photos`, or a folder with captions.jsonl."""
    if name == "shapes":
        from .shapes import Shapes
        return Shapes(resolution)
    if name == "photos":
        from .photos import Photos
        return Photos(resolution)
    p = Path(name)
    if p.is_dir():
        from .folder import FolderDataset
        return FolderDataset(p, resolution=resolution, skip_bad=skip_bad)
    raise UserError(f"--data {name!r}: not 'shapes', 'photos' or an existing folder with captions.jsonl")
