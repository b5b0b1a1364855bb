"""Multi-scale sliced Wasserstein distance (SWD) on Laplacian-pyramid patches — weight-free.

A re-implementation of Karras et al. 2018 (ProGAN, `metrics/sliced_wasserstein.py`):
1. Laplacian pyramid of each image with the 5×5 binomial filter [1 4 6 4 1]ᵀ[1 4 6 4 1]/256 (cv2.pyrDown /
   pyrUp, mirror borders), from full resolution down to `min_res` (default 16; at 32² that is two levels:
   the 32² band-pass level and the 16² low-pass residual).
2. From every image and level, `nhoods_per_image` random 7×7×3 neighbourhoods (descriptors, 147-d).
3. Each set's descriptors are normalised per level and per colour channel by that set's own mean and std.
4. Sliced Wasserstein-1 distance between the real and fake descriptor sets: `dir_repeats` × `dirs_per_repeat`
   random unit directions, sort the 1-D projections, mean absolute difference of the sorted values.
5. Reported ×1e3 (as ProGAN does). `swd()` returns the average over levels; `swd_levels()` each level,
   finest first.

Unit: 10⁻³ × (mean 1-D W1 distance between normalised 7×7 patch projections). The finest level reacts to
blur and lost texture; the coarse level to colour/layout. All randomness (patch positions, directions, the
subsampling of the larger set) comes from a fixed `seed`, so equal inputs give equal numbers. Values depend on
the set size (finite-sample noise floor): compare at equal N.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
_GAUSS = (_BINOMIAL[:, None] * _BINOMIAL[None, :]) / 256.0


def _filter(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    c = x.shape[1]
    k = (_GAUSS * gain).to(x.dtype)[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=c)  # 'reflect' == scipy 'mirror'


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _filter(x)[:, :, ::2, ::2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _filter(up, 4.0)


def laplacian_pyramid(x: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    pyr = [x]
    for _ in range(1, num_levels):
        pyr.append(pyr_down(pyr[-1]))
        pyr[-2] = pyr[-2] - pyr_up(pyr[-1])
    return pyr


def _descriptors(level: torch.Tensor, nhoods_per_image: int, nhood_size: int, g: torch.Generator) -> torch.Tensor:
    """`nhoods_per_image` random k×k×C neighbourhoods of every image -> [N·nhoods, C, k·k] (ProGAN order)."""
    n, c, h, w = level.shape
    k = nhood_size
    if h < k or w < k:
        raise UserError(f"SWD: pyramid level {h}×{w} is smaller than the {k}×{k} neighbourhood; raise min_res")
    m = n * nhoods_per_image
    img = torch.arange(n).repeat_interleave(nhoods_per_image)
    # top-left corners uniform over [0, size - k], i.e. centres over [k//2, size - k//2) as ProGAN's randint(H, S-H)
    y0 = torch.randint(0, h - k + 1, (m,), generator=g)
    x0 = torch.randint(0, w - k + 1, (m,), generator=g)
    off = torch.arange(k)
    yy = (y0[:, None] + off)[:, None, :, None]          # [m, 1, k, 1]
    xx = (x0[:, None] + off)[:, None, None, :]          # [m, 1, 1, k]
    d = level[img[:, None, None, None], torch.arange(c)[None, :, None, None], yy, xx]   # [m, c, k, k]
    return d.reshape(m, c, k * k)


def _finalize(d: torch.Tensor) -> torch.Tensor:
    d = d - d.mean(dim=(0, 2), keepdim=True)
    d = d / d.std(dim=(0, 2), keepdim=True, unbiased=False).clamp_min(1e-12)
    return d.reshape(len(d), -1)


def _sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, dir_repeats: int, dirs_per_repeat: int,
                        g: torch.Generator) -> float:
    out = []
    for _ in range(dir_repeats):
        dirs = torch.randn(a.shape[1], dirs_per_repeat, generator=g, dtype=torch.float64)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a.dtype)
        # project to [dirs, M]; sort with numpy (torch.sort on CPU is ~20× slower here)
        pa = np.sort((dirs.T @ a.T).numpy(), axis=1)
        pb = np.sort((dirs.T @ b.T).numpy(), axis=1)
        out.append(float(np.abs(pa - pb).mean(dtype=np.float64)))
    return sum(out) / len(out)


def _check(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise UserError(f"{what}: expected a tensor [N, 3, H, W] of images in [-1, 1], got {shape}")
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    x = x.detach().cpu().float()
    if len(x) and x.abs().max() > 10:
        raise UserError(f"{what}: values up to {x.abs().max():.0f} look like [0, 255] floats; pass images in "
                        "[-1, 1] (or uint8)")
    return x.clamp(-1, 1)


def swd_levels(real_images: torch.Tensor, fake_images: torch.Tensor, nhood_size: int = 7,
               nhoods_per_image: int = 128, dir_repeats: int = 4, dirs_per_repeat: int = 128,
               min_res: int = 16, seed: int = 0) -> list[float]:
    """SWD ×1e3 per pyramid level (finest first). Images [N, 3, H, W] in [-1, 1]; sets of different size are
    compared by randomly subsampling the larger one (seeded) to the smaller one's size."""
    a, b = _check(real_images, "reference images"), _check(fake_images, "generated images")
    if a.shape[1:] != b.shape[1:]:
        raise UserError(f"SWD: image sizes differ ({tuple(a.shape[1:])} vs {tuple(b.shape[1:])}); "
                        "resize one set to the other's resolution")
    if min(len(a), len(b)) < 2:
        raise UserError("SWD needs at least 2 images in each set")
    res = a.shape[-1]
    num_levels = 1
    while res // 2 ** num_levels >= min_res:
        num_levels += 1
    g = torch.Generator().manual_seed(seed)
    n = min(len(a), len(b))
    if len(a) > n:
        a = a[torch.randperm(len(a), generator=g)[:n]]
    if len(b) > n:
        b = b[torch.randperm(len(b), generator=g)[:n]]
    pa, pb = laplacian_pyramid(a, num_levels), laplacian_pyramid(b, num_levels)
    out = []
    for la, lb in zip(pa, pb):
        da = _finalize(_descriptors(la, nhoods_per_image, nhood_size, g))
        db = _finalize(_descriptors(lb, nhoods_per_image, nhood_size, g))
        out.append(1e3 * _sliced_wasserstein(da, db, dir_repeats, dirs_per_repeat, g))
    return out


def swd(real_images: torch.Tensor, fake_images: torch.Tensor, **kw) -> float:
    """Multi-scale SWD ×1e3, averaged over pyramid levels (see module docstring for the definition)."""
    lv = swd_levels(real_images, fake_images, **kw)
    return sum(lv) / len(lv)
