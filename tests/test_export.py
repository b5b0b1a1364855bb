"""`twostep export`: a student run → a diffusers pipeline folder that reproduces `twostep sample` in 2 forwards.

Tiny student run folders (full, shared with fresh mid-noise, lora with two different adapters, and a latent-space
student of a ZImagePipeline teacher) are built directly with save_student, exported, loaded with
TwoStepZImagePipeline.from_pretrained and compared with the student's own 2-step samples (what `twostep sample`
draws) for the same prompt and seed.
"""

import json
import sys

import pytest
import torch

from twostep.cli import main as _main

PROMPT = "a large red circle top left, blue background"
SEED, NUM = 7, 2


def main(argv):
    """The CLI at the test's thread count (the CLI alone would take every core)."""
    return _main(["--threads", str(torch.get_num_threads())] + list(argv))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def teacher(root):
    """A tiny teacher whose weights all do something (diffusers zero-initialises the output layer)."""
    import os
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_tiny_teacher
    from twostep.model import load_teacher

    t = load_teacher(make_tiny_teacher(root / "teacher"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return t


def make_run(folder, teacher_bb, teacher_cfg, decoupling, mid_noise="same", sigma_mid=0.6):
    """A student run folder whose two steps differ (full: two perturbed copies; lora: random LoRA B per step)."""
    from twostep.methods import load_config
    from twostep.sampling import save_student
    from twostep.student import TwoStepStudent, student_config

    cfg = load_config(None, [f"student.decoupling={decoupling}", f"student.sigma_mid={sigma_mid}",
                             f"student.mid_noise={mid_noise}", "student.lora_rank=4"])
    s = cfg.student
    st = TwoStepStudent(teacher_bb, decoupling, sigma_mid, mid_noise, s.lora_rank, s.lora_alpha, s.lora_targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in st.named_parameters():
            if decoupling != "lora" or "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_student(st, student_config(teacher_cfg, cfg, None), folder)
    return folder


@pytest.fixture(scope="module")
def runs(root, teacher):
    bb, c = teacher.backbone, teacher.config
    return {"full": make_run(root / "full", bb, c, "full"),
            "shared": make_run(root / "shared", bb, c, "shared", mid_noise="fresh", sigma_mid=0.75),
            "lora": make_run(root / "lora", bb, c, "lora")}


def sample_ref(run):
    """What `twostep sample --model RUN --prompt PROMPT --num NUM --seed SEED` generates (before decoding)."""
    from twostep.sampling import load_generator

    gen = load_generator(run)
    return gen.generate(gen.encode([PROMPT] * NUM), gen.noise(NUM, SEED)).x0


def run_counted(pipe, **kw):
    """Call the pipeline; returns (images, [(component, active adapters) per transformer forward])."""
    calls, handles = [], []
    for name in ("transformer", "transformer_2"):
        m = getattr(pipe, name)
        if m is not None:
            def hook(mod, args, name=name):
                calls.append((name, mod.active_adapters() if getattr(mod, "peft_config", None) else None))
            handles.append(m.register_forward_pre_hook(hook))
    try:
        out = pipe(PROMPT, num_images_per_prompt=NUM, generator=torch.Generator().manual_seed(SEED), **kw).images
    finally:
        for h in handles:
            h.remove()
    return out, calls


EXPECTED_CALLS = {
    "full": [("transformer", None), ("transformer_2", None)],
    "shared": [("transformer", None), ("transformer", None)],
    "lora": [("transformer", ["step1"]), ("transformer", ["step2"])],
    "lora-merge": [("transformer", None), ("transformer_2", None)],
}


@pytest.mark.parametrize("case", ["full", "shared", "lora", "lora-merge"])
def test_export_reproduces_sample_in_two_forwards(case, runs, root):
    from twostep.pipeline import TwoStepZImagePipeline

    run = runs[case.split("-")[0]]
    out = root / f"export-{case}"
    rc = main(["export", "--model", str(run), "--out", str(out)] + (["--merge"] if case.endswith("merge") else []))
    assert rc == 0
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"model_index.json", "pipeline.py", "flow.py", "twostep_export.json", "transformer/config.json",
            "text_encoder/config.json"} <= files
    assert ("lora/step1/pytorch_lora_weights.safetensors" in files) == (case == "lora")
    assert any(f.startswith("transformer_2/") for f in files) == (case in ("full", "lora-merge"))
    index = json.loads((out / "model_index.json").read_text())
    sm = 0.75 if case == "shared" else 0.6
    assert index["_class_name"] == "TwoStepZImagePipeline" and index["sigmas"] == [1.0, sm, 0.0]
    assert index["mid_noise"] == ("fresh" if case == "shared" else "same") and index["vae"] == [None, None]

    pipe = TwoStepZImagePipeline.from_pretrained(str(out))
    x0, calls = run_counted(pipe, output_type="latent")
    assert calls == EXPECTED_CALLS[case]  # exactly 2 transformer forwards, the right module/adapter for each step
    ref = sample_ref(run)
    assert ref.abs().mean() > 1e-2  # the model does something
    assert (x0 - ref).abs().max().item() <= 1e-5
    pt, _ = run_counted(pipe, output_type="pt")
    assert (pt - (ref / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-5

    if case == "lora":  # the steps really use different adapters: one adapter twice gives another image
        pipe.register_to_config(step_adapters=["step1", "step1"])
        same, calls = run_counted(pipe, output_type="latent")
        assert calls == [("transformer", ["step1"])] * 2 and (same - ref).abs().max().item() > 1e-3


def test_cli_sample_png_matches_pipeline_images(runs, root, tmp_path):
    import numpy as np
    from PIL import Image

    from twostep.pipeline import TwoStepZImagePipeline

    run, out, png = runs["full"], tmp_path / "pipe", tmp_path / "grid.png"
    assert main(["export", "--model", str(run), "--out", str(out)]) == 0
    assert main(["sample", "--model", str(run), "--prompt", PROMPT, "--num", str(NUM), "--seed", str(SEED),
                 "--scale", "1", "--out", str(png)]) == 0
    grid = np.asarray(Image.open(png))
    imgs, _ = run_counted(TwoStepZImagePipeline.from_pretrained(str(out)), output_type="pil")
    r, pad = imgs[0].size[0], 2
    for k, im in enumerate(imgs):
        cell = grid[pad:pad + r, pad + k * (r + pad): pad + k * (r + pad) + r].astype(int)
        assert np.abs(cell - np.asarray(im).astype(int)).max() <= 1  # uint8 rounding of the same float image


def test_lora_pipeline_save_pretrained_and_custom_pipeline_loading(runs, root, tmp_path, monkeypatch):
    """A loaded lora pipeline saves back (base weights + adapters); diffusers' own custom-pipeline loading of the
    exported folder (no twostep class involved, adapters loaded at the first call) gives the same images."""
    import diffusers.utils.dynamic_modules_utils as dm
    from diffusers import DiffusionPipeline

    from twostep.pipeline import TwoStepZImagePipeline

    out = root / "export-lora-2"
    assert main(["export", "--model", str(runs["lora"]), "--out", str(out)]) == 0
    pipe = TwoStepZImagePipeline.from_pretrained(str(out))
    ref, _ = run_counted(pipe, output_type="latent")
    pipe.save_pretrained(str(tmp_path / "resaved"))
    again, calls = run_counted(TwoStepZImagePipeline.from_pretrained(str(tmp_path / "resaved")),
                               output_type="latent")
    assert calls == EXPECTED_CALLS["lora"] and (again - ref).abs().max().item() == 0

    monkeypatch.setattr(dm, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    custom = DiffusionPipeline.from_pretrained(str(out), custom_pipeline="pipeline", trust_remote_code=True)
    assert type(custom).__name__ == "TwoStepZImagePipeline" and type(custom) is not TwoStepZImagePipeline
    rule = sys.modules[type(custom).__module__].mid_state  # the mid-noise rule from the folder's flow.py copy
    assert rule.__module__.endswith(".flow") and not rule.__module__.startswith("twostep")
    got, calls = run_counted(custom, output_type="latent")
    assert calls == EXPECTED_CALLS["lora"] and (got - ref).abs().max().item() == 0


def test_latent_student_export_copies_text_encoder_and_vae(tmp_path):
    """A latent-space student of a ZImagePipeline teacher: Qwen3 text encoder, tokenizer and VAE come along."""
    import os
    sys.path.insert(0, os.path.dirname(__file__))
    from test_pipeline_teacher import build_tiny_pipeline

    from twostep.sampling import load_generator
    from twostep.model import load_teacher
    from twostep.pipeline import TwoStepZImagePipeline

    teacher = load_teacher(build_tiny_pipeline(tmp_path / "zpipe"))
    run = make_run(tmp_path / "run", teacher.backbone, teacher.config, "full")
    out = tmp_path / "export"
    assert main(["export", "--model", str(run), "--out", str(out), "--dtype", "fp32"]) == 0  # default: bf16
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["text_features"] == "zimage" and index["sample_size"] == 16

    pipe = TwoStepZImagePipeline.from_pretrained(str(out))
    gen = load_generator(run)
    x0 = gen.generate(gen.encode([PROMPT] * NUM), gen.noise(NUM, SEED)).x0
    lat, calls = run_counted(pipe, output_type="latent")
    assert calls == EXPECTED_CALLS["full"] and lat.shape == (NUM, 16, 16, 16)
    assert (lat - x0).abs().max().item() <= 1e-5
    img, _ = run_counted(pipe, output_type="pt")
    assert img.shape == (NUM, 3, 32, 32)
    assert (img - (gen.decode(x0) / 2 + 0.5)).abs().max().item() <= 1e-5


def test_bad_inputs_are_one_line_errors(runs, root, tmp_path, capsys):
    def run(argv):
        rc = main(argv)
        return rc, capsys.readouterr().err.strip().splitlines()

    out = tmp_path / "out"
    rc, err = run(["export", "--model", str(root / "teacher"), "--out", str(out)])
    assert rc == 2 and len(err) == 1 and "not a student run folder" in err[0]
    rc, err = run(["export", "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 2 and len(err) == 1
    rc, err = run(["export", "--model", str(runs["full"]), "--out", str(out), "--merge"])
    assert rc == 2 and len(err) == 1 and "--merge" in err[0]
    assert not out.exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    rc, err = run(["export", "--model", str(runs["shared"]), "--out", str(busy)])
    assert rc == 2 and len(err) == 1 and "not a previous export" in err[0]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and not (tmp_path / "busy.partial").exists()

    # a previous export is replaced as a whole, and nothing is left beside it
    assert run(["export", "--model", str(runs["full"]), "--out", str(out)])[0] == 0
    (out / "stale.txt").write_text("old")
    assert run(["export", "--model", str(runs["shared"]), "--out", str(out)])[0] == 0
    assert not (out / "stale.txt").exists() and not (out / "transformer_2").exists()
    assert json.loads((out / "model_index.json").read_text())["decoupling"] == "shared"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "out"]
    rc, err = run(["export", "--model", str(out), "--out", str(tmp_path / "x")])
    assert rc == 2 and len(err) == 1 and "exported pipeline" in err[0]

    # DIR.partial: an interrupted export's leftovers are replaced; a folder of someone else's is refused
    (tmp_path / "y.partial" / "transformer").mkdir(parents=True)
    assert run(["export", "--model", str(runs["shared"]), "--out", str(tmp_path / "y")])[0] == 0
    assert not (tmp_path / "y.partial").exists()
    (tmp_path / "z.partial").mkdir()
    (tmp_path / "z.partial" / "notes.txt").write_text("mine")
    rc, err = run(["export", "--model", str(runs["shared"]), "--out", str(tmp_path / "z")])
    assert rc == 2 and len(err) == 1 and "not an interrupted export" in err[0] and not (tmp_path / "z").exists()
