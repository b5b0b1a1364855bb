"""A model folder's sample space and the teacher.

`SampleSpace` is the one encode / decode / noise of every model and generator (teacher, samplers, students):
where samples live (resolution, channels), how captions become text features (MiniLM, or a ZImagePipeline's
own text encoder in `parts`) and how samples become images (identity, or the pipeline's VAE). `Teacher` is a
loaded teacher folder (twostep or ZImagePipeline) sampled with an Euler grid; twostep.sampling wraps it and
the student behind one Generator interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import flow
from .backbones.zimage import ZImageBackbone, load_backbone
from .config import COUNT, NON_NEGATIVE, POSITIVE
from .errors import UserError
from .io.folders import CONFIG, WEIGHTS, read_config
from .io.pipeline_format import size_fields  # noqa: F401  (the size rule, here beside sample_hw / image_hw)
from .teacher.pipeline_folder import PipelineParts, load_pipeline_backbone
from .text import get_encoder


def default_sampling(config: dict) -> dict:
    """A teacher config's default sampling (steps, shift, guidance); 8 steps at the default shift, no CFG when
    the config names none."""
    return config.get("sampling", {"steps": 8, "shift": flow.DEFAULT_SHIFT, "guidance": 0.0})


def num_parameters(params) -> int:
    return sum(p.numel() for p in params)


SIZE_KEYS = ("height", "width", "image_height", "image_width")  # written only for non-square models


def sample_hw(config: dict) -> tuple[int, int]:
    """(height, width) of a model config's sample grid (pixels, or latents of a ZImagePipeline teacher): its
    `height` and `width` (any aspect ratio), else the square `resolution`."""
    if "height" in config or "width" in config:
        return int(config["height"]), int(config["width"])
    r = int(config["resolution"])
    return r, r


def image_hw(config: dict) -> tuple[int, int]:
    """(height, width) of a model's decoded images: `image_height`/`image_width`, else the square
    `image_resolution` (a latent model), else the sample grid (a pixel model: the same)."""
    if "image_height" in config or "image_width" in config:
        return int(config["image_height"]), int(config["image_width"])
    if "image_resolution" in config:
        r = int(config["image_resolution"])
        return r, r
    return sample_hw(config)


class SampleSpace:
    """Where a model's samples live, from its config (`config.json`) and `parts` (a ZImagePipeline teacher's
    text encoder and VAE, loaded lazily; None for a pixel-space MiniLM model).

    Samples are [C, height, width] (`sample_hw`: any aspect ratio); `resolution` is the square alias and refuses a
    non-square model, so code that needs both sides never reads one side twice."""

    config: dict
    parts: PipelineParts | None

    @property
    def height(self) -> int:
        return sample_hw(self.config)[0]

    @property
    def width(self) -> int:
        return sample_hw(self.config)[1]

    @property
    def image_height(self) -> int:
        return image_hw(self.config)[0]

    @property
    def image_width(self) -> int:
        return image_hw(self.config)[1]

    @staticmethod
    def _square(h: int, w: int, what: str) -> int:
        if h != w:
            raise UserError(f"this model makes {h}x{w} (height x width) {what}; this command supports square "
                            "models only (read height/width)")
        return h

    @property
    def resolution(self) -> int:
        """The side of a square model's samples (height == width)."""
        return self._square(self.height, self.width, "samples")

    @property
    def image_resolution(self) -> int:
        """Side of the decoded images of a square model (= resolution for a pixel-space model)."""
        return self._square(self.image_height, self.image_width, "images")

    @property
    def channels(self) -> int:
        return int(self.config["transformer"]["in_channels"])

    def encode(self, prompts):
        return self.parts.encode(prompts) if self.parts is not None else get_encoder().encode(prompts)

    def null_text(self, n: int):
        return self.encode([""] * n)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples → images in [-1, 1]: the VAE for a latent model, the identity for a pixel one."""
        return self.parts.decode(x) if self.parts is not None else x

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """[n, C, height, width] standard normal noise from a generator seeded by `seed` (square: as always)."""
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(n, self.channels, self.height, self.width, generator=g)


@dataclass
class Teacher(SampleSpace):
    """A flow model sampled with an Euler grid; default sampling (steps, shift, guidance) from its config.

    Pixel space with MiniLM text (a twostep teacher folder), or latent space with the pipeline's own text encoder
    and VAE in `parts` (a ZImagePipeline folder; loaded lazily). `decode` maps samples to images in [-1, 1].
    """

    backbone: ZImageBackbone
    config: dict
    folder: Path | None = None
    parts: PipelineParts | None = None  # a pipeline teacher's text encoder and VAE

    @property
    def sampling(self) -> dict:
        return default_sampling(self.config)

    @torch.no_grad()
    def sample(self, text, noise: torch.Tensor, steps: int | None = None, guidance: float | None = None,
               shift: float | None = None, return_trajectory: bool = False) -> flow.SampleResult:
        s = self.sampling
        steps = int(COUNT.check(s["steps"] if steps is None else steps, "steps"))
        # a NaN guidance must never reach torch (NaN images crash oneMKL's LAPACK in FD's matrix square root)
        guidance = float(NON_NEGATIVE.check(s["guidance"] if guidance is None else guidance, "guidance"))
        shift = float(POSITIVE.check(s.get("shift", flow.DEFAULT_SHIFT) if shift is None else shift, "shift"))
        sig = flow.sigma_grid(steps, shift)
        neg = self.null_text(noise.shape[0]) if guidance != 0 else None
        self.backbone.eval()
        return flow.sample_euler(self.backbone.denoise, noise, text, sig, guidance=guidance, neg_text=neg,
                                 return_trajectory=return_trajectory)


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(name: str, device) -> torch.dtype:
    """A --dtype (auto | bf16 | fp16 | fp32) for `device`: auto = bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return COMPUTE_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in COMPUTE_DTYPES.items() if v == dtype)


def place_weights(module, parts, device, dtype: torch.dtype) -> None:
    """A transformer (or a student's) on `device` in `dtype`, and a ZImagePipeline model's text encoder with it.
    The samplers keep fp32 states and Euler updates: ZImageBackbone.raw_output casts its inputs to the weights'
    dtype and its output back (t stays fp32), as ZImagePipeline runs a bf16 transformer."""
    module.to(device, dtype)
    if parts is not None:
        parts.place(device, dtype)


def load_teacher(folder: Path, dtype: torch.dtype | None = None) -> Teacher:
    """A teacher folder or ZImagePipeline folder, frozen. `dtype` (default fp32) is the dtype its transformer is
    read in, each tensor cast as it is loaded: a 6B bf16 pipeline read as bf16 takes 12 GB of host memory instead
    of 25 GB per process."""
    folder = Path(folder)
    cfg = read_config(folder)
    if cfg.get("pipeline"):  # a ZImagePipeline folder: the transformer now, text encoder / VAE at first use
        bb = load_pipeline_backbone(folder, dtype or torch.float32)
        bb.requires_grad_(False).eval()
        return Teacher(bb, cfg, folder, PipelineParts(folder, cfg))
    if "transformer" not in cfg:
        raise UserError(f"{folder / CONFIG}: has no 'transformer' section; not a twostep teacher folder")
    check_teacher_config(cfg, folder / CONFIG)
    bb = load_backbone(cfg["transformer"], folder / WEIGHTS, dtype)
    bb.requires_grad_(False).eval()
    return Teacher(bb, cfg, folder)


def check_teacher_config(cfg: dict, where: Path) -> None:
    """A twostep teacher folder's config.json fields besides `transformer` (backbones.zimage checks that one
    against the weights): `resolution` an integer >= 1 (or `height` and `width`: check_size_fields), `sampling` (when given) a mapping with integer `steps`
    >= 1, finite `guidance` >= 0 and `shift` > 0. One UserError naming the field."""
    fix = "restore the folder's original config.json"

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    check_size_fields(cfg, where, fix)
    s = cfg.get("sampling", {})
    if not isinstance(s, dict):
        raise UserError(f"{where}: sampling must be a mapping (steps, shift, guidance), got {type(s).__name__}; {fix}")
    checks = {"steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
              "guidance": lambda v: number(v) and v >= 0, "shift": lambda v: number(v) and v > 0}
    wants = {"steps": "an integer >= 1", "guidance": "a finite number >= 0", "shift": "a finite number > 0"}
    for k, ok in checks.items():
        if k in s and not ok(s[k]):
            raise UserError(f"{where}: sampling.{k} {s[k]!r} must be {wants[k]}; {fix}")


def batched(n: int, bs: int):
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


def check_size_fields(cfg: dict, where, fix: str) -> None:
    """A model config's sample size: the square `resolution` (an integer >= 1), or (any aspect ratio) `height` and
    `width` instead, both integers >= 1 and, when the transformer section names a patch size, multiples of it.
    One UserError naming the field."""
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if "height" in cfg or "width" in cfg:
        if "resolution" in cfg:
            raise UserError(f"{where}: gives both resolution and height/width; keep resolution (square) or "
                            f"height and width; {fix}")
        tr = cfg.get("transformer") if isinstance(cfg.get("transformer"), dict) else {}
        ps = tr.get("all_patch_size")
        patch = ps[0] if isinstance(ps, list) and ps and count(ps[0]) else 1
        for k in ("height", "width"):
            v = cfg.get(k)
            if not count(v):
                raise UserError(f"{where}: {k} {v!r} must be an integer >= 1; {fix}")
            if v % patch:
                raise UserError(f"{where}: {k} {v} is not a multiple of the transformer's patch size {patch}; {fix}")
        return
    r = cfg.get("resolution")
    if not count(r):
        raise UserError(f"{where}: resolution {r!r} must be an integer >= 1; {fix}")


def check_pair(model_cfg: dict, teacher_dir: Path, role: str = "--teacher"):
    """A student (or another teacher) compared against a teacher must share its sample space: sample size
    (height × width), channels and caption-feature dimension. Otherwise PSNR/speed/reference comparisons are
    meaningless."""
    t = read_config(Path(teacher_dir))

    def size(c):
        try:
            h, w = sample_hw(c)
        except (KeyError, TypeError, ValueError):  # a field missing or malformed: compared as it stands
            return c.get("resolution")
        return h if h == w else f"{h}x{w}"

    pairs = [("resolution", size(model_cfg), size(t)),
             ("channels", model_cfg["transformer"].get("in_channels"), t["transformer"].get("in_channels")),
             ("caption dim", model_cfg["transformer"].get("cap_feat_dim"), t["transformer"].get("cap_feat_dim"))]
    for name, a, b in pairs:
        if a != b:
            hint = f" ({model_cfg['teacher']})" if model_cfg.get("teacher") else ""
            raise UserError(f"{role} {teacher_dir}: does not match the model ({name}: model {a}, teacher {b}); "
                            f"pass the teacher the model was distilled from{hint}")
