"""The `twostep` command line. Thin: parses flags, calls the library, maps user errors to exit code 2."""

from __future__ import annotations

import argparse
import os
import sys


def _threads(n: int | None):
    # Set once, here at the entry point (never as an import side effect).
    import torch

    torch.set_num_threads(n or max(1, min(os.cpu_count() or 1, 16)))


def cmd_teacher_train(a):
    from dataclasses import fields

    from .teacher.train import TeacherTrainConfig, train_teacher

    cfg = TeacherTrainConfig()
    for f in fields(cfg):
        v = getattr(a, f.name, None)
        if v is not None:
            setattr(cfg, f.name, v)
    train_teacher(cfg, a.out, progress=not a.no_progress)
    print(f"teacher written to {a.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twostep", description="Distill a few-step flow-matching text-to-image model "
                                "into a 2-step generator (Z-Image Turbo++), and measure it honestly.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("teacher", help="train a teacher, cache its samples, tune its guidance")
    tsub = t.add_subparsers(dest="tcmd", required=True)
    tt = tsub.add_parser("train", help="flow-matching training of a tiny Z-Image teacher (resumable)",
                         description="Train a ZImageTransformer2DModel teacher by flow matching (logit-normal σ, "
                         "caption dropout, EMA with warm-up). --minutes is the TOTAL budget: re-running with the "
                         "same --out resumes from the newest checkpoint and trains until that total is reached.")
    tt.add_argument("--data", required=True, help="shapes | photos | a folder with captions.jsonl")
    tt.add_argument("--out", required=True, help="model folder to write (config.json + model.safetensors)")
    tt.add_argument("--minutes", type=float, help="total training wall time in minutes (default 30)")
    tt.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many updates")
    tt.add_argument("--batch-size", dest="batch_size", type=int)
    tt.add_argument("--lr", type=float)
    tt.add_argument("--dim", type=int, help="transformer width (dim / n_heads must be a multiple of 8)")
    tt.add_argument("--n-layers", dest="n_layers", type=int)
    tt.add_argument("--n-heads", dest="n_heads", type=int)
    tt.add_argument("--patch-size", dest="patch_size", type=int)
    tt.add_argument("--num-train", dest="num_train", type=int, help="size of the fixed training pool")
    tt.add_argument("--ema", type=float)
    tt.add_argument("--seed", type=int)
    tt.add_argument("--skip-bad", dest="skip_bad", action="store_true", default=None,
                    help="skip (and count) unreadable images / caption lines of a folder dataset")
    tt.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    tt.set_defaults(fn=cmd_teacher_train)
    return p


def main(argv=None) -> int:
    from .errors import UserError

    p = build_parser()
    a = p.parse_args(argv)
    _threads(a.threads)
    try:
        a.fn(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
