"""Typed run configuration: dataclasses with documented defaults, YAML files and `--set a.b=c` overrides.

An unknown key, a wrong type or a value outside its choices is a UserError naming the key (exit code 2).
The resolved config is saved in every run folder (`config.yaml`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .errors import UserError


def choice(default, options, doc=""):
    return field(default=default, metadata={"choices": tuple(options), "doc": doc})


def opt(default, doc=""):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class StudentConfig:
    decoupling: str = choice("full", ["full", "lora", "shared"], "step-decoupled parameters: two full copies, "
                             "one frozen base + a LoRA per step, or one shared set (ablation)")
    sigma_mid: float = opt(0.75, "σm: the σ at which step 2 starts (the 2-step shift-3 grid gives 0.75)")
    mid_noise: str = choice("same", ["same", "fresh"], "x_m re-noises x̂0₁ with the initial ε (same) or a fresh ε")
    lora_rank: int = opt(16, "LoRA rank per step (decoupling=lora)")
    lora_alpha: float = opt(16.0, "LoRA alpha (decoupling=lora)")
    lora_targets: list = opt(["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"],
                             "module names that get LoRA adapters (decoupling=lora)")


@dataclass
class DiscriminatorConfig:
    real: str = choice("teacher", ["teacher", "data"], "the GAN's real images: the teacher's cached 8-step "
                       "samples (Turbo++) or benchmark data (ablation)")
    blocks: list = opt([1, 2, 3], "teacher blocks whose image-token features the heads read")
    head: str = choice("grid", ["grid", "pooled"], "heads on the token grid (conv) or on mean-pooled tokens")
    hidden: int = opt(64, "head width")
    text_cond: bool = opt(True, "projection-conditioning of the heads on the pooled caption features")
    loss: str = choice("ns", ["ns", "hinge"], "non-saturating softplus or hinge GAN loss")
    r1: float = opt(0.0, "R1 penalty weight on the heads' inputs (real samples)")
    sigma_dist: str = choice("logit_normal", ["logit_normal", "uniform"], "distribution of the re-noising σ")
    # −1.5 (mostly low noise) by measurement: benchmarks/results/disc_probe.md, README "Distillation" (session 4)
    sigma_mean: float = opt(-1.5, "logit-normal mean of the re-noising σ (LADD biases it to high noise, +1)")
    sigma_std: float = opt(1.0, "logit-normal std of the re-noising σ")


@dataclass
class LossConfig:
    gradient: str = choice("end_to_end", ["end_to_end", "detach"], "whether the final-image loss reaches θ1 "
                           "through x_m (end_to_end) or stops at x_m (detach, ablation)")
    adv_weight: float = opt(1.0, "weight of the final-image adversarial loss")
    step1_loss: str = choice("adv", ["adv", "traj", "none"], "iterative regularisation of step 1: adversarial "
                             "on x̂0₁ (default by measurement, README), regression to the teacher's state at σm, "
                             "or none (ablation)")
    step1_weight: float = opt(1.0, "weight of the step-1 loss")
    traj_distance: str = choice("mse", ["mse", "perceptual"], "distance of step1_loss=traj: pixel MSE or MSE "
                                "of the discriminator's frozen teacher features")
    paired_weight: float = opt(0.0, "optional paired regression of x̂0₂ to the teacher's final sample")
    paired_distance: str = choice("mse", ["mse", "perceptual"], "distance of the paired regression")


@dataclass
class DMDConfig:
    guidance: float = opt(2.0, "DMD2: CFG scale of the real score (Z-Image form pos + g·(pos − neg); g = 0 is "
                          "no guidance); set it to the teacher's tuned value")
    gan_weight: float = opt(5e-3, "DMD2: weight of the GAN generator loss (DMD2 SDXL: 5e-3)")
    critic_gan_weight: float = opt(1e-2, "DMD2: weight of the GAN classifier loss in the critic update "
                                   "(DMD2 SDXL: 1e-2)")
    sigma_min: float = opt(0.02, "DMD2: lowest σ of the uniform re-noising of the DMD term and fake-score loss")
    sigma_max: float = opt(0.98, "DMD2: highest σ of the uniform re-noising")


@dataclass
class D2GConfig:
    regression_weight: float = opt(1.0, "Diffusion2GAN: weight of the paired perceptual regression")
    gan_weight: float = opt(0.5, "Diffusion2GAN: weight of the conditional GAN generator loss")
    blocks: list = opt([], "Diffusion2GAN: teacher blocks the multi-scale discriminator reads ([] = all blocks)")
    scales: list = opt([1, 2], "Diffusion2GAN: input scales of the discriminator (k = downsampled k× then "
                       "upsampled back)")
    translate: float = opt(0.125, "Diffusion2GAN: max translation of the paired augmentation (fraction of the side)")
    flip: bool = opt(True, "Diffusion2GAN: random horizontal flip in the paired augmentation")


@dataclass
class TrainConfig:
    updates: int = opt(2000, "student updates")
    minutes: float = opt(0.0, "optional wall-time budget in minutes (0 = none); stops early when reached")
    batch_size: int = opt(32, "GLOBAL batch over all processes: each of N processes takes batch_size/N rows of "
                          "the same global draw (N must divide it); N processes reproduce one process's batches")
    lr_student: float = opt(2e-5, "AdamW learning rate of the student (full / shared decoupling)")
    lr_lora: float = opt(1e-4, "AdamW learning rate of the student's adapters when student.decoupling=lora "
                         "(zero-initialised adapters barely move at the full-model rate; by measurement, README)")
    lr_disc: float = opt(1e-3, "AdamW learning rate of the discriminator heads / critic (Turbo++ default by "
                         "measurement; the peers' configs set their own)")
    betas: list = opt([0.0, 0.99], "AdamW betas (β1 = 0 is usual for GANs)")
    weight_decay: float = opt(0.0, "AdamW weight decay of the student")
    weight_decay_disc: float = opt(0.01, "AdamW weight decay of the discriminator heads / critic (torch's AdamW "
                                   "default, which every measurement in the README used)")
    d_updates: int = opt(1, "discriminator / critic updates per student update")
    d_warmup: int = opt(300, "discriminator / critic-only updates before the first student update (a head start: "
                        "without it the student reaches the teacher before the heads learn anything)")
    ema: float = opt(0.99, "EMA decay of the student (with warm-up)")
    grad_clip: float = opt(1.0, "max gradient norm (0 = off)")
    grad_checkpointing: bool = opt(False, "gradient checkpointing on the backbone blocks")
    fsdp: bool = opt(False, "shard the student's trainable transformers with torch FSDP2 (each Z-Image block, then "
                     "the transformer; the EMA sharded alike; full/shared decoupling, 2+ processes; on by itself "
                     "under an accelerate FSDP launch); checkpoints hold full tensors (docs/sizing.md)")
    mixed_precision: str = choice("no", ["no", "bf16"], "bf16 autocast (GPUs)")
    seed: int = opt(0, "seed of the run")
    log_every: int = opt(10, "updates between log lines")
    grid_every: int = opt(250, "updates between fixed-noise sample grids (0 = off)")
    eval_every: int = opt(0, "updates between quick evals (0 = off)")
    eval_num: int = opt(200, "images in a quick eval")
    checkpoint_every: int = opt(250, "updates between checkpoints")
    keep_checkpoints: int = opt(2, "complete checkpoints kept")
    max_nonfinite: int = opt(5, "non-finite losses in a row before rolling back to the last checkpoint "
                             "with half the learning rates")


@dataclass
class Config:
    method: str = choice("turbopp", ["turbopp", "diffusion2gan", "ladd", "dmd2"], "distillation method")
    student: StudentConfig = field(default_factory=StudentConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    d2g: D2GConfig = field(default_factory=D2GConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check(cls, name: str, value, path: str):
    f = {x.name: x for x in fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string; accept it as the float it is
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is list:
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise UserError(f"config key {path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    ch = f.metadata.get("choices")
    if ch and value not in ch:
        raise UserError(f"config key {path}: {value!r} is not one of {', '.join(map(str, ch))}")
    return value


def from_dict(cls, d: dict, prefix: str = ""):
    if not isinstance(d, dict):
        raise UserError(f"config section {prefix or '<root>'}: expected a mapping, got {type(d).__name__}")
    obj = cls()
    known = {f.name: f for f in fields(cls)}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if k not in known:
            raise UserError(f"unknown config key {path!r}; known keys here: {', '.join(known)}")
        sub = typing.get_type_hints(cls)[k]
        if dataclasses.is_dataclass(sub):
            setattr(obj, k, from_dict(sub, v, path + "."))
        else:
            setattr(obj, k, _check(cls, k, v, path))
    return obj


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_value(text: str):
    """`--set` values are YAML scalars/lists: 0.75, true, [1, 2], fresh."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"--set value {text!r} is not valid YAML ({e.__class__.__name__}); quote it or fix it")


def apply_overrides(d: dict, sets: list[str]) -> dict:
    d = dict(d)
    for s in sets or []:
        if "=" not in s:
            raise UserError(f"--set {s!r}: expected key=value, e.g. --set loss.step1_loss=traj")
        key, val = s.split("=", 1)
        parts = key.strip().split(".")
        cur = d
        for p in parts[:-1]:
            nxt = cur.get(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {key}: {p!r} is not a section")
            cur[p] = dict(nxt)
            cur = cur[p]
        cur[parts[-1]] = parse_value(val)
    return d


def load_config(path: Path | None = None, sets: list[str] | None = None) -> Config:
    d: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: config file not found")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]}); fix the file")
        if not isinstance(d, dict):
            raise UserError(f"{path}: top level must be a mapping of sections (student, disc, loss, train)")
    d = apply_overrides(d, sets or [])
    return from_dict(Config, d)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
