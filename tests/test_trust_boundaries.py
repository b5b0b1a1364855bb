"""Issue 28, kinds 4-8 beyond the fuzz table (tests/test_cli_fuzz.py): errors classified by cause (memory, a full
disk, permissions: never "truncated or corrupt"), third-party load reports silenced, a run whose every update was
skipped is not complete, a CSV quoted field with a blank line, argv and environment checks."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_teacher
from twostep.cli import main
from twostep.errors import UserError


def _cli(argv, capsys) -> tuple[int, list[str]]:
    rc = main(["--threads", "1", *argv])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tb") / "teacher")


# -- errors classified by cause -------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc,word", [
    (MemoryError("Cannot allocate memory (os error 12)"), "out of memory"),
    (RuntimeError("unable to mmap 268435544 bytes from file <m>: Cannot allocate memory (12)"), "out of memory"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
])
def test_weights_read_errors_say_their_cause_not_corruption(teacher, tmp_path, monkeypatch, capsys, exc, word):
    import safetensors
    import safetensors.torch

    import twostep.evaluate, twostep.report, twostep.sampling, twostep.teacher.cache  # noqa: E401,F401 - imported
    import twostep.io.files as files                                  # before the patch (they bind safe_open)

    def boom(*a, **k):
        raise exc
    for mod, name in ((safetensors.torch, "load_file"), (safetensors, "safe_open"), (files, "load_file"),
                      (files, "safe_open")):  # the first two: imported at call time by backbones.zimage
        monkeypatch.setattr(mod, name, boom)
    rc, lines = _cli(["sample", "--model", str(teacher), "--prompt", "a", "--out", str(tmp_path / "g.png")], capsys)
    assert rc == 2 and len(lines) == 1 and word in lines[0], lines
    assert "corrupt" not in lines[0] and "truncated" not in lines[0]
    assert not (tmp_path / "g.png").exists()


def test_io_cause_words():
    from twostep.io.files import cause, unreadable
    assert cause(OSError(errno.ENOSPC, "No space left on device")).startswith("the disk is full")
    assert cause(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")) \
        .startswith("the disk is full")
    assert cause(ValueError("header too large")) is None
    assert "truncated or corrupt" in str(unreadable("m.safetensors", ValueError("header too large")))


def test_a_full_disk_during_teacher_cache_is_one_line_and_leaves_nothing_complete(teacher, tmp_path, monkeypatch,
                                                                                   capsys):
    real = os.fsync
    out = tmp_path / "cache"

    def full(fd):  # the disk fills up at the first shard (the manifest was written)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(out / "shard-")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", full)
    rc, lines = _cli(["teacher", "cache", "--teacher", str(teacher), "--data", "shapes", "--num", "4", "--out",
                      str(out), "--no-progress"], capsys)
    monkeypatch.undo()
    assert rc == 2 and len(lines) == 1 and "the disk is full" in lines[0] and "error:" in lines[0], lines
    assert not list(out.glob("*.tmp"))
    assert not json.loads((out / "manifest.json").read_text())["complete"]


def test_a_dinov2_load_error_is_one_line_without_the_load_report(teacher, tmp_path, capfd):
    import transformers
    from safetensors.torch import load_file, save_file
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=14)
    d = tmp_path / "dino"
    transformers.Dinov2Model(cfg).save_pretrained(d)
    sd = load_file(str(d / "model.safetensors"))
    save_file(dict(list(sd.items())[: len(sd) // 2]), str(d / "model.safetensors"), metadata={"format": "pt"})
    capfd.readouterr()
    rc = main(["--threads", "1", "eval", "--model", str(teacher), "--data", "shapes", "--num", "10", "--extractor",
               f"dinov2:{d}", "--no-progress"])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "missing keys" in err[0], err


# -- a run whose every update was skipped --------------------------------------------------------------------------

def test_a_run_whose_updates_were_all_skipped_is_not_complete(tmp_path, monkeypatch):
    from conftest import make_tiny_teacher_and_cache
    from twostep.io.folders import read_status
    from twostep.methods import load_config
    from twostep.train import distill, loop

    teacher, cache = make_tiny_teacher_and_cache(tmp_path, num=8, shard_size=8)
    monkeypatch.setattr(loop, "student_step", lambda *a, **k: (False, {}))  # a non-finite loss every time
    cfg = load_config(None, ["train.updates=2", "train.batch_size=2", "train.d_warmup=0", "train.grid_every=0",
                             "train.checkpoint_every=0", "student.decoupling=shared", "disc.blocks=[0]"])
    with pytest.raises(UserError, match="all 2 student updates were skipped"):
        distill(cfg, teacher, cache, tmp_path / "run", progress=False)
    assert not read_status(tmp_path / "run")["complete"]
    assert not (tmp_path / "run" / "model.safetensors").exists()


# -- a CSV quoted field with a blank line ---------------------------------------------------------------------------

def test_csv_quoted_field_with_a_blank_line_is_accepted(tmp_path):
    from twostep.data.prompts import head_prompts, read_prompts
    p = tmp_path / "p.csv"
    p.write_text('id,text\n1,"a red\n\ncircle"\n2,"blue, square"\n\n\n')
    assert head_prompts(p) == ["a red\n\ncircle", "blue, square"]
    assert sorted(read_prompts(p, 2, split="all")) == ["a red\n\ncircle", "blue, square"]
    q = tmp_path / "q.csv"  # a blank line between records is still an empty prompt
    q.write_text("text\na\n\nb\n")
    with pytest.raises(UserError, match="line 3: empty line"):
        head_prompts(q)
    assert head_prompts(q, skip_bad=True) == ["a", "b"]


# -- argv and the environment ---------------------------------------------------------------------------------------

def test_argv_and_environment_checks(monkeypatch):
    from twostep.environment import check_argv, check_environment
    check_argv(["sample", "--prompt", "", "--prompt", "ünïcode ✓"])  # an empty caption is a caption
    for bad, word in ((["--prompt", "a\udcffb"], "0xff"), (["--prompt", "\ud800"], "U+D800"),
                      (["--device", ""], "--device"), (["--json="], "--json"), (["--out", " "], "--out")):
        with pytest.raises(UserError, match=word.replace("+", r"\+")):
            check_argv(bad)
    for env, word in (({"WORLD_SIZE": "abc"}, "WORLD_SIZE"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
                      ({"WORLD_SIZE": "2"}, "launcher"), ({"LOCAL_RANK": "-1"}, "LOCAL_RANK"),
                      ({"TWOSTEP_CONFIGS": ""}, "TWOSTEP_CONFIGS"), ({"TWOSTEP_CACHE": __file__}, "not a folder")):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.raises(UserError, match=word):
                check_environment()
    with monkeypatch.context() as m:  # what torchrun sets
        for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}.items():
            m.setenv(k, v)
        check_environment()


def test_plan_refuses_with_the_number_and_the_estimate(tmp_path):
    from twostep import plan
    line = plan.check("--num", 10, "10 rows", memory=1000, disk=1000, disk_at=tmp_path / "new" / "cache")
    assert line.startswith("--num 10: 10 rows") and "on disk" in line
    with pytest.raises(UserError, match=r"--num 1,000,000,000: .* PiB of memory, but .* is available"):
        plan.check("--num", 10 ** 9, "rows", memory=10 ** 18)
    with pytest.raises(UserError, match=r"on disk, but .* free"):
        plan.check("--num", 10 ** 9, "rows", disk=1 << 61, disk_at=Path(tmp_path))
