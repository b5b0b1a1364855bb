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


def cmd_sample(a):
    import torch

    from .generate import load_generator
    from .images import grid, save_png

    gen = load_generator(a.model, steps=a.steps, guidance=a.guidance)
    prompts = a.prompt
    rows = []
    for j, pr in enumerate(prompts):
        text = gen.encode([pr] * a.num)
        noise = gen.noise(a.num, a.seed + 1000 * j)
        rows.append(gen.generate(text, noise).x0)
    x = torch.cat(rows)
    save_png(grid(x, nrow=a.num, scale=a.scale), a.out)
    print(f"{len(x)} images ({gen.describe()}) -> {a.out}")


def cmd_teacher_cache(a):
    from .teacher.cache import build_cache

    out = build_cache(a.teacher, a.data, a.num, a.out, seed=a.seed, shard_size=a.shard_size,
                      batch_size=a.batch_size, progress=not a.no_progress, skip_bad=a.skip_bad)
    print(f"teacher cache written to {out}")


def cmd_distill(a):
    from .config import dump_config, load_config

    cfg = load_config(a.config, a.set)
    if a.dry_run:
        _dry_run(cfg, a)
        return
    from .train import distill

    out = distill(cfg, a.teacher, a.cache, a.out, resume=a.resume, progress=not a.no_progress)
    print(f"student written to {out}")


def _dry_run(cfg, a):
    from .config import dump_config
    from .methods import build_method
    from .model import load_teacher

    print(dump_config(cfg), end="")
    teacher = load_teacher(a.teacher)
    m = build_method(cfg, teacher.backbone)
    n_s = sum(p.numel() for p in m.student_parameters())
    n_c = sum(p.numel() for p in m.critic_parameters())
    n_t = sum(p.numel() for p in teacher.backbone.parameters())
    print(f"# parameters: teacher {n_t:,} (frozen) | student trainable {n_s:,} | critic trainable {n_c:,}")


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
    tc = tsub.add_parser("cache", help="cache teacher samples (noise, text, trajectory, final) for distillation",
                         description="Per (prompt, seed): the initial noise, the text features, the teacher's state "
                         "at every σ of its default grid and its final sample. Sharded safetensors + manifest with "
                         "checksums; re-running completes missing or corrupt shards and never duplicates.")
    tc.add_argument("--teacher", required=True, help="teacher folder")
    tc.add_argument("--data", required=True, help="prompt source: shapes | photos | folder with captions.jsonl")
    tc.add_argument("--num", type=int, required=True, help="number of (prompt, noise) pairs")
    tc.add_argument("--out", required=True, help="cache folder")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--shard-size", dest="shard_size", type=int, default=256)
    tc.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    tc.add_argument("--skip-bad", dest="skip_bad", action="store_true")
    tc.add_argument("--no-progress", action="store_true")
    tc.set_defaults(fn=cmd_teacher_cache)

    d = sub.add_parser("distill", help="distill a 2-step student from a teacher and its cache (Turbo++)",
                       description="Train a 2-step student against the teacher's cached samples. Config: YAML file "
                       "(--config) + --set section.key=value overrides; see configs/turbopp.yaml. The resolved "
                       "config is saved in the run folder; --resume continues from the newest complete checkpoint.")
    d.add_argument("--teacher", required=True, help="teacher folder")
    d.add_argument("--cache", required=True, help="teacher cache folder (twostep teacher cache)")
    d.add_argument("--config", default=None, help="YAML config file")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.step1_loss=adv (repeatable)")
    d.add_argument("--out", required=True, help="run folder")
    d.add_argument("--resume", action="store_true", help="continue the run in --out")
    d.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter counts")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_distill)

    sp = sub.add_parser("sample", help="sample a teacher or student model to a PNG grid",
                        description="One row per --prompt, --num images per row (seeds seed, seed+1, ...). "
                        "A teacher samples with its default steps/guidance unless --steps/--guidance are given; "
                        "a student run knows its own step count and σ grid.")
    sp.add_argument("--model", required=True, help="teacher folder or student run folder")
    sp.add_argument("--prompt", action="append", required=True, help="caption (repeat for several rows)")
    sp.add_argument("--steps", type=int, default=None, help="teacher only: Euler steps (default from config)")
    sp.add_argument("--guidance", type=float, default=None, help="teacher only: CFG scale g (0 = off)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--num", type=int, default=8, help="images per prompt")
    sp.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of the grid PNG")
    sp.add_argument("--out", required=True, help="PNG file to write")
    sp.set_defaults(fn=cmd_sample)
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
