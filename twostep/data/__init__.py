"""Datasets. Each yields images in [-1, 1] as float tensors [N, 3, H, W] with captions (and attributes)."""
from .base import Examples, get_dataset

__all__ = ["Examples", "get_dataset"]
