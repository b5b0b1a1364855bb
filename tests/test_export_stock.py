"""Exports that stock diffusers loads (issue 17 §6), on the tiny latent ZImagePipeline teacher.

- a `shared` latent student → a stock ZImagePipeline folder: from_pretrained + num_inference_steps=2,
  guidance_scale=0 is `twostep sample` (≤ 1e-5 at σm = 0.75);
- the LoRA files load with stock `ZImagePipeline.load_lora_weights`, and one adapter alone is that step;
- the callback_on_step_end recipe of docs/export.md (executed as written) for full, lora and fresh-noise shared;
- `--dtype` (bf16 default for latent students, fp32 for pixel ones; overflow refused), `--format stock` refusals,
  our class loading after `import twostep` in a fresh interpreter without trust_remote_code or the folder's code.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_export import PROMPT, main, make_run  # noqa: E402
from test_pipeline_teacher import IMAGE, build_tiny_pipeline  # noqa: E402

SEED, NUM, SM = 7, 2, 0.75
ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    """(root, teacher, runs): latent students of the tiny pipeline teacher whose two steps differ."""
    from twostep.model import load_teacher

    root = tmp_path_factory.mktemp("stock")
    t = load_teacher(build_tiny_pipeline(root / "zpipe"))
    bb, c = t.backbone, t.config
    runs = {"shared": make_run(root / "shared", bb, c, "shared", sigma_mid=SM),
            "shared-fresh": make_run(root / "shared-fresh", bb, c, "shared", mid_noise="fresh", sigma_mid=SM),
            "full": make_run(root / "full", bb, c, "full", sigma_mid=SM),
            "lora": make_run(root / "lora", bb, c, "lora", sigma_mid=SM)}
    return root, t, runs


def reference(run):
    """What `twostep sample` draws for PROMPT × NUM at SEED (latents), and its noise and generator."""
    from twostep.sampling import load_generator

    gen = load_generator(run)
    noise = gen.noise(NUM, SEED)
    return gen.generate(gen.encode([PROMPT] * NUM), noise).x0, noise, gen


def export(run, out, *flags):
    assert main(["export", "--model", str(run), "--out", str(out), *flags]) == 0
    return out


def stock_call(pipe, noise, **kw):
    return pipe(PROMPT, num_images_per_prompt=NUM, latents=noise.clone(), height=IMAGE, width=IMAGE,
                guidance_scale=0.0, **kw).images


def test_shared_latent_student_exports_a_stock_zimage_pipeline(latent):
    from diffusers import DiffusionPipeline, ZImagePipeline

    root, _, runs = latent
    out = export(runs["shared"], root / "exp-shared", "--dtype", "fp32")  # --format auto → stock here
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline" and not (out / "pipeline.py").exists()
    pipe = DiffusionPipeline.from_pretrained(str(out))  # plain diffusers: no twostep class anywhere
    assert type(pipe) is ZImagePipeline
    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.5])  # what ZImagePipeline asks for at num_inference_steps=2
    assert pipe.scheduler.sigmas.tolist() == [1.0, SM, 0.0]
    ref, noise, gen = reference(runs["shared"])
    lat = stock_call(pipe, noise, num_inference_steps=2, output_type="latent")
    assert ref.abs().mean() > 1e-2 and (lat - ref).abs().max().item() <= 1e-5
    img = stock_call(pipe, noise, num_inference_steps=2, output_type="pt")
    assert (img - (gen.decode(ref) / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-5


def test_lora_files_load_with_stock_load_lora_weights(latent):
    """Each step's LoRA file, loaded alone by stock load_lora_weights, changes the output and is that step: one
    Euler step from σ = 1 gives step 1's x̂0₁; from x_m at σm (sigmas=[0.5], shifted to σm) step 2's x̂0₂."""
    from diffusers import ZImagePipeline
    from safetensors import safe_open

    root, _, runs = latent
    out = export(runs["lora"], root / "exp-lora", "--dtype", "fp32")
    with safe_open(str(out / "lora" / "step1" / WEIGHTS), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and "lora_" in k for k in keys) and "step1" not in str(keys)
    assert "lora_adapter_metadata" in meta
    _, noise, gen = reference(runs["lora"])
    st, text = gen.student, gen.encode([PROMPT] * NUM)
    with torch.no_grad():
        x0_1 = st.step_backbone(1).denoise(noise, torch.ones(NUM), text)
        x_m = st.mid_state(x0_1, noise)
        x0_2 = st.step_backbone(2).denoise(x_m, torch.full((NUM,), SM), text)

    pipe = ZImagePipeline.from_pretrained(str(out))
    base = stock_call(pipe, noise, num_inference_steps=1, output_type="latent")
    pipe.load_lora_weights(str(out / "lora" / "step1"), weight_name=WEIGHTS, adapter_name="step1")
    one = stock_call(pipe, noise, num_inference_steps=1, output_type="latent")
    assert (one - base).abs().max().item() > 1e-3 and (one - x0_1).abs().max().item() <= 1e-5
    pipe.load_lora_weights(str(out / "lora" / "step2"), weight_name=WEIGHTS, adapter_name="step2")
    pipe.set_adapters("step2")
    two = stock_call(pipe, x_m, num_inference_steps=1, sigmas=[0.5], output_type="latent")
    assert (two - x0_2).abs().max().item() <= 1e-5


def recipe() -> str:
    text = (ROOT / "docs" / "export.md").read_text()
    return re.search(r"```python recipe\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("case", ["full", "lora", "shared-fresh"])
def test_docs_callback_recipe_is_the_student(case, latent):
    """docs/export.md's stock-diffusers recipe, executed as written, reproduces `twostep sample` in 2 forwards."""
    root, _, runs = latent
    out = export(runs[case], root / f"exp-recipe-{case}", "--dtype", "fp32")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "TwoStepZImagePipeline"
    ns = {"DIR": str(out)}
    exec(compile(recipe(), "docs/export.md", "exec"), ns)
    ref, noise, _ = reference(runs[case])
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, m=m: calls.append(id(m)))
             for m in {id(ns["pipe"].transformer): ns["pipe"].transformer, **({id(ns["step2"]): ns["step2"]}
                                                                             if "step2" in ns else {})}.values()]
    lat = ns["generate"](PROMPT, latents=noise.clone(), num_images_per_prompt=NUM, height=IMAGE, width=IMAGE,
                         output_type="latent")
    for h in hooks:
        h.remove()
    assert len(calls) == 2 and (len(set(calls)) == 2) == (case == "full")
    assert ref.abs().mean() > 1e-2 and (lat - ref).abs().max().item() <= 1e-5
    if case == "full":  # the step-2 switch really matters: step 1's model twice is another image
        ns["use"] = lambda step: None
        ns["pipe"].transformer = ns["step1"]
        assert (ns["generate"](PROMPT, latents=noise.clone(), num_images_per_prompt=NUM, height=IMAGE,
                               width=IMAGE, output_type="latent") - ref).abs().max().item() > 1e-3


def test_export_dtype(latent, tmp_path, capsys):
    """Latent students export bf16 by default (transformer and LoRA files), still run and stay close to fp32;
    --dtype fp32 keeps fp32; weights beyond bf16's range are refused with one line and nothing written."""
    from safetensors import safe_open

    from twostep.pipeline import TwoStepZImagePipeline
    from twostep.sampling import load_student_generator, save_student

    root, _, runs = latent
    out = export(runs["lora"], tmp_path / "bf16")
    for f in (out / "transformer").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    with safe_open(str(out / "lora" / "step2" / WEIGHTS), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    assert json.loads((out / "twostep_export.json").read_text())["dtype"] == "bf16"
    pipe = TwoStepZImagePipeline.from_pretrained(str(out), dtype=torch.bfloat16)  # diffusers' default: fp32
    assert pipe.transformer.dtype == torch.bfloat16
    ref, noise, _ = reference(runs["lora"])
    lat = pipe(PROMPT, num_images_per_prompt=NUM, latents=noise, output_type="latent").images
    assert (lat - ref).abs().max().item() < 0.1 * ref.abs().max().item()

    gen = load_student_generator(runs["full"])
    sd = gen.student.state_dict()
    next(v for k, v in sd.items() if k.startswith("step2.") and v.is_floating_point()).view(-1)[0] = 3.4e38
    big = tmp_path / "big"
    save_student(gen.student, gen.config, big)
    capsys.readouterr()
    assert main(["export", "--model", str(big), "--out", str(tmp_path / "x"), "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overflow bf16" in err[0] and "--dtype fp32" in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    export(big, tmp_path / "x", "--dtype", "fp32")


def test_pixel_student_export_stays_fp32_and_refuses_stock(tmp_path, capsys):
    from safetensors import safe_open

    from conftest import make_tiny_teacher
    from twostep.model import load_teacher

    t = load_teacher(make_tiny_teacher(tmp_path / "teacher"))
    run = make_run(tmp_path / "run", t.backbone, t.config, "shared")
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "s"), "--format", "stock"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pixel-space" in err[0] and "--format twostep" in err[0]
    assert not (tmp_path / "s").exists()
    out = export(run, tmp_path / "e")  # auto: the twostep class, fp32
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "TwoStepZImagePipeline"
    with safe_open(str(next((out / "transformer").glob("*.safetensors"))), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}


@pytest.mark.parametrize("case,why", [("full", "different model per step"), ("shared-fresh", "mid_noise=fresh")])
def test_stock_format_refused_where_it_cannot_reproduce(case, why, latent, tmp_path, capsys):
    _, _, runs = latent
    capsys.readouterr()
    assert main(["export", "--model", str(runs[case]), "--out", str(tmp_path / "o"), "--format", "stock"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0] and "--format twostep" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_our_class_loads_without_remote_code_and_reads_old_lora_layout(latent, tmp_path):
    """TwoStepZImagePipeline.from_pretrained (after `import twostep`) needs no trust_remote_code and never runs the
    folder's own pipeline.py; a LoRA export from before the `transformer.` prefix (bare peft keys) still loads and
    gives the same images."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from twostep.pipeline import TwoStepZImagePipeline

    root, _, runs = latent
    out = root / "exp-lora"  # written by test_lora_files_load_with_stock_load_lora_weights
    if not out.exists():
        export(runs["lora"], out, "--dtype", "fp32")
    pipe = TwoStepZImagePipeline.from_pretrained(str(out))
    assert type(pipe) is TwoStepZImagePipeline
    x = pipe("p", latents=torch.ones(1, 16, 16, 16), output_type="latent").images
    old = tmp_path / "old-layout"
    shutil.copytree(out, old)
    for s in ("step1", "step2"):
        f = str(old / "lora" / s / WEIGHTS)
        with safe_open(f, "pt") as fh:
            meta = json.loads(fh.metadata()["lora_adapter_metadata"])
        meta = {k[len("transformer."):]: v for k, v in meta.items()}
        save_file({k[len("transformer."):]: v for k, v in load_file(f).items()}, f,
                  metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    y = TwoStepZImagePipeline.from_pretrained(str(old))("p", latents=torch.ones(1, 16, 16, 16),
                                                        output_type="latent").images
    assert (x - y).abs().max().item() == 0


def test_stock_export_loads_as_saved_without_warnings(latent, tmp_path, capsys):
    """The hint `twostep export` prints for a bf16 stock export, executed as printed, loads the pipeline in bf16 (it
    passes the dtype), and stock diffusers says nothing about the folder (no "verify your model_index.json")."""
    import logging

    from diffusers.utils import logging as dlog

    root, _, runs = latent
    out = tmp_path / "exp"
    capsys.readouterr()
    assert main(["export", "--model", str(runs["shared"]), "--out", str(out)]) == 0   # auto: stock, bf16
    hint = capsys.readouterr().out.split("load it with:\n", 1)[1]
    code = "\n".join(ln[2:].split("  # ")[0] for ln in hint.splitlines())
    assert "dtype=torch.bfloat16" in code
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    level, handler = dlog.get_verbosity(), Keep(logging.WARNING)
    dlog.set_verbosity_warning()
    dlog.get_logger("diffusers").addHandler(handler)
    try:
        ns = {}
        exec(compile(code, "twostep export's hint", "exec"), ns)
    finally:
        dlog.get_logger("diffusers").removeHandler(handler)
        dlog.set_verbosity(level)
    assert ns["pipe"].transformer.dtype == torch.bfloat16
    assert not [m for m in seen if "verify your" in m or "not expected" in m], seen
