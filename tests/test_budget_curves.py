"""Budget curves (issue 18): `benchmarks/run.py --eval-at` trains one tiny run to 2, then 6 updates (continued,
not restarted), evaluates each point from its checkpoint (twostep.sampling.load_checkpoint_generator) and resumes
point by point; the checkpoint's eval is the finished run's `twostep eval`; the pre-registered decoupling rule
(docs/decoupling_rule.md) on synthetic points. Children run in-process (run.run_timed replaced) to stay cheap."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_teacher_and_cache
from twostep.cli import main as twostep_main
from twostep.errors import UserError
from twostep.sampling import checkpoint_updates, load_checkpoint_generator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run  # noqa: E402
import sweep_outputs as so  # noqa: E402

METRICS = ["fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "nfe", "num", "seed"]


def _in_process(calls, fail=lambda cmd: False):
    """run.run_timed without a subprocess: twostep commands through twostep.cli.main, run.py's through run.main."""
    def timed(cmd, env, log):
        calls.append(cmd)
        if fail(cmd):
            return 1, 0.0, 0.1, 0.05
        n, t0, c0 = torch.get_num_threads(), time.time(), time.process_time()
        try:
            rc = twostep_main(cmd[3:]) if cmd[:3] == run.TWOSTEP else run.main(cmd[2:])
        finally:
            torch.set_num_threads(n)
        return rc or 0, 0.0, time.time() - t0, time.process_time() - c0
    return timed


def test_points_from_one_run_resumed_point_by_point(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "store"))  # the eval's teacher store, this test's own
    teacher, cache = make_tiny_teacher_and_cache(tmp_path, num=16)
    monkeypatch.setattr(run, "teacher_dir", lambda data: str(teacher))
    monkeypatch.setattr(run, "ensure_cache", lambda *a, **k: cache)
    monkeypatch.setattr(run, "reference_grids", lambda *a, **k: None)
    monkeypatch.setattr(run, "run_grid", lambda *a, **k: None)
    res = tmp_path / "res"
    argv = ["--out", str(res), "--data", "shapes", "--variants", "turbopp", "--seeds", "0", "--eval-at", "6", "2",
            "--batch", "4", "--cache-num", "16", "--eval-num", "10", "--threads", "1",
            "--set", "train.d_warmup=2", "--set", "disc.blocks=[0]"]
    calls = []
    # 1: point 2 is measured, then training on to 6 fails (an interrupted sweep)
    monkeypatch.setattr(run, "run_timed", _in_process(calls, lambda cmd: "train.updates=6" in cmd))
    run.main(argv)
    p2, p6 = (res / "runs" / f"shapes-turbopp-seed0-u{k}.json" for k in (2, 6))
    assert p2.exists() and not p6.exists()
    first = p2.read_bytes()
    run_dir = res / "work" / "run-shapes-turbopp-seed0"
    d2 = [c for c in calls if "distill" in c]
    assert len(d2) == 2 and "--resume" not in d2[0] and "--resume" in d2[1]  # to 2 afresh, on to 6 from step 2
    assert "train.log_every=1" in d2[0]
    # 2: the sweep again: point 2 is kept as it was (not re-evaluated), the run resumes at its checkpoint
    calls.clear()
    monkeypatch.setattr(run, "run_timed", _in_process(calls))
    run.main(argv)
    assert p2.read_bytes() == first and p6.exists()
    assert [c[c.index("eval-checkpoint") + 2] for c in calls if "eval-checkpoint" in c] == ["6"]
    d6 = [c for c in calls if "distill" in c]
    assert len(d6) == 1 and "train.updates=6" in d6[0] and "--resume" in d6[0]
    r2, r6 = json.loads(p2.read_text()), json.loads(p6.read_text())
    assert (r2["updates"], r6["updates"], r6["eval_at"], r6["method"]) == (2, 6, [2, 6], "turbopp")
    assert r2["timing"] == r6["timing"] == "log: every update"
    assert 0 < r2["train_warmup_s"] == r6["train_warmup_s"] < r2["train_s"] < r6["train_s"]
    assert 0 < r6["train_s_single"] <= r6["train_s"] + 1e-9 and 0 < r6["cpu_share"] <= 1
    assert r6["fd"] != r2["fd"]
    # the point at 6 is exactly `twostep eval` of the finished run (whose model files are that checkpoint's EMA)
    ev = tmp_path / "ev.json"
    assert twostep_main(["eval", "--model", str(run_dir), "--data", "shapes", "--num", "10", "--seed", "0",
                         "--json", str(ev), "--no-progress"]) == 0
    want = json.loads(ev.read_text())
    assert {k: r6[k] for k in METRICS} == {k: want[k] for k in METRICS}
    # the loader: any kept checkpoint, also one the run is past; a pruned one is refused naming the kept ones
    assert checkpoint_updates(run_dir) == [5, 6]
    g5, g6 = load_checkpoint_generator(run_dir, 5), load_checkpoint_generator(run_dir)
    assert (g5.config["updates"], g6.config["updates"]) == (5, 6) and g5.folder == run_dir / "checkpoints" / \
        "step-00000005" / "ema"
    w5, w6 = g5.student.state_dict(), g6.student.state_dict()
    assert any(not torch.equal(w5[k], w6[k]) for k in w5)
    with pytest.raises(UserError, match="complete ones: 5, 6"):
        load_checkpoint_generator(run_dir, 2)
    # the summary: the table with both budgets and the plot
    md = (res / "budget_curves.md").read_text()
    assert "FD @2" in md and "FD @6" in md and "| turbopp | 1 |" in md and "Default by the rule: **full**" in md
    assert (res / "budget_curves_shapes.png").exists()


@pytest.mark.parametrize("decoupling", ["lora", "shared"])
def test_checkpoint_generator_of_lora_and_shared_runs(tiny_loop, decoupling):
    """The loader for the other layouts: a lora checkpoint's adapters + the run folder's frozen base (by hash), a
    shared one's single copy; at the run's last update it is the run folder's student, earlier ones differ."""
    from twostep.methods import load_config
    from twostep.sampling import load_student_generator
    from twostep.train import distill

    root, teacher, cache = tiny_loop
    cfg = load_config(None, ["train.updates=3", "train.batch_size=2", "train.checkpoint_every=1", "train.d_warmup=0",
                             "train.grid_every=0", "train.keep_checkpoints=3", "disc.blocks=[0]",
                             f"student.decoupling={decoupling}", "student.lora_rank=2"])
    run_dir = distill(cfg, teacher, cache, root / decoupling, progress=False)
    assert checkpoint_updates(run_dir) == [1, 2, 3]
    g1, g3, done = (load_checkpoint_generator(run_dir, 1), load_checkpoint_generator(run_dir, 3),
                    load_student_generator(run_dir))
    assert (g1.config["updates"], g3.student.decoupling) == (1, decoupling)
    w1, w3, wd = (g.student.state_dict() for g in (g1, g3, done))
    assert all(torch.equal(w3[k], wd[k]) for k in wd)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)


def test_resume_only_from_a_complete_checkpoint(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    (ck / "step-00000004.partial").mkdir(parents=True)
    (ck / "step-00000002").mkdir()  # no meta.json: a checkpoint whose writing was cut
    assert run.resume_flag(tmp_path / "run") == [] and checkpoint_updates(tmp_path / "run") == []
    (ck / "step-00000002" / "meta.json").write_text("{}")
    assert run.resume_flag(tmp_path / "run") == ["--resume"] and checkpoint_updates(tmp_path / "run") == [2]


@pytest.mark.parametrize("argv, msg", [(["--eval-at", "100", "300"], "--out"),
                                       (["--out", "x", "--updates", "500", "--eval-at", "100", "300"], "--updates"),
                                       (["--out", "x", "--eval-at", "0"], "--eval-at")])
def test_eval_at_refusals(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        run.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def _pt(bench, method, seed, k, fd):
    return {"benchmark": bench, "method": method, "seed": seed, "updates": k, "fd": fd, "train_s_single": 10.0 * k,
            "eval_at": [100, 2000]}


@pytest.mark.parametrize("photos_shared, want", [((2.45, 2.4), "shared"),   # lower beyond noise on both
                                                 ((3.1, 2.7), "full"),      # within noise on photos
                                                 ((2.45,), "full")])        # one paired seed: undecided
def test_decoupling_rule(photos_shared, want):
    pts = [_pt("shapes", "turbopp", 0, 2000, 11.0), _pt("shapes", "turbopp", 1, 2000, 11.5),
           _pt("shapes", "ablate-shared", 0, 2000, 10.0), _pt("shapes", "ablate-shared", 1, 2000, 10.3),
           _pt("photos", "turbopp", 0, 2000, 3.0), _pt("photos", "turbopp", 1, 2000, 3.0),
           _pt("shapes", "turbopp", 0, 100, 12.0)]
    pts += [_pt("photos", "ablate-shared", s, 2000, fd) for s, fd in enumerate(photos_shared)]
    floors = {"shapes": 0.56, "photos": 0.14}
    v = so.decoupling_verdict(pts, floors, at=2000)
    assert v["default"] == want
    assert v["benchmarks"]["shapes"]["outcome"] == "lower"  # −1.1 ± 0.14: beyond max(std, floor 0.56)
    md = so.curves_table(pts, floors)
    assert f"Default by the rule: **{want}**" in md and "**-1.1 ± 0.14**" in md and "FD @100" in md


def test_readme_block_gets_the_curves_table_and_plots(tmp_path, monkeypatch):
    import update_readme

    d = tmp_path / "benchmarks" / "results" / "budget_curves"
    d.mkdir(parents=True)
    (d / "budget_curves.md").write_text(so.curves_table([_pt("shapes", "turbopp", 0, 100, 12.0)], {}))
    (d / "budget_curves_shapes.png").write_bytes(b"")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("x\n<!-- BEGIN budget_curves -->\nold\n<!-- END budget_curves -->\n")
    monkeypatch.setattr(update_readme, "ROOT", tmp_path)
    update_readme.main()
    block = (tmp_path / "docs" / "benchmarks.md").read_text().split("<!-- BEGIN budget_curves -->")[1]
    assert "old" not in block and "| turbopp | 1 | 12 |" in block
    assert "(../benchmarks/results/budget_curves/budget_curves_shapes.png)" in block  # a link from docs/


def test_curves_table_shows_alignment_only_where_measured():
    pts = [{**_pt("shapes", "turbopp", s, k, 11.0), "alignment": a} for s, (k, a) in
           enumerate([(100, 0.27), (100, 0.25)])] + [{**_pt("photos", "turbopp", 0, 100, 3.0), "alignment": None}]
    md = so.curves_table(pts, {})
    shapes, photos = md.split("### shapes")[1], md.split("### shapes")[0]
    assert "alignment @100" in shapes and "0.26 ± 0.014" in shapes   # mean ± std over the two seeds
    assert "alignment" not in photos.lower()
