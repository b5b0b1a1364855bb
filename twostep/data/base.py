"""The shared dataset interface: `ds.sample(n, seed, split) -> Examples`, deterministic for a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
