"""Fréchet distance (FD) and kernel distance (KID) in the embedding of a feature network, computed by
torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance`.

Two ways in: `DistributionMetrics` / `fd_kid` / `fd` take images and one of our feature nets (the original
API); `FeatureStats` takes features streamed in batches from any extractor (extractors.py: our feature nets,
the FID Inception-V3, CLIP, DINOv2), so a large eval never holds its images, and gives the same numbers for the
same features.

Units: FD is the squared Fréchet distance between Gaussians fitted to the `num_features`-d embeddings (same
formula as FID; comparable to published FID numbers only with the `inception` extractor and its real weights).
KID is the unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, mean and std over random
subsets (as torchmetrics / Bińkowski et al.). Statistics are accumulated in float64 (the wrapper hands torchmetrics float64 features, so the result is
float64 too). FD is biased upward for small sample sizes; compare numbers only at equal set sizes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..images import as_feature_input
from ..io.files import atomic_save_tensors, load_tensors

STATS_FORMAT = "twostep-feature-stats-v1"


class TorchmetricsFeature(nn.Module):
    """Adapter that torchmetrics calls as `feature=`: images in [-1, 1] (float, [N, 3, H, W]) -> float64
    embeddings [N, num_features]. Always runs the wrapped net in eval mode without gradients, in batches."""

    def __init__(self, net, batch_size: int = 128):
        super().__init__()
        self.net = net
        self.num_features = int(net.num_features)   # torchmetrics' FID reads this instead of probing
        self.batch_size = batch_size
        self._cache = None
        self.net.eval()

    def train(self, mode: bool = True):  # the feature net is frozen: never switch BatchNorm to batch stats
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # FID and KID are updated with the same batch object one after the other: embed it once. The cache
        # holds the batch itself (identity check, unchanged version), so a stale entry can never match.
        if self._cache is not None and self._cache[0] is images and self._cache[1] == images._version:
            return self._cache[2]
        x = as_feature_input(images, self.net.resolution)
        f = self.net.embed_images(x, self.batch_size).double()
        self._cache = (images, images._version, f)
        return f

    def clear_cache(self):
        self._cache = None


def _kid_subset_size(n_real: int, n_fake: int, kid_subset_size: int | None) -> int:
    s = min(1000, min(n_real, n_fake) // 2) if kid_subset_size is None else int(kid_subset_size)
    if not 2 <= s <= min(n_real, n_fake):
        raise UserError(f"kid_subset_size {s}: must be between 2 and the smaller set size "
                        f"({min(n_real, n_fake)}); pass a smaller kid_subset_size or more images")
    return s


class DistributionMetrics:
    """FD + KID against a fixed reference set whose features are extracted once (torchmetrics'
    `reset_real_features=False`). `metrics(fake_images) -> {"fd", "kid_mean", "kid_std"}`. KID subsets are
    drawn with a fixed `seed` (repeatable); `kid_subset_size` defaults to min(1000, min(N_real, N_fake) // 2)."""

    def __init__(self, net, reference_images: torch.Tensor, kid_subset_size: int | None = None,
                 kid_subsets: int = 100, seed: int = 0, batch_size: int = 512):
        self.feature = TorchmetricsFeature(net)   # embeds in batches of 128 (faster on CPU than larger ones)
        self.kid_subset_size, self.kid_subsets, self.seed, self.batch_size = kid_subset_size, kid_subsets, seed, batch_size
        ref = as_feature_input(reference_images, net.resolution, "reference images")
        if len(ref) < 2:
            raise UserError("reference images: need at least 2 images for FD")
        self.n_real = len(ref)
        from torchmetrics.image.fid import FrechetInceptionDistance  # lazy: torchmetrics costs ~3 s to import
        from torchmetrics.image.kid import KernelInceptionDistance

        self.fid = FrechetInceptionDistance(feature=self.feature, reset_real_features=False)
        # KID's subset size is fixed at construction; the actual one is set per call in __call__.
        with warnings.catch_warnings():   # "KID will save all extracted features in buffer": intended here
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(feature=self.feature, reset_real_features=False,
                                               subsets=kid_subsets, subset_size=2)
        for i in range(0, len(ref), batch_size):
            chunk = ref[i:i + batch_size]
            self.fid.update(chunk, real=True)
            self.kid.update(chunk, real=True)
        self.feature.clear_cache()

    def __call__(self, fake_images: torch.Tensor) -> dict[str, float]:
        fake = as_feature_input(fake_images, self.feature.net.resolution, "generated images")
        if len(fake) < 2:
            raise UserError("generated images: need at least 2 images for FD")
        subset_size = _kid_subset_size(self.n_real, len(fake), self.kid_subset_size)
        self.fid.reset()
        self.kid.reset()
        for i in range(0, len(fake), self.batch_size):
            chunk = fake[i:i + self.batch_size]
            self.fid.update(chunk, real=False)
            self.kid.update(chunk, real=False)
        self.feature.clear_cache()
        fd = float(self.fid.compute())
        self.kid.subset_size = subset_size
        with torch.random.fork_rng(devices=[]):   # KID draws subsets from the global RNG: make it repeatable
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
        return {"fd": max(fd, 0.0), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


class _Dim(nn.Module):
    """Stand-in `feature=` module: FeatureStats hands torchmetrics finished statistics, never images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x):  # pragma: no cover - never called
        raise RuntimeError("FeatureStats does not embed images")


class FeatureStats:
    """Streamed statistics of one feature set (e.g. `Extractor.embed` of every generated batch): `add(features)`
    any number of times with [n, D] batches of any size; `fd(other)`, `kid(other)`, `fd_kid(other)` compare two
    sets with torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance` (their states are filled from
    these sums, then their own `compute()` runs).

    The sums are torchmetrics' own (float64 Σx and ΣxᵀX, as its `update` computes them) over fixed blocks of
    `BLOCK` = 512 rows, whatever the batch sizes given to `add`: so the numbers depend only on the feature rows
    and their order, and equal `DistributionMetrics` (which fed torchmetrics 512 images at a time) bit for bit.
    KID needs the rows themselves (`keep=True`, the default: N·D float64 bytes in RAM); with `keep=False` only
    the sums are held (FD only, O(D²) memory whatever N). `save(path)` / `FeatureStats.load(path)` round-trip
    the exact state (a resumable eval)."""

    BLOCK = 512

    def __init__(self, num_features: int, keep: bool = True):
        if not isinstance(num_features, int) or num_features < 1:
            raise UserError(f"FeatureStats: num_features {num_features!r} must be an integer >= 1")
        self.num_features, self.keep = num_features, bool(keep)
        self.n = 0                        # rows folded into the sums (whole blocks)
        self.sum = torch.zeros(num_features, dtype=torch.float64)
        self.cov_sum = torch.zeros(num_features, num_features, dtype=torch.float64)
        self._pending = torch.zeros(0, num_features, dtype=torch.float64)   # < BLOCK rows not yet in the sums
        self._rows: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.n + len(self._pending)

    def add(self, features: torch.Tensor) -> "FeatureStats":
        if not torch.is_tensor(features) or features.dim() != 2 or features.shape[1] != self.num_features:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise UserError(f"FeatureStats: expected features [n, {self.num_features}], got {shape}")
        f = features.detach().to("cpu", torch.float64)
        if not torch.isfinite(f).all():
            raise UserError("FeatureStats: features hold NaN/inf (the images or the extractor's weights are "
                            "not finite); check the generator's outputs")
        if self.keep:
            self._rows.append(f)
        buf = torch.cat([self._pending, f])
        whole = len(buf) // self.BLOCK * self.BLOCK
        for i in range(0, whole, self.BLOCK):
            self._fold(buf[i:i + self.BLOCK])
        self._pending = buf[whole:].clone()
        return self

    def _fold(self, block: torch.Tensor, sums=None):
        s, c = (self.sum, self.cov_sum) if sums is None else sums
        s += block.sum(dim=0)               # torchmetrics FrechetInceptionDistance.update, line for line
        c += block.t().mm(block)
        if sums is None:
            self.n += len(block)

    def totals(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(Σx, ΣxᵀX, N) over every row added (the partial last block included, the stored state unchanged)."""
        s, c = self.sum.clone(), self.cov_sum.clone()
        if len(self._pending):
            self._fold(self._pending, (s, c))
        return s, c, len(self)

    def features(self) -> torch.Tensor:
        if not self.keep:
            raise UserError("FeatureStats(keep=False) holds only sums: KID needs the features; keep them")
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.num_features, dtype=torch.float64)

    def _check_pair(self, other: "FeatureStats"):
        if not isinstance(other, FeatureStats) or other.num_features != self.num_features:
            raise UserError(f"FD: feature sets of different extractors ({self.num_features}-d vs "
                            f"{getattr(other, 'num_features', '?')}-d)")
        if len(self) < 2 or len(other) < 2:
            raise UserError(f"FD needs at least 2 images in each set (got {len(self)} and {len(other)})")

    def fd(self, other: "FeatureStats") -> float:
        """Squared Fréchet distance between Gaussians fitted to the two sets (torchmetrics' compute; round-off
        below 0 clipped to 0). Symmetric up to round-off; `self` plays torchmetrics' "real"."""
        self._check_pair(other)
        from torchmetrics.image.fid import FrechetInceptionDistance  # lazy: torchmetrics costs ~3 s to import

        # sync_on_compute=False: these are this process's statistics; torchmetrics would otherwise all-gather
        # under torch.distributed and hang a multi-process run whose other ranks are not computing FD
        m = FrechetInceptionDistance(feature=_Dim(self.num_features), sync_on_compute=False)
        (m.real_features_sum, m.real_features_cov_sum, nr), (m.fake_features_sum, m.fake_features_cov_sum, nf) = \
            self.totals(), other.totals()
        m.real_features_num_samples, m.fake_features_num_samples = torch.tensor(nr), torch.tensor(nf)
        m.orig_dtype, m._update_count = torch.float64, 1   # states filled by hand: no "compute before update"
        return max(float(m.compute()), 0.0)

    def kid(self, other: "FeatureStats", subset_size: int | None = None, subsets: int = 100,
            seed: int = 0) -> tuple[float, float]:
        """(KID mean, std): torchmetrics' unbiased MMD² with the cubic kernel over `subsets` random subsets of
        `subset_size` (default min(1000, min(N) // 2)) drawn with a fixed `seed`."""
        self._check_pair(other)
        size = _kid_subset_size(len(self), len(other), subset_size)
        from torchmetrics.image.kid import KernelInceptionDistance  # lazy, as above

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            m = KernelInceptionDistance(feature=_Dim(self.num_features), subsets=subsets, subset_size=size,
                                        sync_on_compute=False)  # as in fd()
        m.real_features, m.fake_features = [self.features()], [other.features()]
        m._update_count = 1
        with torch.random.fork_rng(devices=[]):   # KID draws subsets from the global RNG: make it repeatable
            torch.manual_seed(seed)
            mean, std = m.compute()
        return float(mean), float(std)

    def fd_kid(self, other: "FeatureStats", kid_subset_size: int | None = None, kid_subsets: int = 100,
               seed: int = 0) -> dict[str, float]:
        """{"fd", "kid_mean", "kid_std"} of `other` against `self` (the reference), as DistributionMetrics."""
        fd_ = self.fd(other)
        km, ks = self.kid(other, kid_subset_size, kid_subsets, seed)
        return {"fd": fd_, "kid_mean": km, "kid_std": ks}

    # -- a resumable state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"n": torch.tensor(self.n), "sum": self.sum, "cov_sum": self.cov_sum, "pending": self._pending}
        if self.keep:
            sd["rows"] = self.features()
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "FeatureStats":
        try:
            st = cls(int(sd["sum"].shape[0]), keep="rows" in sd)
            st.n, st.sum, st.cov_sum = int(sd["n"]), sd["sum"].double().clone(), sd["cov_sum"].double().clone()
            st._pending = sd["pending"].double().clone()
            if st.keep:
                st._rows = [sd["rows"].double().clone()]
            ok = (st.cov_sum.shape == (st.num_features,) * 2 and st._pending.shape[1:] == (st.num_features,)
                  and len(st._pending) < cls.BLOCK and (not st.keep or len(st._rows[0]) == len(st)))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError):
            ok = False
        if not ok:
            raise UserError("feature statistics: not a FeatureStats state (keys n, sum, cov_sum, pending[, rows] "
                            "of matching shapes); delete the file and recompute the features")
        return st

    def save(self, path) -> None:
        atomic_save_tensors(self.state_dict(), Path(path), metadata={"format": STATS_FORMAT})

    @classmethod
    def load(cls, path) -> "FeatureStats":
        return cls.from_state_dict(load_tensors(Path(path)))


def fd_kid(real_images: torch.Tensor, fake_images: torch.Tensor, net, kid_subset_size: int | None = None,
           kid_subsets: int = 100, seed: int = 0) -> tuple[float, float, float]:
    """(FD, KID mean, KID std) between two image sets in [-1, 1], [N, 3, H, W], in `net`'s embedding.
    `kid_subset_size` defaults to min(1000, min(N_real, N_fake) // 2) (100 subsets by default). Tiny negative FD
    from round-off is clipped to 0."""
    m = DistributionMetrics(net, real_images, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed)
    r = m(fake_images)
    return r["fd"], r["kid_mean"], r["kid_std"]


def fd(real_images: torch.Tensor, fake_images: torch.Tensor, net) -> float:
    """FD only (torchmetrics FrechetInceptionDistance with the feature net)."""
    feature = TorchmetricsFeature(net)
    real = as_feature_input(real_images, net.resolution, "reference images")
    fake = as_feature_input(fake_images, net.resolution, "generated images")
    if len(real) < 2 or len(fake) < 2:
        raise UserError("FD needs at least 2 images in each set")
    from torchmetrics.image.fid import FrechetInceptionDistance  # lazy: torchmetrics costs ~3 s to import

    metric = FrechetInceptionDistance(feature=feature)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return max(float(metric.compute()), 0.0)
