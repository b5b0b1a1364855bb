"""`photos`: random crops (random position and scale) of six photographs bundled in scikit-image,
captioned "a photo crop of <name>". Texture-rich real images where few-step samplers go blurry.
Crops are area-resized (anti-aliased) to the model resolution; deterministic for a seed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .base import Examples, split_seed

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
CAPTIONS = [f"a photo crop of {n.replace('_', ' ')}" for n in NAMES]
MIN_SCALE, MAX_SCALE = 0.12, 0.45  # crop side as a fraction of the photo's shorter side


@lru_cache(maxsize=1)
def _photos() -> list[torch.Tensor]:
    from skimage import data as skdata

    out = []
    for n in NAMES:
        a = np.asarray(getattr(skdata, n)())
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out.append(torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return out


class Photos:
    name = "photos"
    has_attributes = False

    def __init__(self, resolution: int = 32):
        self.resolution = resolution

    def sample(self, n: int, seed: int = 0, split: str = "train") -> Examples:
        rng = np.random.default_rng(split_seed(seed, split))
        photos = _photos()
        imgs, caps, src = [], [], []
        for _ in range(n):
            k = int(rng.integers(len(NAMES)))
            p = photos[k]
            h, w = p.shape[1:]
            side = int(round(rng.uniform(MIN_SCALE, MAX_SCALE) * min(h, w)))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = p[:, y:y + side, x:x + side][None]
            imgs.append(F.interpolate(crop, size=(self.resolution,) * 2, mode="area")[0])
            caps.append(CAPTIONS[k])
            src.append(k)
        x = torch.stack(imgs).clamp(-1, 1) if imgs else torch.zeros(0, 3, self.resolution, self.resolution)
        return Examples(x, caps, {"source": torch.tensor(src, dtype=torch.long)})
