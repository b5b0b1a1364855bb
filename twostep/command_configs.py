"""The flat configs of `twostep teacher train` and `twostep metrics train`, and the range of eval's --num: kept
import-light (only twostep.config), so the command line builds its whole parser, help and argument errors included,
without importing torch. twostep.teacher.train and twostep.metrics.features use them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import (COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, SEED, UNIT, UNIT_RIGHT_OPEN, Rule, at_least,
                     choice, opt)

EVAL_NUM = at_least(10, "FD/KID need at least 10 images")  # the range of eval's `num` (and of the CLI's --num)

# feature nets (twostep.metrics.features)
NUM_CELLS = 9
CELL_DIM = 24    # per-cell embedding of a shapes feature net (FeatureNet's cell_dim)
BUILTIN_DATA = ("shapes", "photos")


@dataclass
class TeacherTrainConfig:
    """`twostep teacher train` (YAML --config, --set key=value, or the command's flags); the resolved config is
    saved as train_config.json in the model folder, and a re-run with other architecture keys is refused."""
    data: str = opt("shapes", "shapes | photos | a folder with captions.jsonl")
    resolution: int = opt(32, "image side in pixels (a multiple of patch_size)", range=COUNT)
    num_train: int = opt(20000, "size of the fixed training pool (images + captions)", range=COUNT)
    batch_size: int = opt(32, "images per update", range=COUNT)
    lr: float = opt(5e-4, "AdamW learning rate (after the linear warm-up)", range=POSITIVE)
    warmup_steps: int = opt(200, "updates of linear learning-rate warm-up", range=COUNT)
    weight_decay: float = opt(0.0, "AdamW weight decay", range=NON_NEGATIVE)
    ema: float = opt(0.999, "EMA decay of the weights (with warm-up)", range=UNIT_RIGHT_OPEN)
    caption_dropout: float = opt(0.1, "fraction of captions replaced by the empty caption (for CFG)", range=UNIT)
    minutes: float = opt(30.0, "TOTAL training wall time in minutes (a resumed run continues up to it)",
                          range=POSITIVE)
    max_steps: int = opt(0, "stop after this many updates (0 = no step limit)", range=NON_NEGATIVE_INT)
    seed: int = opt(0, "seed of the run (weights, pool, batches)", range=SEED)
    checkpoint_minutes: float = opt(5.0, "wall minutes between checkpoints", range=NON_NEGATIVE)
    dim: int = opt(128, "transformer width (dim / n_heads must be a multiple of 8)", range=COUNT)
    n_layers: int = opt(4, "transformer layers", range=COUNT)
    n_heads: int = opt(2, "attention heads", range=COUNT)
    n_refiner_layers: int = opt(1, "refiner layers per stream", range=NON_NEGATIVE_INT)
    patch_size: int = opt(4, "patch side in pixels", range=COUNT)
    default_guidance: float = opt(2.0, "the CFG scale written to config.json (`twostep teacher tune-guidance` "
                                  "replaces it by the one chosen by FD)", range=NON_NEGATIVE)
    skip_bad: bool = opt(False, "skip (and count) unreadable images / caption lines of a folder dataset")
    init: str = opt("", "continue from this teacher folder's (EMA) weights (same architecture; fresh optimizer)")
    lr_decay: str = choice("none", ["none", "linear"], "after warm-up: constant learning rate (none) or linear "
                           "decay to 0 over the budget (minutes, or max_steps)")

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("dim", "n_heads"), lambda c: c.dim % c.n_heads == 0 and (c.dim // c.n_heads) % 8 == 0,
             "dim / n_heads must be an integer multiple of 8 (e.g. dim 128, n_heads 2)"),
        Rule(("resolution", "patch_size"), lambda c: c.resolution % c.patch_size == 0,
             "resolution must be a multiple of patch_size"),
    )


# the shortcut flags of `twostep teacher train` (every key can also be given by --config / --set)
TEACHER_FLAGS = ("data", "minutes", "max_steps", "batch_size", "lr", "dim", "n_layers", "n_heads", "patch_size", "num_train",
         "ema", "seed", "init", "lr_decay", "skip_bad")


@dataclass
class FeatureTrainConfig:
    """`twostep metrics train` / `python -m twostep.metrics.features` (YAML --config, --set key=value, or the
    commands' flags); the resolved config is saved as train_config.json in the folder."""
    data: str = opt("shapes", "shapes | photos | a folder with captions.jsonl (its images, trained by instance "
                    "discrimination; captions unused): the data whose feature net this is")
    minutes: float = opt(5.0, "training wall time (excluding data generation)", range=POSITIVE)
    num_train: int = opt(20000, "size of the training pool (a folder: at most this many of its images)", range=COUNT)
    num_test: int = opt(2000, "held-out split='test' images the accuracy is measured on (a folder: at most this many "
                        "and at most 1/10 of its distinct images, set aside before training)", range=COUNT)
    batch_size: int = opt(64, "images per Adam update", range=COUNT)
    lr: float = opt(2e-3, "peak Adam learning rate (3% linear warm-up, then cosine to 0 over the budget)",
                     range=POSITIVE)
    width: int = opt(32, "channels of the trunk's first stage", range=COUNT)
    num_features: int = opt(256, "size of the embedding FD/KID use (shapes: at least 9 cells × 24 + 4 = 220)",
                               range=COUNT)
    seed: int = opt(0, "seed of the pool, the held-out images, the weights and the batches", range=SEED)
    resolution: int = opt(32, "image side the net sees, a multiple of 8 (a folder's images are centre-cropped and "
                          "resized to it on loading; shapes and photos are 32)", range=at_least(8))

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("data", "num_features"), lambda c: c.data != "shapes" or c.num_features >= NUM_CELLS * CELL_DIM + 4,
             f"a shapes feature net needs num_features >= {NUM_CELLS * CELL_DIM + 4} (9 cells x {CELL_DIM} + 4)"),
        Rule(("resolution",), lambda c: c.resolution % 8 == 0, "use a multiple of 8, e.g. 32 or 64"),
        Rule(("data", "resolution"), lambda c: c.data not in BUILTIN_DATA or c.resolution == 32,
             "shapes and photos feature nets are 32x32 (the benchmarks' images); drop resolution"),
    )


# the shortcut flags of `twostep metrics train` (and of `python -m twostep.metrics.features`)
FEATURE_FLAGS = ("data", "minutes", "num_train", "batch_size", "lr", "width", "num_features", "seed", "resolution")
