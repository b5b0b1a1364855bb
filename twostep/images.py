"""Image helpers: tensors in [-1, 1] ↔ uint8, grids, PNG writing (atomic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] → uint8 [N, H, W, 3]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


UPSCALE_BELOW = 256            # grids upscale (nearest neighbour) only images whose sides are all below this
TRACKER_PIXELS = 4_000_000     # what goes to a tracker (TensorBoard, wandb) is downsampled to at most this


def grid_scale(scale: int, h: int, w: int) -> int:
    """The upscale a grid applies to h x w images: `scale` for small ones, 1 (none) once a side is >= 256 px, so
    that a 1024² grid of 10 columns is 31 MP, not the 284 MP that x3 made it."""
    return int(scale) if max(h, w) < UPSCALE_BELOW else 1


def grid(x: torch.Tensor, nrow: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile [N, 3, H, W] images row-major with `nrow` images per row; returns uint8 [H', W', 3]. `scale`: the
    nearest-neighbour upscale of images smaller than 256 px (grid_scale: larger ones are never upscaled)."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    scale = grid_scale(scale, h, w)
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = imgs[i]
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    return out


def fit_pixels(arr: np.ndarray, max_pixels: int = TRACKER_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] downsampled by the smallest integer factor (box filter: PIL's reduce) that brings it to at
    most `max_pixels`; unchanged when it already fits."""
    h, w = arr.shape[:2]
    if h * w <= max_pixels:
        return arr
    from PIL import Image

    f = 2
    while (-(-h // f)) * (-(-w // f)) > max_pixels:
        f += 1
    return np.asarray(Image.fromarray(arr).reduce(f))


def save_png(arr: np.ndarray, path: Path):
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(arr).save(tmp)
    tmp.replace(path)


def as_feature_input(x: torch.Tensor, resolution: int, what: str = "images") -> torch.Tensor:
    """Validate [N, 3, H, W]; uint8 [0, 255] is converted to float [-1, 1]; floats are clamped to [-1, 1] (as
    when saved to 8-bit files); resized to the net's resolution (area when shrinking, bilinear when growing)."""
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise UserError(f"{what}: expected a tensor [N, 3, H, W] of images in [-1, 1], got {shape}")
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    x = x.detach().float()
    if len(x) and x.abs().max() > 10:
        raise UserError(f"{what}: values up to {x.abs().max():.0f} look like [0, 255] floats; pass images in "
                        "[-1, 1] (or uint8)")
    x = x.clamp(-1, 1)   # as when the images are written to 8-bit files
    if x.shape[-2:] != (resolution, resolution):
        mode = "area" if x.shape[-1] > resolution else "bilinear"
        x = F.interpolate(x, size=(resolution, resolution), mode=mode,
                          **({} if mode == "area" else {"align_corners": False}))
    return x
