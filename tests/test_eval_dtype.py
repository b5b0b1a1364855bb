"""`twostep eval --dtype`: the transformers held and run in bf16 (fp32 states and Euler updates), fp32 = the
protocol of before (record, work folder, teacher store key), a bf16 work folder or store never mixed with fp32."""

import hashlib
import json
import math

import pytest
import torch

from conftest import make_tiny_teacher
from twostep import evaluate as E
from twostep.cli import main
from twostep.errors import UserError
from twostep.io.files import sha256_text
from twostep.io.folders import save_model_folder, teacher_identity
from twostep.model import load_teacher
from twostep.sampling import StudentGenerator, load_generator

NUM, BS = 10, 5


@pytest.fixture(autouse=True)
def _small(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "cache"))   # the teacher store, per test
    monkeypatch.setattr(E, "DIVERSITY_PROMPTS", 2)                  # 8 diversity images instead of 100 (time)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher (3 steps, no CFG) whose weights all do something, and a `full` student made from it."""
    from twostep.methods import load_config
    from twostep.sampling import save_student
    from twostep.student import TwoStepStudent, student_config

    root = tmp_path_factory.mktemp("dtype")
    folder = make_tiny_teacher(root / "teacher", guidance=0.0)
    t = load_teacher(folder)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # diffusers zero-initialises the output layer: bf16 would change nothing
        for p in t.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = {**t.config, "sampling": {**t.config["sampling"], "steps": 3}}
    save_model_folder(t.backbone.transformer.state_dict(), cfg, folder)
    st = TwoStepStudent(t.backbone, "full", 0.75)
    with torch.no_grad():
        for p in st.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_student(st, student_config(cfg, load_config(None, []), folder), root / "student")
    return folder, root / "student"


def _record(gen, seen=None, **kw):
    """evaluate() of `gen` on shapes against data and teacher; `seen` collects (generator kind, weight dtypes,
    noise dtype, x0 dtype) of every generate call."""
    if seen is not None:
        orig = E._timed_generate

        def spy(g, text, noise, dev):
            m = g.student if isinstance(g, StudentGenerator) else g.teacher.backbone
            x0, sec = orig(g, text, noise, dev)
            seen.append((type(g).__name__, {p.dtype for p in m.parameters()}, noise.dtype, x0.dtype))
            return x0, sec

        E._timed_generate = spy
    try:
        return E.evaluate(gen, "shapes", num=NUM, seed=1, ref="both", batch_size=BS, device="cpu", progress=False,
                          **kw)
    finally:
        if seen is not None:
            E._timed_generate = orig


def _same(a, b):
    return {k: v for k, v in a.items() if "sec" not in k} == {k: v for k, v in b.items() if "sec" not in k}


def test_bf16_eval_on_cpu_runs_in_bf16_on_fp32_states(models):
    teacher, student = models
    seen = []
    r16 = _record(load_generator(student), seen, dtype="bf16")
    kinds = {k for k, *_ in seen}
    assert kinds == {"TeacherSampler", "StudentGenerator"}   # the teacher reference and the student, both bf16
    assert all(w == {torch.bfloat16} and (nz, x0) == (torch.float32, torch.float32) for _, w, nz, x0 in seen)
    r32 = _record(load_generator(student), dtype="fp32")
    assert r16["dtype"] == "bf16" and "dtype" not in r32
    for k in ("fd", "fd_teacher", "psnr_vs_teacher", "diversity"):
        assert math.isfinite(r16[k]) and r16[k] != r32[k], k
    for k in ("fd", "fd_teacher", "diversity"):          # bf16 round-off: well under 1% here
        assert r16[k] == pytest.approx(r32[k], rel=0.02), k
    assert r16["psnr_vs_teacher"] == pytest.approx(r32["psnr_vs_teacher"], abs=0.2)


def test_fp32_and_auto_on_cpu_are_the_record_of_before(models):
    teacher, student = models
    before = _record(load_generator(student))            # no dtype given: auto, fp32 on the CPU
    for dt in ("auto", "fp32"):
        assert _same(_record(load_generator(student), dtype=dt), before), dt
    assert "dtype" not in before
    stores = list((E.default_cache_dir().parent / "eval").glob("teacher-*"))
    assert len(stores) == 1                              # one fp32 store shared by the three runs
    with pytest.raises(UserError, match="--dtype 'fp16': use auto"):
        _record(load_generator(student), dtype="fp16")


def test_teacher_store_keys(models):
    """fp32: the key of before (existing stores stay valid); bf16: another one."""
    teacher, _ = models
    tid, caps, cpu = teacher_identity(teacher), ["a red circle", "a blue square"], torch.device("cpu")
    old = hashlib.sha1(json.dumps([E.TEACHER_STORE_FORMAT, tid, sha256_text("\x00".join(caps)), len(caps), 1, BS,
                                   "cpu"], sort_keys=True, default=str).encode()).hexdigest()
    fp32 = E._teacher_store(tid, caps, 1, BS, cpu).folder
    bf16 = E._teacher_store(tid, caps, 1, BS, cpu, torch.bfloat16).folder
    assert fp32.name == f"teacher-{old[:20]}" and bf16 != fp32
    assert E._teacher_store(tid, caps, 1, BS, cpu, torch.float32).folder == fp32


def test_cli_dtype_is_part_of_the_protocol(models, tmp_path, capsys):
    teacher, student = models
    work = tmp_path / "work"
    argv = ["--threads", "1", "eval", "--model", str(student), "--data", "shapes", "--num", str(NUM),
            "--batch-size", str(BS), "--device", "cpu", "--work", str(work), "--no-progress"]
    assert main(argv + ["--dtype", "bf16", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["dtype"] == "bf16"
    assert json.loads((work / "status.json").read_text())["identity"]["dtype"] == "bf16"
    capsys.readouterr()
    for dt in ("fp32", "auto"):                          # a resumed eval in another dtype: refused
        assert main(argv + ["--dtype", dt]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "differs in: dtype" in err[0], err
    assert main(argv + ["--dtype", "bf16"]) == 0          # the same dtype resumes (the folder is complete)
    w32 = tmp_path / "w32"
    assert main(argv[:-3] + ["--work", str(w32), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(argv[:-3] + ["--work", str(w32), "--no-progress", "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs in: dtype" in err[0], err
    with pytest.raises(SystemExit) as e:                  # an unknown dtype: argparse's choices
        main(argv + ["--dtype", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_pipeline_teacher_bf16_text_encoder_fp32_vae(tmp_path):
    """A ZImagePipeline teacher in bf16 on the CPU: transformer and text encoder bf16, the VAE fp32."""
    from test_pipeline_teacher import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {c} circle number {i}\n" for i, c in enumerate(["red", "blue", "green"] * 10)))
    gen = load_generator(pipe, steps=2)
    r = E.evaluate(gen, None, num=NUM, seed=0, prompts=prompts, extractor=str(E.features_dir_for("shapes", None)),
                   batch_size=BS, device="cpu", dtype="bf16", progress=False)
    assert r["dtype"] == "bf16" and math.isfinite(r["fd"]) and math.isfinite(r["psnr_vs_teacher"])
    assert {p.dtype for p in gen.teacher.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in gen.parts.text_pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in gen.parts.vae.parameters()} == {torch.float32}
