"""TwoStepZImagePipeline: a distilled twostep 2-step Z-Image student as a diffusers pipeline (2 NFE, no CFG).

Written by `twostep export --model RUN --out DIR`. Load it with our class (offline, no remote code):

    import torch
    from twostep.pipeline import TwoStepZImagePipeline

    pipe = TwoStepZImagePipeline.from_pretrained("DIR")
    images = pipe("a red circle on a blue background", num_images_per_prompt=4,
                  generator=torch.Generator().manual_seed(0)).images          # PIL images; output_type="pt"|"np"|"latent"

`DiffusionPipeline.from_pretrained("DIR")` alone cannot work: diffusers looks `_class_name` up inside the diffusers
package. Without twostep installed, the exported folder carries this file as `pipeline.py` and twostep/flow.py as
`flow.py` beside it (the two import only torch, diffusers and transformers, and this one imports the mid-noise rule
from `.flow`, which diffusers' dynamic-module loader copies along), so diffusers' custom-pipeline mechanism loads it:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("DIR", custom_pipeline="pipeline", trust_remote_code=True)

The rollout (conventions of twostep/flow.py: x_σ = (1−σ)·x0 + σ·ε, transformer time t = 1 − σ, output u = x0 − ε,
x̂0 = x_σ + σ·u), with the σ grid `sigmas` = [1, σm, 0] and `mid_noise` from the pipeline config:

    x̂0₁ = F₁(ε, σ = 1, c);   x_m = (1 − σm)·x̂0₁ + σm·ε  (ε' instead of ε when mid_noise = "fresh");
    x̂0₂ = F₂(x_m, σm, c)   → the image (pixel space), or latents decoded by the VAE.

Components by `decoupling`:
  full    transformer (step 1) + transformer_2 (step 2); also a LoRA student exported with --merge
  shared  transformer only, used for both steps
  lora    transformer = the frozen base; the two step adapters live in lora/<step_adapters[i]>/
          pytorch_lora_weights.safetensors in the format of stock `ZImagePipeline.save_lora_weights` (peft keys
          with the `transformer.` prefix, no adapter name; the LoraConfig in the safetensors metadata), so stock
          `ZImagePipeline.load_lora_weights(folder, weight_name=..., adapter_name=...)` loads them too; here they are
          loaded with `load_lora_adapter` by from_pretrained (or lazily on the first call) and switched with
          `set_adapter` before each step. (Exports before the prefix, with bare peft keys, still load.)
  scheduler (optional; latent students) a FlowMatchEulerDiscreteScheduler whose 2-step grid is [1, σm, 0]
          (static shift σm/(1−σm)): unused by this class, it lets stock `ZImagePipeline.from_pretrained` open the
          same folder (docs/export.md: the callback_on_step_end recipe for per-step weights).
Size: `sample_size` is the sample grid (latent or pixel) of the training data: an int (square) or [height, width];
`height` / `width` of a call are image pixels (latent side × the VAE's scale factor).
Text: `text_features` = "last_hidden_state" (a BERT-like encoder, e.g. all-MiniLM-L6-v2: the last hidden state of
the valid tokens, prompts padded together in one batch) or "zimage" (ZImagePipeline's Qwen3 encoding: chat
template, hidden_states[-2], valid tokens). `vae` is None for pixel-space students (images in [-1, 1] come straight
out of step 2); when present, latents are decoded as vae.decode(latents / scaling_factor + shift_factor).
"""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .flow import inference_fresh_noise, mid_state  # relative: the export ships flow.py beside this file

LORA_DIR = "lora"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class TwoStepZImagePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"
    _optional_components = ["transformer_2", "vae", "scheduler"]

    def __init__(self, transformer, text_encoder, tokenizer, transformer_2=None, vae=None, scheduler=None,
                 decoupling: str = "full", sigmas=(1.0, 0.75, 0.0), mid_noise: str = "same",
                 step_adapters=("step1", "step2"), text_features: str = "last_hidden_state",
                 max_sequence_length: int = 77, sample_size=None):
        super().__init__()
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) != 3 or sigmas[0] != 1.0 or sigmas[2] != 0.0 or not 0.0 < sigmas[1] < 1.0:
            raise ValueError(f"sigmas must be [1, σm, 0] with 0 < σm < 1, got {sigmas}")
        if decoupling not in ("full", "shared", "lora"):
            raise ValueError(f"decoupling={decoupling!r}: expected full, shared or lora")
        if decoupling == "full" and transformer_2 is None:
            raise ValueError("decoupling='full' needs transformer_2 (the step-2 transformer)")
        if mid_noise not in ("same", "fresh"):
            raise ValueError(f"mid_noise={mid_noise!r}: expected same or fresh")
        if text_features not in ("last_hidden_state", "zimage"):
            raise ValueError(f"text_features={text_features!r}: expected last_hidden_state or zimage")
        if sample_size is not None and not isinstance(sample_size, int):
            sample_size = [int(v) for v in sample_size]
            if len(sample_size) != 2:
                raise ValueError(f"sample_size must be an int or [height, width], got {sample_size}")
            if sample_size[0] == sample_size[1]:
                sample_size = sample_size[0]
        self.register_modules(transformer=transformer, transformer_2=transformer_2, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae, scheduler=scheduler)
        self.register_to_config(decoupling=decoupling, sigmas=sigmas, mid_noise=mid_noise,
                                step_adapters=list(step_adapters), text_features=text_features,
                                max_sequence_length=int(max_sequence_length),
                                sample_size=None if sample_size is None else sample_size)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=True)

    # -- loading / saving ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if isinstance(pipe, TwoStepZImagePipeline):
            pipe.load_step_adapters()
        return pipe

    def _missing_adapters(self) -> list[str]:
        if self.config.decoupling != "lora":
            return []
        have = getattr(self.transformer, "peft_config", {}) or {}
        return [a for a in self.config.step_adapters if a not in have]

    def load_step_adapters(self, folder: str | None = None):
        """Load the per-step LoRA adapters (lora mode) from `folder`/lora/<name>/ (default: where the pipeline
        was loaded from; a hub id is resolved through the local hub cache)."""
        missing = self._missing_adapters()
        if not missing:
            return
        folder = folder or self.name_or_path
        if folder is None:
            raise ValueError("lora pipeline without its adapters: call load_step_adapters(folder)")
        folder = str(folder)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            folder = snapshot_download(folder, allow_patterns=[f"{LORA_DIR}/*"])
        from safetensors import safe_open

        for name in missing:
            path = os.path.join(folder, LORA_DIR, name)
            with safe_open(os.path.join(path, LORA_WEIGHT_NAME), "pt") as f:
                keys = list(f.keys())
            # stock ZImagePipeline.save_lora_weights layout (transformer.<peft key>), or an older export's bare keys
            prefix = "transformer" if keys and all(k.startswith("transformer.") for k in keys) else None
            self.transformer.load_lora_adapter(path, weight_name=LORA_WEIGHT_NAME, prefix=prefix, adapter_name=name)

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' save_pretrained; in lora mode the transformer is saved without its LoRA layers (plain
        ZImageTransformer2DModel keys) and each step adapter under lora/<name>/ as stock
        ZImagePipeline.save_lora_weights writes it (save_step_adapter)."""
        if self.config.decoupling != "lora" or not getattr(self.transformer, "peft_config", None):
            return super().save_pretrained(save_directory, **kwargs)
        tr = self.transformer
        base = base_state_dict(tr)
        tr.state_dict = lambda *a, **k: base  # diffusers' ModelMixin.save_pretrained reads model.state_dict()
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            del tr.state_dict
        for name in self.config.step_adapters:
            save_step_adapter(tr, name, os.path.join(save_directory, LORA_DIR, name))

    # -- text -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt, device=None, max_sequence_length: int | None = None) -> list[torch.Tensor]:
        """Per-prompt caption features: a list of [L_i, D] tensors (valid tokens only)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        max_len = int(max_sequence_length or self.config.max_sequence_length)
        uniq = sorted(set(prompts))  # as twostep's encoders: unique prompts, sorted, encoded in one padded batch
        if self.config.text_features == "zimage":
            from diffusers import ZImagePipeline

            # ZImagePipeline's own encoding (it rewrites the list it gets in place: hand it a copy)
            emb = ZImagePipeline._encode_prompt(self, list(uniq), device=device, max_sequence_length=max_len)
            feats = {p: e.float() for p, e in zip(uniq, emb)}
        else:
            enc = self.tokenizer(uniq, padding=True, truncation=True, max_length=max_len,
                                 return_tensors="pt").to(device)
            hid = self.text_encoder(**enc).last_hidden_state
            feats = {p: hid[j, :int(enc["attention_mask"][j].sum())].float() for j, p in enumerate(uniq)}
        return [feats[p] for p in prompts]

    # -- the two steps --------------------------------------------------------------------------------------
    def step_transformer(self, i: int):
        """The transformer that runs step i (1 or 2), with its adapter active in lora mode."""
        d = self.config.decoupling
        if d == "full":
            return self.transformer if i == 1 else self.transformer_2
        if d == "lora":
            self.load_step_adapters()
            self.transformer.set_adapter(self.config.step_adapters[i - 1])
        return self.transformer

    def _denoise(self, i: int, x: torch.Tensor, sigma: float, text) -> torch.Tensor:
        """x̂0 = x_σ + σ·u with u = F_i(x_σ, t = 1 − σ, text) (float32 arithmetic around the transformer)."""
        tr = self.step_transformer(i)
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        xs = list(x.to(tr.dtype).unsqueeze(2).unbind(0))  # [C, 1, H, W] per sample (one frame)
        caps = [c.to(device=x.device, dtype=tr.dtype) for c in text]
        out = tr(xs, 1 - sig, caps, patch_size=int(tr.config.all_patch_size[0]), return_dict=False)[0]
        u = torch.stack(out, 0).squeeze(2).to(x.dtype)
        return x + sig.reshape(-1, 1, 1, 1) * u

    @torch.no_grad()
    def __call__(self, prompt=None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, num_inference_steps: int = 2, guidance_scale: float = 0.0,
                 max_sequence_length: int | None = None):
        """Generate images in 2 transformer forwards.

        prompt: str or list of str (or pass prompt_embeds: a list of [L_i, D] caption features per prompt).
        generator / latents: the initial noise ε ([B·num_images_per_prompt, C, h, w] in the transformer's space;
        drawn with randn_tensor(generator) when not given). output_type: "pil" | "np" | "pt" (images in [0, 1]) or
        "latent" (step 2's x̂0 as is: pixels in [-1, 1] for a pixel-space student, else latents).
        num_inference_steps and guidance_scale exist for ZImagePipeline-style callers: only 2 and 0 are valid.
        """
        if num_inference_steps != 2:
            raise ValueError(f"a 2-step student runs exactly 2 steps (got num_inference_steps={num_inference_steps})")
        if guidance_scale != 0:
            raise ValueError("the student was distilled to run without classifier-free guidance: guidance_scale=0")
        device = self._execution_device
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt or prompt_embeds")
            prompt_embeds = self.encode_prompt(prompt, device=device, max_sequence_length=max_sequence_length)
        text = [e for e in prompt_embeds for _ in range(num_images_per_prompt)]

        tr = self.transformer
        channels = int(tr.config.in_channels)
        size = self.config.sample_size  # the sample grid: an int (square) or [height, width]
        sh, sw = (size, size) if size is None or isinstance(size, int) else size
        for name, v in (("height", height), ("width", width)):
            if v and v % self.vae_scale_factor:
                raise ValueError(f"{name} {v} must be a multiple of the VAE's scale factor {self.vae_scale_factor}")
        h = height // self.vae_scale_factor if height else sh
        w = width // self.vae_scale_factor if width else sw
        if h is None or w is None:
            raise ValueError("pass height and width (the pipeline config has no sample_size)")
        shape = (len(text), channels, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)}; expected {shape}")
        eps = latents.to(device=device, dtype=torch.float32)

        _, sigma_mid, _ = self.config.sigmas
        mid_noise = self.config.mid_noise
        x0_1 = self._denoise(1, eps, 1.0, text)                                # step 1 at σ = 1
        x_m = mid_state(x0_1, eps, sigma_mid, mid_noise, inference_fresh_noise(eps, mid_noise))  # flow.mid_state
        x0 = self._denoise(2, x_m, sigma_mid, text)                            # step 2 at σm → the sample

        if output_type == "latent":
            image = x0
        else:
            if self.vae is not None:
                z = x0.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
                x0 = self.vae.decode(z, return_dict=False)[0]
            image = self.image_processor.postprocess(x0, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def save_step_adapter(transformer, adapter: str, folder: str) -> None:
    """One peft adapter of `transformer` as stock `ZImagePipeline.save_lora_weights` writes a LoRA: keys
    `transformer.<peft key without adapter name>`, the adapter's LoraConfig in the safetensors metadata (so rank and
    alpha come back exactly), file folder/pytorch_lora_weights.safetensors."""
    from diffusers import ZImagePipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, adapter_name=adapter)
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=LORA_WEIGHT_NAME,
                                     transformer_lora_adapter_metadata=transformer.peft_config[adapter].to_dict())


def base_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The weights of a peft-injected model under its plain keys (LoRA layers dropped, `.base_layer` removed)."""
    return {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}


def merged_state_dict(transformer, adapter: str) -> dict[str, torch.Tensor]:
    """Plain weights with one LoRA adapter merged in: W + ΔW(adapter) for every LoRA layer (no model mutated), each
    sum taken in fp32 one tensor at a time and stored in W's dtype (a bf16 base is never upcast whole)."""
    from peft.tuners.lora import LoraLayer

    sd = base_state_dict(transformer)
    for name, mod in transformer.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            key = f"{name}.weight"
            sd[key] = (sd[key].float() + mod.get_delta_weight(adapter).float()).to(sd[key].dtype)
    return sd
