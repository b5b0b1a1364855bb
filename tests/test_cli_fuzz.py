"""Hostile input over every subcommand (issue 15), in-process through `twostep.cli.main`.

Every case of the table is a bad or hostile input. Each must give exit code 2, exactly one stderr line that
contains `error:`, no traceback (an exception escaping `main` fails the case with its type), leave every input
folder byte-identical (the sha256 of every file under the shared tiny world and under the case's own input
copies, before and after) and leave no `.tmp` file behind. A case that would train or compute must be refused
before it does (a per-case alarm fails a case that runs too long). The kinds are those of docs/reliability.md
("Hostile input: the kinds"):

    destroys      a command that would overwrite or write into a model / cache / run folder it must not touch
    garbage       something untrained, diverged or unfinished that would be written or read as finished
    numbers       numbers nobody checked (zero, negative, NaN, out of range)
    never-stops   runs that would never end (or give up only after a long time)
    path-leaves   a path read from a manifest that leaves its folder
    after-work    a failure that would come only after the work (unwritable outputs), or a failed start that
                  leaves a half-written folder which a corrected retry then refuses
    fake-resume   --resume of nothing, or of another run
    overwrites    an output file or folder inside a folder another command wrote, or over a file this command
                  did not write (issue 28)
    two-writers   a second command into a folder another one is writing (its lock)
    edited-config a resume that changes what was trained (against the config recorded in status.json, never the
                  editable config.yaml)
    config        a model's config.json that disagrees with its weights (or is not a config at all)
    misc          bad input that was already clean, pinned here

Inputs live in one module-scoped world (a tiny teacher and cache, a finished and a stopped student run, a
second teacher with its cache, a feature net); a case that uses an input folder as an output works on a copy
(under its own `in/`), so a case that fails never spoils the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_teacher, make_tiny_teacher_and_cache
from twostep.cli import main

ROOT = Path(__file__).resolve().parents[1]
CASE_SECONDS = 25  # a refused case takes well under a second; one that works instead of refusing is cut off here

TEACHER_TRAIN = ["--dim", "32", "--n-heads", "1", "--n-layers", "1", "--num-train", "16", "--batch-size", "4",
                 "--max-steps", "2", "--no-progress"]
METRICS_TRAIN = ["--minutes", "0.01", "--num-train", "64", "--batch-size", "8", "--width", "4", "--set",
                 "num_test=16", "--no-progress"]
DISTILL = ["--set", "train.updates=2", "--set", "train.batch_size=2", "--set", "train.d_warmup=0", "--set",
           "train.grid_every=0", "--set", "train.checkpoint_every=1", "--set", "train.log_every=1", "--set",
           "student.decoupling=shared", "--set", "disc.blocks=[0]", "--no-progress"]


def _distill_cfg(*extra):
    from twostep.methods import load_config
    return load_config(None, ["train.batch_size=2", "train.d_warmup=0", "train.grid_every=0", "train.log_every=1",
                              "train.checkpoint_every=1", "train.keep_checkpoints=1", "student.decoupling=shared",
                              "disc.blocks=[0]", *extra])  # the tiny teacher has 1 block


def _make_folder_data(folder: Path, n: int = 8) -> Path:
    from PIL import Image
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (32, 32), (30 * i % 256, 90, 200 - 20 * i)).save(folder / f"im{i}.png")
        lines.append(json.dumps({"file_name": f"im{i}.png", "text": f"a flat colour number {i}"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shared inputs (never written by a case: the hashes before and after every case say so)."""
    from twostep import faults
    from twostep.teacher.cache import build_cache
    from twostep.train import distill

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuzz")
    teacher, cache = make_tiny_teacher_and_cache(root, num=8, shard_size=4)
    run = distill(_distill_cfg("train.updates=2"), teacher, cache, root / "run", progress=False)
    # a run stopped (like SIGINT) after update 1 was checkpointed: unfinished, resumable
    calls = {"n": 0}

    def stop(name):
        calls["n"] += name == "update"
        if name == "update" and calls["n"] == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(faults, "point", stop)
        with pytest.raises(KeyboardInterrupt):
            distill(_distill_cfg("train.updates=6"), teacher, cache, root / "stopped", progress=False)
    other = make_tiny_teacher(root / "other_teacher", seed=1)
    other_cache = build_cache(other, "shapes", 8, root / "other_cache", shard_size=4, progress=False)
    shutil.copytree(ROOT / "models" / "features-shapes", root / "features")
    (root / "a_file").write_text("not a folder\n")
    torch.set_num_threads(before)
    return {"root": root, "teacher": teacher, "cache": cache, "run": run, "stopped": root / "stopped",
            "other_teacher": other, "other_cache": other_cache, "features": root / "features",
            "file": root / "a_file"}


@pytest.fixture(autouse=True)
def _fresh_environment():
    """Cases may set environment variables (WORLD_SIZE, TWOSTEP_CACHE, ...) or drop the process-wide text encoder:
    both are restored after each case."""
    import twostep.text as text_mod
    saved, encoder = dict(os.environ), text_mod._DEFAULT
    yield
    os.environ.clear()
    os.environ.update(saved)
    text_mod._DEFAULT = encoder


# ---------------------------------------------------------------------------------------------------- helpers

def tree_hash(*roots: Path) -> dict[str, str]:
    out = {}
    for r in roots:
        if not r.exists():
            continue
        for p in sorted(r.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p) + "/"] = "dir"
    return out


class Env:
    """A case's view of the world: the shared inputs, copies of them under `in/` (which stay inputs and are
    hashed too), and fresh output paths under `out/`."""

    def __init__(self, world: dict, tmp: Path):
        self.w, self.tmp = world, tmp
        self.inp, self.out = tmp / "in", tmp / "out"
        self.inp.mkdir()
        self.out.mkdir()

    def __getitem__(self, key: str) -> str:
        return str(self.path(key))

    def path(self, key: str) -> Path:
        return Path(self.w[key])

    def copy(self, key: str, name: str | None = None) -> Path:
        dst = self.inp / (name or key)
        if not dst.exists():
            src = self.path(key)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        return dst

    def new(self, name: str = "new") -> Path:
        """An output path that does not exist yet."""
        return self.out / name

    def empty(self, name: str = "empty") -> Path:
        d = self.out / name
        d.mkdir()
        return d


def edit_json(path: Path, fn) -> Path:
    cfg = json.loads(path.read_text())
    cfg = fn(cfg) or cfg
    path.write_text(json.dumps(cfg, indent=1))
    return path


def tset(section: str, **kv):
    def fn(cfg):
        cfg[section].update(kv)
    return fn


def poison(path: Path, value=float("nan")):
    """Overwrite every float tensor of a safetensors file with `value`, keeping its metadata (the update stamp)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = {k: v.fill_(value) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(sd, str(path), metadata=meta)


class CaseTimeout(BaseException):
    """Raised by the alarm (a BaseException: no `except Exception` of the library swallows it)."""


CASES: list = []


def case(kind: str, needle: str | None = None, after=None):
    """Register `fn(env) -> argv` as a case of `kind`; `needle`: a text the error line must contain; `after(env)`:
    further checks once the case is refused (e.g. that a corrected retry now works)."""
    def deco(fn):
        CASES.append(pytest.param(fn, kind, needle, after, id=f"{kind}:{fn.__name__}"))
        return fn
    return deco


def simple(kind: str, name: str, argv_fn, needle: str | None = None, after=None):
    """A case whose `argv_fn(env)` builds the command line."""
    def fn(e):
        return argv_fn(e)
    fn.__name__ = name
    case(kind, needle, after)(fn)


def teacher_train(out, *extra):
    return ["teacher", "train", "--data", "shapes", "--out", str(out), *TEACHER_TRAIN, *extra]


def metrics_train(out, *extra, data="shapes"):
    return ["metrics", "train", "--data", data, "--out", str(out), *METRICS_TRAIN, *extra]


def distill_argv(e, teacher=None, cache=None, out=None, *extra):
    return ["distill", "--teacher", str(teacher or e["teacher"]), "--cache", str(cache or e["cache"]),
            "--out", str(out or e.new("run")), *DISTILL, *extra]


def cache_argv(e, out, *extra, teacher=None):
    return ["teacher", "cache", "--teacher", str(teacher or e["teacher"]), "--data", "shapes", "--num", "4",
            "--shard-size", "4", "--out", str(out), "--no-progress", *extra]


def sample_argv(model, out, *extra):
    return ["sample", "--model", str(model), "--prompt", "a red circle", "--num", "1", "--out", str(out), *extra]


def eval_argv(e, model, *extra):
    return ["eval", "--model", str(model), "--data", "shapes", "--num", "10", "--features", e["features"],
            "--no-progress", *extra]


def speed_argv(e, student, *extra, teacher=None):
    return ["speed", "--teacher", str(teacher or e["teacher"]), "--student", str(student), "--batch", "1",
            "--repeats", "1", *extra]


def demo_argv(e, *extra, out=None):
    return ["demo", "--out", str(out or e.new("demo")), "--teacher", e["teacher"], "--cache-num", "8",
            "--minutes", "0.01", "--eval-num", "10", "--set", "disc.blocks=[0]", *extra]


def tune_argv(e, *extra):
    return ["teacher", "tune-guidance", "--teacher", str(e.copy("teacher")), "--data", "shapes", "--num", "10",
            "--features", e["features"], *extra]


# ------------------------------------------------------------------------------------------------ 1. destroys

simple("destroys", "teacher_train_into_a_trained_teacher", lambda e: teacher_train(e.copy("teacher")))
simple("destroys", "teacher_train_into_a_cache", lambda e: teacher_train(e.copy("cache")))
simple("destroys", "teacher_train_into_a_run", lambda e: teacher_train(e.copy("run")))
simple("destroys", "teacher_train_into_a_file", lambda e: teacher_train(e["file"]))
simple("destroys", "metrics_train_into_a_teacher", lambda e: metrics_train(e.copy("teacher")))
simple("destroys", "metrics_train_into_a_cache", lambda e: metrics_train(e.copy("cache")))
simple("destroys", "metrics_train_into_a_run", lambda e: metrics_train(e.copy("run")))
simple("destroys", "metrics_train_into_another_feature_net", lambda e: metrics_train(e.copy("features"), data="photos"))
simple("destroys", "distill_out_is_the_teacher",
       lambda e: distill_argv(e, e.copy("teacher"), None, e.copy("teacher")))
simple("destroys", "distill_out_is_the_cache", lambda e: distill_argv(e, None, e.copy("cache"), e.copy("cache")))
simple("destroys", "distill_out_inside_the_teacher",
       lambda e: distill_argv(e, e.copy("teacher"), None, e.copy("teacher") / "run"))
simple("destroys", "distill_out_into_another_teacher", lambda e: distill_argv(e, None, None, e.copy("other_teacher")))
simple("destroys", "distill_out_is_a_file", lambda e: distill_argv(e, None, None, e["file"]))


@case("destroys")
def distill_out_contains_the_cache(e):
    cache = e.copy("cache", "nest/cache")
    return distill_argv(e, None, cache, cache.parent)


simple("destroys", "cache_out_is_the_teacher", lambda e: cache_argv(e, e.copy("teacher"), teacher=e.copy("teacher")))
simple("destroys", "cache_out_is_a_run", lambda e: cache_argv(e, e.copy("run")))
simple("destroys", "cache_out_is_a_feature_net", lambda e: cache_argv(e, e.copy("features")))
simple("destroys", "export_out_is_its_run", lambda e: ["export", "--model", str(e.copy("run")), "--out",
                                                       str(e.copy("run"))])
simple("destroys", "export_out_is_a_teacher",
       lambda e: ["export", "--model", e["run"], "--out", str(e.copy("teacher"))])
simple("destroys", "demo_out_is_a_teacher", lambda e: demo_argv(e, out=e.copy("teacher")))


# ------------------------------------------------------------------------------------------------- 2. garbage

simple("garbage", "distill_ema_nan", lambda e: distill_argv(e, None, None, None, "--set", "train.ema=nan"))
simple("garbage", "distill_updates_zero", lambda e: distill_argv(e, None, None, None, "--set", "train.updates=0"))
simple("garbage", "distill_updates_negative", lambda e: distill_argv(e, None, None, None, "--set", "train.updates=-3"))
simple("garbage", "teacher_train_minutes_zero", lambda e: teacher_train(e.new("t"), "--minutes", "0"))
simple("garbage", "sample_a_stopped_run", lambda e: sample_argv(e["stopped"], e.new("g.png")), "unfinished")
simple("garbage", "eval_a_stopped_run", lambda e: eval_argv(e, e["stopped"]), "unfinished")
simple("garbage", "export_a_stopped_run", lambda e: ["export", "--model", e["stopped"], "--out", str(e.new("x"))],
       "unfinished")
simple("garbage", "speed_a_stopped_run", lambda e: speed_argv(e, e["stopped"]), "unfinished")


@case("garbage", "NaN")
def sample_a_run_with_nan_weights(e):
    run = e.copy("run")
    poison(run / "model.safetensors")
    return sample_argv(run, e.new("g.png"))


@case("garbage", "NaN")
def sample_a_teacher_with_inf_weights(e):
    t = e.copy("teacher")
    poison(t / "model.safetensors", float("inf"))
    return sample_argv(t, e.new("g.png"))


@case("garbage")
def distill_a_cache_missing_a_shard(e):
    c = e.copy("cache")
    (c / "shard-00001.safetensors").unlink()
    return distill_argv(e, None, c)


@case("garbage")
def cache_rebuild_after_the_captions_changed(e):
    from twostep.teacher.cache import build_cache
    data = _make_folder_data(e.inp / "data")
    cache = build_cache(e.path("teacher"), str(data), 8, e.inp / "fcache", shard_size=4, progress=False)
    lines = (data / "captions.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"file_name": "im0.png", "text": "a different caption"})
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return ["teacher", "cache", "--teacher", e["teacher"], "--data", str(data), "--num", "8", "--shard-size", "4",
            "--out", str(cache), "--no-progress"]


# ------------------------------------------------------------------------------------------------- 3. numbers

simple("numbers", "sample_num_zero", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--num", "0"))
simple("numbers", "sample_num_negative", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--num", "-2"))
simple("numbers", "sample_steps_zero", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--steps", "0"))
simple("numbers", "sample_guidance_nan", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--guidance", "nan"))
simple("numbers", "sample_guidance_inf", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--guidance", "inf"))
simple("numbers", "sample_scale_zero", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--scale", "0"))
simple("numbers", "sample_seed_negative", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--seed", "-1"))
simple("numbers", "sample_rows_zero", lambda e: ["sample", "--model", e["teacher"], "--eval-prompts", "shapes",
                                                 "--rows", "0", "--num", "1", "--out", str(e.new("g.png"))])
simple("numbers", "eval_steps_zero", lambda e: eval_argv(e, e["teacher"], "--steps", "0"))
simple("numbers", "eval_seed_negative", lambda e: eval_argv(e, e["teacher"], "--seed", "-5"))
simple("numbers", "speed_batch_zero", lambda e: speed_argv(e, e["run"], "--batch", "0"))
simple("numbers", "speed_repeats_zero", lambda e: speed_argv(e, e["run"], "--repeats", "0"))
simple("numbers", "threads_zero", lambda e: ["--threads", "0", *sample_argv(e["teacher"], e.new("g.png"))])
simple("numbers", "threads_negative", lambda e: ["--threads", "-3", *sample_argv(e["teacher"], e.new("g.png"))])
simple("numbers", "cache_shard_size_zero", lambda e: cache_argv(e, e.new("c"), "--shard-size", "0"))
simple("numbers", "cache_batch_size_zero", lambda e: cache_argv(e, e.new("c"), "--batch-size", "0"))
simple("numbers", "cache_seed_negative", lambda e: cache_argv(e, e.new("c"), "--seed", "-1"))
simple("numbers", "teacher_train_batch_size_zero", lambda e: teacher_train(e.new("t"), "--batch-size", "0"))
simple("numbers", "teacher_train_lr_nan", lambda e: teacher_train(e.new("t"), "--lr", "nan"))
simple("numbers", "teacher_train_lr_negative", lambda e: teacher_train(e.new("t"), "--lr=-1e-3"))
simple("numbers", "teacher_train_ema_above_one", lambda e: teacher_train(e.new("t"), "--ema", "1.5"))
simple("numbers", "teacher_train_dim_zero", lambda e: teacher_train(e.new("t"), "--dim", "0"))
simple("numbers", "distill_batch_size_zero", lambda e: distill_argv(e, None, None, None, "--set", "train.batch_size=0"))
simple("numbers", "distill_lr_nan", lambda e: distill_argv(e, None, None, None, "--set", "train.lr_student=nan"))
simple("numbers", "distill_beta_above_one", lambda e: distill_argv(e, None, None, None, "--set",
                                                                   "train.betas=[0.9, 1.5]"))
simple("numbers", "distill_lora_rank_zero", lambda e: distill_argv(e, None, None, None, "--set",
                                                                   "student.decoupling=lora", "--set",
                                                                   "student.lora_rank=0"))
simple("numbers", "distill_log_every_zero", lambda e: distill_argv(e, None, None, None, "--set", "train.log_every=0"))
simple("numbers", "distill_max_nonfinite_zero", lambda e: distill_argv(e, None, None, None, "--set",
                                                                       "train.max_nonfinite=0"))
simple("numbers", "distill_disc_block_out_of_range", lambda e: distill_argv(e, None, None, None, "--set",
                                                                            "disc.blocks=[7]"), "blocks")
simple("numbers", "distill_dry_run_lr_nan", lambda e: ["distill", "--teacher", e["teacher"], "--cache", e["cache"],
                                                       "--out", str(e.new("r")), "--dry-run", "--set",
                                                       "train.lr_disc=nan"])
simple("numbers", "metrics_train_batch_size_zero", lambda e: metrics_train(e.new("f"), "--batch-size", "0"))
simple("numbers", "metrics_train_minutes_negative", lambda e: metrics_train(e.new("f"), "--minutes", "-1"))
simple("numbers", "demo_cache_num_zero", lambda e: demo_argv(e, "--cache-num", "0"))
simple("numbers", "demo_eval_num_zero", lambda e: demo_argv(e, "--eval-num", "0"))
simple("numbers", "tune_guidance_num_zero", lambda e: tune_argv(e, "--num", "0"))
simple("numbers", "tune_guidance_grid_nan", lambda e: tune_argv(e, "--grid", "0", "nan"))


# -------------------------------------------------------------------------------------------- 4. never-stops

simple("never-stops", "teacher_train_lr_1e30", lambda e: ["teacher", "train", "--data", "shapes", "--out",
                                                          str(e.new("t")), *TEACHER_TRAIN[:-3], "--minutes", "2",
                                                          "--lr", "1e30", "--no-progress"])
simple("never-stops", "distill_lr_1e30", lambda e: ["distill", "--teacher", e["teacher"], "--cache", e["cache"],
                                                    "--out", str(e.new("r")), *DISTILL, "--set", "train.updates=40",
                                                    "--set", "train.lr_student=1e30", "--set", "train.lr_disc=1e30",
                                                    "--set", "train.max_nonfinite=2"])
simple("never-stops", "demo_minutes_zero", lambda e: [a if a != "0.01" else "0" for a in demo_argv(e)])


# -------------------------------------------------------------------------------------------- 5. path-leaves

@case("path-leaves")
def cache_manifest_shard_path_with_dotdot(e):
    c = e.copy("cache")
    (e.inp / "other").mkdir()
    shutil.move(str(c / "shard-00000.safetensors"), str(e.inp / "other" / "shard-00000.safetensors"))

    def fn(m):
        m["shards"][0]["file"] = "../other/shard-00000.safetensors"
    edit_json(c / "manifest.json", fn)
    return distill_argv(e, None, c)


@case("path-leaves")
def cache_manifest_shard_path_absolute(e):
    c = e.copy("cache")

    def fn(m):
        m["shards"][0]["file"] = str((c / "shard-00000.safetensors").resolve())
    edit_json(c / "manifest.json", fn)
    return distill_argv(e, None, c)


# --------------------------------------------------------------------------------------------- 6. after-work

simple("after-work", "eval_json_is_a_folder", lambda e: eval_argv(e, e["teacher"], "--steps", "2", "--json",
                                                                  str(e.empty("j"))))
simple("after-work", "eval_json_parent_is_a_file", lambda e: eval_argv(e, e["teacher"], "--steps", "2", "--json",
                                                                       e["file"] + "/m.json"))
simple("after-work", "eval_json_unwritable", lambda e: eval_argv(e, e["teacher"], "--steps", "2", "--json",
                                                                 "/proc/twostep-m.json"))
simple("after-work", "speed_json_parent_is_a_file", lambda e: speed_argv(e, e["run"], "--json",
                                                                         e["file"] + "/s.json"))
simple("after-work", "sample_out_is_a_folder", lambda e: sample_argv(e["teacher"], e.empty("g")))
simple("after-work", "sample_out_parent_is_a_file", lambda e: sample_argv(e["teacher"], e["file"] + "/g.png"))
simple("after-work", "demo_out_is_a_file", lambda e: demo_argv(e, out=e["file"]))
simple("after-work", "export_out_is_a_file", lambda e: ["export", "--model", e["run"], "--out", e["file"]])


def _nothing_written(e):
    t = e.new("t")
    assert not (t / "train_config.json").exists() and not (t / "config.json").exists(), sorted(t.rglob("*"))


def _nothing_written_and_retry_works(e):
    _nothing_written(e)
    rc = main(["--threads", "1", *teacher_train(e.new("t"))])
    assert rc == 0 and (e.new("t") / "model.safetensors").exists()


simple("after-work", "teacher_train_missing_data_writes_nothing",
       lambda e: ["teacher", "train", "--data", str(e.new("nodata")), "--out", str(e.new("t")), *TEACHER_TRAIN],
       after=_nothing_written)


@case("after-work", after=_nothing_written_and_retry_works)
def teacher_train_bad_init_then_the_corrected_retry(e):
    return teacher_train(e.new("t"), "--init", e["cache"])


# -------------------------------------------------------------------------------------------- 7. fake-resume

simple("fake-resume", "resume_a_missing_folder", lambda e: distill_argv(e, None, None, e.new("none"), "--resume"))
simple("fake-resume", "resume_an_empty_folder", lambda e: distill_argv(e, None, None, e.empty("r"), "--resume"))
simple("fake-resume", "resume_a_teacher_folder", lambda e: distill_argv(e, None, None, e.copy("teacher"), "--resume"))
simple("fake-resume", "resume_a_run_of_another_teacher",
       lambda e: distill_argv(e, e["other_teacher"], e["other_cache"], e.copy("run"), "--resume"))
simple("fake-resume", "resume_a_stopped_run_with_another_teacher",
       lambda e: distill_argv(e, e["other_teacher"], e["other_cache"], e.copy("stopped"), "--resume"))


@case("fake-resume")
def resume_a_failed_start(e):
    r = e.inp / "failed"
    r.mkdir()
    shutil.copy(e.path("run") / "config.yaml", r / "config.yaml")
    return distill_argv(e, None, None, r, "--resume")


# ------------------------------------------------------------------------------------------------- 8. config

def _teacher_with(e, fn):
    t = e.copy("teacher")
    edit_json(t / "config.json", fn)
    return t


def _run_with(e, fn):
    r = e.copy("run")
    edit_json(r / "config.json", fn)
    return r


simple("config", "teacher_dim_changed", lambda e: sample_argv(_teacher_with(e, tset("transformer", dim=64)),
                                                              e.new("g.png")), "dim")
simple("config", "teacher_n_heads_changed", lambda e: sample_argv(_teacher_with(e, tset("transformer", n_heads=2,
                                                                                        n_kv_heads=2)),
                                                                  e.new("g.png")), "n_heads")
simple("config", "teacher_n_layers_changed", lambda e: sample_argv(_teacher_with(e, tset("transformer", n_layers=2)),
                                                                   e.new("g.png")), "n_layers")
simple("config", "teacher_cap_feat_dim_changed",
       lambda e: sample_argv(_teacher_with(e, tset("transformer", cap_feat_dim=768)), e.new("g.png")), "cap_feat_dim")
simple("config", "teacher_patch_size_changed",
       lambda e: sample_argv(_teacher_with(e, tset("transformer", all_patch_size=[2])), e.new("g.png")),
       "all_patch_size")
simple("config", "teacher_in_channels_changed",
       lambda e: sample_argv(_teacher_with(e, tset("transformer", in_channels=4)), e.new("g.png")), "in_channels")
simple("config", "teacher_config_is_a_list", lambda e: sample_argv(_teacher_with(e, lambda c: [c]), e.new("g.png")))
simple("config", "teacher_config_lacks_transformer",
       lambda e: sample_argv(_teacher_with(e, lambda c: {k: v for k, v in c.items() if k != "transformer"}),
                             e.new("g.png")), "transformer")
simple("config", "teacher_transformer_lacks_dim",
       lambda e: sample_argv(_teacher_with(e, lambda c: c["transformer"].pop("dim") and None), e.new("g.png")), "dim")
simple("config", "teacher_transformer_is_a_string",
       lambda e: sample_argv(_teacher_with(e, lambda c: c.update(transformer="zimage")), e.new("g.png")),
       "transformer")
simple("config", "teacher_resolution_not_a_number",
       lambda e: sample_argv(_teacher_with(e, lambda c: c.update(resolution="big")), e.new("g.png")), "resolution")
simple("config", "teacher_sampling_steps_not_a_number",
       lambda e: sample_argv(_teacher_with(e, tset("sampling", steps="many")), e.new("g.png")), "steps")
simple("config", "distill_teacher_dim_changed",
       lambda e: distill_argv(e, _teacher_with(e, tset("transformer", dim=64)), None), "dim")
simple("config", "speed_teacher_n_layers_changed",
       lambda e: speed_argv(e, e["run"], teacher=_teacher_with(e, tset("transformer", n_layers=3))), "n_layers")
simple("config", "run_dim_changed", lambda e: sample_argv(_run_with(e, tset("transformer", dim=64)), e.new("g.png")),
       "dim")
simple("config", "run_n_layers_changed",
       lambda e: sample_argv(_run_with(e, tset("transformer", n_layers=2)), e.new("g.png")), "n_layers")
simple("config", "run_config_is_a_list", lambda e: sample_argv(_run_with(e, lambda c: [c]), e.new("g.png")))
simple("config", "run_lacks_decoupling",
       lambda e: sample_argv(_run_with(e, lambda c: c.pop("decoupling") and None), e.new("g.png")), "decoupling")
simple("config", "run_decoupling_unknown",
       lambda e: sample_argv(_run_with(e, lambda c: c.update(decoupling="quad")), e.new("g.png")), "decoupling")
simple("config", "run_decoupling_says_full_files_are_shared",
       lambda e: sample_argv(_run_with(e, lambda c: c.update(decoupling="full")), e.new("g.png")))
simple("config", "run_sigma_mid_not_a_number",
       lambda e: sample_argv(_run_with(e, lambda c: c.update(sigma_mid="half")), e.new("g.png")), "sigma_mid")
simple("config", "export_run_n_heads_changed",
       lambda e: ["export", "--model", str(_run_with(e, tset("transformer", n_heads=2, n_kv_heads=2))), "--out",
                  str(e.new("x"))], "n_heads")


@case("config")
def features_width_changed(e):
    f = e.copy("features")
    edit_json(f / "config.json", lambda c: c["arch"].update(width=8))
    return eval_argv(e, e["teacher"], "--steps", "2", "--features", str(f))


@case("config")
def features_width_negative(e):
    f = e.copy("features")
    edit_json(f / "config.json", lambda c: c["arch"].update(width=-4))
    return eval_argv(e, e["teacher"], "--steps", "2", "--features", str(f))


@case("config")
def features_config_is_a_list(e):
    f = e.copy("features")
    edit_json(f / "config.json", lambda c: [c])
    return eval_argv(e, e["teacher"], "--steps", "2", "--features", str(f))


# --------------------------------------------------------------------------------------------------- 9. misc

simple("misc", "sample_missing_model", lambda e: sample_argv(e.new("nothing"), e.new("g.png")))
simple("misc", "sample_neither_prompt_nor_eval_prompts", lambda e: ["sample", "--model", e["teacher"], "--out",
                                                                    str(e.new("g.png"))])
simple("misc", "sample_student_with_steps", lambda e: sample_argv(e["run"], e.new("g.png"), "--steps", "4"))
simple("misc", "sample_unknown_flag", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--bogus"))
simple("misc", "distill_unknown_config_key", lambda e: distill_argv(e, None, None, None, "--set", "loss.nope=1"))
simple("misc", "distill_cache_of_another_teacher", lambda e: distill_argv(e, None, e["other_cache"]))
simple("misc", "export_merge_of_a_shared_run", lambda e: ["export", "--model", e["run"], "--out", str(e.new("x")),
                                                          "--merge"])
simple("misc", "export_of_a_teacher", lambda e: ["export", "--model", e["teacher"], "--out", str(e.new("x"))])
simple("misc", "eval_num_below_ten", lambda e: eval_argv(e, e["teacher"], "--num", "5"))
simple("misc", "eval_folder_data_without_features", lambda e: ["eval", "--model", e["teacher"], "--data",
                                                               str(_make_folder_data(e.inp / "d")), "--num", "10"])


@case("misc")
def distill_bad_yaml_file(e):
    p = e.inp / "bad.yaml"
    p.write_text("train: [unclosed\n")
    return distill_argv(e, None, None, None, "--config", str(p))


@case("misc")
def distill_cache_with_a_flipped_byte(e):
    c = e.copy("cache")
    p = c / "shard-00000.safetensors"
    b = bytearray(p.read_bytes())
    b[-10] ^= 0xFF
    p.write_bytes(bytes(b))
    return distill_argv(e, None, c, None, "--verify-cache")  # the default check is cheap (sizes + manifest)


@case("misc")
def sample_truncated_teacher_weights(e):
    t = e.copy("teacher")
    p = t / "model.safetensors"
    p.write_bytes(p.read_bytes()[:200])
    return sample_argv(t, e.new("g.png"))


# -------------------------------------------------- 10. overwrites (issue 28): an output file over one it does not own

def _eval_work_folder(e) -> Path:
    from twostep.io.folders import write_status
    w = e.inp / "evalwork"
    w.mkdir()
    (w / "features-000000.safetensors").write_bytes(b"x" * 16)
    write_status(w, "eval", {"format": "twostep-eval-work"}, True)
    return w


def _written_by(e, name: str, record: dict) -> Path:
    p = e.inp / name
    p.write_text(json.dumps(record))
    return p


def _nothing_complete_in_out(e):
    """Nothing under the case's outputs that a later command would take as finished (no files at all)."""
    left = [p for p in e.out.rglob("*") if p.is_file()]
    assert not left, f"left behind: {left[:3]}"


def overwrites(name, argv_fn, needle=None):
    simple("overwrites", name, argv_fn, needle, after=_nothing_complete_in_out)


overwrites("sample_out_is_a_teachers_weights", lambda e: sample_argv(e["teacher"], e.copy("teacher") / "model.safetensors"),
           "inside a teacher")
overwrites("sample_out_is_a_caches_manifest", lambda e: sample_argv(e["teacher"], e.copy("cache") / "manifest.json"),
           "inside a teacher cache")
overwrites("sample_out_is_a_cache_shard",
           lambda e: sample_argv(e["teacher"], e.copy("cache") / "shard-00000.safetensors"), "inside a teacher cache")
overwrites("eval_json_is_a_teachers_config",
           lambda e: eval_argv(e, e["teacher"], "--json", str(e.copy("teacher") / "config.json")), "inside a teacher")
overwrites("speed_json_is_a_teachers_config",
           lambda e: speed_argv(e, e["run"], "--json", str(e.copy("teacher") / "config.json")), "inside a teacher")
overwrites("eval_json_is_a_feature_nets_config",
           lambda e: eval_argv(e, e["teacher"], "--json", str(e.copy("features") / "config.json")),
           "inside a feature net")
overwrites("speed_json_is_another_runs_config",
           lambda e: speed_argv(e, e["run"], "--json", str(e.copy("run", "run2") / "config.json")),
           "belongs to the run folder")
overwrites("sample_out_is_its_runs_loss_curves",
           lambda e: sample_argv(e["run"], e.copy("run", "run2") / "loss_curves.png"), "belongs to the run folder")
overwrites("eval_json_is_its_runs_status", lambda e: eval_argv(e, e.copy("run"), "--json",
                                                               str(e.copy("run") / "status.json")), "belongs to the run")
overwrites("eval_json_into_a_runs_checkpoint", lambda e: eval_argv(
    e, e["teacher"], "--json", str(next((e.copy("run") / "checkpoints").iterdir()) / "meta.json")), "belongs to the run")
overwrites("sample_out_inside_an_eval_work_folder", lambda e: sample_argv(e["teacher"], _eval_work_folder(e) / "g.png"),
           "inside an eval work folder")
overwrites("eval_json_over_a_speed_record", lambda e: eval_argv(e, e["teacher"], "--json", str(_written_by(
    e, "speed.json", {"cmd": "twostep speed --teacher t --student s", "batch": 1}))), "not a `twostep eval` record")
overwrites("speed_json_over_an_eval_record", lambda e: speed_argv(e, e["run"], "--json", str(_written_by(
    e, "eval.json", {"model": "m", "nfe": 2, "sec_per_image": 1.0, "num": 10, "seed": 0}))), "not a `twostep speed`")
overwrites("sample_out_over_a_text_file", lambda e: sample_argv(e["teacher"], e.copy("file")), "not a PNG image")
overwrites("eval_json_over_a_users_json", lambda e: eval_argv(e, e["teacher"], "--json", str(_written_by(
    e, "notes.json", {"todo": ["keep me"]}))), "not a `twostep eval` record")


@case("overwrites", "inside a teacher", after=_nothing_complete_in_out)
def sample_out_is_a_link_to_a_teachers_weights(e):
    link = e.inp / "grid.png"
    link.symlink_to(e.copy("teacher") / "model.safetensors")
    return sample_argv(e["teacher"], link)


overwrites("convert_inception_out_is_a_teachers_weights", lambda e: [
    "metrics", "convert-inception", "--pth", e["file"], "--out", str(e.copy("teacher") / "model.safetensors")],
    "inside a teacher")
overwrites("distill_out_inside_a_cache", lambda e: distill_argv(e, None, None, e.copy("cache") / "run"),
           "inside a teacher cache")
overwrites("cache_out_inside_a_run", lambda e: cache_argv(e, e.copy("run") / "cache"), "inside a student run")
overwrites("export_out_inside_a_feature_net", lambda e: ["export", "--model", e["run"], "--out",
                                                         str(e.copy("features") / "exp")], "inside a feature net")
overwrites("metrics_train_out_inside_a_cache", lambda e: metrics_train(e.copy("cache") / "feat"),
           "inside a teacher cache")
overwrites("eval_work_inside_a_teacher", lambda e: eval_argv(e, e["teacher"], "--work", str(e.copy("teacher") / "w")),
           "inside")


# --------------------------------------------- 11. two-writers (issue 28): a second command into a folder being written

def _locked(folder: Path) -> Path:
    """`folder` held by another writer (a lock of this process: flock locks conflict between open files)."""
    from twostep.io.lock import FolderLock
    HELD.append(FolderLock(folder).acquire())
    return folder


HELD: list = []


def _release(e):
    while HELD:
        HELD.pop().release()
    _nothing_complete_in_out(e)


def two_writers(name, argv_fn):
    simple("two-writers", name, argv_fn, f"(pid {os.getpid()} on host", after=_release)


two_writers("distill_into_a_run_being_written", lambda e: distill_argv(e, None, None, _locked(e.new("run"))))
two_writers("distill_resume_of_a_run_being_written",
            lambda e: distill_argv(e, None, None, _locked(e.copy("stopped")), "--resume"))
two_writers("cache_into_a_cache_being_written", lambda e: cache_argv(e, _locked(e.new("cache"))))
two_writers("export_into_an_export_being_written",
            lambda e: ["export", "--model", e["run"], "--out", str(_locked(e.new("exp")))])
two_writers("eval_work_being_written", lambda e: eval_argv(e, e["teacher"], "--steps", "2", "--work",
                                                           str(_locked(e.new("work")))))
two_writers("teacher_train_into_a_teacher_being_trained", lambda e: teacher_train(_locked(e.new("t"))))
two_writers("metrics_train_into_a_feature_net_being_trained", lambda e: metrics_train(_locked(e.new("feat"))))
two_writers("demo_into_a_demo_being_written", lambda e: demo_argv(e, out=_locked(e.new("demo"))))


# ---------------------------- 12. edited-config (issue 28): a resume that changes what was trained, or trusts config.yaml

def _stopped_with_edited_yaml(e, old: str, new: str) -> Path:
    run = e.copy("stopped")
    y = run / "config.yaml"
    text = y.read_text()
    assert old in text, old
    y.write_text(text.replace(old, new))
    return run


@case("edited-config", "student.sigma_mid 0.75 → 0.5")
def resume_with_the_edited_config_yaml(e):
    run = _stopped_with_edited_yaml(e, "sigma_mid: 0.75", "sigma_mid: 0.5")
    return distill_argv(e, None, None, run, "--config", str(run / "config.yaml"), "--resume")


def edited(name, *sets, needle=None):
    simple("edited-config", name, lambda e: distill_argv(e, None, None, e.copy("stopped"), "--resume",
                                                         *[x for s in sets for x in ("--set", s)]), needle)


edited("resume_sigma_mid_changed", "student.sigma_mid=0.5", needle="student.sigma_mid 0.75 → 0.5")
edited("resume_seed_changed", "train.seed=7", needle="train.seed 0 → 7")
edited("resume_batch_changed", "train.batch_size=4", needle="train.batch_size 2 → 4")
edited("resume_ema_changed", "train.ema=0.5", needle="train.ema")
edited("resume_disc_hidden_changed", "disc.hidden=8", needle="disc.hidden 64 → 8")
edited("resume_loss_weight_changed", "loss.adv_weight=0.25", needle="loss.adv_weight")
edited("resume_mid_noise_changed", "student.mid_noise=fresh", needle="student.mid_noise same → fresh")
edited("resume_d_updates_changed", "train.d_updates=2", needle="train.d_updates 1 → 2")


@case("edited-config", "does not match its hash")
def resume_with_an_edited_status_config(e):
    run = e.copy("stopped")
    edit_json(run / "status.json", lambda s: s["config"]["student"].update(sigma_mid=0.5))
    return distill_argv(e, None, None, run, "--resume", "--set", "student.sigma_mid=0.5")


# ------------------------------------- 13. untrusted-bytes (issue 28): what twostep reads back from disk is checked

def _text_cache(e, tensor=None, name: str = "poison.safetensors", raw: bytes | None = None) -> Path:
    """$TWOSTEP_CACHE for this case (outside the hashed inputs: a command may add entries for other prompts) with
    one entry for the "" caption (CFG's negative branch, encoded by sample, teacher cache and distill's grids);
    the process-wide encoder is dropped so that the entry is read from disk (_fresh_environment restores both)."""
    import twostep.text as text_mod
    root = e.tmp / "tc"
    (root / "text").mkdir(parents=True, exist_ok=True)
    f = root / "text" / name
    if raw is not None:
        f.write_bytes(raw)
    elif tensor is not None:
        save_file({text_mod._key(""): tensor}, str(f))
    os.environ["TWOSTEP_CACHE"] = str(root)
    text_mod._DEFAULT = None
    return f


NAN_CAPTION = torch.full((2, 384), float("nan"))


def _nothing_complete(e):
    """No output a later command would take as finished: no loadable cache, no complete run, no image."""
    from twostep.io.folders import read_status
    from twostep.teacher.cache import load_cache
    for d in [p for p in e.out.rglob("*") if p.is_dir()] + [e.out]:
        st = read_status(d) if (d / "status.json").exists() else None
        assert not (st or {}).get("complete"), f"{d} is marked complete"
        if (d / "manifest.json").exists():
            with pytest.raises(Exception):
                load_cache(d)
    assert not [p for p in e.out.rglob("*.png") if p.parent == e.out], "an image was written"


def untrusted(name, argv_fn, needle=None):
    simple("untrusted-bytes", name, argv_fn, needle, after=_nothing_complete)


untrusted("sample_with_a_nan_text_cache_entry",
          lambda e: (_text_cache(e, NAN_CAPTION), sample_argv(e["teacher"], e.new("g.png")))[1], "poison.safetensors")
untrusted("teacher_cache_with_a_nan_text_cache_entry",
          lambda e: (_text_cache(e, NAN_CAPTION), cache_argv(e, e.new("c")))[1], "poison.safetensors")
untrusted("distill_grids_with_a_nan_text_cache_entry",
          lambda e: (_text_cache(e, NAN_CAPTION), distill_argv(e, None, None, None, "--set", "train.grid_every=1",
                                                               "--set", "train.validation_prompts=['a red circle']"))[1],
          "poison.safetensors")
untrusted("sample_with_a_wrongly_shaped_text_cache_entry",
          lambda e: (_text_cache(e, torch.zeros(3, 100)), sample_argv(e["teacher"], e.new("g.png")))[1], "[3, 100]")
untrusted("sample_with_an_fp16_text_cache_entry",
          lambda e: (_text_cache(e, torch.zeros(2, 384, dtype=torch.float16)), sample_argv(e["teacher"],
                                                                                           e.new("g.png")))[1],
          "torch.float16")
untrusted("sample_with_a_truncated_text_cache_file",
          lambda e: (_text_cache(e, raw=b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"), sample_argv(e["teacher"],
                                                                                              e.new("g.png")))[1],
          "truncated or corrupt")


@case("untrusted-bytes", "not a regular file", after=_nothing_complete)
def sample_with_a_text_cache_entry_that_is_a_folder(e):
    _text_cache(e, NAN_CAPTION)
    (e.tmp / "tc" / "text" / "0000.safetensors").mkdir()
    return sample_argv(e["teacher"], e.new("g.png"))


def _cache_with(e, fn) -> Path:
    """A copy of the cache whose shard 0 is rewritten by fn(tensors) and re-recorded (sha256, bytes) in the
    manifest: bytes that are what the manifest says, with NaN inside (a cache built from bad inputs)."""
    from safetensors import safe_open
    from twostep.io.files import sha256_file
    c = e.copy("cache")
    p = c / "shard-00000.safetensors"
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(p))
    fn(sd)
    save_file(sd, str(p), metadata=meta)

    def rec(m):
        m["shards"][0].update(sha256=sha256_file(p), bytes=p.stat().st_size)
    edit_json(c / "manifest.json", rec)
    return c


untrusted("distill_a_cache_with_nan_samples",
          lambda e: distill_argv(e, None, _cache_with(e, lambda sd: sd["final"].fill_(float("nan")))), "NaN")
untrusted("distill_a_cache_with_nan_caption_features",
          lambda e: distill_argv(e, None, _cache_with(e, lambda sd: sd["text"].fill_(float("nan")))), "NaN")
untrusted("distill_verify_cache_finds_an_inf_state",
          lambda e: distill_argv(e, None, _cache_with(e, lambda sd: next(v for k, v in sd.items() if k.startswith(
              "state")).fill_(float("inf"))), None, "--verify-cache"), "NaN/inf")


# ------------------------------------------------ 14. sizes (issue 28): counts planned against memory and disk first

def sizes(name, argv_fn, needle="1,000,000,000"):
    simple("sizes", name, argv_fn, needle, after=_nothing_complete)


def _fifo(e, name: str) -> Path:
    p = e.inp / name
    os.mkfifo(p)
    return p


sizes("teacher_cache_num_a_billion", lambda e: [a if a != "4" else "1000000000" for a in cache_argv(e, e.new("c"))])
sizes("eval_num_a_billion", lambda e: eval_argv(e, e["teacher"], "--num", "1000000000"))
sizes("sample_seeds_per_prompt_a_billion",
      lambda e: sample_argv(e["teacher"], e.new("g.png"), "--seeds-per-prompt", "1000000000"))
sizes("sample_eval_prompts_a_million_rows",
      lambda e: ["sample", "--model", e["teacher"], "--eval-prompts", "shapes", "--rows", "1000000", "--num",
                 "1000", "--out", str(e.new("g.png"))], "1,000,000 x 1,000")
sizes("teacher_cache_prompts_file_num_a_billion",
      lambda e: ["teacher", "cache", "--teacher", e["teacher"], "--prompts", str(_prompt_file(e, "p.txt")), "--num",
                 "1000000000", "--out", str(e.new("c")), "--no-progress"])
sizes("sample_prompts_is_a_fifo", lambda e: ["sample", "--model", e["teacher"], "--prompts",
                                             str(_fifo(e, "p.txt")), "--out", str(e.new("g.png"))], "FIFO")
sizes("teacher_cache_prompts_is_a_fifo",
      lambda e: ["teacher", "cache", "--teacher", e["teacher"], "--prompts", str(_fifo(e, "p.jsonl")), "--num", "4",
                 "--out", str(e.new("c")), "--no-progress"], "FIFO")
sizes("eval_prompts_is_a_fifo", lambda e: ["eval", "--model", e["teacher"], "--prompts", str(_fifo(e, "p.csv")),
                                           "--num", "10", "--extractor", e["features"], "--no-progress"], "FIFO")
sizes("distill_config_is_a_fifo", lambda e: distill_argv(e, None, None, None, "--config",
                                                         str(_fifo(e, "c.yaml"))), "not a regular file")
sizes("sample_prompts_is_a_device", lambda e: ["sample", "--model", e["teacher"], "--prompts", "/dev/null.txt"
                                               if os.path.exists("/dev/null.txt") else "/dev/null", "--out",
                                               str(e.new("g.png"))], "/dev/null")


def _prompt_file(e, name: str, text: str = "a red circle\na blue square\n") -> Path:
    p = e.inp / name
    p.write_text(text)
    return p


# ----------------------------------- 15. traceback (issue 28): decoding, nesting, environment, third-party errors

def traceback_case(name, argv_fn, needle=None):
    simple("traceback", name, argv_fn, needle, after=_nothing_complete)


def _yaml(e, name: str, text: str) -> Path:
    p = e.inp / name
    p.write_text(text)
    return p


def _env(**kv):
    os.environ.update(kv)  # restored by _fresh_environment


traceback_case("sample_prompt_with_invalid_utf8",
               lambda e: sample_argv(e["teacher"], e.new("g.png"))[:4] + ["a red \udcff circle"]
               + sample_argv(e["teacher"], e.new("g.png"))[5:], "0xff")
traceback_case("sample_prompt_with_a_lone_surrogate",
               lambda e: sample_argv(e["teacher"], e.new("g.png"))[:4] + ["a red \ud800 circle"]
               + sample_argv(e["teacher"], e.new("g.png"))[5:], "U+D800")
traceback_case("teacher_train_data_with_invalid_utf8", lambda e: teacher_train(e.new("t"), "--data", "sh\udce9pes"),
               "0xe9")
traceback_case("distill_yaml_alias_bomb_under_known_keys", lambda e: distill_argv(e, None, None, None, "--config", str(
    _yaml(e, "bomb.yaml", "train:\n  validation_prompts: &a [x, x, x, x, x, x, x, x, x]\n"
                          "student:\n  lora_targets: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                          "disc:\n  blocks: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"))), "aliases")
traceback_case("distill_yaml_100000_deep_file", lambda e: distill_argv(e, None, None, None, "--config", str(
    _yaml(e, "deep.yaml", "train: " + "[" * 100000 + "]" * 100000 + "\n"))), "nested deeper")
traceback_case("distill_set_100000_deep",
               lambda e: distill_argv(e, None, None, None, "--set", "train.updates=" + "[" * 100000 + "]" * 100000))
traceback_case("teacher_train_yaml_deep_mapping", lambda e: teacher_train(e.new("t"), "--config", str(
    _yaml(e, "deep.yaml", "lr: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"))), "nested deeper")
traceback_case("teacher_train_config_is_a_folder", lambda e: teacher_train(e.new("t"), "--config", str(e.empty("cfg"))),
               "not a regular file")
traceback_case("distill_lora_targets_match_nothing",
               lambda e: distill_argv(e, None, None, None, "--set", "student.decoupling=lora", "--set",
                                      "student.lora_targets=[no_such_layer]"), "no_such_layer")
traceback_case("distill_world_size_abc", lambda e: (_env(WORLD_SIZE="abc"), distill_argv(e))[1], "WORLD_SIZE")
traceback_case("distill_world_size_2_without_a_launcher", lambda e: (_env(WORLD_SIZE="2"), distill_argv(e))[1],
               "launcher")
traceback_case("teacher_cache_rank_out_of_range",
               lambda e: (_env(WORLD_SIZE="2", RANK="5", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
                          cache_argv(e, e.new("c")))[1], "RANK=5")
traceback_case("sample_twostep_cache_is_a_file",
               lambda e: (_env(TWOSTEP_CACHE=e["file"]), sample_argv(e["teacher"], e.new("g.png")))[1], "TWOSTEP_CACHE")
traceback_case("eval_twostep_models_is_empty",
               lambda e: (_env(TWOSTEP_MODELS=""), eval_argv(e, e["teacher"]))[1], "TWOSTEP_MODELS")


@case("traceback", "nested too deeply", after=_nothing_complete)
def distill_cache_manifest_200000_deep(e):
    c = e.copy("cache")
    (c / "manifest.json").write_text("[" * 200000 + "]" * 200000)
    return distill_argv(e, None, c)


@case("traceback", "2 columns are named 'text'", after=_nothing_complete)
def sample_prompts_parquet_with_duplicate_columns(e):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = e.inp / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a", "b"]), pa.array(["c", "d"])], names=["text", "text"]), p)
    return ["sample", "--model", e["teacher"], "--prompts", str(p), "--out", str(e.new("g.png"))]


@case("traceback", "lone surrogate", after=_nothing_complete)
def teacher_cache_prompts_jsonl_with_a_surrogate_escape(e):
    p = _prompt_file(e, "p.jsonl", '{"text": "a red circle"}\n{"text": "bad \\ud800 escape"}\n')
    return ["teacher", "cache", "--teacher", e["teacher"], "--prompts", str(p), "--num", "4", "--out",
            str(e.new("c")), "--no-progress"]


# ------------------------------------ 16. accepted-wrong (issue 28): inputs that were taken for something else

def accepted(name, argv_fn, needle=None):
    simple("accepted-wrong", name, argv_fn, needle, after=_nothing_complete)


accepted("speed_student_is_a_teacher", lambda e: speed_argv(e, e["teacher"]), "not a student run")
accepted("speed_student_is_another_teacher", lambda e: speed_argv(e, e["other_teacher"]), "not a student run")
accepted("sample_device_empty", lambda e: sample_argv(e["teacher"], e.new("g.png"), "--device", ""), "--device")
accepted("teacher_cache_device_blank", lambda e: cache_argv(e, e.new("c"), "--device", "  "), "--device")
accepted("eval_extractor_empty", lambda e: ["eval", "--model", e["teacher"], "--data", "shapes", "--num", "10",
                                            "--extractor=", "--no-progress"], "--extractor")
accepted("eval_json_empty", lambda e: eval_argv(e, e["teacher"], "--json", ""), "--json")
accepted("distill_dry_run_cache_is_a_file",
         lambda e: ["distill", "--teacher", e["teacher"], "--cache", e["file"], "--dry-run", "--set", "disc.blocks=[0]"],
         "not a teacher cache")
accepted("distill_dry_run_cache_is_missing",
         lambda e: ["distill", "--teacher", e["teacher"], "--cache", str(e.new("none")), "--dry-run", "--set",
                    "disc.blocks=[0]"], "not a teacher cache")
accepted("distill_dry_run_cache_empty",
         lambda e: ["distill", "--teacher", e["teacher"], "--cache", "", "--dry-run", "--set", "disc.blocks=[0]"],
         "--cache")


# ------------------------------------------------------------------------------------------------ the runner

def _on_alarm(signum, frame):
    raise CaseTimeout(f"still running after {CASE_SECONDS} s (it works instead of refusing)")


def run_cli(argv) -> tuple[int | None, str, BaseException | None]:
    """(exit code, stderr, the exception that escaped main, if any), in-process."""
    from io import StringIO
    old_err, old_out = sys.stderr, sys.stdout
    err = StringIO()
    sys.stderr, sys.stdout = err, StringIO()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_SECONDS)
    rc, exc = None, None
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    except BaseException as e:  # noqa: BLE001 - a traceback, a timeout: the case failed
        exc = e
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        sys.stderr, sys.stdout = old_err, old_out
    return rc, err.getvalue(), exc


@pytest.mark.parametrize("build,kind,needle,after", CASES)
def test_bad_input_is_refused_cleanly(world, tmp_path, build, kind, needle, after):
    e = Env(world, tmp_path)
    argv = build(e)
    if argv[0] != "--threads":
        argv = ["--threads", "1", *argv]
    inputs = [world["root"], e.inp]
    before = tree_hash(*inputs)
    threads = torch.get_num_threads()
    try:
        rc, err, exc = run_cli(argv)
    finally:
        torch.set_num_threads(threads)
    if exc is not None:
        pytest.fail(f"{type(exc).__name__} escaped main (a traceback): {' '.join(str(exc).split())[:300]}")
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    print(f"{kind}: {' '.join(argv[2:4])} -> {rc}: {lines[-1] if lines else err.strip()[-200:]}")  # shown by -s
    assert rc == 2, f"exit code {rc} (stderr: {err.strip()[-300:]!r})"
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if needle:
        assert needle in lines[0], lines[0]
    if kind == "edited-config":  # the reference is what was trained, never the editable file
        assert "config.yaml" not in lines[0], lines[0]
    after_hash = tree_hash(*inputs)
    changed = sorted(k for k in set(before) | set(after_hash) if before.get(k) != after_hash.get(k))
    assert not changed, f"input folders modified: {changed[:5]}"
    left = [str(p) for p in (*world["root"].rglob("*.tmp"), *tmp_path.rglob("*.tmp"))]
    assert not left, f".tmp files left behind: {left}"
    if after is not None:
        after(e)


def test_the_table_covers_every_subcommand_and_kind():
    names = [p.id for p in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    kinds = {p.values[1] for p in CASES}
    assert kinds == {"destroys", "garbage", "numbers", "never-stops", "path-leaves", "after-work", "fake-resume",
                     "config", "misc", "overwrites", "two-writers", "edited-config", "untrusted-bytes", "sizes",
                     "traceback", "accepted-wrong"}
    text = " ".join(names)
    for cmd in ("teacher_train", "cache_", "tune_guidance", "distill", "dry_run", "resume", "sample", "eval",
                "speed", "export", "metrics_train", "demo"):
        assert cmd in text, cmd


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_guidance_never_reaches_lapack(world, tmp_path, value):
    """eval --guidance nan segfaulted inside oneMKL (the FD of NaN features), so it runs in a subprocess."""
    argv = [sys.executable, "-m", "twostep", "--threads", "1", "eval", "--model", str(world["teacher"]), "--data",
            "shapes", "--num", "10", "--steps", "2", "--guidance", value, "--features", str(world["features"]),
            "--no-progress"]
    before = tree_hash(world["root"])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-500:]
    assert tree_hash(world["root"]) == before
