"""The `twostep` command line. Thin: parses flags, calls the library, maps user errors to exit code 2.

Import-light: the parser is built without torch, diffusers or transformers (`twostep --help`, a command's `--help`
and an argument error take well under a second); each command imports the library it runs inside its function.
The flags' defaults are still stated once, in the signatures of the functions the commands call: `default` reads
them from their source.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import sys
from functools import cache, partial
from pathlib import Path


from . import __version__
from .command_configs import EVAL_NUM, FEATURE_FLAGS, TEACHER_FLAGS, FeatureTrainConfig, TeacherTrainConfig
from .config import COUNT, NON_NEGATIVE, POSITIVE, SEED, UPSCALE, add_config_flags, dump_config, load_flagged_config
from .errors import UserError
from .paths import config_file, preset_names


def _threads(n: int | None):
    import torch  # every command but --help / --version runs torch

    # Set once, here at the entry point (never as an import side effect).
    if not n and os.environ.get("OMP_NUM_THREADS", "").isdigit():  # a caller's OMP_NUM_THREADS is honoured
        n = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(n or max(1, min(os.cpu_count() or 1, 16)))


def cmd_teacher_train(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from .teacher.train import train_teacher

    train_teacher(load_flagged_config(TeacherTrainConfig, a, TEACHER_FLAGS), a.out, progress=not a.no_progress)
    print(f"teacher written to {a.out}")


def cmd_sample(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from . import evaluate, report
    from .data.prompts import head_prompts  # lazy, as above
    from .io.folders import PNG_IMAGE, check_output_path  # lazy, as above
    from .sampling import load_generator  # lazy, as above

    if sum(map(bool, (a.prompt, a.eval_prompts, a.prompts))) != 1:
        raise UserError("give one of --prompt (repeatable), --prompts FILE or --eval-prompts DATA")
    if (a.prompt_key is not None or a.skip_bad) and not a.prompts:
        raise UserError("--prompt-key and --skip-bad go with --prompts FILE")
    check_output_path(a.out, "--out", {"--model": a.model, "--prompts": a.prompts}, writes=PNG_IMAGE)  # before the work
    prompts = head_prompts(a.prompts, a.rows, key=a.prompt_key, skip_bad=a.skip_bad) if a.prompts else a.prompt
    dev, wdtype = evaluate.resolve_placement(a.device, a.dtype)
    gen = evaluate.place(load_generator(a.model, steps=a.steps, guidance=a.guidance, dtype=wdtype,
                                        weights=a.weights), dev, wdtype)
    if a.eval_prompts:
        caps = report.protocol_grid(gen, a.eval_prompts, a.out, seed=a.seed, prompts=a.rows, per_prompt=a.num,
                                    scale=a.scale, device=dev)
        print(f"{len(caps)} eval prompts x {a.num} noises ({gen.describe()}) -> {a.out}")
        return
    n = report.prompt_grid(gen, prompts, a.out, seed=a.seed, per_prompt=a.num, scale=a.scale, device=dev)
    print(f"{n} images ({gen.describe()}) -> {a.out}")


def cmd_teacher_cache(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from .teacher.cache import build_cache

    if (a.data is None) == (a.prompts is None):
        raise UserError("give either --data (shapes | photos | FOLDER) or --prompts FILE as the prompt source")
    if a.prompt_key is not None and a.prompts is None:
        raise UserError("--prompt-key goes with --prompts FILE")
    if a.allow_repeats and a.prompts is None:
        raise UserError("--allow-repeats goes with --prompts FILE")
    out = build_cache(a.teacher, a.data, a.num, a.out, seed=a.seed, shard_size=a.shard_size,
                      batch_size=a.batch_size, progress=not a.no_progress, skip_bad=a.skip_bad, device=a.device,
                      dtype=a.dtype, states=a.states, store_dtype=a.store_dtype, verify=a.verify, prompts=a.prompts,
                      prompt_key=a.prompt_key, seeds_per_prompt=a.seeds_per_prompt, allow_repeats=a.allow_repeats)
    if _rank0():  # once, not once per process
        print(f"teacher cache written to {out}" + (" (every shard's sha256 verified)" if a.verify else ""))


def cmd_distill(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from .io.folders import read_config
    from .methods import load_config  # lazy, as above
    from .train import distill, memory  # lazy, as above

    cfg = load_config(config_file(a.config) if a.config else None, a.set)
    if not a.dry_run and (a.cache is None or a.out is None):
        raise UserError("distill needs --cache CACHE and --out RUN (only --dry-run goes without them)")
    if a.dry_run or a.gpu_memory is not None:  # the estimate reads configs only: no weight is loaded
        from .io.pipeline_format import is_pipeline_folder, pipeline_config  # lazy, as above

        # --dry-run: a ZImagePipeline folder's config files suffice (check before renting or downloading)
        tcfg = pipeline_config(a.teacher, weights=False) if a.dry_run and is_pipeline_folder(a.teacher) \
            else read_config(a.teacher)
        world = a.world_size or int(os.environ.get("WORLD_SIZE", "1") or 1)
        est = None
        if a.gpu_memory is not None or cfg.method == "turbopp":
            est = memory.estimate(cfg, tcfg, world, caption_tokens=memory.cache_caption_tokens(a.cache)
                                  if a.cache is not None else None)
        if a.dry_run:
            print(dump_config(cfg), end="")
            n = memory.method_counts(cfg, tcfg)
            print(f"# parameters: teacher {n['teacher']:,} (frozen) | student trainable {n['student']:,} | "
                  f"critic trainable {n['critic']:,}")
            print(memory.format_estimate(est, a.gpu_memory) if est else
                  f"# memory estimate: modelled for method turbopp only, not {cfg.method}")
            print(memory.format_host_disk_time(memory.host_and_disk(cfg, tcfg, world),
                                               memory.wall_time(cfg, tcfg, world), world))
        if est is not None:
            memory.check_fits(est, a.gpu_memory)  # does not fit: one line, exit 2, before any work
        if a.dry_run:
            return
    out = distill(cfg, a.teacher, a.cache, a.out, resume=a.resume, progress=not a.no_progress,
                  verify_cache=a.verify_cache)
    if _rank0():
        print(f"student written to {out}")


def cmd_eval(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from . import evaluate
    from .io.folders import EVAL_RECORD, check_output_path  # lazy, as above
    from .sampling import load_generator  # lazy, as above

    if a.json:  # before the work
        check_output_path(a.json, "--json", {"--model": a.model, "--teacher": a.teacher, "--features": a.features},
                          writes=EVAL_RECORD)
    if a.prompt_key is not None and a.prompts is None:
        raise UserError("--prompt-key goes with --prompts FILE")
    if a.allow_repeats and a.prompts is None:
        raise UserError("--allow-repeats goes with --prompts FILE")
    draw = None
    if a.prompts is not None:  # before any weight is read: the draw needs only the file
        from .data.prompts import describe_draw  # lazy, as above

        draw = evaluate.draw_eval_prompts(a.prompts, a.num, a.seed, a.prompt_key, a.allow_repeats)
        print(describe_draw(draw[1]), flush=True)
    _, wdtype = evaluate.resolve_placement(a.device, a.dtype)  # the weights are read in it
    gen = load_generator(a.model, steps=a.steps, guidance=a.guidance, dtype=wdtype, weights=a.weights)
    res = evaluate.evaluate(gen, a.data, num=a.num, seed=a.seed, ref=a.ref, features=a.features,
                            teacher_dir=a.teacher, progress=not a.no_progress, prompts=a.prompts,
                            prompt_key=a.prompt_key, extractor=a.extractor, clip=a.clip, work=a.work,
                            save_images=a.save_images, batch_size=a.batch_size, device=a.device, dtype=a.dtype,
                            allow_repeats=a.allow_repeats, prompt_draw=draw)
    print(evaluate.format_table([res]))
    if a.json:
        evaluate.write_json(a.json, res)
        print(f"metrics written to {a.json}")


def cmd_tune_guidance(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from . import evaluate

    best, written = evaluate.tune_guidance(a.teacher, a.data, grid=a.grid, num=a.num, seed=a.seed,
                                           features=a.features, log=partial(print, flush=True))
    print(f"default guidance set to g={best:g} (lowest FD) in {written}")


def cmd_metrics_train(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from .metrics.features import train_feature_net

    cmd = "twostep metrics train " + " ".join(shlex.quote(x) for x in sys.argv[sys.argv.index("train") + 1:]) \
        if "train" in sys.argv else None
    cfg = train_feature_net(load_flagged_config(FeatureTrainConfig, a, FEATURE_FLAGS), a.out, progress=not a.no_progress,
                            command=cmd)
    print(f"feature net written to {a.out}: held-out accuracy {cfg.get('heldout_accuracy')}")


def cmd_metrics_convert_inception(a):
    from .metrics.extractors import convert_inception  # lazy: only this command needs it

    out = convert_inception(a.pth, a.out)
    print(f"FID Inception weights written to {out}; use them as --extractor inception:{out}")


def cmd_demo(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from . import demo

    demo.run_demo(a.out, data=a.data, teacher_dir=a.teacher, cache_num=a.cache_num, minutes=a.minutes,
                  eval_num=a.eval_num, seed=a.seed, sets=a.set,
                  config=config_file(a.config) if a.config else None)


def cmd_launch(a):
    from .launch import launch  # lazy, as above

    return launch(a.processes, a.command, a.shutdown_timeout)


def cmd_speed(a):
    # lazy (as in every command): the parser, --help and argument errors stay free of torch
    from . import evaluate, speed
    from .io.folders import SPEED_RECORD, check_output_path  # lazy, as above

    if a.json:  # before the work
        check_output_path(a.json, "--json", {"--teacher": a.teacher, "--student": a.student}, writes=SPEED_RECORD)
    r = speed.measure_folders(a.teacher, a.student, batch=a.batch, repeats=a.repeats, device=a.device,
                              dtype=a.dtype)
    placed = "".join(f" --{k} {getattr(a, k)}" for k in ("device", "dtype") if getattr(a, k) != "auto")
    r["cmd"] = f"twostep speed --teacher {a.teacher} --student {a.student} --batch {a.batch} --repeats {a.repeats}" \
        f"{placed}"
    print(speed.summary(r))
    if a.json:
        evaluate.write_json(a.json, r)


def cmd_export(a):
    from .export import export_student  # lazy: it imports diffusers' pipeline classes (seconds of start-up)

    given = {k: getattr(a, k) for k in ("dtype", "format") if getattr(a, k) is not None}  # else the library's
    out = export_student(a.model, a.out, merge=a.merge, weights=a.weights, **given)
    if (out / "comfyui_workflow.json").is_file():  # --format comfyui (twostep/export_comfyui.py)
        print(f"ComfyUI files written to {out}: copy its diffusion_models/ or loras/ into ComfyUI's models/ folder "
              "and open comfyui_workflow.json in ComfyUI (docs/export.md)")
        return
    stock = json.loads((out / "model_index.json").read_text()).get("_class_name") == "ZImagePipeline"
    cls, mod = ("ZImagePipeline", "diffusers") if stock else ("TwoStepZImagePipeline", "twostep.pipeline")
    bf16 = json.loads((out / "twostep_export.json").read_text()).get("dtype") == "bf16"  # diffusers' default: fp32
    print(f"diffusers pipeline written to {out}; load it with:\n" + ("  import torch\n" if bf16 else "") +
          f"  from {mod} import {cls}\n"
          f"  pipe = {cls}.from_pretrained({str(out)!r}" + (", dtype=torch.bfloat16" if bf16 else "") + ")" +
          ("  # then pipe(prompt, height=..., width=..., num_inference_steps=2, guidance_scale=0)" if stock else ""))


FEATURES_HELP = "feature-net folder (default: features-<data> in $TWOSTEP_MODELS, else ./models)"
ALLOW_REPEATS_HELP = ("with --prompts: when the split holds fewer prompts than the draw needs, reuse them (each as "
                      "evenly as possible; counted in the record) instead of refusing. The command prints the "
                      "file's prompt count and both split sizes")


@cache
def _source(module: str) -> ast.Module:
    path = Path(__file__).resolve().parent.joinpath(*module.split("."))
    return ast.parse((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text(encoding="utf-8"))


def _value(module: str, node: ast.expr):
    if isinstance(node, ast.Name):  # a module-level constant
        return static(module, node.id)
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "Path" and len(node.args) == 1 and not node.keywords:
        return Path(_value(module, node.args[0]))
    return ast.literal_eval(node)


def static(module: str, name: str):
    """The literal value of the constant `name` of twostep.<module>, read from its source without importing it (its
    imports pull in torch)."""
    for node in _source(module).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
            if isinstance(target, ast.Name) and target.id == name:
                return _value(module, value)
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                for t, v in zip(target.elts, value.elts):
                    if isinstance(t, ast.Name) and t.id == name:
                        return _value(module, v)
    raise LookupError(f"twostep.{module}: no literal constant {name}")


def default(ref: str, name: str):
    """The library's default for a flag: stated once, in the signature of the function the command calls
    (`ref` = "module:function", e.g. "teacher.cache:build_cache"), read from its source without importing it
    (tests/test_package.py checks each against the imported function)."""
    module, fn = ref.split(":")
    for node in _source(module).body:
        if isinstance(node, ast.FunctionDef) and node.name == fn:
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
            for arg, d in pairs:
                if arg.arg == name and d is not None:
                    return _value(module, d)
    raise LookupError(f"twostep.{module}.{fn}: no parameter {name} with a default")


PROMPT_FILES_HELP = static("data.prompts", "FORMATS_HELP")
DEVICE_HELP = static("evaluate", "DEVICE_HELP")
EVAL_DTYPES = list(static("evaluate", "EVAL_DTYPES"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twostep", description="Distill a few-step flow-matching text-to-image model "
                                "into a 2-step generator (Z-Image Turbo++), and measure it honestly.")
    p.add_argument("--version", action="version", version=f"twostep {__version__}")
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
    tc = tsub.add_parser("cache", help="cache teacher samples (final sample, text features, chosen σ states) for "
                         "distillation",
                         description="Per (prompt, seed): the teacher's final sample, its text features and the states "
                         "chosen with --states (the noise is its seed, regenerated bitwise). Sharded safetensors + "
                         "manifest with sizes and sha256s; re-running completes missing or corrupt shards and never "
                         "duplicates. Under twostep launch / accelerate launch each process builds shards k = rank (mod "
                         "world size); the shards are byte-identical whatever the number of processes.")
    tc.add_argument("--teacher", required=True, help="teacher folder, or a diffusers ZImagePipeline folder "
                    "(latents + its own text features are cached)")
    tc.add_argument("--data", default=None, help="prompt source: shapes | photos | folder with captions.jsonl "
                    "(its captions only: no image is decoded); or give --prompts")
    tc.add_argument("--prompts", default=None, metavar="FILE", help="prompt source instead of --data: "
                    f"{PROMPT_FILES_HELP}. --num prompts of its train split are drawn (the held-out 5%% by a hash "
                    "of the text are left for `twostep eval --prompts`), deterministic for --seed")
    tc.add_argument("--prompt-key", dest="prompt_key", default=None, metavar="KEY",
                    help="with --prompts: the JSON key (.jsonl) or column (.csv/.parquet) holding the prompt "
                    "(default: the first of text, prompt, caption)")
    tc.add_argument("--seeds-per-prompt", dest="seeds_per_prompt", type=COUNT.arg(), metavar="N",
                    default=default("teacher.cache:build_cache", "seeds_per_prompt"),
                    help="each drawn prompt fills N consecutive rows, each with its own noise (--num rows from "
                    "ceil(--num / N) prompts; default %(default)s)")
    tc.add_argument("--num", type=COUNT.arg(), required=True, help="number of (prompt, noise) pairs")
    tc.add_argument("--out", required=True, help="cache folder")
    tc.add_argument("--seed", type=SEED.arg(), default=default("teacher.cache:build_cache", "seed"))
    tc.add_argument("--shard-size", dest="shard_size", type=COUNT.arg(), default=default("teacher.cache:build_cache", "shard_size"))
    tc.add_argument("--batch-size", dest="batch_size", type=COUNT.arg(), default=default("teacher.cache:build_cache", "batch_size"))
    tc.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                    help="skip bad prompt lines (empty, not UTF-8, invalid JSON, missing key) or folder images, "
                    "counted on one warning line, instead of stopping at the first with its line number")
    tc.add_argument("--device", default=default("teacher.cache:build_cache", "device"),
                    help="where the teacher and its text encoder run: auto (each process's accelerator: its own "
                    "GPU under torchrun, else the CPU), cpu, cuda or cuda:N (default %(default)s)")
    tc.add_argument("--dtype", default=default("teacher.cache:build_cache", "dtype"), choices=["auto", "bf16", "fp16", "fp32"],
                    help="compute dtype of the teacher and text encoder; the sampler's states stay fp32 as in "
                    "ZImagePipeline (default auto: bf16 on CUDA, fp32 on CPU)")
    tc.add_argument("--states", default=default("teacher.cache:build_cache", "states"), metavar="LIST",
                    help="which teacher states to store besides the final sample (always stored; the noise never: "
                    "it is its seed): a comma list of σ on the teacher's grid, e.g. final,0.75 for "
                    "loss.step1_loss=traj; all; or auto = none for a ZImagePipeline teacher, all for a pixel "
                    "teacher (default %(default)s)")
    tc.add_argument("--store-dtype", dest="store_dtype", default=default("teacher.cache:build_cache", "store_dtype"),
                    choices=["auto", "bf16", "fp32"], help="dtype of the stored samples and text features "
                    "(default auto: bf16 for a ZImagePipeline teacher, fp32 for a pixel teacher)")
    tc.add_argument("--allow-repeats", dest="allow_repeats", action="store_true", help=ALLOW_REPEATS_HELP)
    tc.add_argument("--verify", action="store_true", help="at the end, read the whole cache back and check every "
                    "shard's sha256 and contents against the manifest (what `distill --verify-cache` checks)")
    tc.add_argument("--no-progress", action="store_true")
    tc.set_defaults(fn=cmd_teacher_cache)

    tg = tsub.add_parser("tune-guidance", help="choose the teacher's default CFG scale by FD",
                         description="Evaluates the teacher at its default steps for each g of --grid and stores "
                         "the g with the lowest FD (and all FDs) in the teacher's config.json.")
    tg.add_argument("--teacher", required=True)
    tg.add_argument("--data", required=True)
    tg.add_argument("--grid", type=NON_NEGATIVE.arg(), nargs="+", default=default("evaluate:tune_guidance", "grid"))
    tg.add_argument("--num", type=EVAL_NUM.arg(), default=default("evaluate:tune_guidance", "num"))
    tg.add_argument("--seed", type=SEED.arg(), default=default("evaluate:tune_guidance", "seed"),
                    help="eval seed (default %(default)s, so the reported seed 0 is not tuned on)")
    tg.add_argument("--features", default=None, help=FEATURES_HELP)
    tg.set_defaults(fn=cmd_tune_guidance)

    ev = sub.add_parser("eval", help="FD / KID / SWD / alignment / PSNR / diversity / NFE / sec per image",
                        description="Evaluate a teacher (at any --steps/--guidance) or a student run on a benchmark "
                        "or a prompt file. Prompts: --num captions of the held-out split (of --data, or of --prompts "
                        "FILE); noise seeded by --seed; reference: --num images of the data's ref split (--ref data), "
                        "the teacher's default samples for the same prompts and noise (--ref teacher: the "
                        "distillation error), or both. Sampling runs on --device in batches of --batch-size; each "
                        "batch is reduced to features (and per-image scores) on disk and dropped, so images never "
                        "pile up in memory, and re-running with the same --work resumes. Deterministic at a fixed "
                        "seed, batch size and device.")
    ev.add_argument("--model", required=True, help="teacher folder, ZImagePipeline folder or student run folder")
    ev.add_argument("--weights", choices=["best", "last"], default="best",
                    help="a student run trained with train.keep_best: its best EMA (lowest quick FD, RUN/best/; the default) "
                    "or its last one (default %(default)s)")
    ev.add_argument("--data", default=None, help="shapes | photos | folder with captions.jsonl: prompts and "
                    "reference images (a folder needs --extractor or --features); optional with --prompts")
    ev.add_argument("--prompts", default=None, help=f"prompt file instead of the data's captions: {PROMPT_FILES_HELP}; "
                    "its held-out split is drawn (twostep.data.prompts)")
    ev.add_argument("--prompt-key", dest="prompt_key", default=None, help="with --prompts: the JSON key or column "
                    "holding the prompt (default: text, prompt or caption)")
    ev.add_argument("--steps", type=COUNT.arg(), default=None, help="teacher only")
    ev.add_argument("--guidance", type=NON_NEGATIVE.arg(), default=None, help="teacher only (0 = no CFG)")
    ev.add_argument("--num", type=EVAL_NUM.arg(), default=default("evaluate:evaluate", "num"))
    ev.add_argument("--seed", type=SEED.arg(), default=default("evaluate:evaluate", "seed"))
    ev.add_argument("--ref", default=default("evaluate:evaluate", "ref"), choices=list(static("evaluate", "REFS")),
                    help="FD/KID reference: data (the --data ref split), teacher (its default samples for the same "
                    "prompts and noise) or both (fd vs data + fd_teacher); default: data with --data, else teacher")
    ev.add_argument("--teacher", default=None, help="teacher folder for PSNR / --ref teacher (default: the "
                    "student's own teacher, or the teacher itself)")
    ev.add_argument("--features", default=None, help=FEATURES_HELP)
    ev.add_argument("--extractor", default=None, help="FD/KID features: a feature-net folder, inception, "
                    "inception:FILE.safetensors, clip:DIR or dinov2:DIR (twostep.metrics.extractors; default: the "
                    "benchmark's feature net, as --features)")
    ev.add_argument("--clip", default=None, metavar="DIR", help="a transformers CLIPModel folder: adds clip_score "
                    "(100 x mean max(cos(image, caption), 0))")
    ev.add_argument("--work", default=None, metavar="DIR", help="work folder (per-batch features and scores; "
                    "default: a temporary one, removed): re-run with the same DIR to resume an interrupted eval")
    ev.add_argument("--save-images", dest="save_images", action="store_true", help="also write every generated "
                    "image to DIR/images/NNNNNN.png (needs --work)")
    ev.add_argument("--batch-size", dest="batch_size", type=COUNT.arg(), default=default("evaluate:evaluate",
                    "batch_size"), help="images generated at once (default %(default)s; results depend on it at "
                    "round-off level)")
    ev.add_argument("--device", default=default("evaluate:evaluate", "device"), help=DEVICE_HELP)
    ev.add_argument("--dtype", default=default("evaluate:evaluate", "dtype"), choices=EVAL_DTYPES,
                    help="dtype the transformers (model and teacher reference) and a ZImagePipeline's text encoder "
                    "are held and run in; the sampler's states and Euler updates stay fp32, the VAE fp32 "
                    "(default auto: bf16 on CUDA, fp32 on the CPU; part of the protocol: --work, the teacher "
                    "reference store and the record name it)")
    ev.add_argument("--allow-repeats", dest="allow_repeats", action="store_true", help=ALLOW_REPEATS_HELP)
    ev.add_argument("--json", default=None, help="write the metrics as JSON here")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(fn=cmd_eval)

    mt = sub.add_parser("metrics", help="feature networks for FD/KID: train our own, convert the FID Inception's")
    msub = mt.add_subparsers(dest="mcmd", required=True)
    mtt = msub.add_parser("train", help="train a feature net on real data (shapes/photos: attribute / source "
                          "classifier; a folder dataset: contrastive instance discrimination)")
    mtt.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    add_config_flags(mtt, FeatureTrainConfig, FEATURE_FLAGS, required=("data",))
    mtt.add_argument("--no-progress", action="store_true")
    mtt.set_defaults(fn=cmd_metrics_train)
    mci = msub.add_parser("convert-inception", help="one-time: the published FID Inception-V3 .pth -> safetensors",
                          description="Convert pt_inception-2015-12-05-6726825d.pth (pytorch-fid / torch-fidelity) "
                          "to safetensors, read with torch.load(weights_only=True), keys and shapes checked.")
    mci.add_argument("--pth", required=True, help="the downloaded .pth (" + "https://github.com/mseitzer/pytorch-fid/"
                     "releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth)")
    mci.add_argument("--out", required=True, help="the .safetensors file to write (then: inception:FILE)")
    mci.set_defaults(fn=cmd_metrics_convert_inception)

    d = sub.add_parser("distill", help="distill a 2-step student from a teacher and its cache (Turbo++)",
                       description="Train a 2-step student against the teacher's cached samples. Config: YAML file "
                       "or preset (--config) + --set section.key=value overrides; see the preset turbopp. The resolved "
                       "config is saved in the run folder; --resume continues from the newest complete checkpoint. Watching "
                       "a run: log.jsonl, grids/ and loss_curves.png (redrawn as it goes) in the run folder; "
                       "train.log_with=tensorboard (or wandb) also sends them to a tracker, "
                       "train.validation_prompts=['...'] adds your prompts to every grid, train.eval_every=N logs "
                       "eval_fd, a quick FD of the EMA student against train.eval_num held-out teacher samples of "
                       "the cache (train.eval_features picks the feature extractor).")
    d.add_argument("--teacher", required=True, help="teacher folder or ZImagePipeline folder (only its "
                   "transformer is loaded)")
    d.add_argument("--cache", default=None, help="teacher cache folder (twostep teacher cache; required but with "
                   "--dry-run, where it only gives the longest caption)")
    d.add_argument("--config", default=None, help="YAML config file, or the name of a preset shipped with twostep "
                   f"(twostep/presets: {', '.join(preset_names())})")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.step1_loss=traj (repeatable)")
    d.add_argument("--out", default=None, help="run folder (required but with --dry-run)")
    d.add_argument("--resume", action="store_true", help="continue the run in --out")
    d.add_argument("--dry-run", action="store_true", help="print the resolved config, the parameter counts and "
                   "the estimated peak memory per device by part (weights, gradients, AdamW, EMA, activations of "
                   "the student's two passes and the discriminator passes; twostep/train/memory.py, checked against "
                   "measured peaks in docs/sizing.md), without loading any weight")
    d.add_argument("--gpu-memory", dest="gpu_memory", type=POSITIVE.arg(), default=None, metavar="GB",
                   help="memory of one GPU in GiB (an '80 GB' H100: 80): with --dry-run, say whether the estimate "
                   "(+ a reserve for the CUDA context and fragmentation) fits; without, refuse to start a run that "
                   "does not (exit 2, naming what to change)")
    d.add_argument("--world-size", dest="world_size", type=COUNT.arg(), default=None, metavar="N",
                   help="processes (GPUs) the estimate assumes (default: $WORLD_SIZE as torchrun / accelerate "
                   "launch set it, else 1)")
    d.add_argument("--verify-cache", dest="verify_cache", action="store_true",
                   help="check every cache shard's sha256 before training (reads the whole cache once; by default "
                   "only sizes, headers and counts are checked against the manifest)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_distill)

    dm = sub.add_parser("demo", help="the main job: cache → distill → eval → report.html (≈15 min on 2 cores)",
                        description="With the committed teacher: builds a teacher cache, distills a Turbo++ 2-step "
                        "student within --minutes, evaluates teacher 8-step / naive 2-step / student 2-step and "
                        "writes report.html + metrics.json in --out.")
    dm.add_argument("--out", default=default("demo:run_demo", "out"))
    dm.add_argument("--data", default=default("demo:run_demo", "data"), choices=["shapes", "photos"])
    dm.add_argument("--teacher", default=None, help="teacher folder (default: teacher-<data> in $TWOSTEP_MODELS, "
                    "else ./models)")
    dm.add_argument("--config", default=None, help="distill config file or preset (default: the preset demo-defaults, "
                    "Turbo++'s defaults at batch 16; $TWOSTEP_CONFIGS is searched first when set)")
    dm.add_argument("--cache-num", dest="cache_num", type=COUNT.arg(), default=default("demo:run_demo", "cache_num"))
    dm.add_argument("--minutes", type=POSITIVE.arg(), default=default("demo:run_demo", "minutes"),
                    help="distillation time budget (> 0), the discriminator's head start included")
    dm.add_argument("--eval-num", dest="eval_num", type=EVAL_NUM.arg(), default=default("demo:run_demo", "eval_num"))
    dm.add_argument("--seed", type=SEED.arg(), default=default("demo:run_demo", "seed"))
    dm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    dm.set_defaults(fn=cmd_demo)

    la = sub.add_parser("launch", help="run a twostep command in N processes (one per GPU) on this machine",
                        allow_abbrev=False,
                        description="Runs `python -m twostep COMMAND ...` in --processes processes through torch's "
                        "elastic launcher (what torchrun --standalone and accelerate launch use). COMMAND is passed "
                        "through untouched (torchrun's parser abbreviates and takes --num for its --numa-binding). "
                        "Bad input: rank 0's one `error: ...` line and exit 2, before any weight is read; another "
                        "failure: the launcher's report, exit 1. accelerate launch works as well.")
    la.add_argument("--processes", type=COUNT.arg(), required=True, metavar="N",
                    help="processes to start (one per GPU)")
    la.add_argument("--shutdown-timeout", type=COUNT.arg(), metavar="S",
                    default=default("launch:launch", "shutdown_timeout"),
                    help="on SIGTERM/SIGINT, seconds the processes get to write their preemption checkpoint before "
                    "they are killed (default %(default)s; torchrun's --shutdown_timeout is 30)")
    la.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                    help="the twostep command and its flags, e.g. teacher cache --teacher T ... --num 20000")
    la.set_defaults(fn=cmd_launch)

    spd = sub.add_parser("speed", help="teacher vs student images/sec, interleaved in one process",
                         description="Times the teacher (default steps and CFG) and the student (2 steps) "
                         "interleaved after warm-up; prints images/sec, NFE and the ratio to the NFE limit.")
    spd.add_argument("--teacher", required=True)
    spd.add_argument("--student", required=True)
    spd.add_argument("--batch", type=COUNT.arg(), default=default("speed:measure_folders", "batch"))
    spd.add_argument("--repeats", type=COUNT.arg(), default=default("speed:measure_folders", "repeats"))
    spd.add_argument("--device", default=default("speed:measure_folders", "device"), help=DEVICE_HELP)
    spd.add_argument("--dtype", default=default("speed:measure_folders", "dtype"), choices=EVAL_DTYPES,
                     help="dtype both transformers (and a ZImagePipeline's text encoder) are read and run in; the "
                     "sampler's states and Euler updates stay fp32 (default auto: bf16 on CUDA, fp32 on the CPU; "
                     "recorded in --json with the device)")
    spd.add_argument("--json", default=None)
    spd.set_defaults(fn=cmd_speed)

    sp = sub.add_parser("sample", help="sample a teacher or student model to a PNG grid",
                        description="One row per prompt, --num images per row. Seeds: row j (counting from 0) "
                        f"draws its --num noises in one batch from a generator seeded --seed + {static('report', 'PROMPT_SEED_STRIDE')}·j "
                        "(so a row's images do not depend on the other rows); with --eval-prompts, eval's own noise "
                        "instead (column 0 = the noise `twostep eval --seed` gives that prompt). "
                        "A teacher samples with its default steps/guidance unless --steps/--guidance are given; "
                        "a student run knows its own step count and σ grid.")
    sp.add_argument("--model", required=True, help="teacher folder, ZImagePipeline folder or student run folder")
    sp.add_argument("--weights", choices=["best", "last"], default="best",
                    help="a student run trained with train.keep_best: its best EMA (lowest quick FD, RUN/best/; the default) "
                    "or its last one (default %(default)s)")
    sp.add_argument("--prompt", action="append", help="caption (repeat for several rows)")
    sp.add_argument("--prompts", default=None, metavar="FILE", help="instead of --prompt: the first --rows prompts "
                    f"of FILE, in file order, one row each (the same images as --prompt with those prompts); "
                    f"{PROMPT_FILES_HELP}")
    sp.add_argument("--prompt-key", dest="prompt_key", default=None, metavar="KEY",
                    help="with --prompts: the JSON key or column holding the prompt (default: text, prompt, caption)")
    sp.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                    help="with --prompts: skip bad lines (counted on one warning line) instead of stopping")
    sp.add_argument("--eval-prompts", dest="eval_prompts", metavar="DATA", default=None,
                    help="instead of --prompt: the first --rows test-split captions and the noise that `twostep eval "
                    "--data DATA --seed SEED` uses (column 0 = eval's own noise), the same for every model")
    sp.add_argument("--rows", type=COUNT.arg(), default=default("report:protocol_grid", "prompts"),
                    help="with --eval-prompts or --prompts: number of prompts (rows)")
    sp.add_argument("--steps", type=COUNT.arg(), default=None, help="teacher only: Euler steps (default from config)")
    sp.add_argument("--guidance", type=NON_NEGATIVE.arg(), default=None, help="teacher only: CFG scale g (0 = off)")
    sp.add_argument("--seed", type=SEED.arg(), default=default("report:prompt_grid", "seed"))
    sp.add_argument("--num", "--seeds-per-prompt", dest="num", type=COUNT.arg(),
                    default=default("report:prompt_grid", "per_prompt"),
                    help="images per prompt (columns; --seeds-per-prompt is the same flag)")
    sp.add_argument("--scale", type=UPSCALE.arg(), default=default("report:prompt_grid", "scale"),
                    help="nearest-neighbour upscale of the grid PNG, for images under 256 px only (larger ones are "
                    "never upscaled, so a 1024² grid stays readable)")
    sp.add_argument("--device", default=default("evaluate:resolve_placement", "device"), help=DEVICE_HELP)
    sp.add_argument("--dtype", default=default("evaluate:resolve_placement", "dtype"), choices=EVAL_DTYPES,
                    help="dtype the transformer(s) (and a ZImagePipeline's text encoder) are read and run in; the "
                    "sampler's states and Euler updates stay fp32, the VAE fp32 (default auto: bf16 on CUDA, fp32 "
                    "on the CPU)")
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
                        "A shared latent student (mid_noise=same) is written as a stock diffusers ZImagePipeline "
                        "folder instead (--format); LoRA files load with stock ZImagePipeline.load_lora_weights; "
                        "docs/export.md has the stock-diffusers recipe for full/lora students. "
                        "Written to DIR.partial and renamed when complete; a previous export in DIR is replaced.")
    ex.add_argument("--model", required=True, help="student run folder (the --out of `twostep distill`)")
    ex.add_argument("--weights", choices=["best", "last"], default="best",
                    help="a student run trained with train.keep_best: its best EMA (lowest quick FD, RUN/best/; the default) "
                    "or its last one (default %(default)s)")
    ex.add_argument("--out", required=True, help="pipeline folder to write (new, empty, or a previous export)")
    ex.add_argument("--merge", action="store_true", help="lora students: merge each step's adapter into its own "
                    "transformer copy (transformer + transformer_2) instead of shipping base + adapters")
    ex.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default=None,
                    help="dtype of the exported transformer weights (default auto: bf16 for a student of a "
                    "ZImagePipeline teacher, fp32 for a pixel-space one); the copied text encoder and VAE keep "
                    "the teacher's files")
    ex.add_argument("--format", choices=["auto", "twostep", "stock", "comfyui"], default=None,
                    help="twostep: the TwoStepZImagePipeline folder; stock: a plain diffusers ZImagePipeline folder "
                    "(shared latent students with mid_noise=same: ZImagePipeline.from_pretrained(DIR) with "
                    "num_inference_steps=2, guidance_scale=0 is the student); default auto: stock where it "
                    "reproduces the student, else twostep (full/lora: see docs/export.md for stock diffusers); "
                    "comfyui: ComfyUI's Z-Image layout (transformer files per step, or per-step LoRA files) and a "
                    "2-step ComfyUI workflow (latent students)")
    ex.set_defaults(fn=cmd_export)
    return p


def main(argv=None) -> int:
    from .environment import check_argv, check_environment  # lazy, as every import here: --help stays free of torch

    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_argv(argv)  # undecodable bytes, lone surrogates: before argparse (twostep/environment.py)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a = p.parse_args(argv)
    try:
        check_environment()  # WORLD_SIZE / RANK / TWOSTEP_*: said at once, on every process (it is not launched right)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _threads(a.threads)
    # lazy: after parsing, so --help and argument errors never import torch
    from .train.distributed import close_processes
    from .train.preempt import Preempted  # lazy, as above
    from .io.files import cause  # lazy, as above

    ok = False
    try:
        rc = a.fn(a)
        ok = True
    except UserError as e:
        _error_line(f"error: {e}")
        return 2
    except (MemoryError, OSError) as e:  # classified by cause (out of memory, a full disk, a permission), or raised
        if cause(e) is None:
            raise
        _error_line(f"error: {e.filename + ': ' if getattr(e, 'filename', None) else ''}{cause(e)}")
        return 2
    except Preempted as e:  # SIGTERM / SIGINT: checkpointed on every rank, unfinished (twostep/train/preempt.py)
        print(f"stopped: {e}", file=sys.stderr)
        ok = True
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        close_processes(ok)
    return rc if isinstance(rc, int) else 0


LATE_RANK_S = 30.0  # a rank > 0 waits this long before printing its error line (see _error_line); 5 s was too
# short on a loaded machine, where rank 0 reached the same check later than rank 1


def _rank0() -> bool:
    """This process is rank 0 of a launcher's processes, or the only one."""
    return os.environ.get("RANK", "0") in ("", "0")


def _error_line(line: str) -> None:
    """A bad-input line, printed once under a launcher: the commands check their input on every rank, so rank 0
    prints it and exits, and the launcher stops the other ranks. A rank > 0 prints its line only if it is still
    running LATE_RANK_S later (an error of that rank alone), naming the rank."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not _rank0() and world.isdigit() and int(world) > 1:  # (a bad WORLD_SIZE is itself the error here)
        import time

        sys.stderr.flush()
        time.sleep(LATE_RANK_S)
        line = f"{line} (rank {os.environ['RANK']})"
    print(line, file=sys.stderr, flush=True)
