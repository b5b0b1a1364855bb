"""Ownership of folders (twostep.io.folders): a command writes only into a folder that is missing, empty or its own
unfinished (or continuable) work; never into an input folder or a folder of another kind; completion markers
written last and checked by every reader; resume only of the same run; paths inside their folder; outputs checked
before the work. Every refusal: exit 2, one `error:` line, the input folders byte-identical afterwards."""

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_teacher, make_tiny_teacher_and_cache
from twostep import faults
from twostep.cli import main as _main
from twostep.errors import UserError
from twostep.io import folders as F
from twostep.io.files import atomic_write_text
from twostep.teacher import cache as C

ROOT = Path(__file__).resolve().parents[1]
RUN_SETS = ["train.updates=4", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
            "train.grid_every=0", "train.d_warmup=0", "disc.blocks=[0]"]


def main(argv):
    return _main(["--threads", str(torch.get_num_threads())] + [str(a) for a in argv])


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def tree(folder: Path) -> dict:
    """sha256 of every file under `folder` (its names and bytes)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, capsys, *needles, untouched=()):
    """Run the CLI: exit 2, exactly one `error:` line naming `needles`, each folder of `untouched` byte-identical."""
    before = {str(f): tree(f) for f in untouched}
    rc, out, err = run(argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), (rc, err)
    for n in needles:
        assert n in err[0], (n, err[0])
    for f in untouched:
        assert tree(f) == before[str(f)], f"{f} was modified"
    return err[0]


def distill_argv(teacher, cache, out, *extra):
    argv = ["distill", "--teacher", teacher, "--cache", cache, "--out", out, "--no-progress"]
    for s in RUN_SETS:
        argv += ["--set", s]
    return argv + list(extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher, its cache, and one finished 4-update run."""
    root = tmp_path_factory.mktemp("own")
    teacher, cache = make_tiny_teacher_and_cache(root)
    assert main(distill_argv(teacher, cache, root / "run")) == 0
    return root, teacher, cache, root / "run"


# ---- the mechanism ----------------------------------------------------------------------------------------

def test_inspect_folder_kinds_and_legacy(world, tmp_path):
    root, teacher, cache, run_dir = world
    assert F.inspect_folder(tmp_path / "nope").kind is None
    (tmp_path / "empty").mkdir()
    assert F.inspect_folder(tmp_path / "empty").kind is None
    (tmp_path / "f").write_text("x")
    assert F.inspect_folder(tmp_path / "f").kind == "file"
    st = F.inspect_folder(run_dir)
    assert st.kind == "student" and st.complete and not st.legacy and st.progress["done"] == 4
    assert st.identity["teacher"]["weights_sha256"] and st.identity["cache"]
    assert "--resume" in st.resume and str(run_dir / "config.yaml") in st.resume
    assert F.inspect_folder(cache).kind == "cache" and F.inspect_folder(cache).complete
    assert F.inspect_folder(teacher).kind == "teacher" and F.inspect_folder(teacher).legacy
    # the committed folders (written before markers existed) are complete legacy folders of their kind
    for name, kind in (("teacher-shapes", "teacher"), ("turbopp-shapes", "student"), ("features-shapes", "features")):
        st = F.inspect_folder(ROOT / "models" / name)
        assert (st.kind, st.complete, st.legacy) == (kind, True, True), name
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    assert (F.inspect_folder(tmp_path / "notes").kind, F.inspect_folder(tmp_path / "notes").first) == ("other", "todo.txt")


def test_claim_output_rules(world, tmp_path):
    root, teacher, cache, run_dir = world
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        F.claim_output(tmp_path / "f", "features")
    for out, word in ((teacher, "is the --teacher folder"), (teacher / "sub", "is inside the --teacher folder"),
                      (teacher.parent, "contains the --teacher folder")):
        with pytest.raises(UserError, match=word):
            F.claim_output(out, "student", inputs={"--teacher": teacher})
    with pytest.raises(UserError, match="holds a teacher, not a feature net"):
        F.claim_output(teacher, "features")
    with pytest.raises(UserError, match="holds a teacher cache, not a student run"):
        F.claim_output(cache, "student")
    with pytest.raises(UserError, match="already holds a complete student run"):
        F.claim_output(run_dir, "student")
    with pytest.raises(UserError, match="different student run"):
        F.claim_output(run_dir, "student", {"teacher": {}, "cache": "x"}, allow_complete=True)
    with pytest.raises(UserError, match="nothing to resume"):
        F.claim_output(tmp_path / "new", "student", resume=True)
    assert F.claim_output(tmp_path / "new", "student").kind is None
    assert not (tmp_path / "new").exists()  # a claim creates nothing


def test_malformed_status_is_refused(world, tmp_path):
    root, teacher, cache, run_dir = world
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / F.STATUS).write_text("[1, 2]")
    with pytest.raises(UserError, match="not a valid twostep status file"):
        F.inspect_folder(bad)


def test_path_inside():
    root = Path("/srv/cache")
    assert F.path_inside(root, "shard-00000.safetensors") == root / "shard-00000.safetensors"
    for bad in ("../other/shard-00000.safetensors", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(UserError, match="not a path inside the folder"):
            F.path_inside(root, bad, "shard file")


def test_atomic_write_leaves_no_tmp_on_failure(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="Is a directory"):  # io.files.unwritable: the cause, in one line
        atomic_write_text(tmp_path / "d", "x")  # a folder where the file should go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ---- commands that would destroy a folder -------------------------------------------------------------------

def test_distill_never_writes_into_its_inputs(world, capsys):
    root, teacher, cache, run_dir = world
    keep = (teacher, cache)
    refused(distill_argv(teacher, cache, teacher), capsys, "is the --teacher folder", untouched=keep)
    refused(distill_argv(teacher, cache, cache), capsys, "is the --cache folder", untouched=keep)
    refused(distill_argv(teacher, cache, cache / "run"), capsys, "inside the --cache folder", untouched=keep)
    refused(distill_argv(teacher, cache, root), capsys, "contains the --teacher folder", untouched=keep)
    refused(distill_argv(teacher, cache, root / "committed", "--resume"), capsys, "nothing to resume")


def test_distill_never_overwrites_a_trained_student(world, tmp_path, capsys):
    root, teacher, cache, run_dir = world
    committed = tmp_path / "turbopp"  # a legacy student folder: model files, no checkpoint, no status.json
    committed.mkdir()
    for f in ("config.json", "step1.safetensors", "step2.safetensors"):
        shutil.copy(run_dir / f, committed / f)
    refused(distill_argv(teacher, cache, committed), capsys, "already holds a run", untouched=[committed])
    refused(distill_argv(teacher, cache, committed, "--resume"), capsys, "nothing to resume", untouched=[committed])
    refused(distill_argv(teacher, cache, run_dir), capsys, "already holds a run", "--resume", untouched=[run_dir])


def test_teacher_train_never_overwrites_a_trained_teacher(tmp_path, capsys):
    trained = tmp_path / "teacher-shapes"
    shutil.copytree(ROOT / "models" / "teacher-shapes", trained)  # 6500 updates, no checkpoints
    base = ["teacher", "train", "--data", "shapes", "--dim", "32", "--n-heads", "1", "--n-layers", "1",
            "--num-train", "64", "--batch-size", "8", "--no-progress", "--max-steps", "1"]
    refused(base + ["--out", trained], capsys, "different teacher run", untouched=[trained])
    cfg = json.loads((trained / "train_config.json").read_text())
    same = ["teacher", "train", "--config", trained / "train_config.json", "--data", "shapes", "--max-steps", "1",
            "--no-progress"]
    refused(same + ["--out", trained], capsys, "no checkpoint to continue from", untouched=[trained])
    assert cfg["dim"] == 128
    # into a student run, a feature net or a cache: another kind of folder
    refused(base + ["--out", ROOT / "models" / "features-shapes"], capsys, "holds a feature net, not a teacher",
            untouched=[ROOT / "models" / "features-shapes"])


def test_teacher_train_failed_start_leaves_nothing_and_the_retry_works(tmp_path, capsys):
    out = tmp_path / "t"
    base = ["teacher", "train", "--data", "shapes", "--n-heads", "1", "--n-layers", "1", "--num-train", "64",
            "--batch-size", "8", "--no-progress", "--max-steps", "1", "--out", out]
    refused(base + ["--dim", "32", "--init", tmp_path / "nope"], capsys, "--init")
    assert not out.exists()  # no train_config.json that would refuse the corrected retry
    rc, so, err = run(base + ["--dim", "64"], capsys)
    assert rc == 0, err
    st = F.inspect_folder(out)
    assert st.kind == "teacher" and st.complete and st.identity["dim"] == 64
    # --init is an input: never the --out
    refused(base + ["--dim", "64", "--init", out], capsys, "is the --init folder", untouched=[out])


def test_metrics_train_never_writes_into_another_folder(world, tmp_path, capsys):
    root, teacher, cache, run_dir = world
    base = ["metrics", "train", "--data", "photos", "--minutes", "0.01", "--num-train", "32", "--set", "num_test=16",
            "--width", "8", "--num-features", "32", "--no-progress"]
    refused(base + ["--out", teacher], capsys, "holds a teacher, not a feature net", untouched=[teacher])
    refused(base + ["--out", run_dir], capsys, "holds a student run", untouched=[run_dir])
    refused(base + ["--out", cache], capsys, "holds a teacher cache", untouched=[cache])
    (tmp_path / "f").write_text("x")
    refused(base + ["--out", tmp_path / "f"], capsys, "not a folder")
    refused(base + ["--out", ROOT / "models" / "features-photos"], capsys, "already holds a complete feature net",
            untouched=[ROOT / "models" / "features-photos"])
    out = tmp_path / "feat"
    rc, so, err = run(base + ["--out", out], capsys)
    assert rc == 0, err
    assert F.inspect_folder(out).complete and sorted(p.name for p in tmp_path.iterdir()) == ["f", "feat"]
    # a teacher folder passed as --features: named, and no hint to write into it
    from twostep.metrics.features import load_feature_net
    with pytest.raises(UserError, match="holds a teacher, not a feature net") as e:
        load_feature_net(teacher)
    assert f"--out {teacher}" not in str(e.value)


def test_export_never_into_the_run(world, capsys):
    root, teacher, cache, run_dir = world
    refused(["export", "--model", run_dir, "--out", run_dir / "pipe"], capsys, "inside the --model folder",
            untouched=[run_dir])
    refused(["export", "--model", run_dir, "--out", teacher], capsys, "is the teacher folder", untouched=[teacher, run_dir])


# ---- markers: unfinished work is refused, with the command that finishes it -----------------------------------

def test_interrupted_run_is_unfinished_until_resumed(world, tmp_path, capsys, monkeypatch):
    root, teacher, cache, run_dir = world
    out = tmp_path / "stopped"
    seen = {"n": 0}
    orig = faults.point

    def sigint_at_update_3(name):
        if name == "update":
            seen["n"] += 1
            if seen["n"] == 3:
                raise KeyboardInterrupt
        orig(name)

    monkeypatch.setattr(faults, "point", sigint_at_update_3)
    rc, so, err = run(distill_argv(teacher, cache, out), capsys)
    assert rc == 130
    monkeypatch.setattr(faults, "point", orig)
    st = F.inspect_folder(out)
    assert st.kind == "student" and not st.complete and st.progress == {"done": 2, "total": 4, "unit": "updates"}
    for argv in (["sample", "--model", out, "--prompt", "a", "--num", "1", "--out", tmp_path / "s.png"],
                 ["export", "--model", out, "--out", tmp_path / "pipe"]):
        msg = refused(argv, capsys, "unfinished", "updates 2/4", "--resume", untouched=[out])
        assert "twostep distill" in msg
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "pipe").exists()
    rc, so, err = run(distill_argv(teacher, cache, out, "--resume"), capsys)
    assert rc == 0, err
    assert F.inspect_folder(out).complete
    assert run(["sample", "--model", out, "--prompt", "a", "--num", "1", "--out", tmp_path / "s.png"], capsys)[0] == 0


def test_unfinished_teacher_and_legacy_folders(world, tmp_path, capsys):
    root, teacher, cache, run_dir = world
    t = tmp_path / "t"
    shutil.copytree(teacher, t)
    F.write_status(t, "teacher", {"dim": 32}, False, F.progress(3, 10), "twostep teacher train --out t")
    msg = refused(["sample", "--model", t, "--prompt", "a", "--num", "1", "--out", tmp_path / "s.png"], capsys,
                  "unfinished teacher (updates 3/10", "resume with `twostep teacher train --out t`")
    assert str(t) in msg
    # legacy: a run folder without status.json (written before markers) is used as complete
    legacy = tmp_path / "legacy"
    shutil.copytree(run_dir, legacy)
    (legacy / F.STATUS).unlink()
    assert run(["sample", "--model", legacy, "--prompt", "a", "--num", "1", "--out", tmp_path / "l.png"], capsys)[0] == 0
    assert run(["sample", "--model", ROOT / "models" / "turbopp-shapes", "--prompt", "a", "--num", "1",
                "--out", tmp_path / "c.png"], capsys)[0] == 0


# ---- resume identity ----------------------------------------------------------------------------------------

def test_resume_refuses_a_run_of_another_teacher(world, tmp_path, capsys):
    root, teacher, cache, run_dir = world
    other = make_tiny_teacher(tmp_path / "other", seed=7)
    other_cache = C.build_cache(other, "shapes", 16, tmp_path / "ocache", shard_size=8, progress=False)
    r = tmp_path / "r"
    shutil.copytree(run_dir, r)
    refused(distill_argv(other, other_cache, r, "--set", "train.updates=6", "--resume"), capsys,
            "different student run", "teacher.weights", untouched=[r, other, other_cache])
    # the same teacher with another cache is another run too
    c2 = C.build_cache(teacher, "shapes", 16, tmp_path / "c2", seed=1, shard_size=8, progress=False)
    refused(distill_argv(teacher, c2, r, "--set", "train.updates=6", "--resume"), capsys, "different student run",
            "cache", untouched=[r])


def test_resume_of_a_folder_without_checkpoint_is_refused(world, tmp_path, capsys):
    root, teacher, cache, run_dir = world
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(distill_argv(teacher, cache, empty, "--resume"), capsys, "nothing to resume", "empty folder")
    failed = tmp_path / "failed"
    shutil.copytree(run_dir, failed)
    shutil.rmtree(failed / "checkpoints")
    refused(distill_argv(teacher, cache, failed, "--resume"), capsys, "nothing to resume", "no complete checkpoint",
            untouched=[failed])


# ---- the teacher cache: prompt identity, paths inside --------------------------------------------------------

def _folder_data(folder: Path, captions):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, c in enumerate(captions):
        Image.new("RGB", (32, 32), (40 * i % 255, 90, 200)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": c}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_cache_rebuild_with_changed_prompts_is_refused(world, tmp_path, capsys, monkeypatch):
    root, teacher, cache, run_dir = world
    data = _folder_data(tmp_path / "data", ["a red circle", "a blue square", "a green cross", "two circles"])
    out = tmp_path / "c"
    argv = ["teacher", "cache", "--teacher", teacher, "--data", data, "--num", "4", "--shard-size", "2",
            "--out", out, "--no-progress"]

    class Killed(Exception):
        pass

    def boom(k, p):
        raise Killed
    monkeypatch.setattr(C, "_on_shard_written", boom)
    with pytest.raises(Killed):
        main(argv)  # interrupted after its first shard
    monkeypatch.setattr(C, "_on_shard_written", None)
    assert not json.loads((out / C.MANIFEST).read_text())["complete"]
    _folder_data(data, ["a yellow star", "a blue square", "a green cross", "two circles"])  # the captions change
    refused(argv, capsys, "holds a different teacher cache", "prompts", untouched=[out, data])
    assert run(argv[:-3] + ["--out", tmp_path / "new", "--no-progress"], capsys)[0] == 0  # a new folder is fine
    m = json.loads((tmp_path / "new" / C.MANIFEST).read_text())
    assert m["complete"] and m["prompts_sha256"] == C.prompts_sha256(C.load_cache(tmp_path / "new").captions)
    # a manifest from before the prompt hash: the kept shards' own captions decide
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "new", legacy)
    m.pop("prompts_sha256")
    (legacy / C.MANIFEST).write_text(json.dumps(m))
    argv_l = argv[:-3] + ["--out", legacy, "--no-progress"]
    assert run(argv_l, capsys)[0] == 0 and "prompts_sha256" in json.loads((legacy / C.MANIFEST).read_text())
    (legacy / C.MANIFEST).write_text(json.dumps(m))
    _folder_data(data, ["a red circle", "a blue square", "a green cross", "two circles"])
    refused(argv_l, capsys, "differs in: prompts", untouched=[legacy])


def test_cache_shard_paths_stay_inside(world, tmp_path, capsys):
    root, teacher, cache, run_dir = world
    outside = tmp_path / "other"
    shutil.copytree(cache, outside)
    for bad in ("../other/shard-00000.safetensors", str(outside / "shard-00000.safetensors")):
        c = tmp_path / "c"
        if c.exists():
            shutil.rmtree(c)
        shutil.copytree(cache, c)
        m = json.loads((c / C.MANIFEST).read_text())
        m["shards"][0]["file"] = bad
        (c / C.MANIFEST).write_text(json.dumps(m))
        with pytest.raises(UserError, match="not a path inside the folder"):
            C.load_cache(c)
        refused(distill_argv(teacher, c, tmp_path / "r"), capsys, "not a path inside the folder",
                untouched=[c, outside])
        assert not (tmp_path / "r").exists()
        # a rebuild never reads the outside file: it regenerates the shard inside the folder
        C.build_cache(teacher, "shapes", 16, c, shard_size=8, progress=False)
        assert json.loads((c / C.MANIFEST).read_text())["shards"][0]["file"] == C.shard_name(0)
        assert len(C.load_cache(c)) == 16
    assert tree(outside) == tree(cache)


def test_cache_never_into_the_teacher_or_another_kind(world, capsys):
    root, teacher, cache, run_dir = world
    argv = ["teacher", "cache", "--teacher", teacher, "--data", "shapes", "--num", "4", "--no-progress", "--out"]
    refused(argv + [teacher], capsys, "is the --teacher folder", untouched=[teacher])
    refused(argv + [run_dir], capsys, "holds a student run, not a teacher cache", untouched=[run_dir])


# ---- validate before working --------------------------------------------------------------------------------

def test_outputs_are_checked_before_the_work(world, tmp_path, capsys, monkeypatch):
    root, teacher, cache, run_dir = world
    import twostep.evaluate as E
    import twostep.speed as S

    def never(fn):  # keeps the signature: the CLI reads its defaults from it
        return functools.wraps(fn)(lambda *a, **k: pytest.fail("the computation started"))
    monkeypatch.setattr(E, "evaluate", never(E.evaluate))
    monkeypatch.setattr(S, "measure", never(S.measure))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    refused(["eval", "--model", run_dir, "--data", "shapes", "--num", "10", "--json", tmp_path / "dir"], capsys,
            "--json", "is a folder")
    refused(["speed", "--teacher", teacher, "--student", run_dir, "--json", tmp_path / "file" / "x.json"], capsys,
            "is a file, not a folder")
    refused(["sample", "--model", run_dir, "--prompt", "a", "--out", tmp_path / "dir"], capsys, "is a folder")
    refused(["sample", "--model", run_dir, "--prompt", "a", "--out", run_dir / "loss_curves.png"], capsys,
            "belongs to the run folder", untouched=[run_dir])  # a new name in the run would be fine
    refused(["demo", "--teacher", teacher, "--out", tmp_path / "file", "--minutes", "1"], capsys, "not a folder")
    refused(["demo", "--teacher", teacher, "--out", teacher / "demo", "--minutes", "1"], capsys,
            "inside the --teacher folder", untouched=[teacher])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"] and not list((tmp_path / "dir").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_is_refused_before_the_work(world, tmp_path, capsys):
    root, teacher, cache, run_dir = world
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(["sample", "--model", run_dir, "--prompt", "a", "--out", ro / "x.png"], capsys, "not writable")
        refused(distill_argv(teacher, cache, ro / "run"), capsys, "not writable")
    finally:
        ro.chmod(0o755)
