"""Adapter over diffusers' ZImageTransformer2DModel (the tiny teacher and the real 6B model alike).

Hides: list-of-tensors I/O ([C, 1, H, W] per sample), t = 1 − σ, the raw output u = x0 − ε, and the
pad-token initialisation (diffusers creates x_pad_token / cap_pad_token without a meaningful value).
All conventions come from twostep.flow.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .. import flow
from ..errors import UserError
from ..io.files import all_finite, cast_floats, unreadable


def tiny_zimage_config(in_channels: int = 3, dim: int = 128, n_layers: int = 4, n_heads: int = 2,
                       n_refiner_layers: int = 1, cap_feat_dim: int = 384, patch_size: int = 4) -> dict:
    """A small ZImageTransformer2DModel config. dim / n_heads must equal sum(axes_dims)."""
    head = dim // n_heads
    if head * n_heads != dim or head % 8:
        raise UserError(f"dim {dim} / n_heads {n_heads} must be an integer multiple of 8; pick other values")
    side = 3 * head // 8 // 2 * 2  # RoPE axes (frame, row, col); each even, as in [32, 48, 48] of the 6B model
    axes = [head - 2 * side, side, side]
    return dict(all_patch_size=[patch_size], all_f_patch_size=[1], in_channels=in_channels, dim=dim,
                n_layers=n_layers, n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads,
                norm_eps=1e-5, qk_norm=True, cap_feat_dim=cap_feat_dim, rope_theta=256.0, t_scale=1000.0,
                axes_dims=axes, axes_lens=[1024, 64, 64])


class ZImageBackbone(nn.Module):
    """`denoise(x_sigma, sigma, text) -> x0_hat` and `features(...)` over a ZImageTransformer2DModel.

    text: a list of [L_i, cap_feat_dim] tensors (valid tokens only), one per sample.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.patch_size = int(cfg.all_patch_size[0])
        self.in_channels = int(cfg.in_channels)
        self.cap_feat_dim = int(cfg.cap_feat_dim)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, seed: int = 0) -> "ZImageBackbone":
        from diffusers import ZImageTransformer2DModel

        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            tr = ZImageTransformer2DModel(**config)
            init_pad_tokens(tr)
        return cls(tr)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.layers)

    # -- the one call ---------------------------------------------------------------------------------
    def raw_output(self, x_sigma: torch.Tensor, sigma: torch.Tensor, text: Sequence[torch.Tensor]) -> torch.Tensor:
        """u = x0 − ε as the transformer returns it, batched back to [B, C, H, W]."""
        if x_sigma.ndim != 4 or x_sigma.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, H, W], got {tuple(x_sigma.shape)}")
        if len(text) != x_sigma.shape[0]:
            raise ValueError(f"{len(text)} caption feature tensors for a batch of {x_sigma.shape[0]}")
        sigma = torch.as_tensor(sigma, dtype=x_sigma.dtype, device=x_sigma.device).expand(x_sigma.shape[0])
        t = flow.sigma_to_t(sigma)
        # inputs in the weights' dtype (a frozen teacher held in bf16, train.frozen_dtype), the output back in the
        # caller's: a no-op when they agree (fp32, or FSDP's bf16 all-gather, which casts its own inputs)
        dt = self.weight_dtype
        xs = list(x_sigma.to(dt).unsqueeze(2).unbind(0))  # [C, 1, H, W] per sample (F = 1 frame)
        caps = [c.to(device=x_sigma.device, dtype=dt) for c in text]  # CPU-encoded captions follow x
        # the timestep stays in the caller's (fp32) precision, as ZImagePipeline passes it
        out = self.transformer(xs, t, caps, patch_size=self.patch_size, return_dict=False)[0]
        return torch.stack(out, 0).squeeze(2).to(x_sigma.dtype)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the transformer's frozen-or-not patch embedding (never a LoRA target): what it computes in."""
        return next(iter(self.transformer.all_x_embedder.values())).weight.dtype

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor, text: Sequence[torch.Tensor]) -> torch.Tensor:
        """x̂0 = x_σ + σ·u (flow.x0_from_u)."""
        u = self.raw_output(x_sigma, sigma, text)
        return flow.x0_from_u(x_sigma, sigma, u)

    forward = denoise

    # -- features for discriminators ------------------------------------------------------------------
    def features(self, x_sigma: torch.Tensor, sigma: torch.Tensor, text: Sequence[torch.Tensor],
                 blocks: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states of the image tokens after the given main blocks: list of [B, N_img, dim].

        Uses forward hooks on transformer.layers[i]; the unified sequence is [image tokens, caption tokens],
        so the first H·W/p² positions are the image grid (row-major). Stops after the last requested block.
        """
        blocks = sorted(set(int(b) % self.num_blocks for b in blocks))
        n_img = (x_sigma.shape[-2] // self.patch_size) * (x_sigma.shape[-1] // self.patch_size)
        got: dict[int, torch.Tensor] = {}

        class _Stop(Exception):
            pass

        def hook(idx):
            def fn(_m, _inp, out):
                got[idx] = out[:, :n_img].to(x_sigma.dtype)  # a bf16 teacher's features, in the heads' dtype
                if idx == blocks[-1]:
                    raise _Stop
            return fn

        handles = [self.transformer.layers[i].register_forward_hook(hook(i)) for i in blocks]
        try:
            self.raw_output(x_sigma, sigma, text)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return [got[i] for i in blocks]


def init_pad_tokens(transformer: nn.Module, std: float = 0.02) -> None:
    """diffusers leaves the pad tokens without a trained value; give them a small random one (fresh models)."""
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token"):
            p = getattr(transformer, name, None)
            if p is not None:
                p.normal_(0.0, std)


# -- save / load (safetensors + JSON config) -------------------------------------------------------------

def save_backbone(backbone: ZImageBackbone, folder: Path, state_dict: dict | None = None, filename="model.safetensors"):
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else backbone.transformer.state_dict()
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    tmp = folder / (filename + ".tmp")
    save_file(sd, str(tmp))
    tmp.replace(folder / filename)


def load_backbone(config: dict, weights: Path, dtype: torch.dtype | None = None) -> ZImageBackbone:
    """A twostep folder's transformer: its config.json `transformer` section checked (check_transformer_config),
    the weights checked against it (check_weights: one line naming the field that disagrees) and finite.
    `dtype`: read in it, each tensor cast as it is loaded, into a transformer built without storage (no fp32
    copy of the model is ever made); None: as stored, into an fp32 transformer."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = Path(weights)
    where = f"{weights.parent / 'config.json'}"
    check_transformer_config(config, where, complete=False)  # a mapping (the weights name what else is wrong)
    if not weights.exists():
        raise UserError(f"{weights}: weights file missing; point --teacher/--model at a folder written by twostep")
    try:
        if dtype is None:
            sd = load_file(str(weights))
        else:
            cast = cast_floats(dtype)
            with safe_open(str(weights), "pt") as f:
                sd = {k: cast(k, f.get_tensor(k)) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files; memory, permissions:
        raise unreadable(weights, e, "re-create or re-download the file") from None  # said as what they are
    check_weights(config, sd, weights, where)
    check_transformer_config(config, where)
    if not all_finite(sd):
        raise UserError(f"{weights}: holds NaN/inf weights (saved by a run that diverged); retrain the model or "
                        "restore the file")
    bb = build_checked(config, where, meta=dtype is not None)
    load_checked(bb.transformer, sd, weights, assign=dtype is not None)
    return bb


def check_materialized(module: nn.Module, where) -> None:
    """After a load into a module built on the meta device: every parameter and buffer holds a loaded value."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{where}: {len(left)} tensors were not loaded (first: {left[0]})")


# -- a folder's config.json against its weights: one line naming the field, not a size-mismatch traceback ---------

# The settings a twostep folder's `transformer` section must name: diffusers' defaults for a missing one are the
# 6B model's (dim 3840, 30 layers), which would be built silently and then fail to load the weights.
REQUIRED_KEYS = ("all_patch_size", "in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads",
                 "cap_feat_dim", "axes_dims", "axes_lens")
OPTIONAL_KEYS = ("all_f_patch_size", "norm_eps", "qk_norm", "rope_theta", "t_scale", "siglip_feat_dim")


def _int_list(v, minimum: int) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) > 0
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v))


def check_transformer_config(config, where: str, complete: bool = True) -> None:
    """UserError (naming `where`, e.g. the config.json, and the field) unless `config` is a buildable
    ZImageTransformer2DModel config: a mapping with REQUIRED_KEYS, positive integers, dim divisible by n_heads,
    n_heads by n_kv_heads, and even RoPE axes_dims summing to dim / n_heads. `complete=False` (the config of a
    diffusers ZImagePipeline's transformer, whose missing keys take diffusers' defaults and whose keys depend on the
    diffusers version): only a mapping."""
    fix = "restore the folder's original config.json"
    if not isinstance(config, dict):
        raise UserError(f"{where}: 'transformer' must be a mapping of the transformer's settings, got "
                        f"{type(config).__name__}; {fix}")
    if not complete:
        return
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise UserError(f"{where}: transformer.{missing[0]} is missing (required: {', '.join(missing)}); {fix}")
    unknown = sorted(k for k in config if k not in REQUIRED_KEYS + OPTIONAL_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown transformer setting {unknown[0]!r}; {fix}")

    def bad(key, want):
        return UserError(f"{where}: transformer.{key} = {config[key]!r} must be {want}; {fix}")

    for k, lo in (("in_channels", 1), ("dim", 1), ("n_layers", 1), ("n_refiner_layers", 0), ("n_heads", 1),
                  ("n_kv_heads", 1), ("cap_feat_dim", 1)):
        v = config[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise bad(k, f"an integer >= {lo}")
    for k in ("all_patch_size", "all_f_patch_size", "axes_lens"):
        if k in config and not _int_list(config[k], 1):
            raise bad(k, "a non-empty list of integers >= 1")
    dim, heads, kv = config["dim"], config["n_heads"], config["n_kv_heads"]
    if dim % heads:
        raise bad("n_heads", f"a divisor of dim {dim}")
    if heads % kv:
        raise bad("n_kv_heads", f"a divisor of n_heads {heads}")
    axes = config["axes_dims"]
    if not _int_list(axes, 0) or any(a % 2 for a in axes) or sum(axes) != dim // heads:
        raise bad("axes_dims", f"a list of even integers summing to dim / n_heads = {dim // heads}")
    if len(config["axes_lens"]) != len(axes):
        raise bad("axes_lens", f"a list as long as axes_dims ({len(axes)})")


def build_checked(config: dict, where: str, meta: bool = False) -> ZImageBackbone:
    """ZImageBackbone.from_config of a checked config (`meta`: on the meta device, no storage, for a load with
    assign); whatever diffusers still refuses is one line naming `where`."""
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return ZImageBackbone.from_config(config)
    except UserError:
        raise
    except Exception as e:  # diffusers asserts / raises TypeError or ValueError for settings it cannot build
        msg = " ".join(str(e).split())[:160] or "refused by diffusers"
        raise UserError(f"{where}: cannot build the transformer from its settings ({type(e).__name__}: {msg}); "
                        "restore the folder's original config.json")


def weights_architecture(sd: dict[str, torch.Tensor]) -> dict:
    """The transformer settings that a ZImageTransformer2DModel state dict's names and shapes imply (those that
    can be read off it; a LoRA-wrapped base state dict works too)."""
    def count(prefix):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".") and k.split(".")[1].isdigit()}
        return max(idx) + 1 if idx else 0

    got: dict = {"n_layers": count("layers"), "n_refiner_layers": count("noise_refiner")}
    pad = sd.get("x_pad_token")
    if pad is not None:
        got["dim"] = int(pad.shape[-1])
    q = sd.get("layers.0.attention.norm_q.weight")
    if q is not None and "dim" in got and q.numel():
        head = int(q.shape[0])
        got["n_heads"] = got["dim"] // head
        k = sd.get("layers.0.attention.to_k.weight", sd.get("layers.0.attention.to_k.base_layer.weight"))
        if k is not None:
            got["n_kv_heads"] = int(k.shape[0]) // head
    cap = sd.get("cap_embedder.1.weight")
    if cap is not None:
        got["cap_feat_dim"] = int(cap.shape[-1])
    emb = sorted(k for k in sd if k.startswith("all_x_embedder.") and k.endswith(".weight"))
    if emb:
        p, f = (int(x) for x in emb[0].split(".")[1].split("-"))
        got["all_patch_size"] = [int(k.split(".")[1].split("-")[0]) for k in emb]
        got["in_channels"] = int(sd[emb[0]].shape[1]) // (p * p * f)
    return got


def check_weights(config: dict, sd: dict[str, torch.Tensor], weights: Path, where: str) -> None:
    """UserError naming the first transformer setting of config.json (`where`) that the weights disagree with."""
    got = weights_architecture(sd)
    for k in ("dim", "n_heads", "n_kv_heads", "n_layers", "n_refiner_layers", "cap_feat_dim", "in_channels",
              "all_patch_size"):
        if k in got and k not in config:
            raise UserError(f"{where}: transformer.{k} is missing ({Path(weights).name} holds a model with {k} "
                            f"{got[k]!r}); restore the folder's original config.json")
        if k in got and config.get(k) != got[k]:
            raise UserError(f"{where}: transformer.{k} is {config.get(k)!r} but {Path(weights).name} holds a model "
                            f"with {k} {got[k]!r}; config.json and the weights come from different models (restore "
                            "the folder's original config.json)")


def load_checked(module: nn.Module, sd: dict[str, torch.Tensor], weights: Path, strict: bool = True,
                 assign: bool = False) -> None:
    """module.load_state_dict(sd) with a one-line UserError for missing / unexpected names or other shapes.
    `assign`: the module's tensors become sd's (their dtype; a module built on the meta device gets its storage)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise UserError(f"{weights}: does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        "the folder's config.json and weights come from different models")
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise UserError(f"{weights}: tensor {k} has shape {list(v.shape)} but config.json implies "
                            f"{list(own[k].shape)}; the folder's config.json and weights come from different models")
    module.load_state_dict(sd, strict=strict, assign=assign)
    if assign:
        check_materialized(module, weights)
