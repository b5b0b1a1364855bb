"""Datasets and the registry of names. Each yields images in [-1, 1] as float tensors [N, 3, H, W] with
captions (and attributes); `ds.sample(n, seed, split) -> Examples`, deterministic for a seed."""

from pathlib import Path

from ..errors import UserError
from .base import Examples, split_seed
from .folder import FolderDataset
from .photos import Photos
from .shapes import Shapes

BUILTIN = {"shapes": Shapes, "photos": Photos}

__all__ = ["BUILTIN", "Examples", "FolderDataset", "Photos", "Shapes", "get_dataset", "split_seed"]


def get_dataset(name: str, resolution: int = 32, skip_bad: bool = False):
    """`shapes`, `photos`, or a folder with captions.jsonl."""
    if name in BUILTIN:
        return BUILTIN[name](resolution)
    p = Path(name)
    if p.is_dir():
        return FolderDataset(p, resolution=resolution, skip_bad=skip_bad)
    raise UserError(f"--data {name!r}: not 'shapes', 'photos' or an existing folder with captions.jsonl")
