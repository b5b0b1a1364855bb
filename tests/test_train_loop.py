"""The shared training loop: resume reproduces an uninterrupted run; run folders and bad inputs."""

import json

import pytest
import torch

from twostep.methods import load_config
from twostep.errors import UserError
from twostep.train import distill

from tiny import BLOCKS_1


def _cfg(updates, *extra):
    return load_config(None, [f"train.updates={updates}", "train.batch_size=4", "train.log_every=1",
                              "train.checkpoint_every=2", "train.grid_every=0", "train.d_warmup=0", BLOCKS_1, *extra])


def _log(run):
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_next_losses(tiny_loop):
    root, teacher, cache = tiny_loop
    full = distill(_cfg(4), teacher, cache, root / "full", progress=False)
    part = distill(_cfg(2), teacher, cache, root / "part", progress=False)
    part = distill(_cfg(4), teacher, cache, root / "part", resume=True, progress=False)
    a, b = _log(full), _log(part)
    keys = ("g_loss", "d_loss", "step1", "g_adv")
    assert [r["update"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["update"], k)
    from safetensors.torch import load_file
    s1, s2 = load_file(str(full / "step2.safetensors")), load_file(str(part / "step2.safetensors"))
    assert all(torch.allclose(s1[k], s2[k], atol=1e-6) for k in s1)


def test_run_folder_contents_and_refusals(tiny_loop):
    root, teacher, cache = tiny_loop
    run = distill(_cfg(2), teacher, cache, root / "r", progress=False)
    for f in ("config.yaml", "config.json", "step1.safetensors", "step2.safetensors", "log.jsonl", "loss_curves.png"):
        assert (run / f).exists(), f
    with pytest.raises(UserError, match="already holds a run"):
        distill(_cfg(2), teacher, cache, run, progress=False)
    with pytest.raises(UserError, match="would change what the run was trained with \\(student.sigma_mid 0.75 → 0.5"):
        distill(_cfg(4, "student.sigma_mid=0.5"), teacher, cache, run, resume=True, progress=False)


def test_cache_of_another_teacher_is_refused(tiny_loop, tmp_path):
    root, teacher, cache = tiny_loop
    import sys, os
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_tiny_teacher
    other = make_tiny_teacher(tmp_path / "other", seed=5)
    with pytest.raises(UserError):
        distill(_cfg(1), other, cache, tmp_path / "run", progress=False)


def test_cli_bad_config_key_exits_2(tiny_loop, tmp_path, capsys):
    from twostep.cli import main
    root, teacher, cache = tiny_loop
    rc = main(["distill", "--teacher", str(teacher), "--cache", str(cache), "--out", str(tmp_path / "x"),
               "--set", "loss.nope=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "loss.nope" in err[0]
    assert not (tmp_path / "x").exists()


def test_nonfinite_updates_are_skipped_then_rolled_back(tiny_loop, monkeypatch, capsys):
    root, teacher, cache = tiny_loop
    from twostep.methods.turbopp import TurboPP
    orig = TurboPP.student_loss
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        loss, logs = orig(self, batch)
        if 3 <= calls["n"] <= 5:       # updates 3..5 blow up (after the checkpoint at update 2)
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(TurboPP, "student_loss", flaky)
    run = distill(_cfg(6, "train.max_nonfinite=3"), teacher, cache, root / "nan", progress=False)
    out = capsys.readouterr().out
    assert "rolled back to step-00000004" in out and "halved" in out  # the newest complete checkpoint
    from safetensors.torch import load_file
    w = load_file(str(run / "step2.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert [r["update"] for r in _log(run)][-1] == 6 and calls["n"] == 7  # 5 before the rollback + updates 5, 6


def test_discriminator_warmup_runs_once_before_the_first_update(tiny_loop):
    """train.d_warmup: critic-only updates before update 1, logged as update 0; the student is untouched by
    them (its step-1 loss at update 1 equals a run without warm-up) and a resume never repeats them."""
    root, teacher, cache = tiny_loop
    traj = "loss.step1_loss=traj"  # a step-1 loss that reads the student only (adv would read the moved critic)
    full = distill(_cfg(4, "train.d_warmup=3", traj), teacher, cache, root / "wfull", progress=False)
    part = distill(_cfg(2, "train.d_warmup=3", traj), teacher, cache, root / "wpart", progress=False)
    part = distill(_cfg(4, "train.d_warmup=3", traj), teacher, cache, root / "wpart", resume=True, progress=False)
    plain = distill(_cfg(1, traj), teacher, cache, root / "wnone", progress=False)
    a, b, c = _log(full), _log(part), _log(plain)
    assert a[0]["update"] == 0 and a[0]["d_warmup"] == 3 and "d_loss" in a[0]
    assert [r["update"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("g_loss", "d_loss", "step1"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["update"], k)
    assert a[1]["step1"] == pytest.approx(c[0]["step1"], rel=1e-6)   # the student did not move in warm-up
    assert a[1]["d_loss"] != pytest.approx(c[0]["d_loss"], rel=1e-4)  # the critic did


def test_warmup_uses_at_most_half_of_a_time_budget(tiny_loop):
    """Under train.minutes the discriminator's head start stops once it has used half of the budget (it never takes
    the whole budget from the student): 100000 warm-up updates in a 3-second budget end early, the student trains."""
    root, teacher, cache = tiny_loop
    run = distill(_cfg(100000, "train.d_warmup=100000", "train.minutes=0.05"), teacher, cache, root / "wbudget",
                  progress=False)
    recs = _log(run)
    assert recs[0]["update"] == 0 and 0 < recs[0]["d_warmup"] < 100000
    assert recs[-1]["update"] >= 1


def test_resume_applies_a_changed_learning_rate(tiny_loop):
    """The optimizer state in a checkpoint carries the learning rate; a --resume with a new train.lr_student must
    use the new one (loading the state alone would silently keep the old one). The critic's is untouched."""
    from twostep.io.checkpoints import latest_checkpoint
    root, teacher, cache = tiny_loop
    run = root / "lr"
    distill(_cfg(2), teacher, cache, run, progress=False)
    distill(_cfg(4, "train.lr_student=1e-3"), teacher, cache, run, resume=True, progress=False)
    groups = json.loads((latest_checkpoint(run / "checkpoints") / "optim.json").read_text())
    assert [g["lr"] for g in groups["student"]["param_groups"]] == pytest.approx([1e-3])
    assert [g["lr"] for g in groups["critic"]["param_groups"]] == pytest.approx([_cfg(1).train.lr_disc])


def test_each_optimizer_has_its_configured_weight_decay_also_after_a_resume(tiny_loop):
    """train.weight_decay is the student's, train.weight_decay_disc the critic's (the critic silently took
    torch's AdamW default of 0.01 before the option existed); a --resume applies changed values to both."""
    from twostep.io.checkpoints import latest_checkpoint
    root, teacher, cache = tiny_loop
    run = root / "wd"

    def wds():
        groups = json.loads((latest_checkpoint(run / "checkpoints") / "optim.json").read_text())
        return {k: [g["weight_decay"] for g in groups[k]["param_groups"]] for k in ("student", "critic")}

    distill(_cfg(2), teacher, cache, run, progress=False)
    assert wds() == {"student": [0.0], "critic": [pytest.approx(0.01)]}
    distill(_cfg(4, "train.weight_decay=1e-3", "train.weight_decay_disc=0.0"), teacher, cache, run, resume=True,
            progress=False)
    assert wds() == {"student": [pytest.approx(1e-3)], "critic": [0.0]}


def test_lora_student_trains_at_lr_lora_and_a_resume_applies_a_changed_one(tiny_loop):
    """decoupling=lora uses train.lr_lora, not lr_student (which would leave the zero-initialised adapters
    nearly unmoved); a --resume with a new lr_lora applies it, a new lr_student does not touch the adapters."""
    from twostep.io.checkpoints import latest_checkpoint
    root, teacher, cache = tiny_loop
    run = root / "lora-lr"

    def lrs():
        groups = json.loads((latest_checkpoint(run / "checkpoints") / "optim.json").read_text())
        return [g["lr"] for g in groups["student"]["param_groups"]]

    lora = ["student.decoupling=lora", "train.lr_lora=3e-3", "train.lr_student=1e-6"]
    distill(_cfg(2, *lora), teacher, cache, run, progress=False)
    assert lrs() == pytest.approx([3e-3])
    distill(_cfg(4, *lora[:2], "train.lr_student=5e-6"), teacher, cache, run, resume=True, progress=False)
    assert lrs() == pytest.approx([3e-3])
    distill(_cfg(6, "student.decoupling=lora", "train.lr_lora=1e-3"), teacher, cache, run, resume=True,
            progress=False)
    assert lrs() == pytest.approx([1e-3])


def test_fused_adamw_is_the_cuda_default_and_gives_the_foreach_update(tiny_loop):
    """train.adamw: auto is fused on CUDA only (the CPU benchmarks keep torch's default, foreach, and their
    bytes); fused on the CPU trains to the same weights as foreach, to float rounding; the memory estimate counts
    foreach's step temporaries (sqrt(v) of every trainable parameter) only where they are allocated."""
    from safetensors.torch import load_file

    from twostep.train.state import fused_adamw, optimizers
    assert fused_adamw("auto", "cuda") and not fused_adamw("auto", "cpu")
    assert fused_adamw("fused", "cpu") and not fused_adamw("foreach", "cuda")
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert optimizers(_cfg(1, "train.adamw=fused"), p, p)["student"].defaults["fused"] is True
    assert not optimizers(_cfg(1), p, p)["critic"].defaults["fused"]

    root, teacher, cache = tiny_loop
    runs = {impl: distill(_cfg(3, f"train.adamw={impl}"), teacher, cache, root / f"adamw-{impl}", progress=False)
            for impl in ("foreach", "fused")}
    a, b = (load_file(str(runs[i] / "step2.safetensors")) for i in ("foreach", "fused"))
    start = load_file(str(teacher / "model.safetensors"))  # the student's initial weights
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert sum(not torch.equal(a[k], start[k]) for k in a if k in start) > len(a) // 2  # the updates moved them

    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from memory_model import ZIMAGE_TURBO
    from twostep.train.memory import estimate

    def step(impl, device="cuda"):
        return estimate(_cfg(1, f"train.adamw={impl}"), ZIMAGE_TURBO, 1, device=device)["phases"]["optimizer step"]
    trainable = estimate(_cfg(1), ZIMAGE_TURBO, 1)["counts"]["student_trainable"]
    assert step("foreach") - step("auto") == step("foreach") - step("fused") == 4 * trainable
    assert step("foreach", "cpu") == step("auto", "cpu")


def test_lr_half_life_halves_the_student_rate_and_ignores_the_budget():
    from twostep.train.steps import lr_scale
    assert lr_scale(1, 0, 0) == 1.0
    assert lr_scale(1000, 0, 1000) == pytest.approx(0.5)
    assert lr_scale(2000, 0, 1000) == pytest.approx(0.25)
    assert lr_scale(5, 10, 1000) == pytest.approx(0.5 * 0.5 ** (5 / 1000))   # times the warm-up
