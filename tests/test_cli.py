"""The CLI end to end on a tiny teacher; bad input gives one line naming the problem, exit code 2."""

import json
import subprocess
import sys

import pytest

from twostep.cli import main


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def test_sample_teacher_writes_grid(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "g.png"
    rc, so, err = _run(["sample", "--model", str(tiny_teacher), "--prompt", "a red circle", "--prompt", "x",
                        "--num", "2", "--steps", "2", "--out", str(out)], capsys)
    assert rc == 0 and out.exists()
    from PIL import Image
    w, h = Image.open(out).size
    assert (w, h) == (4 * (2 + 2 * 34), 4 * (2 + 2 * 34))  # 2 rows × 2 images, 2 px padding, ×4


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--model", "/nonexistent/x", "--prompt", "a", "--out", "o.png"], "/nonexistent/x"),
    (["eval", "--model", "/nonexistent/x", "--data", "shapes"], "/nonexistent/x"),
    (["teacher", "train", "--data", "/nonexistent/dir", "--out", "t"], "/nonexistent/dir"),
])
def test_bad_paths_exit_2_with_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, so, err = _run(argv, capsys)
    assert rc == 2 and len(err) == 1 and needle in err[0] and err[0].startswith("error:")


def test_teacher_folder_missing_weights(tiny_teacher, tmp_path, capsys):
    (tiny_teacher / "model.safetensors").unlink()
    rc, so, err = _run(["sample", "--model", str(tiny_teacher), "--prompt", "a", "--out", str(tmp_path / "o.png")],
                       capsys)
    assert rc == 2 and "model.safetensors" in err[0] and len(err) == 1
    assert not (tmp_path / "o.png").exists()


def test_corrupt_teacher_weights(tiny_teacher, tmp_path, capsys):
    p = tiny_teacher / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    rc, so, err = _run(["sample", "--model", str(tiny_teacher), "--prompt", "a", "--out", str(tmp_path / "o.png")],
                       capsys)
    assert rc == 2 and "model.safetensors" in err[0]


def test_teacher_train_refuses_other_run_and_resumes_same(tmp_path, capsys):
    out = tmp_path / "t"
    base = ["teacher", "train", "--data", "shapes", "--out", str(out), "--dim", "32", "--n-heads", "1",
            "--n-layers", "1", "--num-train", "64", "--batch-size", "8", "--no-progress"]
    rc, so, err = _run(base + ["--max-steps", "2"], capsys)
    assert rc == 0 and (out / "model.safetensors").exists() and (out / "config.json").exists()
    rc, so, err = _run(base + ["--max-steps", "4"], capsys)
    assert rc == 0 and "resumed" in so and json.loads((out / "config.json").read_text())["training"]["steps"] == 4
    rc, so, err = _run([*base[:-9], "--dim", "64", "--n-heads", "1", "--n-layers", "1", "--num-train", "64",
                        "--batch-size", "8", "--no-progress", "--max-steps", "2"], capsys)
    assert rc == 2 and "different teacher run" in err[0]


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "twostep", "distill", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--set" in out.stdout and "--resume" in out.stdout


@pytest.mark.parametrize("field,kw,needle", [("resolution", {"resolution": 16}, "resolution: model 32, teacher 16"),
                                             ("caption dim", {"dim": 16}, None)])
def test_student_teacher_mismatch(tiny_teacher, tmp_path, capsys, field, kw, needle):
    from conftest import make_tiny_teacher
    other = make_tiny_teacher(tmp_path / "other", **kw)
    if field == "caption dim":  # same sample space, other caption features
        cfg = json.loads((other / "config.json").read_text())
        cfg["transformer"]["cap_feat_dim"] = 768
        (other / "config.json").write_text(json.dumps(cfg))
        needle = "caption dim: model 384, teacher 768"
    for argv in (["eval", "--model", str(tiny_teacher), "--steps", "2", "--data", "shapes", "--num", "10",
                  "--teacher", str(other), "--features", "models/features-shapes"],
                 ["speed", "--teacher", str(other), "--student", str(tiny_teacher), "--batch", "2"]):
        rc, so, err = _run(["--threads", "1", *argv], capsys)
        if argv[0] == "speed":  # a teacher given as --student is refused first, by what it is
            assert rc == 2 and len(err) == 1 and "--student" in err[0] and "not a student" in err[0], err
            continue
        assert rc == 2 and len(err) == 1 and needle in err[0] and str(other) in err[0], err


def test_teacher_train_init_starts_from_the_given_weights_and_lr_decay_is_linear(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from twostep.teacher import train as tt

    src = tmp_path / "src"
    base = ["--threads", "1", "teacher", "train", "--data", "shapes", "--dim", "32", "--n-heads", "1",
            "--n-layers", "1", "--num-train", "64", "--batch-size", "8", "--no-progress"]
    assert _run(base + ["--out", str(src), "--max-steps", "2"], capsys)[0] == 0
    # --init with 0 updates: the exported EMA is exactly the source's weights (no fresh initialisation)
    cont = tmp_path / "cont"
    seen = {}
    orig = tt._init_from
    tt._init_from = lambda model, s, m: (seen.update(w={k: v.clone() for k, v in model.transformer.state_dict().items()}),
                                         orig(model, s, m))[1]
    try:
        rc, so, err = _run(base + ["--out", str(cont), "--init", str(src), "--max-steps", "1", "--lr-decay", "linear"],
                           capsys)
    finally:
        tt._init_from = orig
    assert rc == 0
    a, b = load_file(str(src / "model.safetensors")), load_file(str(cont / "model.safetensors"))
    assert any(not torch.equal(seen["w"][k], a[k]) for k in a)          # a fresh init differs from the source ...
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2      # ... the continued teacher starts from it
    assert json.loads((cont / "config.json").read_text())["training"]["continued_from"]["steps"] == 2
    # an architecture that does not match is one line, exit 2
    rc, so, err = _run([("64" if a == "32" else a) for a in base] + ["--out", str(tmp_path / "x"), "--init", str(src),
                        "--max-steps", "1"], capsys)
    assert rc == 2 and len(err) == 1 and "--init" in err[0] and "architecture differs" in err[0]
    # lr decay: 1 without decay; linear from 1 to 0 over max_steps (or the time budget)
    cfg = tt.TeacherTrainConfig(lr_decay="linear", max_steps=10)
    assert [tt._decay(cfg, s, 0, 60) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert tt._decay(tt.TeacherTrainConfig(lr_decay="linear"), 0, 30, 60) == 0.5
    assert tt._decay(tt.TeacherTrainConfig(), 7, 59, 60) == 1.0


def test_threads_default_honours_omp_num_threads(monkeypatch):
    """`benchmarks/run.py --threads 1` sets OMP_NUM_THREADS for its children; the CLI must not override it with
    all cores (it did, and two 'one-thread' jobs then fought over both cores)."""
    import torch

    from twostep.cli import _threads
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        _threads(None)
        assert torch.get_num_threads() == 1
        _threads(2)  # an explicit --threads wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
