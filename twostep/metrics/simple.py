"""Small image metrics: PSNR between paired images and within-prompt diversity."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..errors import UserError
from ..images import as_feature_input


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR in dB, for images in [-1, 1] (peak-to-peak 2):
    10·log10(2² / MSE). An identical pair has PSNR = inf, so the mean is inf if any pair is identical."""
    if not torch.is_tensor(a) or not torch.is_tensor(b) or a.shape != b.shape or a.dim() < 2:
        raise UserError(f"psnr: expected two image tensors of equal shape [N, ...], got "
                        f"{tuple(a.shape) if torch.is_tensor(a) else a!r} and {tuple(b.shape) if torch.is_tensor(b) else b!r}")
    vals = psnr_values(a, b)
    return sum(vals) / len(vals)


def psnr_values(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """The per-image PSNRs (dB) that `psnr` averages, in order: a streamed eval sums them batch by batch."""
    mse = (a.detach().cpu().double() - b.detach().cpu().double()).pow(2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10 * math.log10(4.0 / m) for m in mse.tolist()]


def diversity(images: torch.Tensor, group_ids, net=None, space: str = "features") -> float:
    """Mean pairwise distance among samples of the same prompt.

    `group_ids`: one id per image (caption strings or ints); images sharing an id are samples of one prompt.
    For each group with ≥ 2 samples, the mean L2 distance over all unordered pairs; the result is the mean over
    those groups. `space="features"` (default) measures in the feature net's embedding (the FD features —
    weight-free LPIPS is not available offline), so 0 means mode collapse and larger means more varied;
    values are only comparable with the same feature net. `space="pixels"` uses the RMS pixel distance in
    [-1, 1] units instead (no net needed).
    """
    if len(group_ids) != len(images):
        raise UserError(f"diversity: {len(images)} images but {len(group_ids)} group ids")
    if space == "features":
        if net is None:
            raise UserError("diversity: space='features' needs the benchmark's feature net (load_feature_net)")
        emb = net.embed_images(as_feature_input(images, net.resolution)).double()
    elif space == "pixels":
        emb = images.detach().cpu().double().flatten(1) / math.sqrt(images[0].numel())
    else:
        raise UserError(f"diversity: space {space!r} is not 'features' or 'pixels'")
    return feature_diversity(emb, group_ids)


def feature_diversity(emb: torch.Tensor, group_ids) -> float:
    """`diversity` from embeddings already computed ([N, D], one row per image; e.g. an extractor's features
    of a streamed eval): the mean over prompts with >= 2 samples of their mean pairwise L2 distance."""
    if len(group_ids) != len(emb):
        raise UserError(f"diversity: {len(emb)} embeddings but {len(group_ids)} group ids")
    emb = emb.double()
    groups = defaultdict(list)
    for i, gid in enumerate(group_ids):
        groups[gid.item() if torch.is_tensor(gid) else gid].append(i)
    per_group = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        e = emb[idx]
        d = torch.cdist(e, e)
        k = len(idx)
        per_group.append((d.sum() / (k * (k - 1))).item())
    if not per_group:
        raise UserError("diversity: no prompt has 2 or more samples; generate several samples per prompt")
    return sum(per_group) / len(per_group)
