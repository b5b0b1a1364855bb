"""Training that survives a cluster (CPU, gloo): sharded DCP checkpoints that reshard, preemption by SIGTERM, the
resume command as launched, a 2-"node" launch. docs/cluster.md.

One story, three 2-process launches (the slow part):
  one       1 process, files layout, 8 updates (the reference of every other run's arithmetic)
  one_dcp   1 process, DCP layout: the same bytes as `one` (model, checkpoint), and `export` gives the same pipeline
  nodes     one_dcp's update-2 checkpoint (1 process) resumed by 2 "nodes" × 1 process (torchrun --nnodes 2, c10d
            rendezvous on localhost) to 8: a 1 → 2 reshard; ≈ `one` (1 vs 2 processes: float rounding, TOL)
  pre       nodes' update-4 checkpoint resumed as 1 node × 2 processes, SIGTERMed (to its `twostep launch`, as a scheduler does)
            after 1-2 updates (a seeded random draw, TWOSTEP_KILL_SEED): a checkpoint of the update it stopped at, status unfinished; then
            status.json's `resume` run verbatim (a shell) ends bit-identical to `nodes`, no update lost or repeated
  down      nodes' update-4 checkpoint (2 processes) resumed in 1 process: the same bytes (student, EMA, AdamW
            moments) in the files layout, then trained to 8 ≈ `one`

The student loss is deterministic (as in tests/test_fsdp.py: adversarial weight 0, trajectory + paired MSE), so runs
with different numbers of processes can agree to float rounding.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from twostep.methods import load_config
from twostep.train import distill
from twostep.train.dcp import read_full

from tiny import BLOCKS_1

UPDATES = 8
SETTINGS = [f"train.updates={UPDATES}", "train.d_warmup=0", "train.batch_size=4", "train.log_every=1",
            "train.checkpoint_every=2", "train.keep_checkpoints=4", "train.grid_every=0", "train.grad_clip=0.05",
            "train.lr_student=1e-3", "student.decoupling=full", "loss.adv_weight=0.0", "loss.paired_weight=1.0",
            "loss.step1_loss=traj", BLOCKS_1]
FSDP = ["train.fsdp=true"]
TOL = 1e-5  # 1 vs 2 processes: the same sums in another order (tests/test_fsdp.py)
MODEL = ("step1.safetensors", "step2.safetensors")
ENV = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _env():
    env = {**os.environ, **ENV}
    env.pop("TWOSTEP_FAULT", None)
    return env


def _args(teacher, cache, out, resume):
    a = ["-m", "twostep", "--threads", "1", "distill", "--teacher", str(teacher), "--cache", str(cache), "--out",
         str(out), "--no-progress"]
    for s in SETTINGS + FSDP:
        a += ["--set", s]
    return a + (["--resume"] if resume else [])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_checkpoint(src, step, dst):
    """A run folder as `src` stood after its checkpoint `step` (config, launch record, that checkpoint)."""
    dst.mkdir()
    for f in ("config.yaml", "launch.json"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    shutil.copytree(src / "checkpoints" / f"step-{step:08d}", dst / "checkpoints" / f"step-{step:08d}")
    return dst


def _model(run):
    return {f"{n}/{k}": v for n in MODEL for k, v in load_file(str(run / n)).items()}


def _maxdiff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _dcp(run, step):
    return dict(read_full(run / "checkpoints" / f"step-{step:08d}" / "dcp"))


def _updates(run):
    return [json.loads(line)["update"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_tiny_teacher_and_cache

    root = tmp_path_factory.mktemp("cluster")
    teacher, cache = make_tiny_teacher_and_cache(root)
    one = distill(load_config(None, SETTINGS), teacher, cache, root / "one", progress=False)
    one_dcp = distill(load_config(None, SETTINGS + ["train.checkpoint_format=dcp"]), teacher, cache,
                      root / "one_dcp", progress=False)
    t0 = time.time()
    # 2 "nodes" × 1 process on localhost, resuming a 1-process DCP checkpoint
    nodes = _copy_checkpoint(one_dcp, 2, root / "nodes")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t29",
                               "--rdzv_conf", f"is_host={'true' if k == 0 else 'false'}"]
                              + _args(teacher, cache, nodes, True), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    # 1 node × 2 processes from nodes' update-4 checkpoint, SIGTERMed after 1-3 updates
    pre = _copy_checkpoint(nodes, 4, root / "pre")
    rng = random.Random(int(os.environ.get("TWOSTEP_KILL_SEED", "0")))
    want = 4 + rng.randint(1, 2)  # log.jsonl starts with the checkpoint's 4 records
    a = _args(teacher, cache, pre, True)  # the README's launcher: twostep launch
    k = a.index("distill")
    p = subprocess.Popen([sys.executable, *a[:k], "launch", "--processes", "2", *a[k:]], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = lambda: len(_updates(pre)) if (pre / "log.jsonl").exists() else 0  # noqa: E731
    t1 = time.time()
    while p.poll() is None and lines() < want and time.time() - t1 < 240:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    p.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to its workers
    stopped = p.communicate(timeout=300)[0]
    stopped_rc = p.returncode
    status = json.loads((pre / "status.json").read_text())
    # status.json's resume command, run verbatim
    r = subprocess.run(status["resume"], shell=True, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    launches_s = time.time() - t0
    # nodes' update-4 checkpoint (2 processes) in 1 process: first only loaded and saved again, then trained on
    down = _copy_checkpoint(nodes, 4, root / "down")
    distill(load_config(None, [s.replace(f"updates={UPDATES}", "updates=4") for s in SETTINGS]), teacher, cache,
            down, resume=True, progress=False)
    resaved = {n: load_file(str(down / "checkpoints" / "step-00000004" / n))
               for n in ("student.safetensors", "ema/step1.safetensors", "ema/step2.safetensors",
                         "optim_student.safetensors")}
    distill(load_config(None, SETTINGS), teacher, cache, down, resume=True, progress=False)
    return dict(root=root, teacher=teacher, one=one, one_dcp=one_dcp, nodes=nodes, nodes_out=outs, pre=pre,
                stopped=stopped, stopped_rc=stopped_rc, status=status, resumed=r.stdout + r.stderr, down=down, resaved=resaved,
                want=want, launches_s=launches_s)


def test_a_dcp_checkpoint_holds_the_bytes_of_the_files_layout_and_exports_the_same_pipeline(runs, tmp_path):
    one, one_dcp = runs["one"], runs["one_dcp"]
    a, b = _model(one), _model(one_dcp)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    ck = one_dcp / "checkpoints" / f"step-{UPDATES:08d}"
    assert json.loads((ck / "meta.json").read_text())["format"] == 3
    sd, files = _dcp(one_dcp, UPDATES), one / "checkpoints" / f"step-{UPDATES:08d}"
    student = load_file(str(files / "student.safetensors"))
    assert {f"student/{k}" for k in student} == {k for k in sd if k.startswith("student/")}
    assert all(torch.equal(student[k], sd[f"student/{k}"]) for k in student)
    for stem in ("step1", "step2"):  # the consolidated EMA files are the files layout's, tensor for tensor
        x, y = load_file(str(files / "ema" / f"{stem}.safetensors")), load_file(str(ck / "ema" / f"{stem}.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # AdamW's moments: the files layout by parameter index, DCP by parameter name (the same order)
    moments = load_file(str(files / "optim_student.safetensors"))
    names = json.loads((ck / "optim.json").read_text())["student"]["param_groups"][0]["params"]
    for i, name in enumerate(names):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[f"{i}.{k}"], sd[f"optim_student/{name}/{k}"]), (name, k)
    from twostep.export import export_student
    ea, eb = export_student(one, tmp_path / "a"), export_student(one_dcp, tmp_path / "b")
    fa = sorted(p.relative_to(ea) for p in ea.rglob("*.safetensors"))
    assert fa and fa == sorted(p.relative_to(eb) for p in eb.rglob("*.safetensors"))
    for f in fa:
        x, y = load_file(str(ea / f)), load_file(str(eb / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f


def test_one_process_dcp_resumes_on_two_nodes(runs):
    nodes, one = runs["nodes"], runs["one"]
    out = "\n".join(runs["nodes_out"])
    assert "resuming a run of 1 processes with 2" in out
    rec = json.loads((nodes / "distributed.json").read_text())
    assert rec["num_processes"] == 2 and rec["ranks_in_sync"] is True
    launch = json.loads((nodes / "launch.json").read_text())
    assert launch["num_processes"] == 2 and launch["num_nodes"] == 2 and launch["launcher"] == "torchrun"
    assert "--nnodes 2" in launch["resume"] and "--rdzv_backend c10d" in launch["resume"]
    shards = sorted(p.name for p in (nodes / "checkpoints" / "step-00000004" / "dcp").iterdir())
    assert len(shards) == 2  # each rank wrote its own shards
    assert _maxdiff(_model(one), _model(nodes)) < TOL
    assert _updates(nodes) == list(range(1, UPDATES + 1))  # the log: the checkpoint's records, then 3..8, once


def test_sigterm_checkpoints_the_update_in_progress_and_the_printed_command_resumes_bit_identically(runs):
    pre, nodes, status = runs["pre"], runs["nodes"], runs["status"]
    stopped = runs["stopped"]
    assert "stopped: SIGTERM: stopped at update" in stopped, stopped[-3000:]
    # the launcher waited for the checkpoint, then ended with one line and 128 + 15, no traceback
    assert runs["stopped_rc"] == 143 and "Traceback" not in stopped, stopped[-3000:]
    assert stopped.rstrip().splitlines()[-1].startswith("twostep launch: SIGTERM: the processes were stopped")
    k = int(stopped.split("stopped at update ")[1].split(",")[0])
    assert runs["want"] <= k < UPDATES  # after the updates it was let do, before the end
    assert status["complete"] is False and status["progress"]["done"] == k  # its checkpoint is of update k
    cmd = status["resume"]
    assert cmd.startswith(f"{sys.executable} -m twostep --threads 1 launch --processes 2 distill --teacher ") and cmd.endswith("--resume --no-progress"), cmd
    assert f"resumed from {pre / 'checkpoints' / f'step-{k:08d}'} at update {k}" in runs["resumed"]
    # bit-identical to the uninterrupted run: model files and everything in the last checkpoint
    a, b = _model(nodes), _model(pre)
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    x, y = _dcp(nodes, UPDATES), _dcp(pre, UPDATES)
    assert x.keys() == y.keys() and [n for n in x if not torch.equal(x[n], y[n])] == []
    assert _updates(pre) == list(range(1, UPDATES + 1))  # 0 updates lost, none twice (1..k, then k+1..8)
    assert json.loads((pre / "status.json").read_text())["complete"] is True


def test_two_process_dcp_resumes_in_one_process_with_the_same_bytes(runs):
    nodes, down, resaved = runs["nodes"], runs["down"], runs["resaved"]
    sd = _dcp(nodes, 4)
    st = resaved["student.safetensors"]
    assert st and all(torch.equal(v, sd[f"student/{k}"]) for k, v in st.items())
    for stem in ("step1", "step2"):
        e = resaved[f"ema/{stem}.safetensors"]
        assert all(torch.equal(v, sd[f"ema/{stem}.transformer.{k}"]) for k, v in e.items())
    names = json.loads((nodes / "checkpoints" / "step-00000004" / "optim.json").read_text())["student"]["param_groups"][0]["params"]
    m = resaved["optim_student.safetensors"]
    assert all(torch.equal(m[f"{i}.{k}"], sd[f"optim_student/{n}/{k}"])
               for i, n in enumerate(names) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert _maxdiff(_model(runs["one"]), _model(down)) < TOL


def test_report_launch_seconds(runs):
    print(f"\n2-process launches: {runs['launches_s']:.0f} s")


def test_dmd2_fake_score_is_sharded_like_the_student(tmp_path):
    """DMD2's critic copy of the teacher (the fake score), built on the meta device like the student's copies, is
    sharded with FSDP2 (its blocks, its transformer, then the GAN heads: every critic parameter a DTensor shard) and
    filled from the teacher; one critic update on the shards gives the weights of the unsharded critic. In one
    process (a 1-rank gloo group); the 2-process run is checked by hand (docs/cluster.md)."""
    from pathlib import Path

    import torch.distributed as dist

    from tiny import BLOCKS_2, fake_batch, tiny_teacher_backbone
    from twostep.methods import build_method
    from twostep.student import trainable_copies_on_meta
    from twostep.train.distributed import (critic_copies, is_dtensor, materialize, materialize_backbones,
                                           shard_critic)
    from twostep.train.state import optimizers
    from twostep.train.steps import critic_step

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "dmd2.yaml", [BLOCKS_2])
    teacher = tiny_teacher_backbone()
    torch.manual_seed(0)
    ref = build_method(cfg, teacher)
    torch.manual_seed(0)
    with trainable_copies_on_meta():
        sh = build_method(cfg, teacher)
    assert [p.device.type for p in critic_copies(sh)[0].parameters()][0] == "meta"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        class Acc:
            device, num_processes = torch.device("cpu"), 1
        from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
        blocks = sum(isinstance(m, ZImageTransformerBlock) for m in teacher.transformer.modules())
        assert shard_critic(Acc(), sh) == blocks + 2  # each block, the transformer, then the GAN heads
        materialize(sh.student, teacher, "cpu")
        materialize_backbones(critic_copies(sh), teacher, "cpu")
        assert all(is_dtensor(p) for p in sh.critic_parameters())
        for m in (ref, sh):
            opt = optimizers(cfg, m.student_parameters(), m.critic_parameters())["critic"]
            torch.manual_seed(1)
            assert critic_step(m, opt, m.critic_parameters(), fake_batch(2), cfg.train.grad_clip) is not None
        a, b = ref.critic.state_dict(), sh.critic.state_dict()
        assert a.keys() == b.keys()
        moved = max((a[k] - teacher.state_dict()[k[len("fake."):]]).abs().max().item()
                    for k in a if k.startswith("fake."))
        assert moved > 0
        assert max((a[k] - b[k].full_tensor()).abs().max().item() for k in a) < 1e-6
    finally:
        dist.destroy_process_group()


def test_the_resume_command_keeps_the_launcher_and_the_resume_flags(monkeypatch, tmp_path):
    """status.json's `resume` for an 8-GPU accelerate launch: the launcher's own command line up to `-m twostep`
    (read from the parent process), twostep's --threads, the run's inputs and the flags a resume needs
    (--gpu-memory); --set and the original --config give way to the run's config.yaml."""
    from twostep.train import launched as launch

    own = ["--threads", "4", "distill", "--teacher", "Z-Image-Turbo", "--cache", "cache-zit", "--out",
           "runs/zit-full", "--config", "configs/zimage-turbo-full-fsdp8.yaml", "--set", "train.lr_student=1e-5",
           "--gpu-memory", "80"]
    accel = ["/usr/bin/python3", "/venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/fsdp.yaml",
             "--num_processes", "8", "-m", "twostep"]
    monkeypatch.setattr(launch, "_parent_argv", lambda: accel + own)
    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/twostep/__main__.py"] + own)
    assert launch.resume_command("Z-Image-Turbo", "cache-zit", "runs/zit-full") == (
        "/usr/bin/python3 /venv/bin/accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 "
        "-m twostep --threads 4 distill --teacher Z-Image-Turbo --cache cache-zit --config runs/zit-full/config.yaml "
        "--out runs/zit-full --resume --gpu-memory 80")
    rec = launch.record(tmp_path, 8, "cmd", say=lambda s: None)
    assert rec["launcher"] == "accelerate launch" and rec["flags"] == ["--gpu-memory", "80"]
    said = []
    launch.record(tmp_path, 1, "cmd", say=said.append)  # the same run folder resumed by one process
    assert said == ["resuming a run of 8 processes with 1: its checkpoint is resharded on load"]
    # twostep launch: its own command line up to distill
    monkeypatch.setattr(launch, "_parent_argv", lambda: ["/usr/bin/python3", "/venv/bin/twostep", "launch",
                                                         "--processes", "2"] + own[2:])
    assert launch.resume_command("T", "C", "R").startswith("/usr/bin/python3 /venv/bin/twostep launch --processes 2 "
                                                           "distill --teacher T ")
    assert launch.launcher_name(launch._launcher_argv()) == "twostep launch"
    monkeypatch.setattr(launch, "_parent_argv", lambda: None)  # no launcher: the plain command, as before
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert launch.resume_command("T", "C", "R") == "twostep distill --teacher T --cache C --config R/config.yaml " \
                                                   "--out R --resume"
