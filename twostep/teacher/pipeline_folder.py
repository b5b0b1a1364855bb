"""A diffusers `ZImagePipeline` folder (as `save_pretrained` writes it) used as a twostep teacher.

Detected by its `model_index.json`. Components: tokenizer + text_encoder (Qwen3Model), vae (AutoencoderKL),
transformer (ZImageTransformer2DModel), scheduler (FlowMatchEulerDiscreteScheduler).

- The teacher works in the VAE's latent space: channels = the transformer's `in_channels` (16), resolution =
  the latent side. Its transformer is wrapped by the ordinary `ZImageBackbone` adapter (same conventions as
  ZImagePipeline: t = 1 − σ, u = x0 − ε).
- Text features are ZImagePipeline's own: diffusers' `ZImagePipeline.encode_prompt` is called (chat template,
  Qwen3 `hidden_states[-2]`, padded to max_sequence_length = 512, valid tokens only), so they are identical
  to what the pipeline feeds its transformer.
- Images: `decode(latents)` = `vae.decode(latents / scaling_factor + shift_factor)`, clamped to [-1, 1].
- What is loaded when: `load_teacher` loads only the transformer; the tokenizer + text encoder load at the
  first `encode`, the VAE at the first `decode`. `twostep distill` (which reads text features and latents from
  the teacher cache) therefore never loads either (a DMD2 run with CFG loads the text encoder once for "").
- Image size: `image_size` in an optional `twostep.json` next to model_index.json, else the VAE's
  `sample_size` (1024 for Z-Image, = ZImagePipeline's default height/width), else 1024. Latent side =
  image_size / 2^(len(vae.block_out_channels) − 1), as in the pipeline; the image size must be a multiple of
  twice that factor.
- Default sampling: 8 steps, no CFG (Z-Image-Turbo's setting); `twostep.json` may set
  {"sampling": {"steps": N, "guidance": g}}. The shift comes from the scheduler config (its static `shift`,
  or exp(mu) of the pipeline's resolution-dependent mu when `use_dynamic_shifting` is on).

`twostep.json` (optional; `twostep teacher tune-guidance` writes sampling.guidance there):
    {"image_size": 256, "sampling": {"steps": 8, "guidance": 0.0}}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from ..errors import UserError

MODEL_INDEX = "model_index.json"
SIDECAR = "twostep.json"
FORMAT = "diffusers-zimage-pipeline"
DEFAULT_IMAGE_SIZE = 1024
DEFAULT_STEPS = 8
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default
WEIGHT_SUFFIXES = (".safetensors",)  # never .bin: that is a pickle, and twostep never unpickles

# component -> (files of which one must exist, needs weights)
COMPONENTS = {
    "tokenizer": (("tokenizer_config.json", "tokenizer.json"), False),
    "text_encoder": (("config.json",), True),
    "vae": (("config.json",), True),
    "transformer": (("config.json",), True),
    "scheduler": (("scheduler_config.json",), False),
}


def is_pipeline_folder(folder) -> bool:
    return (Path(folder) / MODEL_INDEX).is_file()


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: unreadable or invalid JSON ({type(e).__name__}); restore the file from the original "
                        "pipeline")
    if not isinstance(d, dict):
        raise UserError(f"{p}: expected a JSON object; restore the file from the original pipeline")
    return d


def _missing(folder: Path, name: str, what: str) -> UserError:
    return UserError(f"{folder}: ZImagePipeline folder is missing its {name} component ({what}); save the whole "
                     f"pipeline with ZImagePipeline.save_pretrained or copy the {name}/ folder of the original model "
                     "into it")


def _weight_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def check_pipeline_folder(folder: Path) -> dict:
    """Every component present (listed in model_index.json, its folder with its config, and weights where it has
    any); returns model_index.json. A missing piece is a UserError naming the component and the fix."""
    folder = Path(folder)
    index = _read_json(folder / MODEL_INDEX)
    cls = index.get("_class_name", "ZImagePipeline")
    if cls != "ZImagePipeline":
        raise UserError(f"{folder / MODEL_INDEX}: describes a {cls}, not a ZImagePipeline; a pipeline teacher must be "
                        "a ZImagePipeline folder (as ZImagePipeline.save_pretrained writes it)")
    for name, (files, weighted) in COMPONENTS.items():
        entry = index.get(name)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            raise _missing(folder, name, f"{MODEL_INDEX} lists no {name}")
        d = folder / name
        if not d.is_dir():
            raise _missing(folder, name, f"{d} not found")
        if not any((d / f).is_file() for f in files):
            raise _missing(folder, name, f"{d / files[0]} not found")
        if weighted and not _weight_files(d):
            raise _missing(folder, name, f"no *.safetensors weights in {d}; .bin (pickle) weights are never loaded: convert them to safetensors")
    if index["transformer"][1] != "ZImageTransformer2DModel":
        raise UserError(f"{folder / MODEL_INDEX}: transformer is {index['transformer'][1]}, not a "
                        "ZImageTransformer2DModel; twostep distills Z-Image pipelines only")
    return index


def _sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + Path(p).read_bytes() + b"\0")
    return h.hexdigest()


def transformer_weights_sha256(folder: Path) -> str:
    """One sha256 over the transformer's weight files (name + content, sorted by name)."""
    from .cache import file_sha256

    h = hashlib.sha256()
    for p in _weight_files(Path(folder) / "transformer"):
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _init_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def scheduler_shift(sched: dict, latent_side: int, path: Path) -> float:
    """The σ-grid shift ZImagePipeline's scheduler applies at this latent size (see twostep.flow.shift_sigma)."""
    bad = [k for k in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                       "stochastic_sampling", "shift_terminal") if sched.get(k)]
    if bad:
        raise UserError(f"{path}: scheduler option {bad[0]} is not supported (twostep samples the plain shifted "
                        "Euler grid of Z-Image); set it to false/null in a copy of the pipeline")
    if not sched.get("use_dynamic_shifting"):
        return float(sched.get("shift", 1.0))
    # ZImagePipeline: mu = calculate_shift(image_seq_len); time_shift(mu, 1, σ) is shift_sigma with shift exp(mu)
    # (exponential) or mu (linear)
    seq = (latent_side // 2) ** 2
    b0, b1 = sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096)
    s0, s1 = sched.get("base_shift", 0.5), sched.get("max_shift", 1.15)
    m = (s1 - s0) / (b1 - b0)
    mu = seq * m + (s0 - m * b0)
    return float(math.exp(mu) if sched.get("time_shift_type", "exponential") == "exponential" else mu)


def pipeline_config(folder: Path) -> dict:
    """The twostep teacher config of a ZImagePipeline folder (read from its JSON files only; nothing loaded)."""
    folder = Path(folder)
    index = check_pipeline_folder(folder)
    tr = _read_json(folder / "transformer" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    te = _read_json(folder / "text_encoder" / "config.json")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    side = _read_json(folder / SIDECAR) if (folder / SIDECAR).is_file() else {}
    tcfg = _init_kwargs(tr)
    try:
        vsf = 2 ** (len(vae["block_out_channels"]) - 1)
        latent_ch, in_ch = int(vae["latent_channels"]), int(tcfg["in_channels"])
        cap_dim, hidden = int(tcfg["cap_feat_dim"]), int(te["hidden_size"])
        patch = int(tcfg["all_patch_size"][0])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{folder}: component configs lack a field twostep needs ({type(e).__name__}: {e}); "
                        "restore the pipeline's config.json files")
    if latent_ch != in_ch:
        raise UserError(f"{folder}: vae latent_channels {latent_ch} != transformer in_channels {in_ch}; the "
                        "components come from different models")
    if cap_dim != hidden:
        raise UserError(f"{folder}: transformer cap_feat_dim {cap_dim} != text_encoder hidden_size {hidden}; the "
                        "components come from different models")
    size = side.get("image_size", vae.get("sample_size") if isinstance(vae.get("sample_size"), int) else None)
    size = int(size or DEFAULT_IMAGE_SIZE)
    where = f"{folder / SIDECAR} image_size" if "image_size" in side else f"{folder}/vae/config.json sample_size"
    if size < 2 * vsf or size % (2 * vsf):
        raise UserError(f"{where} = {size}: must be a positive multiple of {2 * vsf} (twice the VAE's scale "
                        f"factor); set image_size in {folder / SIDECAR}")
    latent = 2 * (size // (2 * vsf))
    if latent % patch:
        raise UserError(f"{where} = {size}: latent side {latent} is not a multiple of the patch size {patch}; "
                        f"set another image_size in {folder / SIDECAR}")
    s = side.get("sampling", {}) or {}
    sampling = {"steps": int(s.get("steps", DEFAULT_STEPS)),
                "shift": scheduler_shift(sched, latent, folder / "scheduler" / "scheduler_config.json"),
                "guidance": float(s.get("guidance", 0.0))}
    tok_files = sorted(p for p in (folder / "tokenizer").iterdir() if p.is_file())
    te_w = _weight_files(folder / "text_encoder")
    vae_w = _weight_files(folder / "vae")
    cfg = {
        "kind": "teacher", "backbone": "zimage", "format": FORMAT, "pipeline": str(folder.resolve()),
        "transformer": tcfg, "resolution": latent, "image_resolution": size, "data": side.get("data"),
        "text_encoder": {"name": f"ZImagePipeline text_encoder ({index['text_encoder'][1]}, hidden_states[-2])",
                         "max_sequence_length": MAX_SEQUENCE_LENGTH,
                         "config_sha256": _sha256_files([folder / "text_encoder" / "config.json"]),
                         "tokenizer_sha256": _sha256_files(tok_files),
                         "weights_bytes": sum(p.stat().st_size for p in te_w)},
        "vae": {"class": index["vae"][1], "scale_factor": vsf,
                "scaling_factor": float(vae.get("scaling_factor", 1.0)),
                "shift_factor": float(vae.get("shift_factor") or 0.0),
                "config_sha256": _sha256_files([folder / "vae" / "config.json"]),
                "weights_bytes": sum(p.stat().st_size for p in vae_w)},
        "sampling": sampling,
    }
    for k in ("guidance_tuned", "num_parameters"):
        if k in side:
            cfg[k] = side[k]
    return cfg


def save_sidecar(folder: Path, config: dict):
    """Persist twostep's own settings of a pipeline teacher (sampling, guidance tuning) in twostep.json."""
    from ..ckpt import atomic_write_text

    folder = Path(folder)
    side = _read_json(folder / SIDECAR) if (folder / SIDECAR).is_file() else {}
    side["sampling"] = {k: config["sampling"][k] for k in ("steps", "guidance")}
    for k in ("guidance_tuned", "num_parameters"):
        if k in config:
            side[k] = config[k]
    atomic_write_text(folder / SIDECAR, json.dumps(side, indent=1))


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _load(folder: Path, name: str, fn):
    try:
        return fn()
    except UserError:
        raise
    except Exception as e:  # diffusers / transformers / safetensors raise many types for bad files
        msg = " ".join(str(e).split())[:160]
        raise UserError(f"{folder / name}: cannot load the {name} component ({type(e).__name__}: {msg}); restore it "
                        "from the original pipeline")


def load_pipeline_backbone(folder: Path):
    """The transformer only, wrapped by the ordinary ZImageBackbone adapter (float32, frozen)."""
    from diffusers import ZImageTransformer2DModel

    from ..backbones.zimage import ZImageBackbone

    _quiet()
    folder = Path(folder)
    tr = _load(folder, "transformer", lambda: ZImageTransformer2DModel.from_pretrained(
        str(folder), subfolder="transformer", dtype=torch.float32, use_safetensors=True))
    return ZImageBackbone(tr)


class PipelineParts:
    """The pipeline's text side (tokenizer + text encoder) and VAE, each loaded at its first use."""

    def __init__(self, folder: Path, config: dict | None = None, batch_size: int = 16):
        self.folder = Path(folder)
        self.config = config if config is not None else pipeline_config(self.folder)
        self.batch_size = batch_size
        self.text_pipe = None   # a ZImagePipeline holding tokenizer, text_encoder and scheduler only
        self.vae = None
        self._null: torch.Tensor | None = None

    @property
    def loaded(self) -> set[str]:
        return ({"text_encoder"} if self.text_pipe is not None else set()) | ({"vae"} if self.vae is not None else set())

    def _text(self):
        if self.text_pipe is None:
            from diffusers import ZImagePipeline

            _quiet()
            self.text_pipe = _load(self.folder, "text_encoder", lambda: ZImagePipeline.from_pretrained(
                str(self.folder), transformer=None, vae=None, dtype=torch.float32, use_safetensors=True))
        return self.text_pipe

    def _vae(self):
        if self.vae is None:
            from diffusers import AutoencoderKL

            _quiet()
            self.vae = _load(self.folder, "vae", lambda: AutoencoderKL.from_pretrained(
                str(self.folder), subfolder="vae", dtype=torch.float32, use_safetensors=True)).eval()
        return self.vae

    @torch.no_grad()
    def encode(self, prompts) -> list[torch.Tensor]:
        """ZImagePipeline.encode_prompt's features: one [L_i, D] float32 tensor of valid tokens per prompt."""
        prompts = list(prompts)
        uniq = sorted(set(prompts))
        feats: dict[str, torch.Tensor] = {}
        if "" in uniq and self._null is not None:
            feats[""] = self._null
            uniq.remove("")
        if uniq:
            pipe = self._text()
            for i in range(0, len(uniq), self.batch_size):
                chunk = uniq[i:i + self.batch_size]
                # encode_prompt rewrites the list it gets in place (chat template): hand it a copy
                emb, _ = pipe.encode_prompt(list(chunk), do_classifier_free_guidance=False,
                                            max_sequence_length=MAX_SEQUENCE_LENGTH)
                feats.update({p: e.float().cpu().clone() for p, e in zip(chunk, emb)})
        if "" in feats:
            self._null = feats[""]
        return [feats[p] for p in prompts]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] → images [N, 3, h·f, w·f] in [-1, 1], as ZImagePipeline decodes them."""
        vae = self._vae()
        sf = float(vae.config.scaling_factor)
        sh = float(vae.config.shift_factor or 0.0)
        out = []
        for i in range(0, latents.shape[0], self.batch_size):
            z = latents[i:i + self.batch_size].to(vae.dtype) / sf + sh
            out.append(vae.decode(z, return_dict=False)[0].float().clamp(-1, 1))
        if not out:
            r = int(self.config["image_resolution"])
            return torch.zeros(0, 3, r, r)
        return torch.cat(out)


def parts_for_model(config: dict, where: Path | None = None) -> PipelineParts | None:
    """The text encoder / VAE a model (teacher or student) config needs, or None for a pixel-space MiniLM model."""
    p = config.get("pipeline")
    if not p:
        return None
    if not is_pipeline_folder(p):
        src = f"{where}/config.json" if where else "the model's config.json"
        raise UserError(f"{p}: the ZImagePipeline folder that {src} names (its text encoder and VAE) is not there; "
                        "restore it or edit 'pipeline' in that config.json")
    return PipelineParts(Path(p))
