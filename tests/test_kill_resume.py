"""SIGKILL `twostep distill` at ≥ 10 points (mid-checkpoint-write included), resume each time: the final student
is bit-identical to an uninterrupted run with the same seeds (CPU, 1 thread). docs/reliability.md lists the faults.
The full student at random points; the shared and lora students (small checkpoints: adapters only, the run
folder's files linked to the checkpoint's EMA, a lora base written once) at the points of their own files.

Kill points come from twostep/faults.py (`TWOSTEP_FAULT=<point>:<n>`: the process SIGKILLs itself the n-th time it
reaches <point>), drawn at random from a seeded RNG, plus kills from outside at random wall-clock instants.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twostep.io.checkpoints import latest_checkpoint

from tiny import BLOCKS_1

POINTS = ["update", "ckpt.mid", "ckpt.rename", "ckpt.prune", "model.save"]
UPDATES = 48  # > the most progress 10 kills can keep (≤ 4 updates per kill), so ≥ 10 kills always happen
SETTINGS = [f"train.updates={UPDATES}", "train.d_warmup=0", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
            "train.keep_checkpoints=2", "train.grid_every=0", BLOCKS_1]


def _cmd(teacher, cache, out, resume, settings=SETTINGS):
    cmd = [sys.executable, "-m", "twostep", "--threads", "1", "distill", "--teacher", str(teacher), "--cache",
           str(cache), "--out", str(out), "--no-progress"]
    for s in settings:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def _env(fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TWOSTEP_FAULT", None)
    if fault:
        env["TWOSTEP_FAULT"] = fault
    return env


def _lines(run: Path) -> list[str]:
    f = run / "log.jsonl"
    return f.read_text().splitlines() if f.exists() else []


def _resumable(run: Path) -> bool:
    """--resume when the run has a complete checkpoint; a run killed before its first one starts afresh (a kill
    from outside can land before it on a slow machine)."""
    return latest_checkpoint(run / "checkpoints") is not None


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """Everything that defines the final student: the run folder's model files and the last checkpoint."""
    out = {}
    for f in sorted(run.glob("*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    ck = latest_checkpoint(run / "checkpoints")
    for f in sorted(ck.rglob("*.safetensors")):
        if f.name != "rng.safetensors":
            out.update({f"ckpt/{f.relative_to(ck)}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_sigkill_anywhere_then_resume_is_bit_identical(tiny_loop):
    root, teacher, cache = tiny_loop
    ref = root / "uninterrupted"
    r = subprocess.run(_cmd(teacher, cache, ref, False), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    rng = random.Random(int(os.environ.get("TWOSTEP_KILL_SEED", "0")))
    faults = [f"{p}:{rng.randint(1, 2)}" for p in POINTS]               # every point at least once
    faults += [f"{rng.choice(POINTS)}:{rng.randint(1, 2)}" for _ in range(3)]
    run, killed = root / "killed", []
    for _ in range(2):  # from outside, at a random instant: once 1–4 more updates have been logged
        n0 = len(_lines(run))
        p = subprocess.Popen(_cmd(teacher, cache, run, _resumable(run)), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        want, t0 = n0 + rng.randint(1, 4), time.time()
        while p.poll() is None and len(_lines(run)) < want and time.time() - t0 < 240:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed.append("external")
        p.wait()
    for fault in faults:
        r = subprocess.run(_cmd(teacher, cache, run, _resumable(run)), env=_env(fault), capture_output=True,
                           text=True, timeout=300)
        if r.returncode == 0:  # the run finished before reaching this point: nothing left to interrupt
            break
        assert r.returncode == -signal.SIGKILL, (fault, r.stderr[-2000:])
        killed.append(fault)
        ck = latest_checkpoint(run / "checkpoints")  # what --resume will pick: never a partial one
        assert ck is None or (not ck.name.endswith(".partial") and
                              {"student.safetensors", "ema", "optim.json", "rng.safetensors"}
                              <= {f.name for f in ck.iterdir()}), (fault, ck)
    r = subprocess.run(_cmd(teacher, cache, run, _resumable(run)), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(killed) >= 10, killed
    assert {f.split(":")[0] for f in killed} >= {"ckpt.mid", "ckpt.rename", "model.save"}, killed

    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ after {killed}: {diff[:3]}"
    assert len(list((run / "checkpoints").glob("step-*"))) <= 2  # the last K kept, partials cleaned up


# shared: killed inside the second checkpoint's write (between its files); lora: inside the second run-folder save,
# after its base (written once, so skipped there: the 4th point) and the first linked adapter (the 5th), which
# leaves step1 of update 4 beside step2 and config.json of update 2
@pytest.mark.parametrize("decoupling,faults", [("shared", ["ckpt.mid:2"]), ("lora", ["model.save:5"])])
def test_sigkill_then_resume_is_bit_identical_for_shared_and_lora(tiny_loop, decoupling, faults):
    """SIGKILLed inside the small checkpoints' own files, then resumed: bit-identical to an uninterrupted run."""
    root, teacher, cache = tiny_loop
    settings = [s.replace(f"updates={UPDATES}", "updates=6") for s in SETTINGS] + [
        f"student.decoupling={decoupling}", "student.lora_rank=2"]
    ref, run = root / f"ref-{decoupling}", root / f"killed-{decoupling}"
    r = subprocess.run(_cmd(teacher, cache, ref, False, settings), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for i, fault in enumerate(faults):
        r = subprocess.run(_cmd(teacher, cache, run, i > 0, settings), env=_env(fault), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, (fault, r.stderr[-2000:])
    r = subprocess.run(_cmd(teacher, cache, run, True, settings), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ after {faults}: {diff[:3]}"
    if decoupling == "lora":
        assert all("lora_" in k for k in a if k.startswith("ckpt/student.safetensors/"))


def test_interrupted_model_save_is_refused_until_resumed(tiny_loop):
    root, teacher, cache = tiny_loop
    run = root / "half-saved"
    cmd = _cmd(teacher, cache, run, False)
    r = subprocess.run(cmd, env=_env("model.save:1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    # the first model file holds the new update, config.json does not exist yet or names the old one
    from twostep.errors import UserError
    from twostep.sampling import load_student_generator
    if (run / "config.json").exists():
        with pytest.raises(UserError, match="interrupted"):
            load_student_generator(run)
    r = subprocess.run(_cmd(teacher, cache, run, True), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_student_generator(run).config["updates"] == UPDATES
