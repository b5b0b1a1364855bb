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
from .teacher.pipeline_folder import PipelineParts, load_pipeline_backbone
from .text import get_encoder


def default_sampling(config: dict) -> dict:
    """A teacher config's default sampling (steps, shift, guidance); 8 steps at the default shift, no CFG when
    the config names none."""
    return config.get("sampling", {"steps": 8, "shift": flow.DEFAULT_SHIFT, "guidance": 0.0})


def num_parameters(params) -> int:
    return sum(p.numel() for p in params)


class SampleSpace:
    """Where a model's samples live, from its config (`config.json`) and `parts` (a ZImagePipeline teacher's
    text encoder and VAE, loaded lazily; None for a pixel-space MiniLM model)."""

    config: dict
    parts: PipelineParts | None

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    @property
    def image_resolution(self) -> int:
        """Side of the decoded images (= resolution for a pixel-space model)."""
        return int(self.config.get("image_resolution", self.config["resolution"]))

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
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn(n, self.channels, self.resolution, self.resolution, generator=g)


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


def load_teacher(folder: Path) -> Teacher:
    folder = Path(folder)
    cfg = read_config(folder)
    if cfg.get("pipeline"):  # a ZImagePipeline folder: the transformer now, text encoder / VAE at first use
        bb = load_pipeline_backbone(folder)
        bb.requires_grad_(False).eval()
        return Teacher(bb, cfg, folder, PipelineParts(folder, cfg))
    if "transformer" not in cfg:
        raise UserError(f"{folder / CONFIG}: has no 'transformer' section; not a twostep teacher folder")
    check_teacher_config(cfg, folder / CONFIG)
    bb = load_backbone(cfg["transformer"], folder / WEIGHTS)
    bb.requires_grad_(False).eval()
    return Teacher(bb, cfg, folder)


def check_teacher_config(cfg: dict, where: Path) -> None:
    """A twostep teacher folder's config.json fields besides `transformer` (backbones.zimage checks that one
    against the weights): `resolution` an integer >= 1, `sampling` (when given) a mapping with integer `steps`
    >= 1, finite `guidance` >= 0 and `shift` > 0. One UserError naming the field."""
    fix = "restore the folder's original config.json"

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    r = cfg.get("resolution")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise UserError(f"{where}: resolution {r!r} must be an integer >= 1; {fix}")
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


def check_pair(model_cfg: dict, teacher_dir: Path, role: str = "--teacher"):
    """A student (or another teacher) compared against a teacher must share its sample space: resolution,
    channels and caption-feature dimension. Otherwise PSNR/speed/reference comparisons are meaningless."""
    t = read_config(Path(teacher_dir))
    pairs = [("resolution", model_cfg.get("resolution"), t.get("resolution")),
             ("channels", model_cfg["transformer"].get("in_channels"), t["transformer"].get("in_channels")),
             ("caption dim", model_cfg["transformer"].get("cap_feat_dim"), t["transformer"].get("cap_feat_dim"))]
    for name, a, b in pairs:
        if a != b:
            hint = f" ({model_cfg['teacher']})" if model_cfg.get("teacher") else ""
            raise UserError(f"{role} {teacher_dir}: does not match the model ({name}: model {a}, teacher {b}); "
                            f"pass the teacher the model was distilled from{hint}")
