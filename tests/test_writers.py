"""One writer per folder (twostep/io/lock.py) and a resume's identity from what was trained (issue 28).

- Two `twostep distill` processes started together into one --out: exactly one trains, the other exits 2 naming
  the holder's pid and host, and the finished run is bit-identical to a run alone (student safetensors bytes).
- The lock: released on every exit path, a stale lock of a killed process taken over, ranks other than 0 never
  lock, no lock put into a folder the command refuses.
- A resume against the config recorded in status.json: resuming the run alone with its original flags works
  after its config.yaml was edited (and config.yaml is rewritten to what was trained).
The refusals themselves are cases of tests/test_cli_fuzz.py (kinds overwrites, two-writers, edited-config).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_teacher_and_cache
from tiny import BLOCKS_1
from twostep.errors import UserError
from twostep.io.folders import LOCK_FILE, inspect_folder
from twostep.io.lock import FolderLock, folder_lock, holds_lock

SETTINGS = ["train.updates=12", "train.d_warmup=0", "train.batch_size=4", "train.log_every=1", "train.grid_every=0",
            "train.checkpoint_every=4", "train.keep_checkpoints=1", BLOCKS_1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    return (root, *make_tiny_teacher_and_cache(root, num=8, shard_size=8))


def _distill(teacher, cache, out, *extra):
    cmd = [sys.executable, "-m", "twostep", "--threads", "1", "distill", "--teacher", str(teacher), "--cache",
           str(cache), "--out", str(out), "--no-progress"]
    for s in SETTINGS:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TWOSTEP_FAULT", None)
    return subprocess.Popen([*cmd, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _student_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.glob("*.safetensors"))}


def test_two_distills_into_one_folder_one_runs_and_matches_a_run_alone(tiny):
    root, teacher, cache = tiny
    both, alone = root / "both", root / "alone"
    procs = [_distill(teacher, cache, both), _distill(teacher, cache, both), _distill(teacher, cache, alone)]
    res = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    (rc_a, _, err_a), (rc_b, _, err_b), (rc_alone, _, err_alone) = res
    assert rc_alone == 0, err_alone[-500:]
    assert sorted((rc_a, rc_b)) == [0, 2], (rc_a, err_a[-300:], rc_b, err_b[-300:])
    winner, loser = (procs[0], err_b) if rc_a == 0 else (procs[1], err_a)
    lines = [ln for ln in loser.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in loser, loser
    assert f"(pid {winner.pid} on host {socket.gethostname()}" in lines[0], lines[0]
    # the run is the winner's alone: every update logged once, complete, bit-identical to the run alone
    updates = [json.loads(ln)["update"] for ln in (both / "log.jsonl").read_text().splitlines()]
    assert updates == list(range(1, 13)), updates
    assert inspect_folder(both).complete and not (both / LOCK_FILE).exists()
    got, want = _student_bytes(both), _student_bytes(alone)
    assert got and got == want, sorted(got)
    _resume_checks_the_recorded_config_not_the_edited_yaml(teacher, cache, alone)


def _resume_checks_the_recorded_config_not_the_edited_yaml(teacher, cache, run):
    """The recorded config decides: an edited config.yaml does not stop a resume with the original flags, and
    config.yaml is rewritten to what was trained. (Resuming with the edited file is fuzz edited-config:*; this
    part reuses the run above, so no other run is trained for it.)"""
    from twostep.cli import main

    y = run / "config.yaml"
    y.write_text(y.read_text().replace("sigma_mid: 0.75", "sigma_mid: 0.5"))
    status = json.loads((run / "status.json").read_text())
    assert status["config"]["student"]["sigma_mid"] == 0.75 and len(status["config_sha256"]) == 64
    argv = ["--threads", "1", "distill", "--teacher", str(teacher), "--cache", str(cache), "--out", str(run),
            "--no-progress", *[x for s in SETTINGS for x in ("--set", s)], "--set", "train.updates=13", "--resume"]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert "sigma_mid: 0.75" in y.read_text()
    assert json.loads((run / "config.json").read_text())["sigma_mid"] == 0.75
    s = json.loads((run / "status.json").read_text())
    assert s["complete"] and s["progress"]["done"] == 13


def test_the_lock_is_released_on_every_exit_path(tmp_path):
    d = tmp_path / "new" / "out"

    @holds_lock("out")
    def fails(out):
        assert (Path(out) / LOCK_FILE).is_file()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fails(d)
    assert not (tmp_path / "new").exists()  # the folders the lock made, still empty, are gone again
    with folder_lock(d):
        (d / "x").write_text("work")
        with pytest.raises(UserError, match=f"pid {os.getpid()} on host"):
            with folder_lock(d):
                pass
    assert sorted(p.name for p in d.iterdir()) == ["x"]  # released: the lock file removed, the work kept
    with folder_lock(d):  # and free again
        pass


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    code = ("import fcntl, json, os, socket, sys, time; f = open(sys.argv[1] + '/.twostep.lock', 'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); json.dump({'pid': os.getpid(), 'host': "
            "socket.gethostname(), 'since': time.time()}, f); f.flush(); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {p.pid} on host {socket.gethostname()}"):
            FolderLock(d).acquire()
    finally:
        p.kill()
        p.wait()
    assert json.loads((d / LOCK_FILE).read_text())["pid"] == p.pid  # the killed holder's file is still there
    with folder_lock(d) as lock:
        assert lock.took_over["pid"] == p.pid
    assert f"took over the lock of a writer that is gone (pid {p.pid}" in capsys.readouterr().err


def test_only_rank_0_locks_and_refused_folders_get_no_lock(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    with FolderLock(d):  # rank 0 of job-a
        monkeypatch.setenv("RANK", "1")
        with folder_lock(d) as lock:  # rank 1 of the same job: no lock of its own
            assert lock is None
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # rank 1 of a double-submitted job: refused too
        with pytest.raises(UserError, match=f"pid {os.getpid()} on host"):
            with folder_lock(d):
                pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(UserError):
            with folder_lock(d):
                pass
    t = tmp_path / "teacher"
    t.mkdir()
    (t / "config.json").write_text(json.dumps({"kind": "teacher"}))
    with folder_lock(t, kind="student") as lock:  # another kind: the command refuses it, no lock file put there
        assert lock is None and not (t / LOCK_FILE).exists()
    with folder_lock(t / "sub") as lock:  # inside another twostep folder: likewise
        assert lock is None and not (t / "sub").exists()
