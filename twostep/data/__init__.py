"""Datasets and the registry of names. Each yields images in [-1, 1] as float tensors [N, 3, H, W] with
captions (and attributes); `ds.sample(n, seed, split) -> Examples`, deterministic for a seed. Prompt files
(.txt/.jsonl/.csv/.parquet, no images) are read by `prompts.read_prompts`; `get_captions` draws a dataset's
captions without decoding a folder's images."""

from pathlib import Path

from ..errors import UserError
from .base import Examples, split_seed
from .folder import FolderDataset
from .photos import Photos
from .prompts import HOLDOUT, head_prompts, prompt_file_identity, read_prompts, repeat_prompts
from .shapes import Shapes

BUILTIN = {"shapes": Shapes, "photos": Photos}

__all__ = ["BUILTIN", "Examples", "FolderDataset", "HOLDOUT", "Photos", "Shapes", "get_captions", "get_dataset",
           "head_prompts", "prompt_file_identity", "read_prompts", "repeat_prompts", "split_seed"]


def get_dataset(name: str, resolution: int = 32, skip_bad: bool = False):
    """`shapes`, `photos`, or a folder with captions.jsonl. `resolution`: the side (square) or (height, width);
    the builtins render square images only."""
    if not isinstance(resolution, int):  # (height, width): square is the plain side, as always
        h, w = (int(v) for v in resolution)
        resolution = h if h == w else (h, w)
    if name in BUILTIN:
        if not isinstance(resolution, int):
            raise UserError(f"--data {name}: the {name} benchmark renders square images, not {resolution[0]}x"
                            f"{resolution[1]}; use a folder dataset (images + captions.jsonl) for a non-square model")
        return BUILTIN[name](resolution)
    p = Path(name)
    if p.is_dir():
        return FolderDataset(p, resolution=resolution, skip_bad=skip_bad)
    raise UserError(f"--data {name!r}: not 'shapes', 'photos' or an existing folder with captions.jsonl")


def get_captions(name: str, num: int, seed: int = 0, split: str = "train", resolution: int = 32,
                 skip_bad: bool = False) -> list[str]:
    """The captions `get_dataset(name, resolution).sample(num, seed, split)` gives, without decoding a folder's
    images (a folder is read with decode=False: captions.jsonl and the images' existence only)."""
    if name in BUILTIN:
        return BUILTIN[name](resolution).sample(num, seed=seed, split=split).captions
    p = Path(name)
    if p.is_dir():
        return FolderDataset(p, resolution=resolution, skip_bad=skip_bad, decode=False).captions_sample(num, seed,
                                                                                                         split)
    return get_dataset(name)  # the one-line error about an unknown --data
