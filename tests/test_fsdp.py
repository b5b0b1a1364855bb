"""FSDP2 (`train.fsdp=true`) on CPU: 2 processes (torchrun, gloo) shard the `full` student's two transformers and
its EMA, stepped by fused AdamW (auto's choice on CUDA); the final model equals a 1-process unsharded foreach-AdamW
run with the same global batch, the checkpoints hold full tensors in the unsharded format, the best student
(train.keep_best) is the same, and a resume from a mid-run checkpoint under FSDP ends at the same weights.

The student loss is made independent of the methods' per-process σ/ε draws (adversarial weight 0; step-1
trajectory MSE + paired MSE to the teacher, both deterministic with mid_noise=same), so 1 and 2 processes can
agree to float rounding; a tiny gradient-clipping threshold keeps clipping active at every update, so the global
gradient norm over the DTensor shards is part of what is compared."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from twostep.methods import load_config
from twostep.train import distill

from tiny import BLOCKS_1

UPDATES = 4
SETTINGS = [f"train.updates={UPDATES}", "train.d_warmup=0", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
            "train.keep_checkpoints=2", "train.grid_every=4", "train.grad_clip=0.05", "train.lr_student=1e-3",
            "student.decoupling=full", "loss.adv_weight=0.0", "loss.paired_weight=1.0", "loss.step1_loss=traj", BLOCKS_1,
            "train.eval_every=2", "train.eval_num=10"]  # quick FD + train.keep_best (RUN/best/) under FSDP too
FSDP = ["train.fsdp=true", "train.grad_checkpointing=true",
        "train.checkpoint_format=files",  # the gathered full-tensor layout (DCP, the default here: test_cluster.py)
        "train.adamw=fused"]  # auto's choice on CUDA, stepping the DTensor shards (the 1-process run: foreach)
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_tiny_teacher_and_cache

    root = tmp_path_factory.mktemp("fsdp")
    teacher, cache = make_tiny_teacher_and_cache(root, num=20, shard_size=10)  # 10 rows held out for the quick FD
    one = distill(load_config(None, SETTINGS), teacher, cache, root / "one", progress=False)
    two = _launch(teacher, cache, root / "two", SETTINGS + FSDP)
    return root, teacher, cache, one, two


def _launch(teacher, cache, out, settings, resume=False, units=16, expect=""):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "twostep", "--threads", "1", "distill", "--teacher", str(teacher), "--cache", str(cache),
           "--out", str(out), "--no-progress"] + (["--resume"] if resume else [])
    for s in settings:
        cmd += ["--set", s]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)  # a hang (a skipped collective) fails
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    # full: 2 transformers × (3 blocks of the tiny model + the transformer), for the student and for its EMA
    assert f"FSDP2: student and EMA sharded over 2 processes ({units} units){expect}" in p.stdout + p.stderr
    return out


def _maxdiff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _files(folder, names):
    return {n: load_file(str(folder / n)) for n in names}


MODEL = ("step1.safetensors", "step2.safetensors")
CKPT = ("student.safetensors", "ema/step1.safetensors", "ema/step2.safetensors", "optim_student.safetensors")


def test_fsdp_two_processes_match_one_unsharded_process(runs):
    root, teacher, cache, one, two = runs
    rec = json.loads((two / "distributed.json").read_text())
    assert rec["num_processes"] == 2 and rec["ranks_in_sync"] is True and len(set(rec["param_digests"])) == 1
    # the run folder's model (EMA) and every checkpoint hold full tensors, in the unsharded run's format
    a, b = _files(one, MODEL), _files(two, MODEL)
    moved = max((a[n][k].double() - load_file(str(teacher / "model.safetensors"))[k].double()).abs().max().item()
                for n in MODEL for k in a[n])
    assert moved > 1e-3  # the comparison is not vacuous: training moved the weights
    for n in MODEL:
        assert _maxdiff(a[n], b[n]) < TOL, n
    for step in ("step-00000002", "step-00000004"):
        ca, cb = _files(one / "checkpoints" / step, CKPT), _files(two / "checkpoints" / step, CKPT)
        for n in CKPT:
            assert _maxdiff(ca[n], cb[n]) < TOL, (step, n)
        oa, ob = (json.loads((d / "checkpoints" / step / "optim.json").read_text()) for d in (one, two))
        impl = lambda o: {**o, "param_groups": [{k: v for k, v in g.items() if k not in ("fused", "foreach")}  # noqa: E731
                                                for g in o["param_groups"]]}
        assert impl(oa["student"]) == impl(ob["student"])  # param groups and step counts, but the kernel choice
        assert [g["fused"] for g in ob["student"]["param_groups"]] == [True] * len(ob["student"]["param_groups"])
        # β1 = 0: AdamW's first moment is the last clipped gradient, so its norm is the clip threshold when the
        # norm was computed over all shards (a per-shard norm would give 0.05·√2 here)
        m = [v.double() for k, v in cb["optim_student.safetensors"].items() if k.endswith(".exp_avg")]
        assert torch.sqrt(sum((v ** 2).sum() for v in m)).item() == pytest.approx(0.05, rel=1e-5)
    la, lb = ([r for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "step1" in r]
              for d in (one, two))  # the update records (a quick FD adds its own)
    assert len(la) == len(lb) == UPDATES
    for ra, rb in zip(la, lb):
        for k in ("step1", "paired", "mse_vs_teacher"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["update"], k)
    assert (two / "grids" / f"grid-{UPDATES:06d}.png").exists()


def test_fsdp_keeps_the_same_best_student_as_the_unsharded_run(runs):
    """train.keep_best under FSDP: every rank gathers the EMA, rank 0 writes RUN/best/; the same update is kept,
    with the unsharded run's quick FD and weights, and only complete student files are there."""
    root, teacher, cache, one, two = runs
    recs = [json.loads((d / "best" / "config.json").read_text())["best"] for d in (one, two)]
    assert recs[0]["update"] == recs[1]["update"] in (2, 4)
    assert recs[1]["eval_fd"] == pytest.approx(recs[0]["eval_fd"], rel=1e-3)
    fds = {r["update"]: r["eval_fd"] for r in map(json.loads, (two / "log.jsonl").read_text().splitlines())
           if "eval_fd" in r}
    assert set(fds) == {2, 4} and recs[1]["eval_fd"] == pytest.approx(min(fds.values()), abs=1e-5)  # log: 5 decimals
    a, b = _files(one / "best", MODEL), _files(two / "best", MODEL)
    for n in MODEL:
        assert _maxdiff(a[n], b[n]) < TOL, n
    assert not any(p.name.startswith(".") or p.suffix == ".tmp" for p in (two / "best").iterdir())


def test_fsdp_resume_from_a_mid_run_checkpoint_ends_at_the_same_weights(runs):
    root, teacher, cache, one, two = runs
    res = root / "resumed"  # the FSDP run as it stood after its update-2 checkpoint
    res.mkdir()
    shutil.copy(two / "config.yaml", res / "config.yaml")
    shutil.copytree(two / "checkpoints" / "step-00000002", res / "checkpoints" / "step-00000002")
    _launch(teacher, cache, res, SETTINGS + FSDP, resume=True)
    a, b = _files(two, MODEL), _files(res, MODEL)
    for n in MODEL:
        assert _maxdiff(a[n], b[n]) < 1e-6, n
    ca, cb = (_files(d / "checkpoints" / "step-00000004", CKPT) for d in (two, res))
    for n in CKPT:
        assert _maxdiff(ca[n], cb[n]) < 1e-6, n


def test_fsdp_shared_student_when_ranks_call_it_differently(runs):
    """LADD (shared student) runs step 1 only for the samples that drew step k = 2; with 1 row per rank a rank
    often has none, and it must still join the other rank's FSDP all-gathers (TwoStepStudent.step_input)
    rather than hang. Ends in sync, with full-tensor model files. Under train.mixed_precision=bf16 (FSDP2's
    MixedPrecisionPolicy: bf16 all-gathers, fp32 reduction) and train.frozen_dtype=bf16, with gradient
    accumulation: the teacher and the all-gathered student compute in bf16, the master weights stay fp32."""
    root, teacher, cache, one, two = runs
    out = _launch(teacher, cache, root / "ladd", ["method=ladd", "student.decoupling=shared", "train.updates=4", "train.d_warmup=0",
                                                  "train.batch_size=2", "train.grad_accum=2", "train.checkpoint_every=0",
                                                  "train.grid_every=0", "train.fsdp=true", "train.mixed_precision=bf16",
                                                  "train.frozen_dtype=bf16", BLOCKS_1], units=8,
                  expect="; parameters all-gathered in bf16, gradients reduced in fp32")
    assert json.loads((out / "distributed.json").read_text())["ranks_in_sync"] is True
    w = load_file(str(out / "model.safetensors"))
    assert w.keys() == load_file(str(teacher / "model.safetensors")).keys()
    assert {v.dtype for v in w.values()} == {torch.float32}
