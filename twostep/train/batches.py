"""What a run trains on: the teacher and its cache, deterministic batches from the cache, and (for a method that
reads "data_real") benchmark images."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import get_dataset
from ..errors import UserError
from ..model import load_teacher
from ..teacher.cache import load_cache, sigma_index

REAL_IMAGES = 5000  # at most this many benchmark training images are held for a method that needs "data_real"


def load_inputs(teacher_dir: Path, cache_dir: Path, verify: bool = False, dtype: torch.dtype | None = None):
    """(teacher, cache): the teacher folder, read in `dtype` (train.frozen_dtype), and a cache made by it (opened
    lazily; checked cheaply, or every shard's sha256 with `verify`: `distill --verify-cache`), with samples of the
    teacher's shape."""
    teacher = load_teacher(teacher_dir, dtype)
    cache = load_cache(cache_dir, expect_teacher=teacher_dir, verify=verify)
    want = (teacher.channels, teacher.height, teacher.width)
    if cache.sample_shape != want:
        raise UserError(f"{cache_dir}: cache samples {cache.sample_shape} do not match the teacher's {want} "
                        "(channels, height, width); rebuild the cache with this teacher")
    return teacher, cache


class BatchSource:
    """Deterministic batches from the teacher cache. `batch_size` is the GLOBAL batch: update k draws the global
    batch's indices from a generator seeded by (seed, k) alone, and rank r of `world` processes takes rows
    [r·B/W, (r+1)·B/W), so N processes see exactly the halves/quarters of the one-process batch, and a resumed
    run sees exactly the batches an uninterrupted one would. Rows are drawn from the first `rows` of the cache
    (default all; train.eval_every holds the rest out: viz.training_rows)."""

    def __init__(self, cache, needs: set[str], sigma_mid: float, seed: int, data_real: torch.Tensor | None,
                 rank: int = 0, world: int = 1, device="cpu", rows: int | None = None):
        self.cache, self.needs, self.seed, self.rank, self.world = cache, needs, seed, rank, world
        self.rows = len(cache) if rows is None else int(rows)
        self.device = torch.device(device)
        self.mid = None
        if "teacher_mid" in needs:  # loss.step1_loss=traj: the teacher's state at σm must be in the cache
            if not cache.has_state(sigma_mid):
                kept = ", ".join(["final"] + [f"{s:g}" for s in cache.stored_sigmas])
                grid = ", ".join(f"{float(s):.6g}" for s in cache.sigmas)
                raise UserError(
                    f"{cache.folder}: holds no teacher state at σm = {sigma_mid:g} (stored: {kept}), which "
                    f"loss.step1_loss=traj reads; rebuild it with `twostep teacher cache ... --states final,"
                    f"{sigma_mid:g} --out <new folder>`" if sigma_index(cache.sigmas, sigma_mid) is not None else
                    f"student.sigma_mid={sigma_mid:g} is not on the teacher's σ grid ({grid}), which "
                    "loss.step1_loss=traj needs; set student.sigma_mid to one of them")
            self.mid = float(sigma_mid)
        self.data_real = data_real

    def get(self, update: int, sub: int, batch_size: int) -> dict:
        if batch_size % self.world:
            raise UserError(f"train.batch_size={batch_size} is the global batch and must be divisible by the "
                            f"{self.world} processes")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + update * 101 + sub * 7)
        per = batch_size // self.world
        mine = slice(self.rank * per, (self.rank + 1) * per)
        idx = torch.randint(0, self.rows, (batch_size,), generator=g)
        j = torch.randint(0, len(self.data_real), (batch_size,), generator=g) if self.data_real is not None else None
        fresh = torch.randn((batch_size, *self.cache.sample_shape), generator=g)
        idx = idx[mine]
        # only this rank's rows are read (the cache is memory-mapped; the noise is regenerated from its seed)
        want = ["noise"] + (["final"] if "teacher_final" in self.needs else []) + \
            ([self.mid] if self.mid is not None else [])
        r = self.cache.rows(idx, want)
        b = {"noise": r["noise"], "text": self.cache.text_rows(idx), "index": idx}
        if "teacher_final" in self.needs:
            b["teacher_final"] = r["final"]
        if self.mid is not None:
            b["teacher_mid"] = r[self.mid]
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
    if not cache.manifest.get("data"):
        raise UserError(f"{cache.folder}: was built from a prompt file (--prompts), which has no images, and this "
                        "method reads data_real (real images); build the cache from --data DATA for it")
    return get_dataset(cache.manifest["data"]).sample(min(len(cache), REAL_IMAGES), seed=seed, split="train").images
