"""Fréchet distance (FD) and kernel distance (KID) in the embedding of a benchmark's own feature network,
computed by torchmetrics' `FrechetInceptionDistance` / `KernelInceptionDistance` with a custom `feature=`
module (no Inception weights exist offline; see features.py).

Units: FD is the squared Fréchet distance between Gaussians fitted to the `num_features`-d embeddings (same
formula as FID, but NOT comparable to published FID numbers). KID is the unbiased MMD² with the cubic
polynomial kernel k(x, y) = (xᵀy / d + 1)³, mean and std over random subsets (as torchmetrics / Bińkowski et
al.). Statistics are accumulated in float64 (the wrapper hands torchmetrics float64 features, so the result is
float64 too). FD is biased upward for small sample sizes; compare numbers only at equal set sizes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..errors import UserError
from ..images import as_feature_input


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
