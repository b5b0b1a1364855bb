"""`twostep sample` / `twostep speed` on --device in --dtype (as eval: auto = bf16 on CUDA, fp32 elsewhere), and the
loaders reading a model's weights directly in a dtype (no fp32 copy first; None and fp32 = the bytes of before)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_teacher
from twostep import cli, evaluate as E, report, speed
from twostep.backbones.zimage import ZImageBackbone
from twostep.cli import build_parser, main
from twostep.model import load_teacher
from twostep.sampling import StudentGenerator, load_checkpoint_generator, load_generator

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = ROOT / "models" / "teacher-shapes", ROOT / "models" / "turbopp-shapes"
PROMPTS = ["a red circle", "a blue square left"]


def _run(argv, capsys):
    rc = main(["--threads", "1", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def _sample(model, out, capsys, *extra):
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    rc, _, err = _run(["sample", "--model", model, *args, "--num", "3", "--scale", "1", "--out", out, *extra], capsys)
    assert rc == 0, err
    return Path(out).read_bytes()


def _pixels(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny CFG teacher whose weights all do something, and full / lora / shared students of it (perturbed, the
    LoRA adapters too), each a folder as `twostep distill` writes it; plus a run folder with one checkpoint."""
    from twostep.io.folders import save_model_folder
    from twostep.methods import load_config
    from twostep.sampling import save_student
    from twostep.student import TwoStepStudent, student_config

    root = tmp_path_factory.mktemp("device")
    teacher = make_tiny_teacher(root / "teacher")
    t = load_teacher(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # diffusers zero-initialises the output layer: bf16 would change nothing
        for p in t.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_model_folder(t.backbone.transformer.state_dict(), t.config, teacher)
    out = {"teacher": teacher}
    for dec in ("full", "lora", "shared"):
        cfg = load_config(None, [f"student.decoupling={dec}", "student.lora_rank=4"])
        s = cfg.student
        st = TwoStepStudent(t.backbone, dec, s.sigma_mid, s.mid_noise, s.lora_rank, s.lora_alpha, s.lora_targets)
        with torch.no_grad():
            for p in st.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        c = student_config(t.config, cfg, teacher)
        save_student(st, c, root / dec)
        out[dec] = root / dec
        if dec == "full":   # a run folder with a complete checkpoint at update 3 (small format: ema/ files)
            run = root / "run"
            ck = run / "checkpoints" / "step-00000003"
            save_student(st, {**c, "updates": 3}, ck / "ema")
            (ck / "meta.json").write_text("{}")
            (run / "config.json").write_text(json.dumps({**c, "updates": 3}))
            out["run"] = run
    return out


def _module(gen):
    return gen.student if isinstance(gen, StudentGenerator) else gen.teacher.backbone


def _load(name, folders, dtype=None):
    if name == "run":
        return load_checkpoint_generator(folders["run"], 3, dtype=dtype)
    return load_generator(folders[name], steps=3 if name == "teacher" else None, dtype=dtype)


# -- the loaders ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["teacher", "full", "lora", "shared", "run"])
def test_loaders_read_weights_in_the_dtype_states_stay_fp32(name, folders, monkeypatch):
    built = []
    orig = ZImageBackbone.from_config.__func__

    def spy(cls, config, seed=0):
        bb = orig(cls, config, seed)
        built.append(next(bb.parameters()).device.type)
        return bb

    monkeypatch.setattr(ZImageBackbone, "from_config", classmethod(spy))
    before = _load(name, folders)
    assert set(built) == {"cpu"}
    built.clear()
    g32, g16 = _load(name, folders, torch.float32), _load(name, folders, torch.bfloat16)
    assert set(built) == {"meta"}   # read in a dtype: the modules are built without storage, then assigned
    w0, w32, w16 = (dict(_module(g).named_parameters()) for g in (before, g32, g16))
    assert w0.keys() == w32.keys() == w16.keys()
    assert all(torch.equal(w0[k], w32[k]) and w32[k].dtype == torch.float32 for k in w0)
    assert {p.dtype for p in w16.values()} == {torch.bfloat16}
    assert not any(p.requires_grad for g in (g32, g16) for p in _module(g).parameters())
    text, noise = before.encode(PROMPTS), before.noise(2, 7)
    r0, r32, r16 = (g.generate(text, noise, return_trajectory=True) for g in (before, g32, g16))
    assert torch.equal(r0.x0, r32.x0) and all(torch.equal(a, b) for a, b in zip(r0.trajectory, r32.trajectory))
    assert {s.dtype for s in [*r16.trajectory, r16.x0]} == {torch.float32}   # fp32 states and Euler updates
    d = (r16.x0 - r0.x0).abs()
    assert 0 < float(d.max()) and float(d.mean()) < 0.05


def test_eval_reads_in_its_dtype_and_fp32_is_the_record_of_before(folders, tmp_path, monkeypatch, capsys):
    from test_eval_dtype import _record, _same

    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(E, "DIVERSITY_PROMPTS", 2)
    assert _same(_record(load_generator(folders["full"], dtype=torch.float32)), _record(load_generator(folders["full"])))
    seen = []

    def stop(folder, steps=None, guidance=None, dtype=None, weights="best"):
        seen.append(dtype)
        raise KeyboardInterrupt

    import twostep.sampling
    monkeypatch.setattr(twostep.sampling, "load_generator", stop)  # the commands import it when they run
    for dt, want in (("auto", torch.float32), ("bf16", torch.bfloat16)):
        assert _run(["eval", "--model", folders["full"], "--data", "shapes", "--num", "10", "--device", "cpu",
                     "--dtype", dt], capsys)[0] == 130
    assert seen == [torch.float32, torch.bfloat16]


# -- twostep sample ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [TEACHER, STUDENT], ids=["teacher", "student"])
def test_sample_defaults_are_the_bytes_of_before(model, tmp_path, capsys):
    ref = tmp_path / "ref.png"   # the library path of before: weights read as stored, fp32, on the CPU
    report.prompt_grid(load_generator(model), PROMPTS, ref, per_prompt=3, scale=1)
    assert _sample(model, tmp_path / "a.png", capsys) == ref.read_bytes()
    assert _sample(model, tmp_path / "b.png", capsys, "--device", "cpu", "--dtype", "fp32") == ref.read_bytes()
    ev = tmp_path / "ev.png"
    report.protocol_grid(load_generator(model), "shapes", ev, prompts=2, per_prompt=2, scale=1)
    rc, _, err = _run(["sample", "--model", model, "--eval-prompts", "shapes", "--rows", "2", "--num", "2",
                       "--scale", "1", "--device", "auto", "--out", tmp_path / "ev2.png"], capsys)
    assert rc == 0 and (tmp_path / "ev2.png").read_bytes() == ev.read_bytes(), err


@pytest.mark.parametrize("model", [TEACHER, STUDENT], ids=["teacher", "student"])
def test_sample_bf16_is_close_to_fp32_not_equal(model, tmp_path, capsys):
    _sample(model, tmp_path / "fp32.png", capsys)
    _sample(model, tmp_path / "bf16.png", capsys, "--dtype", "bf16")
    a, b = _pixels(tmp_path / "fp32.png"), _pixels(tmp_path / "bf16.png")
    d = np.abs(a - b)
    assert a.shape == b.shape and d.max() > 0   # bf16 weights: other images ...
    assert d.mean() < 2.0                       # ... by bf16 round-off (of 255 levels; 0.6 here)


def test_sample_and_speed_bad_device_is_one_line_exit_2(tmp_path, capsys):
    cmds = [["sample", "--model", TEACHER, "--prompt", "a", "--out", tmp_path / "o.png"],
            ["speed", "--teacher", TEACHER, "--student", STUDENT, "--batch", "1", "--repeats", "1"]]
    bad = [("tpu", "--device 'tpu': use auto")] + \
        ([] if torch.cuda.is_available() else [("cuda", "--device cuda: no CUDA device is available here")])
    for argv in cmds:
        for dev, needle in bad:
            rc, _, err = _run([*argv, "--device", dev], capsys)
            assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(SystemExit) as e:                  # an unknown dtype: argparse's choices
        main([*map(str, cmds[0]), "--dtype", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["sample", "speed"])
def test_help_lists_device_and_dtype(cmd, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([cmd, "--help"])
    h = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE" in h and "auto (CUDA when available, else CPU) | cpu | cuda | cuda:N" in h
    assert "--dtype {auto,bf16,fp32}" in h and "bf16 on CUDA, fp32 on the CPU" in h


# -- twostep speed -------------------------------------------------------------------------------------------

def test_speed_records_device_and_dtype(tmp_path, capsys):
    base = ["speed", "--teacher", TEACHER, "--student", STUDENT, "--batch", "1", "--repeats", "1"]
    rc, out, err = _run([*base, "--json", tmp_path / "d.json"], capsys)
    assert rc == 0 and "img/s" in out, err
    r = json.loads((tmp_path / "d.json").read_text())
    want = "cpu" if not torch.cuda.is_available() else "cuda"
    assert r["device"] == want and r["dtype"] == ("fp32" if want == "cpu" else "bf16")
    assert r["cmd"] == f"twostep speed --teacher {TEACHER} --student {STUDENT} --batch 1 --repeats 1"
    rc, _, err = _run([*base, "--device", "cpu", "--dtype", "bf16", "--json", tmp_path / "b.json"], capsys)
    r = json.loads((tmp_path / "b.json").read_text())
    assert rc == 0 and (r["device"], r["dtype"]) == ("cpu", "bf16") and r["cmd"].endswith(
        "--repeats 1 --device cpu --dtype bf16"), err


def test_speed_reads_the_clock_after_a_device_sync(monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "sync", lambda dev: calls.append(str(dev)))
    t, s = load_generator(TEACHER, steps=1), load_generator(STUDENT)
    speed.measure(t, s, batch=1, repeats=2, warmup=0, device=torch.device("cpu"))
    assert calls == ["cpu"] * (2 * 2 * 2)   # before and after each timed generate: 2 repeats x 2 models
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: seen.append(str(dev)))
    E.sync(torch.device("cuda:0"))
    E.sync(torch.device("cpu"))
    assert seen == ["cuda:0"]


def test_sample_of_a_zimage_pipeline_in_bf16(tmp_path, capsys, monkeypatch):
    """`twostep sample --dtype bf16` of a tiny ZImagePipeline folder: the transformer and text encoder it samples
    with are bf16, the VAE fp32, and the grid differs from fp32's only by round-off."""
    from test_pipeline_teacher import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    seen = []
    place = E.place
    monkeypatch.setattr(E, "place", lambda gen, *a, **k: seen.append(place(gen, *a, **k)) or seen[-1])
    for dt in ("fp32", "bf16"):
        rc, _, err = _run(["sample", "--model", pipe, "--prompt", "a red circle", "--num", "2", "--steps", "2",
                           "--scale", "1", "--dtype", dt, "--out", tmp_path / f"{dt}.png"], capsys)
        assert rc == 0, err
    gen = seen[-1]
    assert {p.dtype for p in gen.teacher.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in gen.parts.text_pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in gen.parts.vae.parameters()} == {torch.float32}
    a, b = _pixels(tmp_path / "fp32.png"), _pixels(tmp_path / "bf16.png")
    assert a.shape == b.shape and np.abs(a - b).max() > 0 and np.abs(a - b).mean() < 8.0
