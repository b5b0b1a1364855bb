"""The step-decoupled 2-step student (Turbo++ idea 2); its folder is written and read by twostep.sampling.

    ε ~ N(0, I)
    x̂0₁ = F_θ1(ε, σ = 1, c)                       step 1 (its Euler step to σm and same-noise re-noising coincide)
    x_m  = (1 − σm)·x̂0₁ + σm·ε                     same noise (default) or fresh ε'
    x̂0₂ = F_θ2(x_m, σm, c)                         step 2: the image

decoupling: `full` = two full copies θ1, θ2; `lora` = one frozen base + one peft LoRA adapter per step, switched
per step; `shared` = one set (ablation). All start from the teacher. No CFG: 2 NFE per image.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

from . import flow
from .backbones.zimage import ZImageBackbone, check_materialized
from .errors import UserError

STEP_NAMES = ("step1", "step2")


def check_lora_targets(transformer: nn.Module, targets) -> None:
    """Every `student.lora_targets` entry names Linear layers of the transformer, as peft matches them (the whole
    module name, or its last dotted parts); one UserError naming those that match nothing."""
    if isinstance(targets, str) or not targets:
        raise UserError(f"student.lora_targets={targets!r}: give a non-empty list of module names, e.g. "
                        "[to_q, to_k, to_v, to_out.0]")
    names = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    bad = [t for t in targets if not any(n == t or n.endswith("." + str(t)) for n in names)]
    if bad:
        leaves = sorted({n.split(".")[-1] if not n.split(".")[-1].isdigit() else ".".join(n.split(".")[-2:])
                         for n in names})
        raise UserError(f"student.lora_targets: {', '.join(map(repr, bad))} matches no Linear layer of the "
                        f"teacher's transformer; use names among {', '.join(leaves[:12])}")


class TwoStepStudent(nn.Module):
    def __init__(self, teacher: ZImageBackbone, decoupling: str = "full", sigma_mid: float = 0.75,
                 mid_noise: str = "same", lora_rank: int = 16, lora_alpha: float = 16.0,
                 lora_targets=("to_q", "to_k", "to_v", "to_out.0")):
        super().__init__()
        if not 0.0 < sigma_mid < 1.0:
            raise UserError(f"student.sigma_mid={sigma_mid}: must lie strictly between 0 and 1")
        self.decoupling, self.sigma_mid, self.mid_noise = decoupling, float(sigma_mid), mid_noise
        if decoupling == "full":
            self.step1 = _trainable_copy(teacher)
            self.step2 = _trainable_copy(teacher)
        elif decoupling == "shared":
            self.shared = _trainable_copy(teacher)
        elif decoupling == "lora":
            from peft import LoraConfig

            self.base = deepcopy_sharing_frozen(teacher).requires_grad_(False)  # the frozen base IS the teacher
            check_lora_targets(self.base.transformer, lora_targets)  # before peft (whose own error is a traceback)
            for name in STEP_NAMES:  # LoRA B starts at zero: both steps start exactly at the teacher
                self.base.transformer.add_adapter(
                    LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(lora_targets),
                               init_lora_weights=True), adapter_name=name)
            with torch.no_grad():  # fp32 adapters whatever dtype the frozen base is read in (train.frozen_dtype)
                for n, p in self.base.named_parameters():
                    if "lora_" in n and p.dtype != torch.float32:
                        p.data = p.data.float()
            self._lora_trainable()
        else:
            raise UserError(f"student.decoupling={decoupling!r}: use full, lora or shared")

    # -- which parameters run which step --------------------------------------------------------------
    def _lora_trainable(self):
        for n, p in self.base.named_parameters():
            p.requires_grad_(any(f".{s}." in n or n.endswith(f".{s}") for s in STEP_NAMES) and "lora_" in n)

    def step_backbone(self, i: int) -> ZImageBackbone:
        """The backbone that runs step i (1 or 2), with the right adapter active in lora mode."""
        if self.decoupling == "full":
            return self.step1 if i == 1 else self.step2
        if self.decoupling == "shared":
            return self.shared
        self.base.transformer.set_adapter(STEP_NAMES[i - 1])
        self._lora_trainable()  # peft's set_adapter freezes the inactive adapter; both stay trainable
        return self.base

    def step_parameters(self, i: int) -> list[nn.Parameter]:
        if self.decoupling == "lora":
            return [p for n, p in self.base.named_parameters() if "lora_" in n and f".{STEP_NAMES[i - 1]}." in n]
        return [p for p in self.step_backbone(i).parameters()]

    @property
    def sharded(self) -> bool:
        """True when FSDP holds the parameters as shards (train.fsdp). Every process must then make the same
        sequence of student calls: each call all-gathers parameters, and a call one process skips hangs the rest."""
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in self.parameters())

    @property
    def sigmas(self) -> list[float]:
        return flow.two_step_sigmas(self.sigma_mid)

    def transformers(self) -> dict[str, ZImageBackbone]:
        """The backbones that hold trainable weights, by name: {"step1", "step2"} (full), {"shared"} (shared) or
        {"base"} (lora: the frozen base carrying both step adapters); in step order."""
        if self.decoupling == "full":
            return {"step1": self.step1, "step2": self.step2}
        if self.decoupling == "shared":
            return {"shared": self.shared}
        return {"base": self.base}

    # -- the 2-step rollout ---------------------------------------------------------------------------
    def mid_state(self, x0_1: torch.Tensor, noise: torch.Tensor,
                  fresh_noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_m = (1 − σm)·x̂0₁ + σm·ε: the same ε (mid_noise=same) or the fresh ε' (flow.mid_state)."""
        return flow.mid_state(x0_1, noise, self.sigma_mid, self.mid_noise, fresh_noise)

    def forward(self, noise: torch.Tensor, text, gradient: str = "end_to_end",
                fresh_noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        b = noise.shape[0]
        one = torch.ones(b, dtype=noise.dtype, device=noise.device)
        x0_1 = self.step_backbone(1).denoise(noise, one, text)                     # step 1 at σ = 1
        x_m = self.mid_state(x0_1, noise, fresh_noise)                             # x_m = (1−σm)x̂0₁ + σm·ε
        if gradient == "detach":
            x_m = x_m.detach()                                                     # ablation: no grad into θ1
        x0_2 = self.step_backbone(2).denoise(x_m, one * self.sigma_mid, text)     # step 2 at σm
        return {"x0_1": x0_1, "x_m": x_m, "x0_2": x0_2}

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, text) -> dict[str, torch.Tensor]:
        """The inference rollout (forward's dict) without gradient; mid_noise=fresh draws ε' from a generator
        seeded by the noise (flow.inference_fresh_noise), so one seed gives one image."""
        return self(noise, text, fresh_noise=flow.inference_fresh_noise(noise, self.mid_noise))

    def step_input(self, noise: torch.Tensor, text, k: torch.Tensor,
                   fresh_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_in, σ_in) of step k per sample: ε at σ = 1 for k = 1; for k = 2 the state x_m made by the student's
        own step 1, computed under no_grad (it never requires grad) and re-noised to σm as in forward."""
        b = noise.shape[0]
        sigma = torch.ones(b, dtype=noise.dtype, device=noise.device)
        sigma[k == 2] = self.sigma_mid
        x_in = noise.clone()
        two = (k == 2).nonzero().flatten()
        if len(two):
            sub_text = [text[i] for i in two.tolist()]
            with torch.no_grad():
                x0_1 = self.step_backbone(1).denoise(noise[two], sigma.new_ones(len(two)), sub_text)
                x_in[two] = self.mid_state(x0_1, noise[two], None if fresh_noise is None else fresh_noise[two])
        elif self.sharded:  # FSDP: this rank drew no k = 2 sample, but the others may run step 1; join their
            with torch.no_grad():  # all-gathers with a 1-sample call whose result is unused (no RNG drawn)
                self.step_backbone(1).denoise(noise[:1], sigma.new_ones(1), [text[0]])
        return x_in.detach(), sigma

    def at_step(self, noise: torch.Tensor, text, k: torch.Tensor,
                fresh_noise: torch.Tensor | None = None) -> torch.Tensor:
        """x̂0 at step k per sample, gradient through that step only (the earlier step under no_grad). One call
        runs both steps' samples, so it needs one parameter set (decoupling=shared)."""
        if self.decoupling != "shared":
            raise UserError("TwoStepStudent.at_step runs both steps in one call: it needs student.decoupling=shared")
        x_in, sigma = self.step_input(noise, text, k, fresh_noise)
        return self.step_backbone(2).denoise(x_in, sigma, text)

    # -- weights --------------------------------------------------------------------------------------
    def export_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Files of a student folder: {filename stem: state dict}. `state`: this module's full state dict when the
        module itself holds shards (FSDP; twostep.train.state gathers it), else self.state_dict()."""
        sd = self.state_dict() if state is None else state

        def sub(prefix):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

        if self.decoupling == "full":
            return {"step1": sub("step1.transformer."), "step2": sub("step2.transformer.")}
        if self.decoupling == "shared":
            return {"model": sub("shared.transformer.")}
        sd = sub("base.transformer.")
        return {"base": {k: v for k, v in sd.items() if "lora_" not in k},
                **{s: {k: v for k, v in sd.items() if "lora_" in k and f".{s}." in k} for s in STEP_NAMES}}

    # the stems of export_state that never change in training (a lora student's base: the teacher's weights)
    FROZEN_STEMS = {"lora": ("base",), "full": (), "shared": ()}

    def trainable_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What of a state dict (this module's, or `state`, a gathered one) a checkpoint must hold: the weights
        that train. lora: the adapters only (the frozen base is the teacher, pointed at by its hash); full / shared:
        every weight."""
        sd = self.state_dict() if state is None else state
        return {k: v for k, v in sd.items() if "lora_" in k} if self.decoupling == "lora" else sd

    def stem_prefix(self, stem: str) -> str:
        """export_state's inverse: the state-dict prefix of the names in its file `stem`."""
        if self.decoupling == "full":
            return f"{stem}.transformer."
        return "shared.transformer." if self.decoupling == "shared" else "base.transformer."

    def load_export_state(self, files: dict[str, dict[str, torch.Tensor]], assign: bool = False):
        """export_state's files into this module; `assign`: its tensors become the files' (their dtype; a student
        built on the meta device, build_student_from_config(meta=True), gets its storage)."""
        if self.decoupling == "full":
            self.step1.transformer.load_state_dict(files["step1"], assign=assign)
            self.step2.transformer.load_state_dict(files["step2"], assign=assign)
        elif self.decoupling == "shared":
            self.shared.transformer.load_state_dict(files["model"], assign=assign)
        else:
            sd = {**files["base"], **files["step1"], **files["step2"]}
            self.base.transformer.load_state_dict(sd, assign=assign)
        if assign:
            check_materialized(self, "student")


def deepcopy_sharing_frozen(module: nn.Module) -> nn.Module:
    """deepcopy whose frozen parameters are the original Parameter objects, not copies. A lora student's frozen
    base is the teacher, and the EMA of a frozen weight is that weight: one copy of the frozen transformer serves
    all three (for the 6B model, two fewer copies; docs/sizing.md). Safe because nothing writes to frozen weights,
    which the teacher-unchanged check at the end of every run verifies."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    return copy.deepcopy(module, memo)


_ON_META: ContextVar[bool] = ContextVar("twostep_student_on_meta", default=False)


@contextmanager
def trainable_copies_on_meta():
    """Students built inside (twostep.methods builds them) hold their full / shared trainable copies of the teacher
    on the meta device: the modules, names, shapes and dtypes, no storage. The training loop gives them storage
    where it fits (twostep.train.distributed.materialize: under FSDP after sharding, each process only its shards),
    so a 6B copy is never made whole on a device that cannot hold it. A lora student's base is the
    teacher itself, not a copy, and its adapters are small: it is built as usual."""
    token = _ON_META.set(True)
    try:
        yield
    finally:
        _ON_META.reset(token)


def meta_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """deepcopy with every parameter and buffer on the meta device (requires_grad kept), floating-point ones in
    `dtype` when given; no storage is allocated."""
    memo: dict = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        m = torch.empty_like(t, device="meta", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(module, memo)


def _trainable_copy(bb: ZImageBackbone) -> ZImageBackbone:
    # trainable weights are fp32 masters whatever dtype the frozen teacher is read in (train.frozen_dtype)
    c = meta_copy(bb, torch.float32) if _ON_META.get() else copy.deepcopy(bb).float()
    c.requires_grad_(True).train()
    return c


def student_config(teacher_cfg: dict, cfg, teacher_folder: Path | None) -> dict:
    return {"kind": "student", "backbone": teacher_cfg.get("backbone", "zimage"),
            "transformer": teacher_cfg["transformer"],
            **({"resolution": teacher_cfg["resolution"]} if "resolution" in teacher_cfg else {}),
            "text_encoder": teacher_cfg.get("text_encoder"), "data": teacher_cfg.get("data"),
            "data_version": teacher_cfg.get("data_version"),
            "teacher": str(teacher_folder) if teacher_folder else None,
            "method": cfg.method, "decoupling": cfg.student.decoupling, "sigma_mid": cfg.student.sigma_mid,
            "mid_noise": cfg.student.mid_noise, "lora_rank": cfg.student.lora_rank,
            "lora_alpha": cfg.student.lora_alpha, "lora_targets": list(cfg.student.lora_targets),
            "sampling": {"steps": 2, "sigmas": flow.two_step_sigmas(cfg.student.sigma_mid), "guidance": 0.0},
            # a ZImagePipeline teacher: the latent space, and the folder whose text encoder and VAE the student uses
            **{k: teacher_cfg[k] for k in ("format", "pipeline", "image_resolution", "vae") if k in teacher_cfg},
            # a non-square teacher: height/width (+ image_height/image_width) instead of resolution (model.size_fields)
            **{k: teacher_cfg[k] for k in ("height", "width", "image_height", "image_width") if k in teacher_cfg}}


def build_student_from_config(c: dict, meta: bool = False) -> TwoStepStudent:
    """The student a folder's config.json describes; `meta`: on the meta device, without storage (then
    load_export_state(assign=True))."""
    with torch.device("meta") if meta else nullcontext():
        base = ZImageBackbone.from_config(c["transformer"])
        return TwoStepStudent(base, c["decoupling"], c["sigma_mid"], c.get("mid_noise", "same"),
                              c.get("lora_rank", 16), c.get("lora_alpha", 16.0), c.get("lora_targets", ["to_q"]))
