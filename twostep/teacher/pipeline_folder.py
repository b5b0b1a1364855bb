"""A diffusers `ZImagePipeline` folder used as a twostep teacher: its components, loaded when first needed.

The folder format (what must be there, the teacher config derived from its JSON files) is
twostep.io.pipeline_format. Here:
- The teacher works in the VAE's latent space; its transformer is wrapped by the ordinary `ZImageBackbone`
  adapter (same conventions as ZImagePipeline: t = 1 − σ, u = x0 − ε).
- Text features are ZImagePipeline's own: diffusers' `ZImagePipeline.encode_prompt` is called (chat template,
  Qwen3 `hidden_states[-2]`, padded to max_sequence_length = 512, valid tokens only), so they are identical
  to what the pipeline feeds its transformer.
- Images: `decode(latents)` = `vae.decode(latents / scaling_factor + shift_factor)`, clamped to [-1, 1],
  DECODE_BATCH latents per VAE call whatever the caller's batch (eval, sample, grids, the quick FD): a 1024²
  fp32 decode holds GBs of activations per latent.
- What is loaded when: `load_teacher` loads only the transformer; the tokenizer + text encoder load at the
  first `encode`, the VAE at the first `decode`. `twostep distill` (which reads text features and latents from
  the teacher cache) therefore never loads either (a DMD2 run with CFG loads the text encoder once for "").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..backbones.zimage import ZImageBackbone
from ..errors import UserError
from ..io.pipeline_format import MAX_SEQUENCE_LENGTH, is_pipeline_folder, pipeline_config

DECODE_BATCH = 2   # latents per VAE call (the training grids' rule: twostep.train.viz)


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


def load_pipeline_backbone(folder: Path, dtype: torch.dtype = torch.float32):
    """The transformer only, read in `dtype` and wrapped by the ordinary ZImageBackbone adapter."""
    from diffusers import ZImageTransformer2DModel

    _quiet()
    folder = Path(folder)
    tr = _load(folder, "transformer", lambda: ZImageTransformer2DModel.from_pretrained(
        str(folder), subfolder="transformer", dtype=dtype, use_safetensors=True))
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
        self.device, self.dtype = torch.device("cpu"), torch.float32  # of the text encoder (place)

    def place(self, device, dtype=torch.float32):
        """Run the text encoder on `device` in `dtype` (loaded there at first use, or moved now); the features
        `encode` returns stay float32 on the CPU."""
        self.device, self.dtype = torch.device(device), dtype
        self._null = None
        if self.text_pipe is not None:
            self.text_pipe.text_encoder.to(self.device, self.dtype)

    @property
    def loaded(self) -> set[str]:
        return ({"text_encoder"} if self.text_pipe is not None else set()) | ({"vae"} if self.vae is not None else set())

    def _text(self):
        if self.text_pipe is None:
            from diffusers import ZImagePipeline

            _quiet()
            self.text_pipe = _load(self.folder, "text_encoder", lambda: ZImagePipeline.from_pretrained(
                str(self.folder), transformer=None, vae=None, dtype=self.dtype, use_safetensors=True))
            if self.device.type != "cpu":
                self.text_pipe.text_encoder.to(self.device)
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
        """Latents [N, C, h, w] → images [N, 3, h·f, w·f] in [-1, 1], as ZImagePipeline decodes them, DECODE_BATCH
        latents per VAE call."""
        vae = self._vae()
        sf = float(vae.config.scaling_factor)
        sh = float(vae.config.shift_factor or 0.0)
        out = []
        for i in range(0, latents.shape[0], DECODE_BATCH):
            z = latents[i:i + DECODE_BATCH].to(vae.dtype) / sf + sh
            out.append(vae.decode(z, return_dict=False)[0].float().clamp(-1, 1))
        if not out:
            c = self.config  # image_height/image_width of a non-square model, else the square image_resolution
            h, w = (c["image_height"], c["image_width"]) if "image_height" in c else (c["image_resolution"],) * 2
            return torch.zeros(0, 3, int(h), int(w))
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
