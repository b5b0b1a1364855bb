"""Typed run configuration: dataclasses with documented defaults, YAML files and `--set a.b=c` overrides.

An unknown key, a wrong type, a value outside its choices or outside its range is a UserError naming the key
(exit code 2). The resolved config is saved in every run folder (`config.yaml`).

Ranges are declared once: every numeric field states its Range next to its default and doc (`opt(2e-5, "doc",
range=POSITIVE)`), from_dict checks it when the config is parsed (before any model is built; NaN and ±inf are
refused for every float), and a dataclass's `RULES` (Rule: keys, test, fix) check values that only make sense
together. The same Range objects give the CLI's non-config flags their argparse type (`type=COUNT.arg()`, so
argparse's own one-line `error:` and exit code 2 apply) and the library functions behind them their check
(`COUNT.check(num, "num")`).

Here: the machinery (from_dict, to_dict, read_sections, load_typed, dump_config) and the sections every
distillation method shares (student, disc, train). A method's own sections are dataclasses in its module
(twostep/methods/*.py, e.g. turbopp's `loss`); twostep.methods assembles one config class per method
(distill_config_class) and holds the distill `load_config`, since it sees the registry and this module must not.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import yaml

from .errors import UserError


# -- ranges: the values a numeric option allows, declared once -------------------------------------------------

@dataclass(frozen=True)
class Range:
    """The values a numeric option allows: a number between `lo` and `hi` (None: unbounded; each bound closed
    unless `lo_open` / `hi_open`), an integer when `integer`; with `items`, a list of such numbers (exactly
    `length` of them when given, at least `min_items`). NaN and ±inf are never inside. `text` says it in messages
    ("use a number > 0")."""
    text: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    items: bool = False
    length: int | None = None
    min_items: int = 0

    def number_ok(self, x) -> bool:
        """One number (a list's item) inside the bounds."""
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            return False
        if self.integer and not isinstance(x, numbers.Integral):
            return False
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return self.hi is None or not (x > self.hi or (self.hi_open and x == self.hi))

    def contains(self, value) -> bool:
        if not self.items:
            return self.number_ok(value)
        return (isinstance(value, (list, tuple)) and len(value) >= self.min_items
                and (self.length is None or len(value) == self.length) and all(self.number_ok(x) for x in value))

    def check(self, value, name: str):
        """`value` if inside, else a one-line UserError naming `name`, the value and the range (a library
        function's check of an argument a CLI flag gives it)."""
        if not self.contains(value):
            raise UserError(f"{name}: {shown(value)} is out of range; use {self.text}")
        return value

    def arg(self) -> Callable[[str], Any]:
        """An argparse `type=` for a flag in this range (one item per value when nargs is used): a value that is
        not a number, or outside, is argparse's one-line error (exit code 2)."""
        kind = "an integer" if self.integer else "a number"

        def parse(text: str):
            try:
                value = int(text) if self.integer else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not {kind}; use {self.text}") from None
            if not self.number_ok(value):
                raise argparse.ArgumentTypeError(f"{text} is out of range; use {self.text}")
            return value

        parse.__name__ = "integer" if self.integer else "number"
        parse.range = self  # type: ignore[attr-defined]  # the flag's range (tests/test_ranges.py enumerates them)
        return parse


def at_least(n: int, why: str = "") -> Range:
    """Integers >= n."""
    return Range(f"an integer >= {n}{f' ({why})' if why else ''}", lo=n, integer=True)


FINITE = Range("a finite number")
POSITIVE = Range("a finite number > 0", lo=0, lo_open=True)
NON_NEGATIVE = Range("a finite number >= 0", lo=0)
UNIT = Range("a number in [0, 1]", lo=0, hi=1)
UNIT_RIGHT_OPEN = Range("a number in [0, 1), i.e. 0 <= x < 1", lo=0, hi=1, hi_open=True)
UNIT_OPEN = Range("a number in (0, 1), i.e. 0 < x < 1", lo=0, hi=1, lo_open=True, hi_open=True)
SIGMA = Range("a noise level in (0, 1], i.e. 0 < sigma <= 1", lo=0, hi=1, lo_open=True)
COUNT = at_least(1)
NON_NEGATIVE_INT = at_least(0)
SEED = Range(f"an integer in [0, {2 ** 32 - 1}]", lo=0, hi=2 ** 32 - 1, integer=True)
UPSCALE = Range("an integer in [1, 64]", lo=1, hi=64, integer=True)
BETAS = Range("a list of two numbers in [0, 1), e.g. [0.0, 0.99]", lo=0, hi=1, hi_open=True, items=True, length=2)
BLOCKS = Range("a non-empty list of integers >= 0 (teacher block indices), e.g. [1, 2, 3]", lo=0, integer=True,
               items=True, min_items=1)
BLOCKS_OR_ALL = Range("a list of integers >= 0 (teacher block indices; [] = all blocks)", lo=0, integer=True,
                      items=True)
SCALES = Range("a non-empty list of integers >= 1, e.g. [1, 2]", lo=1, integer=True, items=True, min_items=1)
GUIDANCES = Range("a non-empty list of numbers >= 0 (CFG scales)", lo=0, items=True, min_items=1)


class Rule(NamedTuple):
    """A check of values that only make sense together (a dataclass's `RULES`): `test(section)` must hold;
    `fix` says what to change."""
    keys: tuple[str, ...]
    test: Callable[[Any], bool]
    fix: str


def choice(default, options, doc=""):
    return field(default=default, metadata={"choices": tuple(options), "doc": doc})


def opt(default, doc="", range: Range | None = None):  # noqa: A002  (shadows the builtin in here only)
    meta = {"doc": doc, **({"range": range} if range is not None else {})}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def field_range(cls, name: str) -> Range | None:
    """The declared range of a config field (a float field without one: FINITE; other fields: None)."""
    f = {x.name: x for x in fields(cls)}[name]
    rng = f.metadata.get("range")
    if rng is None and typing.get_type_hints(cls)[name] is float:
        return FINITE
    return rng


@dataclass
class StudentConfig:
    decoupling: str = choice("full", ["full", "lora", "shared"], "step-decoupled parameters: two full copies, "
                             "one frozen base + a LoRA per step, or one shared set (ablation)")
    sigma_mid: float = opt(0.75, "σm: the σ at which step 2 starts (the 2-step shift-3 grid gives 0.75)",
                           range=UNIT_OPEN)
    mid_noise: str = choice("same", ["same", "fresh"], "x_m re-noises x̂0₁ with the initial ε (same) or a fresh ε")
    lora_rank: int = opt(16, "LoRA rank per step (decoupling=lora)", range=COUNT)
    lora_alpha: float = opt(16.0, "LoRA alpha (decoupling=lora)", range=POSITIVE)
    lora_targets: list = opt(["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"],
                             "module names that get LoRA adapters (decoupling=lora)")


@dataclass
class DiscriminatorConfig:
    real: str = choice("teacher", ["teacher", "data"], "the GAN's real images: the teacher's cached 8-step "
                       "samples (Turbo++) or benchmark data (ablation)")
    blocks: list = opt([1, 2, 3], "teacher blocks whose image-token features the heads read (indices into the "
                        "teacher's blocks: 0 .. its layer count − 1)", range=BLOCKS)
    head: str = choice("grid", ["grid", "pooled"], "heads on the token grid (conv) or on mean-pooled tokens")
    hidden: int = opt(64, "head width", range=COUNT)
    text_cond: bool = opt(True, "projection-conditioning of the heads on the pooled caption features")
    loss: str = choice("ns", ["ns", "hinge"], "non-saturating softplus or hinge GAN loss")
    r1: float = opt(0.0, "R1 penalty weight on the heads' inputs (real samples)", range=NON_NEGATIVE)
    sigma_dist: str = choice("logit_normal", ["logit_normal", "uniform"], "distribution of the re-noising σ")
    sigma_mean: float = opt(-1.5, "logit-normal mean of the re-noising σ (−1.5: mostly low noise; LADD biases it to "
                            "high noise, +1)", range=FINITE)
    sigma_std: float = opt(1.0, "logit-normal std of the re-noising σ", range=NON_NEGATIVE)
    mismatch_weight: float = opt(0.0, "matching-aware critic: weight of the real images paired with a wrong caption "
                                 "(the batch's captions rolled by one) as extra fakes (0 = off)", range=NON_NEGATIVE)


@dataclass
class TrainConfig:
    updates: int = opt(2000, "student updates", range=COUNT)
    minutes: float = opt(0.0, "optional wall-time budget in minutes (0 = none); stops early when reached",
                         range=NON_NEGATIVE)
    batch_size: int = opt(32, "GLOBAL batch over all processes: each of N processes takes batch_size/N rows of "
                          "the same global draw (N must divide it); N processes reproduce one process's batches",
                          range=COUNT)
    grad_accum: int = opt(1, "gradient accumulation: each update averages the gradients of grad_accum micro-batches "
                          "of batch_size rows (backward after each), so the update's global batch is batch_size × "
                          "grad_accum; the same update as one batch of that size, to float rounding", range=COUNT)
    lr_student: float = opt(2e-5, "AdamW learning rate of the student (full / shared decoupling)", range=POSITIVE)
    lr_lora: float = opt(1e-4, "AdamW learning rate of the student's adapters when student.decoupling=lora",
                          range=POSITIVE)
    lr_disc: float = opt(1e-3, "AdamW learning rate of the discriminator heads / critic (the peers' configs set "
                         "their own)", range=POSITIVE)
    warmup: int = opt(0, "linear learning-rate warm-up of the student: update k (1, 2, ...) steps at "
                      "lr × min(1, k / warmup) (0 = off); the critic keeps its rate (train.d_warmup gives it its "
                      "head start)", range=NON_NEGATIVE_INT)
    lr_half_life: int = opt(0, "exponential decay of the student's learning rate: halved every lr_half_life "
                            "updates (0 = constant); a function of the update alone, so budgets can be extended",
                            range=NON_NEGATIVE_INT)
    betas: list = opt([0.0, 0.99], "AdamW betas (β1 = 0 is usual for GANs)", range=BETAS)
    weight_decay: float = opt(0.0, "AdamW weight decay of the student", range=NON_NEGATIVE)
    weight_decay_disc: float = opt(0.01, "AdamW weight decay of the discriminator heads / critic (torch's AdamW "
                                   "default)", range=NON_NEGATIVE)
    d_updates: int = opt(1, "discriminator / critic updates per student update", range=COUNT)
    d_warmup: int = opt(300, "discriminator / critic-only updates before the first student update (a head start "
                        "for the discriminator)", range=NON_NEGATIVE_INT)
    ema: float = opt(0.99, "EMA decay of the student (with warm-up)", range=UNIT_RIGHT_OPEN)
    grad_clip: float = opt(1.0, "max gradient norm (0 = off)", range=NON_NEGATIVE)
    grad_checkpointing: bool = opt(False, "gradient checkpointing on the backbone blocks")
    fsdp: bool = opt(False, "shard the student's trainable transformers with torch FSDP2 (each Z-Image block, then "
                     "the transformer; the EMA sharded alike; full/shared decoupling, 2+ processes; on by itself "
                     "under an accelerate FSDP launch); checkpoints hold full tensors (docs/sizing.md)")
    mixed_precision: str = choice("no", ["no", "bf16"], "bf16 autocast (GPUs); under train.fsdp also FSDP2's "
                                  "MixedPrecisionPolicy: parameters all-gathered in bf16, gradients reduced in fp32, "
                                  "fp32 master weights and optimizer state")
    frozen_dtype: str = choice("auto", ["auto", "bf16", "fp32"], "dtype the frozen teacher (and a lora student's "
                               "frozen base, which is the teacher) is held in; it never trains, so it is never "
                               "upcast: auto = bf16 on CUDA, fp32 on the CPU. Trainable weights stay fp32")
    adamw: str = choice("auto", ["auto", "foreach", "fused"], "AdamW implementation: fused (torch's one-kernel "
                        "step, no temporaries), foreach (torch's default, which on CUDA holds sqrt(v) of every "
                        "parameter at once during the step); auto = fused on CUDA, foreach on the CPU")
    seed: int = opt(0, "seed of the run", range=SEED)
    log_every: int = opt(10, "updates between log lines", range=COUNT)
    grid_every: int = opt(250, "updates between fixed-noise sample grids (0 = off)", range=NON_NEGATIVE_INT)
    # watching a run (train/viz.py): trackers, validation prompts in the grid, a quick FD every eval_every
    log_with: str = choice("none", ["none", "tensorboard", "wandb"], "also send the log's scalars (every log_every), "
                           "the grids (every grid_every) and eval_fd to an accelerate tracker: tensorboard writes "
                           "RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`); wandb needs `pip install wandb`")
    validation_prompts: list = opt([], "your own prompts, added as columns of every grid (teacher 8-step | naive "
                                   "2-step | student rows, fixed noise seeded by VALIDATION_SEED in train/viz.py)")
    eval_every: int = opt(0, "updates between quick FDs of the EMA student against the cache's last eval_num "
                          "teacher samples, which training then never draws (0 = off: nothing held out); logged as "
                          "eval_fd in log.jsonl and the trackers", range=NON_NEGATIVE_INT)
    eval_num: int = opt(64, "held-out cache rows of the quick FD (train.eval_every > 0; at most half the cache)",
                        range=at_least(10, "FD needs at least 10 images"))
    eval_features: str = opt("", "feature extractor of the quick FD (twostep.metrics.extractors spec: a feature-net "
                             "folder, inception[:FILE], clip:DIR, dinov2:DIR); '' = the committed feature net of the "
                             "cache's benchmark (shapes / photos)")
    keep_best: bool = opt(True, "with train.eval_every > 0: keep the EMA student of the lowest quick FD in RUN/best/ "
                          "(export, sample and eval of the run take it; --weights last takes the last)")
    checkpoint_every: int = opt(250, "updates between checkpoints (0 = only the final one)", range=NON_NEGATIVE_INT)
    keep_checkpoints: int = opt(2, "complete checkpoints kept", range=COUNT)
    checkpoint_format: str = choice("auto", ["auto", "files", "dcp"], "checkpoint layout: files = full tensors "
                                    "(rank 0 gathers them under FSDP); dcp = torch.distributed.checkpoint shards, "
                                    "each rank its own, resumable under any number of processes; auto = dcp when "
                                    "several processes train, files for one (twostep/train/dcp.py)")
    max_nonfinite: int = opt(5, "non-finite losses in a row before rolling back to the last checkpoint "
                             "with half the learning rates", range=COUNT)

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("validation_prompts",), lambda t: all(isinstance(p, str) and p.strip() for p in t.validation_prompts),
             "use a list of non-empty prompt strings, e.g. ['a red circle', 'two blue squares']"),
    )


# What `twostep distill --resume` may change: how long a run goes, how often and where it reports, evaluates and
# saves, how the same updates are computed, and the optimizers' hyper-parameters (learning rates: the remedy a run
# that gave up after NaN rollbacks names; state.apply_resumed_hparams applies them, betas and weight decays to the
# resumed optimizers). Every other field (method, student, disc, the
# method's sections, the rest of train) changes what the updates compute: a resume that changes one is refused and
# named, against the config recorded (hashed) in the run's status.json, never against its editable config.yaml
# (train/state.check_run_folder). A field added later is of the second kind until it is listed here.
RESUMABLE = frozenset({
    "train.updates", "train.minutes",                                          # how long
    "train.lr_student", "train.lr_lora", "train.lr_disc",                      # lowered after rollbacks
    "train.betas", "train.weight_decay", "train.weight_decay_disc",            # applied to the resumed optimizers
    "train.log_every", "train.grid_every", "train.log_with", "train.validation_prompts",  # reporting
    "train.eval_every", "train.eval_num", "train.eval_features",               # quick FD (held-out rows: viz.training_rows)
    "train.keep_best",                                                         # which EMA is kept, not the updates
    "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite",  # saving and rollbacks
    "train.grad_checkpointing", "train.fsdp",                                  # memory, not the updates
})


def flat_fields(d: dict, prefix: str = "") -> dict:
    """A config dict as {"section.key": value} ("method": its name)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def trained_fields(d: dict) -> dict:
    """The fields of a config dict that define what a run trains (all but RESUMABLE), flat."""
    return {k: v for k, v in flat_fields(d).items() if k not in RESUMABLE}


def trained_sha256(d: dict) -> str:
    """sha256 of trained_fields(d) (canonical JSON): what a run's status.json records next to its config."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(trained_fields(d), sort_keys=True).encode()).hexdigest()


def trained_diff(recorded: dict, now: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(field, recorded value, new value) of every trained field that differs; a field the recorded config lacks
    (a run from before it existed) counts as its value in `defaults` (a config dict)."""
    import json
    rec, new, dft = trained_fields(recorded), trained_fields(now), trained_fields(defaults or {})
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
    return [(k, rec.get(k, dft.get(k)), new.get(k)) for k in sorted(set(rec) | set(new))
            if not same(rec.get(k, dft.get(k)), new.get(k))]


class Config:
    """The type of a distill config. twostep.methods.config_class(method) is a dataclass derived from it, one per
    method, with the sections method, student, disc, the method's own sections (its `sections`), train."""


def distill_config_class(class_name: str, method: str, methods, sections: dict[str, type]) -> type:
    """The config dataclass of one distillation method: `method` (one of `methods`, default this one), the shared
    sections student, disc, then the method's own `sections` ({YAML name: dataclass}), then train."""
    fields_ = [("method", str, choice(method, methods, "distillation method")),
               ("student", StudentConfig, field(default_factory=StudentConfig)),
               ("disc", DiscriminatorConfig, field(default_factory=DiscriminatorConfig)),
               *[(name, cls, field(default_factory=cls)) for name, cls in sections.items()],
               ("train", TrainConfig, field(default_factory=TrainConfig))]
    return dataclasses.make_dataclass(class_name, fields_, bases=(Config,), namespace={"__module__": __name__})


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
        value = _as_float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is list:
        ok = isinstance(value, list)
        rng = f.metadata.get("range")
        if ok and rng is not None and not rng.integer:  # YAML's 1e-4 strings inside a list of numbers, as floats
            value = [_yaml_float(x) for x in value]
    else:
        ok = True
    if not ok:
        raise UserError(f"config key {path}: expected {hint.__name__}, got {type(value).__name__} {shown(value)}")
    ch = f.metadata.get("choices")
    if ch and value not in ch:
        raise UserError(f"config key {path}: {value!r} is not one of {', '.join(map(str, ch))}")
    rng = field_range(cls, name)
    if rng is not None and not rng.contains(value):
        raise UserError(f"config key {path}: {shown(value)} is out of range; use {rng.text}")
    return value


def _as_float(x) -> float:
    try:
        return float(x)
    except OverflowError:  # an integer beyond float: out of every range
        return math.inf


def _yaml_float(x):
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def shown(value, limit: int = 60) -> str:
    """repr(value) for a one-line message, shortened (an integer of thousands of digits has no repr at all)."""
    try:
        text = repr(value)
    except ValueError:
        return "<an integer of too many digits>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_rules(obj, prefix: str = "") -> None:
    """The `RULES` of a config section (values that only make sense together): a UserError naming the keys, their
    values and the fix."""
    for rule in getattr(type(obj), "RULES", ()):
        if not rule.test(obj):
            vals = ", ".join(f"{prefix}{k}={shown(getattr(obj, k))}" for k in rule.keys)
            raise UserError(f"config keys {vals}: {rule.fix}")


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
    check_rules(obj, prefix)
    return obj


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


YAML_DEPTH = 32  # nesting a config can have (sections, lists of lists); deeper is not a twostep config


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases and with a nesting limit: a config never needs `*name` (an alias bomb
    expands to billions of values when shown or checked) nor 100 000 nested brackets (a RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a twostep config; "
                                              "write the value out", self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str):
    """A config's YAML (a file's text or a --set value): safe, no aliases, at most YAML_DEPTH levels. Raises
    yaml.YAMLError (or ValueError: an integer of too many digits for Python's int())."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # the scanner's own recursion on absurd input
        raise yaml.YAMLError(f"nested deeper than {YAML_DEPTH} levels") from None


def parse_value(text: str):
    """`--set` values are YAML scalars/lists: 0.75, true, [1, 2], fresh."""
    try:
        return load_yaml(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of too many digits for Python's int()
        raise UserError(f"--set value {shown(text)} is not valid YAML ({e.__class__.__name__}); quote it or fix it")


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


def read_sections(path: Path | None = None, sets: list[str] | None = None) -> dict:
    """A YAML file of sections (none: {}) with the `--set` overrides applied, as a plain dict (not yet checked)."""
    d: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: config file not found")
        if not path.is_file():  # os.stat: a folder, a FIFO (which would block), a device
            raise UserError(f"{path}: not a regular file; --config takes a YAML file")
        try:
            d = load_yaml(path.read_text()) or {}
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of too many digits for Python's int()
            raise UserError(f"{path}: invalid YAML ({(str(e).splitlines() or [type(e).__name__])[0]}); fix the file")
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]}); save it "
                            "as a UTF-8 YAML file") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: top level must be a mapping of sections (e.g. student, disc, train)")
    return apply_overrides(d, sets or [])


def load_typed(cls, path: Path | None = None, sets: list[str] | None = None):
    """A config dataclass `cls` from a YAML file and `--set` overrides (read_sections, then from_dict). A distill
    config, whose sections depend on its method, comes from twostep.methods.load_config."""
    return from_dict(cls, read_sections(path, sets))


def dump_config(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# -- the configs of the other training commands (teacher, feature net): flat dataclasses, YAML + flags + --set --

def add_config_flags(parser, cls, keys, required=()) -> None:
    """--config FILE, --set KEY=VALUE and one shortcut flag per key of `keys` (num_train → --num-train) of the
    config dataclass `cls`: type (a numeric field's range as the argparse type), choices and help from its field,
    default None (the dataclass holds the default; load_flagged_config applies the flags given)."""
    parser.add_argument("--config", default=None, help="YAML config file (the keys of the flags below, and more)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lr=1e-3 (repeatable; after the file and the flags)")
    hints, known = typing.get_type_hints(cls), {f.name: f for f in fields(cls)}
    for k in keys:
        f, hint = known[k], hints[k]
        doc = f.metadata.get("doc", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = (doc if k in required else f"{doc} (default {default!r})" if doc else f"default {default!r}")
        help_ = help_.replace("%", "%%")
        if hint is bool:
            parser.add_argument("--" + k.replace("_", "-"), dest=k, action="store_true", default=None, help=help_)
        else:
            rng = field_range(cls, k) if hint in (int, float) else None
            parser.add_argument("--" + k.replace("_", "-"), dest=k, type=rng.arg() if rng else hint,
                                choices=f.metadata.get("choices"), default=None, required=k in required, help=help_)


def load_flagged_config(cls, args, keys):
    """The config `cls` of a command parsed with add_config_flags: its --config file, then the shortcut flags
    that were given (not None), then the --set overrides. Unknown keys and bad values: UserError."""
    d = read_sections(getattr(args, "config", None))
    for k in keys:
        if getattr(args, k, None) is not None:
            d[k] = getattr(args, k)
    return from_dict(cls, apply_overrides(d, getattr(args, "set", None) or []))
