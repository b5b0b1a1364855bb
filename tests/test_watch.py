"""Watching a run (issue 16 §5): train.log_with (accelerate trackers), train.validation_prompts in the grid,
train.eval_every (a quick FD of the EMA student against held-out teacher samples of the cache, in log.jsonl) and
a loss-curves PNG redrawn while the run goes."""

import json

import numpy as np
import pytest
import torch

from twostep.errors import UserError
from twostep.methods import load_config
from twostep.train import BatchSource, distill
from twostep.train import viz

from tiny import BLOCKS_1

RUN = ["train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2", "train.d_warmup=0", BLOCKS_1]
WATCH = ["train.grid_every=2", "train.eval_every=2", "train.eval_num=10", "train.log_with=tensorboard",
         "train.validation_prompts=['a red circle', 'two blue squares']"]


@pytest.fixture(scope="module")
def watch_loop(tmp_path_factory):
    """A tiny teacher and a 20-row cache: eval_num = 10 holds out half of it."""
    from conftest import make_tiny_teacher_and_cache

    root = tmp_path_factory.mktemp("watch")
    return (root, *make_tiny_teacher_and_cache(root, num=20, shard_size=10))


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_config_keys_defaults_and_refusals():
    t = load_config(None, []).train
    assert (t.log_with, t.validation_prompts, t.eval_every, t.eval_num, t.eval_features) == ("none", [], 0, 64, "")
    t = load_config(None, WATCH + ["train.eval_features=inception"]).train
    assert (t.log_with, t.validation_prompts, t.eval_every, t.eval_num) == (
        "tensorboard", ["a red circle", "two blue squares"], 2, 10)
    for bad, needle in [("train.log_with=mlflow", "log_with"), ("train.eval_num=9", "eval_num"),
                        ("train.eval_every=-1", "eval_every"), ("train.validation_prompts=['ok', '  ']", "non-empty"),
                        ("train.validation_prompts=['ok', 3]", "validation_prompts"),
                        ("train.validation_prompts=a circle", "validation_prompts")]:
        with pytest.raises(UserError, match=needle) as e:
            load_config(None, [bad])
        assert "\n" not in str(e.value)


def test_distill_help_explains_the_watch_keys(capsys):
    from twostep.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in ("train.log_with=tensorboard", "train.validation_prompts", "train.eval_every", "train.eval_num",
                "train.eval_features", "loss_curves.png"):
        assert key in text, key


def test_wandb_missing_is_one_line_exit_2_before_any_work(watch_loop, tmp_path, capsys, monkeypatch):
    """wandb is not a dependency: without it, train.log_with=wandb names `pip install wandb`, exit 2, nothing
    written (the check runs before the accelerator, the teacher or the run folder)."""
    import importlib.util

    from twostep.cli import main

    root, teacher, cache = watch_loop
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    rc = main(["distill", "--teacher", str(teacher), "--cache", str(cache), "--out", str(tmp_path / "x"),
               "--set", "train.log_with=wandb", "--set", "train.updates=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install wandb" in err[0] and "train.log_with=wandb" in err[0]
    assert not (tmp_path / "x").exists()
    viz.check_tracker("none")
    viz.check_tracker("tensorboard")  # a real dependency


def test_wandb_offline_run_if_installed(watch_loop, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not installed here: the test above covers this machine
    root, teacher, cache = watch_loop
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = distill(load_config(None, RUN + ["train.updates=2", "train.grid_every=2", "train.log_with=wandb"]),
                  teacher, cache, tmp_path / "w", progress=False)
    assert (run / "wandb").is_dir()


def test_held_out_rows_only_when_eval_every(watch_loop):
    """eval_every = 0 (the default) draws from every row, the same bytes as before the option existed; with
    eval_every > 0 training never draws the last eval_num rows; more than half held out is refused."""
    from twostep.teacher.cache import load_cache

    root, teacher, cache_dir = watch_loop
    cache = load_cache(cache_dir)
    off = load_config(None, []).train
    on = load_config(None, ["train.eval_every=5", "train.eval_num=10"]).train
    assert viz.training_rows(len(cache), off) == 20 and viz.training_rows(len(cache), on) == 10
    a = BatchSource(cache, {"teacher_final"}, 0.75, 3, None)
    b = BatchSource(cache, {"teacher_final"}, 0.75, 3, None, rows=viz.training_rows(len(cache), off))
    held = BatchSource(cache, {"teacher_final"}, 0.75, 3, None, rows=viz.training_rows(len(cache), on))
    seen = set()
    for u in range(40):
        x, y, z = a.get(u, 0, 8), b.get(u, 0, 8), held.get(u, 0, 8)
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["noise"], y["noise"])
        seen |= set(z["index"].tolist())
    assert seen == set(range(10))
    with pytest.raises(UserError, match="more than half"):
        viz.training_rows(19, on)
    # a resume holds out what the run held out (a config from before the keys: nothing)
    assert viz.training_rows(20, on, {"train": {"eval_every": 3, "eval_num": 10}}) == 10
    assert viz.training_rows(20, off, {"train": {"lr_student": 1e-5}}) == 20
    for prev, now in [({"train": {}}, on), ({"train": {"eval_every": 2, "eval_num": 12}}, on),
                      ({"train": {"eval_every": 2}}, off)]:
        with pytest.raises(UserError, match="--resume: the run held out"):
            viz.training_rows(20, now, prev)


class _Replay(torch.nn.Module):
    """A 'student' whose 2-step sample is the teacher's cached one for the same noise (`shift` rows earlier)."""

    def __init__(self, cache, shift=0):
        super().__init__()
        r = cache.rows(range(len(cache)))
        self.noise, self.final, self.shift = r["noise"], r["final"], shift

    def generate(self, noise, text):
        idx = [int((self.noise == n).flatten(1).all(1).nonzero()[0]) - self.shift for n in noise]
        return {"x0_2": self.final[idx]}


def test_quick_fd_is_zero_for_the_teachers_own_samples_and_uses_the_held_out_rows(watch_loop):
    from twostep.model import load_teacher
    from twostep.teacher.cache import load_cache

    root, teacher_dir, cache_dir = watch_loop
    teacher, cache = load_teacher(teacher_dir), load_cache(cache_dir)
    ext = viz.eval_extractor("", cache)  # the committed shapes feature net (the tiny teacher's data)
    assert ext.name == "features:features-shapes"
    q = viz.QuickFD(teacher, cache, range(10, 20), ext, batch=3)  # batches of 3: 4 chunks, the last of 1
    assert [len(c) for c in q.chunks] == [3, 3, 3, 1] and q.chunks[0][0] == 10
    r = q(_Replay(cache))
    assert r["eval_num"] == 10 and r["eval_fd"] == pytest.approx(0.0, abs=1e-6)
    assert q(_Replay(cache, shift=10))["eval_fd"] > 1e-3  # the other prompts' samples: FD > 0
    with pytest.raises(UserError, match="train.eval_features"):
        viz.eval_extractor("", type("C", (), {"manifest": {"data": "prompts.txt"}})())


def test_validation_prompts_add_grid_columns(watch_loop):
    """Each validation prompt is one more column: the cache's columns are unchanged; its teacher cell is the
    teacher's default sample (its config's steps / guidance) from VALIDATION_SEED noise."""
    from twostep.model import load_teacher
    from twostep.sampling import TeacherSampler
    from twostep.teacher.cache import load_cache

    root, teacher_dir, cache_dir = watch_loop
    teacher, cache = load_teacher(teacher_dir), load_cache(cache_dir)
    plain = viz.grid_inputs(teacher, cache, n=4)
    more = viz.grid_inputs(teacher, cache, n=4, prompts=["a red circle"])
    assert len(more["text"]) == 5 and torch.equal(more["noise"][:4], plain["noise"])
    assert torch.equal(more["teacher"][:4], plain["teacher"]) and torch.equal(more["naive"][:4], plain["naive"])
    noise = teacher.noise(1, viz.VALIDATION_SEED)
    want = TeacherSampler(teacher).generate(teacher.encode(["a red circle"]), noise).x0
    assert torch.equal(more["noise"][4:], noise) and torch.equal(more["teacher"][4:], want)


def test_loss_curves_png_panels_and_atomic_write(tmp_path):
    """One panel per logged key (eval_fd records included); written to a temporary name, then renamed."""
    from PIL import Image

    log = [{"update": 1, "g_loss": 1.0}, {"update": 2, "g_loss": 0.5}, {"update": 2, "eval_fd": 3.0}]
    viz.loss_curves(log, ("g_loss", "d_loss") + viz.EVAL_KEYS, tmp_path / "loss_curves.png")
    assert Image.open(tmp_path / "loss_curves.png").size[0] == round(3.2 * 80 * 2)  # g_loss, eval_fd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curves.png"]


def test_watched_run_trackers_eval_grid_and_live_curves(watch_loop, tmp_path, monkeypatch):
    """A run with everything on, stopped at update 2 and resumed to 4: tensorboard holds every logged number at its
    update (the same values as log.jsonl, both segments), eval_fd at every eval_every (in the checkpoint's log, so a
    resume keeps it) and the grids as images; eval_fd at the end is the quick FD of the saved (EMA) student; the
    grid has a column per validation prompt; loss_curves.png is redrawn while the run goes (CURVES_EVERY_S = 0
    here) and ends with an eval_fd panel."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from twostep.model import load_teacher
    from twostep.sampling import load_student_generator
    from twostep.teacher.cache import load_cache

    root, teacher, cache = watch_loop
    drawn = []  # (records, panels) of every redraw, not drawn: matplotlib takes seconds (test_loss_curves_png)
    monkeypatch.setattr(viz, "CURVES_EVERY_S", 0.0)
    monkeypatch.setattr(viz, "loss_curves", lambda log, keys, path: drawn.append((len(log), tuple(keys), path.name)))
    run = distill(load_config(None, RUN + WATCH + ["train.updates=2"]), teacher, cache, tmp_path / "run",
                  progress=False)
    distill(load_config(None, RUN + WATCH + ["train.updates=4"]), teacher, cache, run, resume=True, progress=False)
    log = _log(run)
    evals = [r for r in log if "eval_fd" in r]
    assert [r["update"] for r in evals] == [2, 4] and all(r["eval_num"] == 10 and r["eval_fd"] > 0 for r in evals)
    counts = [n for n, _, _ in drawn]  # after each record, and at the end of each of the two runs
    assert counts == [1, 2, 3, 3, 4, 5, 6, 6] and len(log) == 6
    assert all(k[-1] == "eval_fd" and "g_loss" in k and p == "loss_curves.png" for _, k, p in drawn)

    q = viz.QuickFD(load_teacher(teacher), load_cache(cache), range(10, 20), viz.eval_extractor("", load_cache(cache)),
                    batch=4)
    assert q(load_student_generator(run, weights="last").student)["eval_fd"] == pytest.approx(evals[-1]["eval_fd"], abs=1e-5)

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    for key in ("g_loss", "d_loss", "eval_fd"):
        got = {e.step: e.value for e in ea.Scalars(key)}
        want = {r["update"]: r[key] for r in log if key in r}
        assert got.keys() == want.keys() and all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want), key
    grids = ea.Images("grid")
    assert [g.step for g in grids] == [2, 4]
    png = np.asarray(Image.open(run / "grids" / "grid-000004.png"))
    assert (grids[-1].width, grids[-1].height) == (png.shape[1], png.shape[0])
    assert png.shape[1] == 3 * (10 * (32 + 2) + 2)  # 8 cache columns + 2 validation prompts, 32² at scale 3


TWO_RANKS = r"""
import os, sys, torch, torch.distributed as dist
from datetime import timedelta
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
from twostep.metrics.fd import FeatureStats
fd = 0.0
if rank == 0:  # only the main process scores, as viz.quick_eval does; torchmetrics must not all-gather here
    a = FeatureStats(4, keep=False).add(torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    b = FeatureStats(4, keep=False).add(torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 1)
    fd = a.fd(b)
v = torch.tensor([fd], dtype=torch.float64)
dist.all_reduce(v)  # viz.quick_eval: the main process's figure sent to every rank
print(f"rank{rank} {float(v):.6f}", flush=True)
dist.destroy_process_group()
"""


def test_fd_on_the_main_process_alone_does_not_wait_for_the_others(tmp_path):
    """train.eval_every in a multi-process run without FSDP: only the main process computes the FD. torchmetrics
    syncs a metric's state over torch.distributed at compute() unless told not to, which hung 2-process runs at
    the first eval (FeatureStats: sync_on_compute=False)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    vals = [o[0].split()[-1] for o in outs]
    assert vals[0] == vals[1] and float(vals[0]) > 0.5


def test_keep_best_keeps_the_peak_through_a_resume_and_export_sample_eval_take_it(watch_loop, tmp_path, monkeypatch):
    """train.keep_best (on by default with eval_every): a run whose quick FD is best at update 2 of 4 (scripted FDs
    5, 3, 4, 6; stopped at 2 and resumed) keeps the EMA of update 2 in RUN/best/, and the run folder's default
    weights are those; --weights last gives the last EMA."""
    from twostep.sampling import load_checkpoint_generator, load_student_generator, resolve_student
    from twostep.train import loop
    from twostep.train.best import best_record

    root, teacher, cache = watch_loop
    fds, calls = [5.0, 3.0, 4.0, 6.0], []

    def scripted(acc, quick, ema):  # the quick FD of the k-th evaluation (k = update, one per update)
        calls.append(1)
        return {"eval_fd": fds[len(calls) - 1] if len(calls) <= len(fds) else 1.0, "eval_num": 10, "eval_sec": 0.0}

    monkeypatch.setattr(loop, "quick_eval", scripted)
    cfg = RUN + ["train.eval_every=1", "train.eval_num=10"]
    run = distill(load_config(None, cfg + ["train.updates=2"]), teacher, cache, tmp_path / "run", progress=False)
    assert best_record(run) == {"update": 2, "eval_fd": 3.0}
    distill(load_config(None, cfg + ["train.updates=4"]), teacher, cache, run, resume=True, progress=False)
    assert best_record(run) == {"update": 2, "eval_fd": 3.0}          # 4.0 and 6.0 after the resume do not replace it
    assert len(calls) == 4, calls
    assert [(r["update"], r.get("best")) for r in _log(run) if "eval_fd" in r] == [(1, 1), (2, 1), (3, 0), (4, 0)]
    assert resolve_student(run) == run / "best" and resolve_student(run, "last") == run

    def weights(gen):
        return {k: v.clone() for k, v in gen.student.state_dict().items()}

    best, last = weights(load_student_generator(run)), weights(load_student_generator(run, weights="last"))
    at2, at4 = weights(load_checkpoint_generator(run, 2)), weights(load_checkpoint_generator(run, 4))
    assert all(torch.equal(best[k], at2[k]) for k in at2) and all(torch.equal(last[k], at4[k]) for k in at4)
    assert any(not torch.equal(best[k], last[k]) for k in best)
    off = distill(load_config(None, cfg + ["train.updates=1", "train.keep_best=false"]), teacher, cache,
                  tmp_path / "off", progress=False)
    assert not (off / "best").exists() and resolve_student(off) == off
