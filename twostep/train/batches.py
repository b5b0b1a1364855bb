"""What a run trains on: the teacher and its cache, deterministic batches from the cache, and (for a method that
reads "data_real") benchmark images."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import get_dataset
from ..errors import UserError
from ..model import load_teacher
from ..teacher.cache import load_cache

REAL_IMAGES = 5000  # at most this many benchmark training images are held for a method that needs "data_real"


def load_inputs(teacher_dir: Path, cache_dir: Path):
    """(teacher, cache): the teacher folder and a cache made by it, with images of the teacher's shape."""
    teacher = load_teacher(teacher_dir)
    cache = load_cache(cache_dir, expect_teacher=teacher_dir)
    if tuple(cache.noise.shape[1:]) != (teacher.channels, teacher.resolution, teacher.resolution):
        raise UserError(f"{cache_dir}: cache images {tuple(cache.noise.shape[1:])} do not match the teacher "
                        f"({teacher.channels}×{teacher.resolution}²); rebuild the cache with this teacher")
    return teacher, cache


class BatchSource:
    """Deterministic batches from the teacher cache. `batch_size` is the GLOBAL batch: update k draws the global
    batch's indices from a generator seeded by (seed, k) alone, and rank r of `world` processes takes rows
    [r·B/W, (r+1)·B/W), so N processes see exactly the halves/quarters of the one-process batch, and a resumed
    run sees exactly the batches an uninterrupted one would."""

    def __init__(self, cache, needs: set[str], sigma_mid: float, seed: int, data_real: torch.Tensor | None,
                 rank: int = 0, world: int = 1, device="cpu"):
        self.cache, self.needs, self.seed, self.rank, self.world = cache, needs, seed, rank, world
        self.device = torch.device(device)
        self.mid = cache.state_at(sigma_mid) if "teacher_mid" in needs else None
        self.data_real = data_real

    def get(self, update: int, sub: int, batch_size: int) -> dict:
        if batch_size % self.world:
            raise UserError(f"train.batch_size={batch_size} is the global batch and must be divisible by the "
                            f"{self.world} processes")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + update * 101 + sub * 7)
        per = batch_size // self.world
        mine = slice(self.rank * per, (self.rank + 1) * per)
        idx = torch.randint(0, len(self.cache), (batch_size,), generator=g)
        j = torch.randint(0, len(self.data_real), (batch_size,), generator=g) if self.data_real is not None else None
        fresh = torch.randn((batch_size, *self.cache.noise.shape[1:]), generator=g)
        idx = idx[mine]
        b = {"noise": self.cache.noise[idx], "text": [self.cache.text[i] for i in idx.tolist()], "index": idx}
        if "teacher_final" in self.needs:
            b["teacher_final"] = self.cache.final[idx]
        if self.mid is not None:
            b["teacher_mid"] = self.mid[idx]
        if j is not None:
            b["data_real"] = self.data_real[j[mine]]
        b["fresh_noise"] = fresh[mine]
        if self.device.type != "cpu":  # drawn on the CPU (device-independent batches), used on the accelerator
            b = {k: (v if k == "index" else [t.to(self.device) for t in v] if isinstance(v, list) else
                     v.to(self.device, non_blocking=True)) for k, v in b.items()}
        return b


def real_images(cache, needs: set[str], seed: int) -> torch.Tensor | None:
    """The benchmark's training images behind the cache's prompts, when the method reads "data_real" (None
    otherwise): min(len(cache), REAL_IMAGES) of them, drawn at the run's seed."""
    if "data_real" not in needs:
        return None
    return get_dataset(cache.manifest["data"]).sample(min(len(cache), REAL_IMAGES), seed=seed, split="train").images
