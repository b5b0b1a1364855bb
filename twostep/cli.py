"""The `twostep` command line. Thin: parses flags, calls the library, maps user errors to exit code 2."""

from __future__ import annotations

import argparse
import os
import sys


def _threads(n: int | None):
    # Set once, here at the entry point (never as an import side effect).
    import torch

    if not n and os.environ.get("OMP_NUM_THREADS", "").isdigit():  # a caller's OMP_NUM_THREADS is honoured
        n = int(os.environ["OMP_NUM_THREADS"])
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

    from .errors import UserError
    from .generate import load_generator
    from .images import grid, save_png

    if bool(a.prompt) == bool(a.eval_prompts):
        raise UserError("give either --prompt (repeatable) or --eval-prompts DATA")
    gen = load_generator(a.model, steps=a.steps, guidance=a.guidance)
    if a.eval_prompts:
        from .report import protocol_grid

        caps = protocol_grid(gen, a.eval_prompts, a.out, seed=a.seed, prompts=a.rows, per_prompt=a.num,
                             scale=a.scale)
        print(f"{len(caps)} eval prompts x {a.num} noises ({gen.describe()}) -> {a.out}")
        return
    prompts = a.prompt
    rows = []
    for j, pr in enumerate(prompts):
        text = gen.encode([pr] * a.num)
        noise = gen.noise(a.num, a.seed + 1000 * j)
        rows.append(gen.decode(gen.generate(text, noise).x0))
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


def cmd_eval(a):
    from .io.files import atomic_write_text
    from .evaluate import evaluate, format_table
    from .generate import load_generator
    import json

    gen = load_generator(a.model, steps=a.steps, guidance=a.guidance)
    res = evaluate(gen, a.data, num=a.num, seed=a.seed, ref=a.ref, features=a.features,
                   teacher_dir=a.teacher, progress=not a.no_progress)
    print(format_table([res]))
    if a.json:
        from pathlib import Path
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.json), json.dumps(res, indent=1))
        print(f"metrics written to {a.json}")


def cmd_tune_guidance(a):
    from pathlib import Path

    from .evaluate import evaluate
    from .generate import TeacherSampler
    from .io.folders import read_config, save_teacher_settings
    from .model import load_teacher

    teacher = load_teacher(a.teacher)
    fds = {}
    for g in a.grid:
        r = evaluate(TeacherSampler(teacher, guidance=g), a.data, num=a.num, seed=a.seed, progress=False,
                     features=a.features)
        fds[g] = r["fd"]
        print(f"g={g:g}: FD {r['fd']:.4g}  SWD {r['swd']:.4g}" + (f"  alignment {r['alignment']:.3f}"
              if r["alignment"] is not None else ""), flush=True)
    best = min(fds, key=fds.get)
    cfg = read_config(Path(a.teacher))
    cfg["sampling"]["guidance"] = best
    cfg["num_parameters"] = sum(p.numel() for p in teacher.backbone.parameters())
    cfg["guidance_tuned"] = {"metric": "fd", "data": a.data, "num": a.num, "seed": a.seed,
                             "fd_by_guidance": {f"{g:g}": v for g, v in fds.items()}}
    save_teacher_settings(Path(a.teacher), cfg)
    print(f"default guidance set to g={best:g} (lowest FD) in {a.teacher}/"
          f"{'twostep.json' if cfg.get('pipeline') else 'config.json'}")


def cmd_metrics_train(a):
    from .metrics.features import train_feature_net

    import shlex
    cmd = "twostep metrics train " + " ".join(shlex.quote(x) for x in sys.argv[sys.argv.index("train") + 1:]) \
        if "train" in sys.argv else None
    cfg = train_feature_net(a.data, a.out, minutes=a.minutes, seed=a.seed, progress=not a.no_progress, command=cmd)
    print(f"feature net written to {a.out}: held-out accuracy {cfg.get('heldout_accuracy')}")


def cmd_demo(a):
    from .demo import run_demo

    run_demo(a.out, data=a.data, teacher_dir=a.teacher, cache_num=a.cache_num, minutes=a.minutes,
             eval_num=a.eval_num, seed=a.seed, sets=a.set)


def cmd_speed(a):
    import json

    from .generate import load_generator
    from .speed import measure

    from .model import check_pair

    student = load_generator(a.student)
    check_pair(student.config, a.teacher)
    r = measure(load_generator(a.teacher), student, batch=a.batch, repeats=a.repeats)
    r["cmd"] = f"twostep speed --teacher {a.teacher} --student {a.student} --batch {a.batch} --repeats {a.repeats}"
    for k in ("teacher", "student"):
        print(f"{k:8s} {r[k]['model']:45s} NFE {r[k]['nfe']:3d}  {r[k]['images_per_sec']:8.1f} img/s  "
              f"{1e3 * r[k]['sec_per_image']:.2f} ms/img")
    print(f"student/teacher time ratio {r['time_ratio_student_over_teacher']:.3f} vs NFE ratio "
          f"{r['nfe_ratio_student_over_teacher']:.3f} -> {r['ratio_over_nfe_limit']:.3f}x the NFE limit")
    if a.json:
        from pathlib import Path
        from .io.files import atomic_write_text
        atomic_write_text(Path(a.json), json.dumps(r, indent=1))


def cmd_export(a):
    from .export import export_student

    out = export_student(a.model, a.out, merge=a.merge)
    print(f"diffusers pipeline written to {out}; load it with:\n"
          f"  from twostep.pipeline import TwoStepZImagePipeline\n"
          f"  pipe = TwoStepZImagePipeline.from_pretrained({str(out)!r})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twostep", description="Distill a few-step flow-matching text-to-image model "
                                "into a 2-step generator (Z-Image Turbo++), and measure it honestly.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS if set, else all cores)")
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
    tt.add_argument("--init", help="continue from this teacher folder's weights (same architecture; fresh optimizer)")
    tt.add_argument("--lr-decay", dest="lr_decay", choices=["none", "linear"],
                    help="after warm-up: constant LR (none, default) or linear decay to 0 over the budget")
    tt.add_argument("--skip-bad", dest="skip_bad", action="store_true", default=None,
                    help="skip (and count) unreadable images / caption lines of a folder dataset")
    tt.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    tt.set_defaults(fn=cmd_teacher_train)
    tc = tsub.add_parser("cache", help="cache teacher samples (noise, text, trajectory, final) for distillation",
                         description="Per (prompt, seed): the initial noise, the text features, the teacher's state "
                         "at every σ of its default grid and its final sample. Sharded safetensors + manifest with "
                         "checksums; re-running completes missing or corrupt shards and never duplicates.")
    tc.add_argument("--teacher", required=True, help="teacher folder, or a diffusers ZImagePipeline folder "
                    "(latents + its own text features are cached)")
    tc.add_argument("--data", required=True, help="prompt source: shapes | photos | folder with captions.jsonl")
    tc.add_argument("--num", type=int, required=True, help="number of (prompt, noise) pairs")
    tc.add_argument("--out", required=True, help="cache folder")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--shard-size", dest="shard_size", type=int, default=256)
    tc.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    tc.add_argument("--skip-bad", dest="skip_bad", action="store_true")
    tc.add_argument("--no-progress", action="store_true")
    tc.set_defaults(fn=cmd_teacher_cache)

    tg = tsub.add_parser("tune-guidance", help="choose the teacher's default CFG scale by FD",
                         description="Evaluates the teacher at its default steps for each g of --grid and stores "
                         "the g with the lowest FD (and all FDs) in the teacher's config.json.")
    tg.add_argument("--teacher", required=True)
    tg.add_argument("--data", required=True)
    tg.add_argument("--grid", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0])
    tg.add_argument("--num", type=int, default=500)
    tg.add_argument("--seed", type=int, default=1, help="eval seed (default 1, so the reported seed 0 is not tuned on)")
    tg.add_argument("--features", default=None, help="feature-net folder (default models/features-<data>)")
    tg.set_defaults(fn=cmd_tune_guidance)

    ev = sub.add_parser("eval", help="FD / KID / SWD / alignment / PSNR / diversity / NFE / sec per image",
                        description="Evaluate a teacher (at any --steps/--guidance) or a student run on a benchmark. "
                        "Prompts: --num captions of the held-out split; noise seeded by --seed; reference: --num "
                        "images of the data's ref split (--ref data) or the teacher's default samples (--ref "
                        "teacher). Deterministic on CPU at a fixed seed.")
    ev.add_argument("--model", required=True, help="teacher folder, ZImagePipeline folder or student run folder")
    ev.add_argument("--data", required=True, help="shapes | photos | folder (needs --features)")
    ev.add_argument("--steps", type=int, default=None, help="teacher only")
    ev.add_argument("--guidance", type=float, default=None, help="teacher only (0 = no CFG)")
    ev.add_argument("--num", type=int, default=1000)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--ref", default="data", choices=["data", "teacher"])
    ev.add_argument("--teacher", default=None, help="teacher folder for PSNR / --ref teacher (default: the "
                    "student's own teacher, or the teacher itself)")
    ev.add_argument("--features", default=None, help="feature-net folder (default models/features-<data>)")
    ev.add_argument("--json", default=None, help="write the metrics as JSON here")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(fn=cmd_eval)

    mt = sub.add_parser("metrics", help="train the benchmarks' feature networks")
    msub = mt.add_subparsers(dest="mcmd", required=True)
    mtt = msub.add_parser("train", help="train a feature net (attribute / source classifier) on real data")
    mtt.add_argument("--data", required=True, choices=["shapes", "photos"])
    mtt.add_argument("--out", required=True)
    mtt.add_argument("--minutes", type=float, default=5.0)
    mtt.add_argument("--seed", type=int, default=0)
    mtt.add_argument("--no-progress", action="store_true")
    mtt.set_defaults(fn=cmd_metrics_train)

    d = sub.add_parser("distill", help="distill a 2-step student from a teacher and its cache (Turbo++)",
                       description="Train a 2-step student against the teacher's cached samples. Config: YAML file "
                       "(--config) + --set section.key=value overrides; see configs/turbopp.yaml. The resolved "
                       "config is saved in the run folder; --resume continues from the newest complete checkpoint.")
    d.add_argument("--teacher", required=True, help="teacher folder or ZImagePipeline folder (only its "
                   "transformer is loaded)")
    d.add_argument("--cache", required=True, help="teacher cache folder (twostep teacher cache)")
    d.add_argument("--config", default=None, help="YAML config file")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.step1_loss=traj (repeatable)")
    d.add_argument("--out", required=True, help="run folder")
    d.add_argument("--resume", action="store_true", help="continue the run in --out")
    d.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter counts")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_distill)

    dm = sub.add_parser("demo", help="the main job: cache → distill → eval → report.html (≈15 min on 2 cores)",
                        description="With the committed teacher: builds a teacher cache, distills a Turbo++ 2-step "
                        "student within --minutes, evaluates teacher 8-step / naive 2-step / student 2-step and "
                        "writes report.html + metrics.json in --out.")
    dm.add_argument("--out", default="out/demo")
    dm.add_argument("--data", default="shapes", choices=["shapes", "photos"])
    dm.add_argument("--teacher", default=None, help="teacher folder (default models/teacher-<data>)")
    dm.add_argument("--cache-num", dest="cache_num", type=int, default=1024)
    dm.add_argument("--minutes", type=float, default=7.0, help="distillation time budget")
    dm.add_argument("--eval-num", dest="eval_num", type=int, default=500)
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    dm.set_defaults(fn=cmd_demo)

    spd = sub.add_parser("speed", help="teacher vs student images/sec, interleaved in one process",
                         description="Times the teacher (default steps and CFG) and the student (2 steps) "
                         "interleaved after warm-up; prints images/sec, NFE and the ratio to the NFE limit.")
    spd.add_argument("--teacher", required=True)
    spd.add_argument("--student", required=True)
    spd.add_argument("--batch", type=int, default=32)
    spd.add_argument("--repeats", type=int, default=5)
    spd.add_argument("--json", default=None)
    spd.set_defaults(fn=cmd_speed)

    sp = sub.add_parser("sample", help="sample a teacher or student model to a PNG grid",
                        description="One row per --prompt, --num images per row (seeds seed, seed+1, ...). "
                        "A teacher samples with its default steps/guidance unless --steps/--guidance are given; "
                        "a student run knows its own step count and σ grid.")
    sp.add_argument("--model", required=True, help="teacher folder, ZImagePipeline folder or student run folder")
    sp.add_argument("--prompt", action="append", help="caption (repeat for several rows)")
    sp.add_argument("--eval-prompts", dest="eval_prompts", metavar="DATA", default=None,
                    help="instead of --prompt: the first --rows test-split captions and the noise that `twostep eval "
                    "--data DATA --seed SEED` uses (column 0 = eval's own noise), the same for every model")
    sp.add_argument("--rows", type=int, default=8, help="with --eval-prompts: number of prompts (rows)")
    sp.add_argument("--steps", type=int, default=None, help="teacher only: Euler steps (default from config)")
    sp.add_argument("--guidance", type=float, default=None, help="teacher only: CFG scale g (0 = off)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--num", type=int, default=8, help="images per prompt")
    sp.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of the grid PNG")
    sp.add_argument("--out", required=True, help="PNG file to write")
    sp.set_defaults(fn=cmd_sample)

    ex = sub.add_parser("export", help="write a student run as a diffusers pipeline folder (2 NFE)",
                        description="Write a student run folder as a diffusers pipeline (TwoStepZImagePipeline, "
                        "twostep/pipeline.py) that reproduces `twostep sample` for the same prompt and seed: "
                        "transformer (+ transformer_2 for full students), the per-step LoRA adapters under lora/ "
                        "(lora students; --merge writes two merged transformers instead), the caption encoder "
                        "(text_encoder + tokenizer), σ grid [1, σm, 0] and mid-noise mode in model_index.json. "
                        "Load it with `TwoStepZImagePipeline.from_pretrained(DIR)`, or without twostep with "
                        "`DiffusionPipeline.from_pretrained(DIR, custom_pipeline='pipeline', trust_remote_code=True)`. "
                        "Written to DIR.partial and renamed when complete; a previous export in DIR is replaced.")
    ex.add_argument("--model", required=True, help="student run folder (the --out of `twostep distill`)")
    ex.add_argument("--out", required=True, help="pipeline folder to write (new, empty, or a previous export)")
    ex.add_argument("--merge", action="store_true", help="lora students: merge each step's adapter into its own "
                    "transformer copy (transformer + transformer_2) instead of shipping base + adapters")
    ex.set_defaults(fn=cmd_export)
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
