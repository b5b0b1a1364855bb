"""Prompt alignment on `shapes`, scored by the attribute classifier (features.py).

Definition (`alignment`): the fraction of captioned objects — over all images, each object counted once —
whose shape, colour AND size are all predicted correctly by the classifier at the object's grid cell. An
object drawn in the wrong cell counts as wrong (its cell reads as empty or as another object). Extra objects
in cells the caption leaves empty and the background are not part of this number; `alignment_report` gives
them separately (`extra_objects`: fraction of captioned-empty cells predicted non-empty; `background`:
fraction of images with the right background; `image`: fraction of images with every object right, no extra
object and the right background).

The classifier's own error bounds the score: real images score ≈ its held-out `object` accuracy
(models/features-shapes/config.json), not 1.0.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..images import as_feature_input


def _check(images, labels, net):
    if getattr(net, "data", None) != "shapes":
        raise UserError("alignment: needs the shapes attribute classifier (models/features-shapes), "
                        f"got a feature net for {getattr(net, 'data', '?')!r}")
    if not labels or not all(k in labels for k in ("shape", "colour", "size", "background")):
        raise UserError("alignment: labels must hold shape, colour, size and background (the shapes dataset's "
                        "Examples.labels)")
    if len(images) != len(labels["shape"]):
        raise UserError(f"alignment: {len(images)} images but {len(labels['shape'])} label rows")


def alignment_report(images: torch.Tensor, labels: dict, net) -> dict[str, float]:
    """Per-attribute agreement between the prompts' labels and the classifier's reading of the images."""
    _check(images, labels, net)
    pred = net.predict(as_feature_input(images, net.resolution))
    obj = labels["shape"] > 0
    sh = pred["shape"] == labels["shape"]
    col = pred["colour"] == labels["colour"]
    size = pred["size"] == labels["size"]
    ok = sh & col & size & obj
    extra = (pred["shape"] > 0) & ~obj
    bg = pred["background"] == labels["background"]
    n_obj = max(int(obj.sum()), 1)
    n_empty = max(int((~obj).sum()), 1)
    return {
        "alignment": ok.sum().item() / n_obj,
        "shape": (sh & obj).sum().item() / n_obj,
        "colour": (col & obj).sum().item() / n_obj,
        "size": (size & obj).sum().item() / n_obj,
        "extra_objects": extra.sum().item() / n_empty,
        "background": bg.float().mean().item(),
        "image": ((ok | ~obj).all(1) & ~extra.any(1) & bg).float().mean().item(),
    }


def alignment(images: torch.Tensor, labels: dict, net) -> float:
    """Fraction of captioned objects whose shape, colour and size are all read correctly at their cell."""
    return alignment_report(images, labels, net)["alignment"]


def alignment_counts(images: torch.Tensor, labels: dict, net) -> tuple[int, int]:
    """(captioned objects read correctly, captioned objects): `alignment` is their ratio, so a streamed eval
    sums the two counts over its batches and divides once (the same number as over all images at once)."""
    _check(images, labels, net)
    pred = net.predict(as_feature_input(images, net.resolution))
    obj = labels["shape"] > 0
    ok = (pred["shape"] == labels["shape"]) & (pred["colour"] == labels["colour"]) & \
        (pred["size"] == labels["size"]) & obj
    return int(ok.sum()), int(obj.sum())
