"""Non-square samples (issue 17 §7): a pixel-space teacher at 32×48 and a latent ZImagePipeline at 32×64 pixels
(16×32 latents) through sample space, student, discriminator heads, sample, export and the folder crop."""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_export import PROMPT, main, make_run  # noqa: E402
from test_pipeline_teacher import build_tiny_pipeline  # noqa: E402

H, W = 32, 48


def make_pixel_teacher(folder, height=H, width=W):
    from twostep import flow
    from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config
    from twostep.data.shapes import VERSION
    from twostep.io.folders import save_model_folder

    tcfg = tiny_zimage_config(dim=32, n_layers=1, n_heads=1, n_refiner_layers=1, patch_size=4)
    bb = ZImageBackbone.from_config(tcfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # diffusers zero-initialises the output layer: make the model do something
        for p in bb.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = {"kind": "teacher", "backbone": "zimage", "transformer": tcfg, "height": height, "width": width,
           "text_encoder": "all-MiniLM-L6-v2", "data": "shapes", "data_version": VERSION,
           "sampling": {"steps": 4, "shift": flow.DEFAULT_SHIFT, "guidance": 0.0}}
    save_model_folder(bb.transformer.state_dict(), cfg, folder)
    return folder


@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    from twostep.model import load_teacher

    root = tmp_path_factory.mktemp("nonsquare")
    t = load_teacher(make_pixel_teacher(root / "teacher"))
    return root, t, make_run(root / "run", t.backbone, t.config, "full")


def test_sample_space_and_student_at_32x48(pixel, tmp_path, capsys):
    from PIL import Image

    from twostep.errors import UserError
    from twostep.io.folders import teacher_identity
    from twostep.sampling import load_generator

    root, t, run = pixel
    assert (t.height, t.width, t.image_height, t.image_width) == (H, W, H, W)
    with pytest.raises(UserError, match="32x48"):
        t.resolution  # the square alias refuses: no code reads one side twice
    assert t.noise(2, 0).shape == (2, 3, H, W)
    assert t.sample(t.encode(["a"] * 2), t.noise(2, 0), steps=2).x0.shape == (2, 3, H, W)
    ident = teacher_identity(root / "teacher")
    assert (ident["height"], ident["width"], ident["resolution"]) == (H, W, None)

    gen = load_generator(run)
    assert "resolution" not in gen.config and (gen.config["height"], gen.config["width"]) == (H, W)
    x = gen.generate(gen.encode([PROMPT] * 2), gen.noise(2, 7)).x0
    assert x.shape == (2, 3, H, W) and x.abs().mean() > 1e-2

    png = tmp_path / "grid.png"
    assert main(["sample", "--model", str(run), "--prompt", PROMPT, "--num", "2", "--scale", "1",
                 "--out", str(png)]) == 0
    assert Image.open(png).size == (2 * W + 3 * 2, H + 2 * 2)  # 2 images of W×H with 2-px padding


def test_grid_heads_follow_the_sample_grid(pixel):
    """The grid heads reshape to (H/p, W/p) of the samples they see (never sqrt(tokens)): 32×48 → 8×12 tokens,
    48×32 → 12×8, each a per-token logit map; the critic loss with R1 runs."""
    from twostep.discriminator import Discriminator, critic_gan_loss

    _, t, _ = pixel
    torch.manual_seed(0)
    d = Discriminator(t.backbone, blocks=[0], head="grid", hidden=8)
    text = t.encode(["a", "b"])
    for hw in ((H, W), (W, H)):
        x = torch.randn(2, 3, *hw)
        logits = d(x, text)
        assert logits.shape == (2, (hw[0] // 4) * (hw[1] // 4)) and d.grid == (hw[0] // 4, hw[1] // 4)
    loss, logs = critic_gan_loss(d, torch.randn(2, 3, H, W), text, torch.randn(2, 3, H, W), r1=0.1)
    loss.backward()
    assert torch.isfinite(loss) and "r1" in logs


def test_pixel_export_at_32x48_reproduces_sample(pixel):
    from twostep.pipeline import TwoStepZImagePipeline
    from twostep.sampling import load_generator

    root, _, run = pixel
    out = root / "export"
    assert main(["export", "--model", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "model_index.json").read_text())["sample_size"] == [H, W]
    gen = load_generator(run)
    noise = gen.noise(2, 7)
    ref = gen.generate(gen.encode([PROMPT] * 2), noise).x0
    pipe = TwoStepZImagePipeline.from_pretrained(str(out))
    lat = pipe(PROMPT, num_images_per_prompt=2, latents=noise, output_type="latent").images
    assert (lat - ref).abs().max().item() <= 1e-5
    drawn = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert drawn.shape == (1, 3, H, W)  # the default size is the sample grid


def test_folder_dataset_crops_to_the_aspect_ratio(tmp_path):
    """(height, width): the largest centered box of that aspect ratio, resized; square stays the square crop."""
    from PIL import Image

    from twostep.data import get_dataset
    from twostep.errors import UserError

    a = np.zeros((60, 200, 3), np.uint8)
    a[:, 55:145] = 255  # the centered 60×90 box (aspect 2:3) is white, the rest black
    Image.fromarray(a).save(tmp_path / "wide.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": "wide.png", "text": "x"}) + "\n")
    ds = get_dataset(str(tmp_path), (H, W))
    x = ds.images([0])
    # only the white box, downscaled (bicubic reads a pixel or two across the box edge: the border columns)
    assert x.shape == (1, 3, H, W) and x[..., 1:-1].min() > 0.99 and x.min() > 0.8 and ds.upscaled == 0
    assert get_dataset(str(tmp_path), 32).images([0]).shape == (1, 3, 32, 32)
    with pytest.raises(UserError, match="square"):
        get_dataset("shapes", (H, W))


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    """The tiny ZImagePipeline at 32×64 pixels (twostep.json image_size [32, 64]: 16×32 latents)."""
    from twostep.model import load_teacher

    root = tmp_path_factory.mktemp("latent-nonsquare")
    folder = build_tiny_pipeline(root / "zpipe")
    (folder / "twostep.json").write_text(json.dumps({"image_size": [32, 64]}))
    return root, folder, load_teacher(folder)


def test_latent_pipeline_at_32x64(latent):
    from diffusers import ZImagePipeline

    from twostep.pipeline import TwoStepZImagePipeline
    from twostep.sampling import load_generator

    root, folder, t = latent
    assert (t.height, t.width, t.image_height, t.image_width) == (16, 32, 32, 64)
    assert "resolution" not in t.config and "image_resolution" not in t.config
    for case in ("full", "shared"):
        run = make_run(root / case, t.backbone, t.config, case, sigma_mid=0.75)
        gen = load_generator(run)
        noise = gen.noise(2, 7)
        assert noise.shape == (2, 16, 16, 32)
        ref = gen.generate(gen.encode([PROMPT] * 2), noise).x0
        out = root / f"export-{case}"
        assert main(["export", "--model", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
        if case == "full":
            pipe = TwoStepZImagePipeline.from_pretrained(str(out))
            img = pipe(PROMPT, num_images_per_prompt=2, latents=noise, output_type="pt").images
        else:  # stock ZImagePipeline at height=32, width=64
            pipe = ZImagePipeline.from_pretrained(str(out))
            img = pipe(PROMPT, num_images_per_prompt=2, latents=noise.clone(), height=32, width=64,
                       num_inference_steps=2, guidance_scale=0.0, output_type="pt").images
        assert img.shape == (2, 3, 32, 64)
        assert (img - (gen.decode(ref) / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-5


def test_latent_size_not_a_multiple_is_refused(latent, tmp_path, capsys):
    """Each image side must be a multiple of 2 × the VAE's scale factor (16 for Z-Image; 4 for the tiny VAE)."""
    import shutil

    _, folder, _ = latent
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "twostep.json").write_text(json.dumps({"image_size": [32, 66]}))
    capsys.readouterr()
    assert main(["sample", "--model", str(bad), "--prompt", "x", "--num", "1", "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "width 66" in err[0] and "multiple of 4" in err[0] and "image_size" in err[0]
    assert not (tmp_path / "a.png").exists()
