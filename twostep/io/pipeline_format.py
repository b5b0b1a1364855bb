"""The diffusers `ZImagePipeline` folder format (as `save_pretrained` writes it), read from its JSON files only.

Detected by its `model_index.json`. Components: tokenizer + text_encoder (Qwen3Model), vae (AutoencoderKL),
transformer (ZImageTransformer2DModel), scheduler (FlowMatchEulerDiscreteScheduler). `pipeline_config` derives
the twostep teacher config of such a folder without loading anything; loading its components is
twostep.teacher.pipeline_folder's job.

- Latent space: channels = the transformer's `in_channels` (16), resolution = the latent side.
- Image size: `image_size` in an optional `twostep.json` next to model_index.json (an integer, square, or
  [height, width] for any aspect ratio), else the VAE's `sample_size` (1024 for Z-Image, = ZImagePipeline's
  default height/width), else 1024. Latent side = image side / 2^(len(vae.block_out_channels) − 1), as in the
  pipeline; each image side must be a multiple of twice that factor (16 for Z-Image: ZImagePipeline refuses
  others). A square teacher's config has `resolution` / `image_resolution`; a non-square one `height` / `width`
  (latent) and `image_height` / `image_width` instead (twostep.model.size_fields).
- Default sampling: 8 steps, no CFG (Z-Image-Turbo's setting); `twostep.json` may set
  {"sampling": {"steps": N, "guidance": g}}. The shift comes from the scheduler config (its static `shift`,
  or exp(mu) of the pipeline's resolution-dependent mu when `use_dynamic_shifting` is on).

`twostep.json` (optional; `twostep teacher tune-guidance` writes sampling.guidance there):
    {"image_size": 256, "sampling": {"steps": 8, "guidance": 0.0}}      (or "image_size": [768, 1344])
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from .files import atomic_write_text, sha256_files


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


def read_json(p: Path) -> dict:
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


def weight_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def check_pipeline_folder(folder: Path, weights: bool = True) -> dict:
    """Every component present (listed in model_index.json, its folder with its config, and weights where it has
    any; `weights=False`: the config files only, as `distill --dry-run` reads them); returns model_index.json. A
    missing piece is a UserError naming the component and the fix."""
    folder = Path(folder)
    index = read_json(folder / MODEL_INDEX)
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
        if weights and weighted and not weight_files(d):
            if any(d.glob("*.bin")):
                raise _missing(folder, name, f"no *.safetensors weights in {d}, only .bin (pickle) files, which are "
                               "never loaded: convert them to safetensors")
            raise _missing(folder, name, f"no weight files (*.safetensors) in {d}: download the component's "
                           "weights (`distill --dry-run` alone reads the config files only)")
    if index["transformer"][1] != "ZImageTransformer2DModel":
        raise UserError(f"{folder / MODEL_INDEX}: transformer is {index['transformer'][1]}, not a "
                        "ZImageTransformer2DModel; twostep distills Z-Image pipelines only")
    return index


def transformer_weights_sha256(folder: Path) -> str:
    """One sha256 over the transformer's weight files (name + content, sorted by name); each file's hash is read
    once and reused while its size and mtime stay (io.files.weights_sha256)."""
    return sha256_files(weight_files(Path(folder) / "transformer"), cached=True)


def _init_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def scheduler_shift(sched: dict, latent_side, path: Path) -> float:
    """The σ-grid shift ZImagePipeline's scheduler applies at this latent size (an int side, or (height, width);
    see twostep.flow.shift_sigma)."""
    bad = [k for k in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                       "stochastic_sampling", "shift_terminal") if sched.get(k)]
    if bad:
        raise UserError(f"{path}: scheduler option {bad[0]} is not supported (twostep samples the plain shifted "
                        "Euler grid of Z-Image); set it to false/null in a copy of the pipeline")
    if not sched.get("use_dynamic_shifting"):
        return float(sched.get("shift", 1.0))
    # ZImagePipeline: mu = calculate_shift(image_seq_len); time_shift(mu, 1, σ) is shift_sigma with shift exp(mu)
    # (exponential) or mu (linear)
    lh, lw = (latent_side, latent_side) if isinstance(latent_side, int) else latent_side
    seq = (lh // 2) * (lw // 2)  # ZImagePipeline: image_seq_len = (latent h // 2) · (latent w // 2)
    b0, b1 = sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096)
    s0, s1 = sched.get("base_shift", 0.5), sched.get("max_shift", 1.15)
    m = (s1 - s0) / (b1 - b0)
    mu = seq * m + (s0 - m * b0)
    return float(math.exp(mu) if sched.get("time_shift_type", "exponential") == "exponential" else mu)


def pipeline_config(folder: Path, weights: bool = True) -> dict:
    """The twostep teacher config of a ZImagePipeline folder (read from its JSON files only; nothing loaded).
    `weights=False`: the weight files need not be there (check_pipeline_folder)."""
    folder = Path(folder)
    index = check_pipeline_folder(folder, weights)
    tr = read_json(folder / "transformer" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    te = read_json(folder / "text_encoder" / "config.json")
    sched = read_json(folder / "scheduler" / "scheduler_config.json")
    side = read_json(folder / SIDECAR) if (folder / SIDECAR).is_file() else {}
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
    where = f"{folder / SIDECAR} image_size" if "image_size" in side else f"{folder}/vae/config.json sample_size"
    image_hw = _image_size(size, where, folder)
    latent_hw = []
    for name, s_ in zip(("height", "width"), image_hw):
        if s_ < 2 * vsf or s_ % (2 * vsf):
            raise UserError(f"{where}: image {name} {s_} must be a positive multiple of {2 * vsf} (twice the VAE's "
                            f"scale factor; ZImagePipeline refuses other sizes); set image_size in {folder / SIDECAR}")
        latent = 2 * (s_ // (2 * vsf))
        if latent % patch:
            raise UserError(f"{where}: image {name} {s_} gives a latent side {latent} that is not a multiple of the "
                            f"patch size {patch}; set another image_size in {folder / SIDECAR}")
        latent_hw.append(latent)
    lh, lw = latent_hw
    s = side.get("sampling", {}) or {}
    sampling = {"steps": int(s.get("steps", DEFAULT_STEPS)),
                "shift": scheduler_shift(sched, (lh, lw), folder / "scheduler" / "scheduler_config.json"),
                "guidance": float(s.get("guidance", 0.0))}
    tok_files = sorted(p for p in (folder / "tokenizer").iterdir() if p.is_file())
    te_w = weight_files(folder / "text_encoder")
    vae_w = weight_files(folder / "vae")
    cfg = {
        "kind": "teacher", "backbone": "zimage", "format": FORMAT, "pipeline": str(folder.resolve()),
        "transformer": tcfg, **size_fields(lh, lw), **size_fields(*image_hw, image=True),
        "data": side.get("data"),
        "text_encoder": {"name": f"ZImagePipeline text_encoder ({index['text_encoder'][1]}, hidden_states[-2])",
                         "max_sequence_length": MAX_SEQUENCE_LENGTH,
                         "config_sha256": sha256_files([folder / "text_encoder" / "config.json"]),
                         "tokenizer_sha256": sha256_files(tok_files),
                         "weights_bytes": sum(p.stat().st_size for p in te_w)},
        "vae": {"class": index["vae"][1], "scale_factor": vsf,
                "scaling_factor": float(vae.get("scaling_factor", 1.0)),
                "shift_factor": float(vae.get("shift_factor") or 0.0),
                "config_sha256": sha256_files([folder / "vae" / "config.json"]),
                "weights_bytes": sum(p.stat().st_size for p in vae_w)},
        "sampling": sampling,
    }
    for k in ("guidance_tuned", "num_parameters"):
        if k in side:
            cfg[k] = side[k]
    return cfg


def _image_size(size, where: str, folder: Path) -> tuple[int, int]:
    """(height, width) of an image_size setting: an integer (square) or [height, width]; None → the default."""
    if size is None:
        return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if count(size):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(count(v) for v in size):
        return int(size[0]), int(size[1])
    raise UserError(f"{where} = {size!r}: must be an integer (square) or [height, width] of integers >= 1; set "
                    f"image_size in {folder / SIDECAR}")


def size_fields(height: int, width: int, image: bool = False) -> dict:
    """The config fields of a sample (or, image=True, decoded-image) size: the square `resolution` /
    `image_resolution` alias when height == width (every square model's config, as before), else `height` +
    `width` / `image_height` + `image_width` (read back by twostep.model.sample_hw / image_hw)."""
    h, w = int(height), int(width)
    if h == w:
        return {"image_resolution" if image else "resolution": h}
    return {"image_height": h, "image_width": w} if image else {"height": h, "width": w}


def save_sidecar(folder: Path, config: dict):
    """Persist twostep's own settings of a pipeline teacher (sampling, guidance tuning) in twostep.json."""
    folder = Path(folder)
    side = read_json(folder / SIDECAR) if (folder / SIDECAR).is_file() else {}
    side["sampling"] = {k: config["sampling"][k] for k in ("steps", "guidance")}
    for k in ("guidance_tuned", "num_parameters"):
        if k in config:
            side[k] = config[k]
    atomic_write_text(folder / SIDECAR, json.dumps(side, indent=1))
