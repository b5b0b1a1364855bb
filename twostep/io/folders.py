"""Model folders on disk: a twostep model folder (`config.json` + safetensors weights) or a diffusers
ZImagePipeline folder (twostep.io.pipeline_format), the identity of a teacher folder, and the update stamps
that keep a run folder's weight files and config.json from different saves apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from .files import atomic_save_tensors, atomic_write_text, sha256_file
from .pipeline_format import is_pipeline_folder, pipeline_config, save_sidecar, transformer_weights_sha256

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
IDENTITY_KEYS = ("weights_sha256", "transformer", "resolution", "text_encoder", "sampling")


def read_config(folder: Path) -> dict:
    """A model folder's config; for a diffusers ZImagePipeline folder (model_index.json), the teacher config
    twostep derives from its component configs (twostep.io.pipeline_format)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass a model folder written by `twostep teacher train` or `distill`"
                        " (or a ZImagePipeline folder)")
    if is_pipeline_folder(folder):
        return pipeline_config(folder)
    p = folder / CONFIG
    if not p.exists():
        raise UserError(f"{p}: missing; the model folder is incomplete (train it again or copy the whole folder)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e.msg} at line {e.lineno}); restore the file")


def save_model_folder(weights: dict[str, torch.Tensor], config: dict, folder: Path):
    """Write model.safetensors + config.json (each atomically; config.json last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(weights, folder / WEIGHTS)
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1))


def save_teacher_settings(folder: Path, config: dict):
    """Write back a teacher's edited settings (e.g. tuned guidance): config.json of a twostep folder, twostep.json
    of a ZImagePipeline folder (whose own files stay untouched)."""
    if config.get("pipeline"):
        save_sidecar(Path(folder), config)
    else:
        atomic_write_text(Path(folder) / CONFIG, json.dumps(config, indent=1))


def teacher_identity(folder: Path, config: dict | None = None) -> dict:
    """What makes two teachers' samples the same: their weights (sha256), transformer config, resolution,
    text encoder and default sampling (plus, for a ZImagePipeline teacher, its VAE: not part of a cache's
    identity, which holds latents, but of the decoded eval references)."""
    folder = Path(folder)
    cfg = config if config is not None else read_config(folder)
    if cfg.get("pipeline"):  # a ZImagePipeline folder: its transformer's weight files; the VAE is recorded too
        return {"weights_sha256": transformer_weights_sha256(folder), "transformer": cfg["transformer"],
                "resolution": cfg.get("resolution"), "text_encoder": cfg.get("text_encoder"),
                "sampling": cfg.get("sampling"), "vae": cfg.get("vae")}
    w = folder / WEIGHTS
    if not w.is_file():
        raise UserError(f"{w}: missing; the teacher folder is incomplete (train it again or copy the whole folder)")
    if "transformer" not in cfg:
        raise UserError(f"{folder / CONFIG}: has no 'transformer' section; not a twostep teacher folder")
    return {"weights_sha256": sha256_file(w), "transformer": cfg["transformer"],
            "resolution": cfg.get("resolution"), "text_encoder": cfg.get("text_encoder"),
            "sampling": cfg.get("sampling")}


def identity_diff(a: dict, b: dict) -> list[str]:
    """The parts (weights, transformer, ...) in which two teacher identities differ."""
    names = {"weights_sha256": "weights"}
    return [names.get(k, k) for k in IDENTITY_KEYS
            if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def save_stamped(files: dict[str, dict[str, torch.Tensor]], config: dict, folder: Path, on_file=None):
    """Write `{stem}.safetensors` for each entry, stamped with config["updates"], then config.json last; loading
    refuses a folder whose files carry different stamps (a write interrupted between files, see check_stamps).
    `on_file()` runs after each weight file (a fault-injection point of the tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = {"updates": config.get("updates", 0)}
    for stem, sd in files.items():
        atomic_save_tensors(sd, folder / f"{stem}.safetensors", metadata=stamp)
        if on_file is not None:
            on_file()
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1))


def check_stamps(folder: Path, stems, config: dict):
    """All weight files must come from the update that config.json names (see save_stamped)."""
    want = str(config.get("updates", 0))
    for stem in stems:
        p = folder / f"{stem}.safetensors"
        if not p.exists():
            raise UserError(f"{p}: missing; the run folder is incomplete (finish it with `twostep distill --resume`)")
        try:
            with safe_open(str(p), "pt") as f:
                got = (f.metadata() or {}).get("updates", want)
        except Exception as e:
            raise UserError(f"{p}: unreadable safetensors ({type(e).__name__}); the file is truncated or corrupt")
        if got != want:
            raise UserError(f"{folder}: {p.name} is from update {got} but config.json from update {want} (a save was "
                            "interrupted); run `twostep distill --resume` on it to rewrite the model files")
