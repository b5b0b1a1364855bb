"""Pluggable feature extractors for FD / KID (and CLIP score): one interface over our own feature nets, the
standard FID Inception-V3, and CLIP / DINOv2 from a local transformers folder.

`load_extractor(spec, device="cpu") -> Extractor`, where `spec` is
- a feature-net folder (config.json + model.safetensors, `twostep metrics train`): our small CNN; images are
  resized to its resolution (area when shrinking, bilinear when growing: `images.as_feature_input`), exactly as
  `twostep eval` has always done;
- `inception` or `inception:FILE.safetensors`: the FID Inception-V3 of TensorFlow's FID code
  (`pt_inception-2015-12-05`, the network of pytorch-fid, torch-fidelity and torchmetrics' FID), 2048-d pool3
  features. `inception` alone reads `$TWOSTEP_CACHE/inception/pt_inception-2015-12-05.safetensors` (default
  ~/.cache/twostep), downloading and converting the published .pth there the first time when the machine is
  online; offline, convert a downloaded .pth once with `twostep metrics convert-inception`;
- `clip:DIR`: the image tower of a transformers `CLIPModel` folder (its projected image embedding, e.g. 768-d
  for ViT-L/14), as FD_CLIP uses;
- `dinov2:DIR`: a transformers `Dinov2Model` folder, the layer-normed CLS token (1024-d for ViT-L/14), as
  FD_DINOv2 (Stein et al. 2023, dgm-eval) uses.
(A folder literally named `inception` is passed as `./inception`.)

Every extractor takes images in [-1, 1] (or uint8), [N, 3, H, W] at any size and returns float64 [N, D] on the
CPU (`embed`). Preprocessing, stated once per kind (`describe()["resize"]` records it in every eval record):
- Pretrained nets (inception / clip / dinov2) first see the 8-bit image: round((x + 1) · 127.5), as when the
  image is written to a PNG (torch-fidelity and torchmetrics take uint8 images too).
- inception: the 8-bit image resized to 299×299 with TensorFlow 1.x's bilinear resize (align_corners=False, no
  antialiasing: torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`), then (x − 128) / 128 — the
  torch-fidelity / torchmetrics input path, so features match theirs for the same uint8 images and weights.
  Non-square images are squashed to 299×299, as there.
- clip / dinov2: the shorter side resized to S (torch bicubic, antialiased) and the centre S×S crop (S = the
  CLIP tower's image_size; DINOv2: the folder's preprocessor_config.json crop_size, else 224), scaled to
  [0, 1] and normalised with the folder's preprocessor_config.json image_mean/std (defaults: CLIP's OpenAI
  mean/std; ImageNet's for DINOv2). For a square image this is dgm-eval's DINOv2 resize; the transformers image
  processors do the same with PIL's bicubic, so features are close to, not bitwise, theirs.

Weights are read only from safetensors (the Inception .pth is unpickled only by the explicit one-time
`convert_inception`, with `weights_only=True`). A file or folder of the wrong architecture is a one-line
UserError naming what was found and the fix.

`clip_score(images, captions, clip)`: CLIPScore (Hessel et al. 2021, as torchmetrics'): 100 · mean over images
of max(cos(E_image, E_text), 0), with the same CLIP image preprocessing; `CLIPScorer` streams it in batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..images import as_feature_input
from ..io.files import atomic_save_tensors, one_line, sha256_file
from ..io.folders import OutputKind, check_output_path

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")   # the same bytes as torch-fidelity's weights-inception-…
INCEPTION_HASH_PREFIX = "6726825d"   # first hex digits of the .pth's sha256 (torch.hub's file-name convention)
INCEPTION_FILE = "pt_inception-2015-12-05.safetensors"
INCEPTION_FORMAT = "twostep-inception-fid-v1"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINOV2_SIZE = 224

__all__ = ["Extractor", "FeatureNetExtractor", "InceptionExtractor", "CLIPExtractor", "DINOv2Extractor",
           "CLIPScorer", "EmbedStream", "FIDInceptionV3", "load_extractor", "clip_score", "convert_inception",
           "default_inception_file", "resize_bilinear_tf1", "INCEPTION_URL"]


# ---------------------------------------------------------------------------------------------- the interface

class Extractor:
    """Images -> features. Subclasses set `name`, `num_features`, `resize` (the documented preprocessing) and
    implement `_prepare(x)` (checked images in [-1, 1] on `self.device` -> the network's input, resized) and
    `_forward(inputs)` (a batch of prepared inputs -> features).

    Batches: float32 convolutions give results that depend (in the last bits) on which images share a batch,
    so `embed` always runs the network on consecutive blocks of `batch_size` prepared images, and `stream()`
    buffers images across calls so that features streamed in any batch sizes are the bytes `embed` gives for
    the whole set at once."""

    name: str = "?"
    num_features: int = 0
    resize: str = ""
    batch_size: int = 64

    def __init__(self, device="cpu", batch_size: int | None = None):
        self.device = torch.device(device)
        if batch_size is not None:
            self.batch_size = int(batch_size)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The network's input for `images` (the documented resize), on `self.device`."""
        return self._prepare(_check_images(images).to(self.device))

    @torch.no_grad()
    def features_of(self, inputs: torch.Tensor) -> torch.Tensor:
        """float64 CPU features of one batch of prepared inputs."""
        return self._forward(inputs.to(self.device)).double().cpu()

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """float64 [N, num_features] on the CPU for images in [-1, 1] (or uint8), [N, 3, H, W], any H, W; the
        network runs on blocks of `batch_size` (default the extractor's) on `self.device`."""
        bs = int(batch_size or self.batch_size)
        out = [self.features_of(self.prepare(images[i:i + bs])) for i in range(0, len(images), bs)]
        return torch.cat(out) if out else torch.zeros(0, self.num_features, dtype=torch.float64)

    def stream(self) -> "EmbedStream":
        """An EmbedStream: `add(images)` in any batch sizes, then `flush()`; the features equal `embed(all)`."""
        return EmbedStream(self)

    def describe(self) -> dict:
        """What an eval record stores about the extractor (kind, source, sha256 of the weights, resize rule)."""
        return {"name": self.name, "num_features": self.num_features, "resize": self.resize}

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, num_features={self.num_features})"


class EmbedStream:
    """Embeds images given in batches of any size exactly as `extractor.embed` would embed them all at once:
    prepared inputs (the resized network inputs, not the full-size images) are buffered until `batch_size` of
    them are there. `add(images)` returns the features of the blocks it completed (possibly none), `flush()`
    those of the rest; `len(stream)` counts images added. At most batch_size − 1 prepared inputs are held."""

    def __init__(self, extractor: Extractor):
        self.extractor, self.n = extractor, 0
        self._buf: list[torch.Tensor] = []
        self._held = 0

    def __len__(self) -> int:
        return self.n

    def add(self, images: torch.Tensor) -> torch.Tensor:
        ex = self.extractor
        bs = int(ex.batch_size)
        out = []
        for i in range(0, len(images), bs):   # prepare in slices: never more than one batch of full-size images
            p = ex.prepare(images[i:i + bs])
            self.n += len(p)
            self._buf.append(p)
            self._held += len(p)
            if self._held >= bs:
                buf = torch.cat(self._buf)
                whole = len(buf) // bs * bs
                out += [ex.features_of(buf[j:j + bs]) for j in range(0, whole, bs)]
                self._buf, self._held = ([buf[whole:]] if whole < len(buf) else []), len(buf) - whole
        return torch.cat(out) if out else torch.zeros(0, ex.num_features, dtype=torch.float64)

    def flush(self) -> torch.Tensor:
        ex = self.extractor
        if not self._held:
            return torch.zeros(0, ex.num_features, dtype=torch.float64)
        f = ex.features_of(torch.cat(self._buf))
        self._buf, self._held = [], 0
        return f


def _check_images(x) -> torch.Tensor:
    """[N, 3, H, W] floats in [-1, 1] (uint8 accepted and converted); clamped as when saved to 8-bit files."""
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise UserError(f"images: expected a tensor [N, 3, H, W] of images in [-1, 1], got {shape}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    x = x.detach().float()
    if len(x) and x.abs().max() > 10:
        raise UserError(f"images: values up to {x.abs().max():.0f} look like [0, 255] floats; pass images in "
                        "[-1, 1] (or uint8)")
    return x.clamp(-1, 1)


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the 8-bit levels 0..255 (as float32): what a PNG of the image holds (images.to_uint8)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


# ---------------------------------------------------------------------------------------------- our feature nets

class FeatureNetExtractor(Extractor):
    """One of our small CNN feature nets (metrics/features.py); `net` stays reachable for alignment/diversity."""

    batch_size = 128   # as TorchmetricsFeature: the committed eval numbers were embedded in batches of 128

    def __init__(self, net, folder: Path | str | None = None, device="cpu", batch_size: int | None = None):
        super().__init__(device, batch_size)
        self.net = net.to(self.device).eval()
        self.folder = Path(folder) if folder is not None else Path(getattr(net, "folder_config", {}).get("_folder", "?"))
        self.name = f"features:{self.folder.name}"
        self.num_features = int(net.num_features)
        self.resolution = int(net.resolution)
        self.resize = (f"to {self.resolution}x{self.resolution} (area when shrinking, bilinear when growing; "
                       "non-square images squashed)")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        # exactly the path of fd.TorchmetricsFeature (its resize and checks; FeatureNet.embed_images per batch of
        # 128): the bytes the committed eval numbers were computed from
        return as_feature_input(images, self.resolution).to(self.device)

    def _forward(self, inputs):
        return self.net.features(inputs)

    def describe(self) -> dict:
        cfg = getattr(self.net, "folder_config", {}) or {}
        w = self.folder / "model.safetensors"
        return {**super().describe(), "kind": "feature-net", "folder": str(self.folder),
                "data": getattr(self.net, "data", None), "data_version": cfg.get("data_version"),
                "sha256": sha256_file(w) if w.is_file() else None}


# ---------------------------------------------------------------------------------------------- FID Inception-V3

class _Conv(nn.Module):
    """BasicConv2d of torchvision / pytorch-fid / torch-fidelity: conv (no bias) + BatchNorm(eps 1e-3) + ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):   # TensorFlow's average pool ignores the zero padding (pytorch-fid's "Patch")
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _A(nn.Module):   # FIDInceptionA
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = _Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _B(nn.Module):   # InceptionB (unpatched)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _C(nn.Module):   # FIDInceptionC
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = m(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _D(nn.Module):   # InceptionD (unpatched)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _E(nn.Module):   # FIDInceptionE_1 (avg pool without padding) / FIDInceptionE_2 (max pool: TF's graph)
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-V3 (TensorFlow's 2015-12-05 graph as ported by pytorch-fid `fid_inception_v3` and
    torch-fidelity `FeatureExtractorInceptionV3`), with their state-dict keys (`Conv2d_1a_3x3.conv.weight`, …,
    `Mixed_7c.branch_pool.bn.running_var`, `fc.weight` [1008, 2048]). `forward(x)`: x already resized to 299² and
    scaled to [-1, 1] -> the 2048-d pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = _C(768, 128), _C(768, 160), _C(768, 160), _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b, self.Mixed_7c = _E(1280, max_pool=False), _E(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)   # the 1008-way logits (unused for FD; part of the published file)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = m(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear(align_corners=False)`: source coordinate = output index · (in / out), no
    half-pixel offset, no antialiasing; torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` ('slow',
    bit-exact on CPU), which the FID reference code applies before Inception."""
    def axis(n_in):
        g = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = g.long()
        return lo, (lo + 1).clamp_max(n_in - 1), g - lo.float()

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bot = x[:, :, ylo, :], x[:, :, yhi, :]
    a, b, c, d = top[..., xlo], top[..., xhi], bot[..., xlo], bot[..., xhi]
    row0 = a + (b - a) * dx.view(1, 1, 1, size)
    row1 = c + (d - c) * dx.view(1, 1, 1, size)
    return row0 + (row1 - row0) * dy.view(1, 1, size, 1)


def _bad_inception(path, what: str) -> UserError:
    return UserError(f"{path}: not the FID Inception-V3 (pt_inception-2015-12-05) weights: {what}; download "
                     f"{INCEPTION_URL} and convert it with `twostep metrics convert-inception --pth FILE.pth "
                     f"--out FILE.safetensors`")


def _inception_shapes() -> dict[str, torch.Size]:
    """FIDInceptionV3's tensor names and shapes (built on the meta device: no memory, no init), without
    BatchNorm's num_batches_tracked."""
    with torch.device("meta"):
        net = FIDInceptionV3()
    return {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def _inception_state(sd: dict, path) -> dict[str, torch.Tensor]:
    """Check a state dict against FIDInceptionV3's keys and shapes; float32 copy. BatchNorm's
    num_batches_tracked is optional (files from before torch 0.4.1 lack it) and ignored."""
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise _bad_inception(path, "expected a mapping of tensor names to tensors")
    want = _inception_shapes()
    got = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if any(k.startswith("AuxLogits.") for k in got) or (torch.is_tensor(got.get("fc.weight"))
                                                        and got["fc.weight"].shape[0] == 1000):
        raise _bad_inception(path, "these are torchvision's ImageNet Inception-V3 weights (1000 classes / "
                             "AuxLogits), whose features differ from the FID network's")
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        parts = ([f"{len(missing)} tensors missing (first: {missing[0]})"] if missing else []) + \
                ([f"{len(extra)} unexpected (first: {extra[0]})"] if extra else [])
        raise _bad_inception(path, ", ".join(parts))
    for k, shape in want.items():
        if tuple(got[k].shape) != tuple(shape):
            raise _bad_inception(path, f"{k} has shape {tuple(got[k].shape)}, expected {tuple(shape)}")
        if not got[k].is_floating_point():
            raise _bad_inception(path, f"{k} has dtype {got[k].dtype}, expected floats")
    out = {k: got[k].detach().float().contiguous() for k in want}
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise _bad_inception(path, f"{bad[0]} holds NaN/inf")
    return out


def _file_format(path: Path) -> str | None:
    from safetensors import safe_open   # header only
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None


def convert_inception(pth: Path | str, out: Path | str) -> Path:
    """One-time conversion of the published FID Inception .pth (pytorch-fid's pt_inception-2015-12-05-6726825d.pth
    or torch-fidelity's weights-inception-2015-12-05-6726825d.pth, the same tensors) to safetensors. The .pth is
    read with `torch.load(weights_only=True)` (plain tensors only: no code runs); its keys and shapes are checked.
    Returns `out`."""
    pth, out = Path(pth), Path(out)
    if not pth.is_file():
        raise UserError(f"{pth}: not found; download {INCEPTION_URL} and pass its path")
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: must end in .safetensors")
    check_output_path(out, "--out", {"--pth": pth},  # only an earlier conversion is replaced
                      writes=OutputKind("a converted Inception file", lambda p: _file_format(p) == INCEPTION_FORMAT))
    try:
        sd = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle errors of many kinds, a non-weights-only file, a truncated file
        raise _bad_inception(pth, f"unreadable as plain PyTorch weights ({type(e).__name__}: {one_line(e)[:80]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    state = _inception_state(sd, pth)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(state, out, metadata={"format": INCEPTION_FORMAT, "source": pth.name,
                                              "source_sha256": sha256_file(pth)})
    return out


def default_inception_file() -> Path:
    """Where `inception` (no file) looks: $TWOSTEP_CACHE/inception/pt_inception-2015-12-05.safetensors."""
    root = Path(os.environ.get("TWOSTEP_CACHE", Path.home() / ".cache" / "twostep"))
    return root / "inception" / INCEPTION_FILE


def _download_inception(target: Path) -> Path:
    """The usual download (online machines only): the published .pth, its sha256 prefix checked by torch.hub,
    converted to `target` and deleted."""
    tmp = target.with_name("pt_inception-2015-12-05-6726825d.pth.part")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(tmp), hash_prefix=INCEPTION_HASH_PREFIX, progress=True)
        return convert_inception(tmp, target)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"inception: no weights at {target} and the download of {INCEPTION_URL} failed "
                        f"({type(e).__name__}: {one_line(e)[:80]}); on a machine online download that file, run "
                        f"`twostep metrics convert-inception --pth FILE.pth --out {target}`, or pass "
                        "inception:FILE.safetensors") from None
    finally:
        tmp.unlink(missing_ok=True)


class InceptionExtractor(Extractor):
    """FID Inception-V3 pool3 features (2048-d) from a safetensors file in the published key layout."""

    name = "inception"
    num_features = INCEPTION_FEATURES
    batch_size = 50
    resize = ("8-bit image -> 299x299 by TensorFlow-1.x bilinear (align_corners=False, no antialias; "
              "torch-fidelity's), then (x - 128) / 128; non-square images squashed")

    def __init__(self, weights: Path | str, device="cpu", batch_size: int | None = None):
        super().__init__(device, batch_size)
        self.weights = Path(weights)
        from safetensors import safe_open   # the file is read once; no pickle anywhere
        if self.weights.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            raise UserError(f"{self.weights}: a pickled PyTorch file; convert it once with `twostep metrics "
                            f"convert-inception --pth {self.weights} --out FILE.safetensors` and pass "
                            "inception:FILE.safetensors")
        if not self.weights.is_file():
            raise UserError(f"{self.weights}: Inception weights file not found; pass inception:FILE.safetensors "
                            f"(made by `twostep metrics convert-inception` from {INCEPTION_URL})")
        try:
            with safe_open(str(self.weights), "pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise _bad_inception(self.weights, f"unreadable safetensors ({type(e).__name__})") from None
        state = _inception_state(sd, self.weights)
        with torch.device("meta"):   # no random init of 24M parameters that the file replaces anyway
            self.net = FIDInceptionV3()
        self.net.load_state_dict(state, strict=False, assign=True)   # every tensor checked above
        for m in self.net.modules():   # num_batches_tracked (unused in eval mode) is not in every file
            if isinstance(m, nn.BatchNorm2d):
                m.num_batches_tracked = torch.zeros((), dtype=torch.long)
        self.net.to(self.device).eval().requires_grad_(False)

    def _prepare(self, x):
        return (resize_bilinear_tf1(_to_8bit(x), INCEPTION_SIZE) - 128) / 128

    def _forward(self, inputs):
        return self.net(inputs)

    def describe(self) -> dict:
        return {**super().describe(), "kind": "inception", "weights": str(self.weights),
                "sha256": sha256_file(self.weights), "reference": "pt_inception-2015-12-05 (pytorch-fid / "
                "torch-fidelity / torchmetrics FID), pool3"}


# ---------------------------------------------------------------------------------------------- CLIP / DINOv2

def _preprocessor(folder: Path) -> dict:
    p = folder / "preprocessor_config.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{p}: not valid JSON ({type(e).__name__}); fix or delete it") from None
    return d if isinstance(d, dict) else {}


def _stats(pre: dict, key: str, default) -> tuple[float, float, float]:
    v = pre.get(key, default)
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(a, (int, float)) for a in v)):
        raise UserError(f"preprocessor_config.json: {key} {v!r} must be a list of 3 numbers")
    return tuple(float(a) for a in v)


def _resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side -> `size` (bicubic, antialiased), centre crop size×size (the CLIP / DINOv2 processors' rule)."""
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


def _hf_load(cls_name: str, model_type: str, folder: Path, spec: str):
    """A transformers model of `model_type` from a local folder (no download), or a one-line UserError."""
    if not folder.is_dir():
        raise UserError(f"{spec}: {folder} is not a folder; pass {spec.split(':')[0]}:DIR, a transformers folder "
                        "(config.json + model.safetensors, e.g. from save_pretrained)")
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_path}: missing or not JSON ({type(e).__name__}); {folder} is not a transformers "
                        "model folder") from None
    got = cfg.get("model_type") if isinstance(cfg, dict) else None
    if got != model_type:
        raise UserError(f"{folder}: holds a {got!r} model, not {model_type!r}; pass a {cls_name} folder to "
                        f"{spec.split(':')[0]}:DIR")
    if not any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"{folder}: no model.safetensors (only safetensors weights are read); re-save it with "
                        "save_pretrained(safe_serialization=True)")
    import transformers   # lazy: seconds of import time
    from transformers.utils import logging as hf_logging
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()   # no "Loading weights" bar on every eval
    hf_logging.set_verbosity_error()    # no load report (a table of missing keys): what is wrong is said below
    try:
        model, info = getattr(transformers, cls_name).from_pretrained(str(folder), local_files_only=True,
                                                                       use_safetensors=True, output_loading_info=True)
    except Exception as e:   # shape mismatches, truncated files, ...
        raise UserError(f"{folder}: cannot load it as a {cls_name} ({type(e).__name__}: {one_line(e)[:100]})") from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    # transformers fills missing or mis-shaped tensors with a random init and only warns: refuse that here
    for what in ("missing_keys", "mismatched_keys"):
        bad = sorted(str(k) for k in (info.get(what) or []))
        if bad:
            raise UserError(f"{folder}: model.safetensors does not match its config.json as a {cls_name} "
                            f"({len(bad)} {what.replace('_', ' ')}, first: {bad[0][:80]}); re-save the model with "
                            "save_pretrained")
    return model.float().eval().requires_grad_(False)


def _weights_sha256(folder: Path) -> str | None:
    f = folder / "model.safetensors"
    return sha256_file(f) if f.is_file() else None


class _HFImageExtractor(Extractor):
    """A transformers image model's input: 8-bit, shorter side to `size`, centre crop, normalised by its
    mean/std (set by the subclass)."""

    size: int
    mean: torch.Tensor
    std: torch.Tensor

    def _prepare(self, x):
        x = _resize_crop(_to_8bit(x) / 255.0, self.size)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class CLIPExtractor(_HFImageExtractor):
    """CLIP image embedding (visual_projection of the pooled CLS token), the FD_CLIP features."""

    def __init__(self, folder: Path | str, device="cpu", batch_size: int | None = None):
        super().__init__(device, batch_size)
        self.folder = Path(folder)
        self.model = _hf_load("CLIPModel", "clip", self.folder, f"clip:{folder}").to(self.device)
        pre = _preprocessor(self.folder)
        self.size = int(self.model.config.vision_config.image_size)
        self.mean = torch.tensor(_stats(pre, "image_mean", CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(_stats(pre, "image_std", CLIP_STD)).view(1, 3, 1, 1)
        self.name = f"clip:{self.folder.name}"
        self.num_features = int(self.model.config.projection_dim)
        self.resize = (f"8-bit image, shorter side -> {self.size} (bicubic, antialiased), centre crop "
                       f"{self.size}x{self.size}, CLIP mean/std")

    def _forward(self, inputs):
        out = self.model.vision_model(pixel_values=inputs)
        return self.model.visual_projection(out.pooler_output)

    @torch.no_grad()
    def text_features(self, captions: list[str], batch_size: int = 64) -> torch.Tensor:
        """Projected CLIP text embeddings [N, projection_dim] (float64, CPU); captions truncated to the model's
        context (77 tokens for the OpenAI models)."""
        tok = self.tokenizer()
        n_ctx = int(self.model.config.text_config.max_position_embeddings)
        out = []
        for i in range(0, len(captions), batch_size):
            t = tok(list(captions[i:i + batch_size]), padding=True, truncation=True, max_length=n_ctx,
                    return_tensors="pt")
            o = self.model.text_model(input_ids=t["input_ids"].to(self.device),
                                      attention_mask=t["attention_mask"].to(self.device))
            out.append(self.model.text_projection(o.pooler_output).double().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_features, dtype=torch.float64)

    def tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from transformers import AutoTokenizer   # lazy, as above
            try:
                self._tok = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            except Exception as e:
                raise UserError(f"{self.folder}: no usable CLIP tokenizer ({type(e).__name__}: "
                                f"{one_line(e)[:80]}); save the model's tokenizer into the folder "
                                "(tokenizer.save_pretrained)") from None
        return self._tok

    def describe(self) -> dict:
        return {**super().describe(), "kind": "clip", "folder": str(self.folder),
                "sha256": _weights_sha256(self.folder), "features": "visual_projection(pooled CLS)"}


class DINOv2Extractor(_HFImageExtractor):
    """DINOv2 CLS token after the final layer norm (pooler_output), the FD_DINOv2 features."""

    def __init__(self, folder: Path | str, device="cpu", batch_size: int | None = None):
        super().__init__(device, batch_size)
        self.folder = Path(folder)
        self.model = _hf_load("Dinov2Model", "dinov2", self.folder, f"dinov2:{folder}").to(self.device)
        pre = _preprocessor(self.folder)
        crop = pre.get("crop_size", DINOV2_SIZE)
        crop = crop.get("height", DINOV2_SIZE) if isinstance(crop, dict) else crop
        if not isinstance(crop, int) or crop < 1:
            raise UserError(f"{self.folder / 'preprocessor_config.json'}: crop_size {crop!r} must be a positive int")
        self.size = int(crop)
        self.mean = torch.tensor(_stats(pre, "image_mean", IMAGENET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(_stats(pre, "image_std", IMAGENET_STD)).view(1, 3, 1, 1)
        self.name = f"dinov2:{self.folder.name}"
        self.num_features = int(self.model.config.hidden_size)
        self.resize = (f"8-bit image, shorter side -> {self.size} (bicubic, antialiased), centre crop "
                       f"{self.size}x{self.size}, ImageNet mean/std")

    def _forward(self, inputs):
        return self.model(pixel_values=inputs).pooler_output

    def describe(self) -> dict:
        return {**super().describe(), "kind": "dinov2", "folder": str(self.folder),
                "sha256": _weights_sha256(self.folder), "features": "CLS token after the final layernorm"}


# ---------------------------------------------------------------------------------------------- the loader

def load_extractor(spec: str, device="cpu", batch_size: int | None = None) -> Extractor:
    """`spec`: a feature-net folder | `inception` | `inception:FILE.safetensors` | `clip:DIR` | `dinov2:DIR`
    (see the module docstring). The network is frozen, in eval mode, on `device` (float32)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("extractor: empty spec; pass a feature-net folder, inception, inception:FILE.safetensors, "
                        "clip:DIR or dinov2:DIR")
    kind, sep, rest = spec.partition(":")
    if spec == "inception":
        f = default_inception_file()
        return InceptionExtractor(f if f.is_file() else _download_inception(f), device, batch_size)
    if sep and kind in ("inception", "clip", "dinov2"):
        if not rest:
            raise UserError(f"extractor {spec!r}: name the file or folder after '{kind}:'")
        cls = {"inception": InceptionExtractor, "clip": CLIPExtractor, "dinov2": DINOv2Extractor}[kind]
        return cls(Path(rest).expanduser(), device, batch_size)
    p = Path(spec).expanduser()
    if not p.exists():
        raise UserError(f"extractor {spec!r}: no such feature-net folder, and not inception, "
                        "inception:FILE.safetensors, clip:DIR or dinov2:DIR")
    # lazy: metrics/__init__ resolves features.py lazily so `python -m twostep.metrics.features` imports it once
    from .features import load_feature_net
    return FeatureNetExtractor(load_feature_net(p), p, device, batch_size)


# ---------------------------------------------------------------------------------------------- CLIP score

class CLIPScorer:
    """Streamed CLIPScore: `update(images, captions)` per batch, `compute()` -> 100 · mean max(cos, 0)
    (Hessel et al. 2021; torchmetrics' CLIPScore definition). Accepts a `clip:DIR` folder or a CLIPExtractor
    (reusing the model that computes FD_CLIP)."""

    def __init__(self, clip, device="cpu"):
        self.clip = clip if isinstance(clip, CLIPExtractor) else CLIPExtractor(Path(str(clip).removeprefix("clip:")), device)
        self.total, self.n = 0.0, 0

    def scores(self, images: torch.Tensor, captions) -> torch.Tensor:
        """Per-image 100 · max(cos, 0) (float64)."""
        captions = list(captions)
        if not torch.is_tensor(images) or len(images) != len(captions):
            raise UserError(f"clip score: {len(images) if torch.is_tensor(images) else '?'} images but "
                            f"{len(captions)} captions")
        if not all(isinstance(c, str) for c in captions):
            raise UserError("clip score: captions must be strings")
        img = F.normalize(self.clip.embed(images), dim=-1)
        txt = F.normalize(self.clip.text_features(captions), dim=-1)
        return 100 * (img * txt).sum(-1).clamp_min(0)

    def update(self, images: torch.Tensor, captions) -> None:
        s = self.scores(images, captions)
        self.total += float(s.sum())
        self.n += len(s)

    def compute(self) -> float:
        if not self.n:
            raise UserError("clip score: no images were scored")
        return self.total / self.n


def clip_score(images: torch.Tensor, captions, clip, device="cpu") -> float:
    """CLIPScore of images (in [-1, 1]) against their captions: 100 · mean max(cos(E_I, E_T), 0). `clip`: a
    `clip:DIR` / DIR string or a CLIPExtractor."""
    s = CLIPScorer(clip, device)
    s.update(images, captions)
    return s.compute()
