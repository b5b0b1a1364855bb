"""Image helpers: tensors in [-1, 1] ↔ uint8, grids, PNG writing (atomic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] → uint8 [N, H, W, 3]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(x: torch.Tensor, nrow: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile [N, 3, H, W] images row-major with `nrow` images per row; returns uint8 [H', W', 3]."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = imgs[i]
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def save_png(arr: np.ndarray, path: Path):
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(arr).save(tmp)
    tmp.replace(path)
