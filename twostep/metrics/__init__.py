"""Evaluation metrics: FD/KID (through torchmetrics) in a pluggable feature extractor (extractors.py: our
feature nets, the FID Inception-V3, CLIP, DINOv2; `FeatureStats` for features streamed in batches), CLIP score,
multi-scale SWD (weight-free), prompt alignment on `shapes`, PSNR and within-prompt diversity.

The feature-net names (features.py) and the extractor names (extractors.py) are resolved lazily so that
`python -m twostep.metrics.features` does not import its own module twice. Note: the functions `fd`, `swd` and `alignment` shadow the submodules of the same
name as package attributes; import the submodules as `from twostep.metrics.swd import swd_levels` etc.
"""

from importlib import import_module

from .alignment import alignment, alignment_report
from .fd import DistributionMetrics, FeatureStats, TorchmetricsFeature, fd, fd_kid
from .simple import diversity, psnr
from .swd import swd, swd_levels

_LAZY = {"FeatureNet", "load_feature_net", "train_feature_net", "accuracy"}
_LAZY_EXTRACTORS = {"Extractor", "load_extractor", "clip_score", "CLIPScorer", "convert_inception"}

__all__ = sorted(["alignment", "alignment_report", "DistributionMetrics", "FeatureStats", "TorchmetricsFeature",
                  "fd", "fd_kid", "diversity", "psnr", "swd", "swd_levels", *_LAZY, *_LAZY_EXTRACTORS])


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(".features", __name__), name)
    if name in _LAZY_EXTRACTORS:
        return getattr(import_module(".extractors", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
