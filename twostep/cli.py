"""The `twostep` command line. Thin: parses flags, calls the library, maps user errors to exit code 2."""

from __future__ import annotations

import argparse
import inspect
import os
import shlex
import sys
from functools import partial

import torch

from . import demo, evaluate, report, speed
from .config import COUNT, NON_NEGATIVE, POSITIVE, SEED, UPSCALE, add_config_flags, dump_config, load_flagged_config
from .errors import UserError
from .io.folders import check_output_path
from .methods import load_config
from .metrics.features import FLAGS as FEATURE_FLAGS, FeatureTrainConfig, train_feature_net
from .sampling import load_generator
from .teacher.cache import build_cache
from .teacher.train import FLAGS as TEACHER_FLAGS, TeacherTrainConfig, train_teacher
from .train import distill, parameter_counts


def _threads(n: int | None):
    # Set once, here at the entry point (never as an import side effect).
    if not n and os.environ.get("OMP_NUM_THREADS", "").isdigit():  # a caller's OMP_NUM_THREADS is honoured
        n = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(n or max(1, min(os.cpu_count() or 1, 16)))


def cmd_teacher_train(a):
    train_teacher(load_flagged_config(TeacherTrainConfig, a, TEACHER_FLAGS), a.out, progress=not a.no_progress)
    print(f"teacher written to {a.out}")


def cmd_sample(a):
    if bool(a.prompt) == bool(a.eval_prompts):
        raise UserError("give either --prompt (repeatable) or --eval-prompts DATA")
    check_output_path(a.out, "--out", {"--model": a.model})  # before the work
    gen = load_generator(a.model, steps=a.steps, guidance=a.guidance)
    if a.eval_prompts:
        caps = report.protocol_grid(gen, a.eval_prompts, a.out, seed=a.seed, prompts=a.rows, per_prompt=a.num,
                                    scale=a.scale)
        print(f"{len(caps)} eval prompts x {a.num} noises ({gen.describe()}) -> {a.out}")
        return
    n = report.prompt_grid(gen, a.prompt, a.out, seed=a.seed, per_prompt=a.num, scale=a.scale)
    print(f"{n} images ({gen.describe()}) -> {a.out}")


def cmd_teacher_cache(a):
    out = build_cache(a.teacher, a.data, a.num, a.out, seed=a.seed, shard_size=a.shard_size,
                      batch_size=a.batch_size, progress=not a.no_progress, skip_bad=a.skip_bad)
    print(f"teacher cache written to {out}")


def cmd_distill(a):
    cfg = load_config(a.config, a.set)
    if a.dry_run:
        print(dump_config(cfg), end="")
        n = parameter_counts(cfg, a.teacher)
        print(f"# parameters: teacher {n['teacher']:,} (frozen) | student trainable {n['student']:,} | "
              f"critic trainable {n['critic']:,}")
        return
    out = distill(cfg, a.teacher, a.cache, a.out, resume=a.resume, progress=not a.no_progress)
    print(f"student written to {out}")


def cmd_eval(a):
    if a.json:  # before the work
        check_output_path(a.json, "--json", {"--model": a.model, "--teacher": a.teacher, "--features": a.features})
    gen = load_generator(a.model, steps=a.steps, guidance=a.guidance)
    res = evaluate.evaluate(gen, a.data, num=a.num, seed=a.seed, ref=a.ref, features=a.features,
                            teacher_dir=a.teacher, progress=not a.no_progress)
    print(evaluate.format_table([res]))
    if a.json:
        evaluate.write_json(a.json, res)
        print(f"metrics written to {a.json}")


def cmd_tune_guidance(a):
    best, written = evaluate.tune_guidance(a.teacher, a.data, grid=a.grid, num=a.num, seed=a.seed,
                                           features=a.features, log=partial(print, flush=True))
    print(f"default guidance set to g={best:g} (lowest FD) in {written}")


def cmd_metrics_train(a):
    cmd = "twostep metrics train " + " ".join(shlex.quote(x) for x in sys.argv[sys.argv.index("train") + 1:]) \
        if "train" in sys.argv else None
    cfg = train_feature_net(load_flagged_config(FeatureTrainConfig, a, FEATURE_FLAGS), a.out, progress=not a.no_progress,
                            command=cmd)
    print(f"feature net written to {a.out}: held-out accuracy {cfg.get('heldout_accuracy')}")


def cmd_demo(a):
    demo.run_demo(a.out, data=a.data, teacher_dir=a.teacher, cache_num=a.cache_num, minutes=a.minutes,
                  eval_num=a.eval_num, seed=a.seed, sets=a.set, config=a.config)


def cmd_speed(a):
    if a.json:  # before the work
        check_output_path(a.json, "--json", {"--teacher": a.teacher, "--student": a.student})
    r = speed.measure_folders(a.teacher, a.student, batch=a.batch, repeats=a.repeats)
    r["cmd"] = f"twostep speed --teacher {a.teacher} --student {a.student} --batch {a.batch} --repeats {a.repeats}"
    print(speed.summary(r))
    if a.json:
        evaluate.write_json(a.json, r)


def cmd_export(a):
    from .export import export_student  # lazy: it imports diffusers' pipeline classes (seconds of start-up)

    out = export_student(a.model, a.out, merge=a.merge)
    print(f"diffusers pipeline written to {out}; load it with:\n"
          f"  from twostep.pipeline import TwoStepZImagePipeline\n"
          f"  pipe = TwoStepZImagePipeline.from_pretrained({str(out)!r})")


EVAL_NUM = evaluate.EVAL_NUM    # FD/KID need at least 10 images
FEATURES_HELP = "feature-net folder (default: features-<data> in $TWOSTEP_MODELS, else ./models)"


def default(fn, name: str):
    """The library's default for a flag: stated once, in the signature of the function the command calls."""
    return inspect.signature(fn).parameters[name].default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twostep", description="Distill a few-step flow-matching text-to-image model "
                                "into a 2-step generator (Z-Image Turbo++), and measure it honestly.")
    p.add_argument("--threads", type=COUNT.arg(), default=None, help="torch CPU threads (default: OMP_NUM_THREADS if set, else all cores)")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("teacher", help="train a teacher, cache its samples, tune its guidance")
    tsub = t.add_subparsers(dest="tcmd", required=True)
    tt = tsub.add_parser("train", help="flow-matching training of a tiny Z-Image teacher (resumable)",
                         description="Train a ZImageTransformer2DModel teacher by flow matching (logit-normal σ, "
                         "caption dropout, EMA with warm-up). --minutes is the TOTAL budget: re-running with the "
                         "same --out resumes from the newest checkpoint and trains until that total is reached.")
    tt.add_argument("--out", required=True, help="model folder to write (config.json + model.safetensors)")
    add_config_flags(tt, TeacherTrainConfig, TEACHER_FLAGS, required=("data",))
    tt.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    tt.set_defaults(fn=cmd_teacher_train)
    tc = tsub.add_parser("cache", help="cache teacher samples (noise, text, trajectory, final) for distillation",
                         description="Per (prompt, seed): the initial noise, the text features, the teacher's state "
                         "at every σ of its default grid and its final sample. Sharded safetensors + manifest with "
                         "checksums; re-running completes missing or corrupt shards and never duplicates.")
    tc.add_argument("--teacher", required=True, help="teacher folder, or a diffusers ZImagePipeline folder "
                    "(latents + its own text features are cached)")
    tc.add_argument("--data", required=True, help="prompt source: shapes | photos | folder with captions.jsonl")
    tc.add_argument("--num", type=COUNT.arg(), required=True, help="number of (prompt, noise) pairs")
    tc.add_argument("--out", required=True, help="cache folder")
    tc.add_argument("--seed", type=SEED.arg(), default=default(build_cache, "seed"))
    tc.add_argument("--shard-size", dest="shard_size", type=COUNT.arg(), default=default(build_cache, "shard_size"))
    tc.add_argument("--batch-size", dest="batch_size", type=COUNT.arg(), default=default(build_cache, "batch_size"))
    tc.add_argument("--skip-bad", dest="skip_bad", action="store_true")
    tc.add_argument("--no-progress", action="store_true")
    tc.set_defaults(fn=cmd_teacher_cache)

    tg = tsub.add_parser("tune-guidance", help="choose the teacher's default CFG scale by FD",
                         description="Evaluates the teacher at its default steps for each g of --grid and stores "
                         "the g with the lowest FD (and all FDs) in the teacher's config.json.")
    tg.add_argument("--teacher", required=True)
    tg.add_argument("--data", required=True)
    tg.add_argument("--grid", type=NON_NEGATIVE.arg(), nargs="+", default=default(evaluate.tune_guidance, "grid"))
    tg.add_argument("--num", type=EVAL_NUM.arg(), default=default(evaluate.tune_guidance, "num"))
    tg.add_argument("--seed", type=SEED.arg(), default=default(evaluate.tune_guidance, "seed"),
                    help="eval seed (default %(default)s, so the reported seed 0 is not tuned on)")
    tg.add_argument("--features", default=None, help=FEATURES_HELP)
    tg.set_defaults(fn=cmd_tune_guidance)

    ev = sub.add_parser("eval", help="FD / KID / SWD / alignment / PSNR / diversity / NFE / sec per image",
                        description="Evaluate a teacher (at any --steps/--guidance) or a student run on a benchmark. "
                        "Prompts: --num captions of the held-out split; noise seeded by --seed; reference: --num "
                        "images of the data's ref split (--ref data) or the teacher's default samples (--ref "
                        "teacher). Deterministic on CPU at a fixed seed.")
    ev.add_argument("--model", required=True, help="teacher folder, ZImagePipeline folder or student run folder")
    ev.add_argument("--data", required=True, help="shapes | photos | folder (needs --features)")
    ev.add_argument("--steps", type=COUNT.arg(), default=None, help="teacher only")
    ev.add_argument("--guidance", type=NON_NEGATIVE.arg(), default=None, help="teacher only (0 = no CFG)")
    ev.add_argument("--num", type=EVAL_NUM.arg(), default=default(evaluate.evaluate, "num"))
    ev.add_argument("--seed", type=SEED.arg(), default=default(evaluate.evaluate, "seed"))
    ev.add_argument("--ref", default=default(evaluate.evaluate, "ref"), choices=["data", "teacher"])
    ev.add_argument("--teacher", default=None, help="teacher folder for PSNR / --ref teacher (default: the "
                    "student's own teacher, or the teacher itself)")
    ev.add_argument("--features", default=None, help=FEATURES_HELP)
    ev.add_argument("--json", default=None, help="write the metrics as JSON here")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(fn=cmd_eval)

    mt = sub.add_parser("metrics", help="train the benchmarks' feature networks")
    msub = mt.add_subparsers(dest="mcmd", required=True)
    mtt = msub.add_parser("train", help="train a feature net (attribute / source classifier) on real data")
    mtt.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    add_config_flags(mtt, FeatureTrainConfig, FEATURE_FLAGS, required=("data",))
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
    dm.add_argument("--out", default=default(demo.run_demo, "out"))
    dm.add_argument("--data", default=default(demo.run_demo, "data"), choices=["shapes", "photos"])
    dm.add_argument("--teacher", default=None, help="teacher folder (default: teacher-<data> in $TWOSTEP_MODELS, "
                    "else ./models)")
    dm.add_argument("--config", default=None, help="distill config (default: demo.yaml in $TWOSTEP_CONFIGS, "
                    "else ./configs)")
    dm.add_argument("--cache-num", dest="cache_num", type=COUNT.arg(), default=default(demo.run_demo, "cache_num"))
    dm.add_argument("--minutes", type=POSITIVE.arg(), default=default(demo.run_demo, "minutes"),
                    help="distillation time budget (> 0)")
    dm.add_argument("--eval-num", dest="eval_num", type=EVAL_NUM.arg(), default=default(demo.run_demo, "eval_num"))
    dm.add_argument("--seed", type=SEED.arg(), default=default(demo.run_demo, "seed"))
    dm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    dm.set_defaults(fn=cmd_demo)

    spd = sub.add_parser("speed", help="teacher vs student images/sec, interleaved in one process",
                         description="Times the teacher (default steps and CFG) and the student (2 steps) "
                         "interleaved after warm-up; prints images/sec, NFE and the ratio to the NFE limit.")
    spd.add_argument("--teacher", required=True)
    spd.add_argument("--student", required=True)
    spd.add_argument("--batch", type=COUNT.arg(), default=default(speed.measure_folders, "batch"))
    spd.add_argument("--repeats", type=COUNT.arg(), default=default(speed.measure_folders, "repeats"))
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
    sp.add_argument("--rows", type=COUNT.arg(), default=default(report.protocol_grid, "prompts"),
                    help="with --eval-prompts: number of prompts (rows)")
    sp.add_argument("--steps", type=COUNT.arg(), default=None, help="teacher only: Euler steps (default from config)")
    sp.add_argument("--guidance", type=NON_NEGATIVE.arg(), default=None, help="teacher only: CFG scale g (0 = off)")
    sp.add_argument("--seed", type=SEED.arg(), default=default(report.prompt_grid, "seed"))
    sp.add_argument("--num", type=COUNT.arg(), default=default(report.prompt_grid, "per_prompt"),
                    help="images per prompt")
    sp.add_argument("--scale", type=UPSCALE.arg(), default=default(report.prompt_grid, "scale"),
                    help="nearest-neighbour upscale of the grid PNG")
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
