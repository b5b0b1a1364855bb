"""Pluggable feature extractors (twostep.metrics.extractors), streamed FD/KID (fd.FeatureStats), CLIP score and
feature nets trained on a folder dataset (`twostep metrics train --data FOLDER`).

No pretrained weights exist offline: every loader is exercised on a randomly initialised network saved in the
real format (the FID Inception's .pth -> safetensors key layout; transformers save_pretrained folders), so the
loading and preprocessing code is real and only the weights are not.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from twostep.cli import main as cli_main
from twostep.data import get_dataset
from twostep.errors import UserError
from twostep.metrics import DistributionMetrics, FeatureStats
from twostep.metrics import extractors as X
from twostep.metrics.features import FeatureTrainConfig, _views, load_feature_net, nt_xent, retrieval_accuracy

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """A random FID Inception with calibrated BatchNorm statistics, saved as the published .pth would be and
    converted once to safetensors."""
    d = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    net = X.FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None   # cumulative average over the calibration batch
    net.train()
    with torch.no_grad():   # running statistics from real activations, so features depend on the image
        net(torch.randn(4, 3, 96, 96))
    sd = net.eval().state_dict()
    torch.save(sd, d / "pt_inception-2015-12-05-6726825d.pth")
    out = X.convert_inception(d / "pt_inception-2015-12-05-6726825d.pth", d / "inception.safetensors")
    return d, out, sd


def _clip_folder(root: Path) -> Path:
    """A tiny random CLIPModel + a character-level CLIP BPE tokenizer, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos,
                                      bos_token_id=bos, pad_token_id=eos),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    torch.manual_seed(0)
    out = root / "clip"
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _dinov2_folder(root: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    out = root / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                             image_size=28, patch_size=14)).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 28, "width": 28}}))
    return out


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return _clip_folder(root), _dinov2_folder(root)


def _code(argv) -> int:
    try:
        return cli_main(["--threads", "1", *argv])   # the CLI sets torch's threads: keep the suite's one
    except SystemExit as e:   # argparse's own errors
        return e.code


def _images(n, h=40, w=56, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _folder_dataset(root: Path, n: int = 24, res: int = 24) -> Path:
    """n distinct smooth random RGB images (two captions for the first) + captions.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(n):
        x = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(res, res), mode="bilinear", align_corners=False)
        Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    lines.append(json.dumps({"file_name": "0.png", "text": "a second caption"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------------------------- FeatureStats

def test_feature_stats_equal_distribution_metrics_bit_for_bit(tmp_path):
    """The committed feature net through load_extractor + FeatureStats gives the same bytes as the original
    DistributionMetrics (so `twostep eval` numbers stay identical), in any batches and after a save/load."""
    ds = get_dataset("shapes")
    ref, fake = ds.sample(60, seed=0, split="ref").images, ds.sample(50, seed=1, split="test").images
    ex = X.load_extractor(str(ROOT / "models" / "features-shapes"))
    assert ex.num_features == 256 and ex.describe()["kind"] == "feature-net" and ex.describe()["sha256"]
    want = DistributionMetrics(ex.net, ref, seed=0, kid_subsets=10)(fake)
    real = FeatureStats(ex.num_features).add(ex.embed(ref))
    stream, gen = ex.stream(), FeatureStats(ex.num_features)   # generated batches of any size (7, 23, 20)
    gen.add(stream.add(fake[:7]))
    gen.save(tmp_path / "stats.safetensors")   # a resumed eval: the state round-trips exactly
    gen = FeatureStats.load(tmp_path / "stats.safetensors")
    gen.add(stream.add(fake[7:30]))
    gen.add(stream.add(fake[30:]))
    gen.add(stream.flush())
    assert len(gen) == 50
    assert real.fd_kid(gen, kid_subsets=10, seed=0) == want
    # keep=False: FD only, from the sums
    lean = FeatureStats(ex.num_features, keep=False).add(ex.embed(fake))
    assert real.fd(lean) == want["fd"]
    with pytest.raises(UserError, match="KID needs the features"):
        real.kid(lean)


def test_embed_stream_equals_embed_whatever_the_batches():
    ex = X.load_extractor(str(ROOT / "models" / "features-photos"), batch_size=16)
    x = _images(45, 32, 32)
    want = ex.embed(x)
    st = ex.stream()
    got = [st.add(x[a:b]) for a, b in [(0, 3), (3, 20), (20, 21), (21, 45)]] + [st.flush()]
    assert [len(g) for g in got] == [0, 16, 0, 16, 13] and len(st) == 45
    assert torch.equal(torch.cat(got), want)


def test_feature_stats_sums_are_torchmetrics_blocks_of_512_whatever_the_batches():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1300, 8, generator=g, dtype=torch.float64)
    b = torch.randn(700, 8, generator=g, dtype=torch.float64) * 1.1 + 0.1
    m = FrechetInceptionDistance(feature=Identity())   # DistributionMetrics fed torchmetrics 512 rows at a time
    for x, real in ((a, True), (b, False)):
        for i in range(0, len(x), 512):
            m.update(x[i:i + 512], real=real)
    want = float(m.compute())
    sa, sb = FeatureStats(8), FeatureStats(8)
    for i, bs in enumerate([1, 500, 37, 700, 62]):
        sa.add(a[sum([1, 500, 37, 700, 62][:i]):][:bs])
    for x in b.split(333):
        sb.add(x)
    assert sa.fd(sb) == want and len(sa) == 1300 and sa.n == 1024   # the partial last block is not folded in


def test_feature_stats_bad_input():
    st = FeatureStats(4)
    with pytest.raises(UserError, match=r"expected features \[n, 4\]"):
        st.add(torch.zeros(3, 5))
    with pytest.raises(UserError, match="NaN/inf"):
        st.add(torch.full((2, 4), float("nan")))
    st.add(torch.randn(1, 4))
    with pytest.raises(UserError, match="at least 2 images"):
        st.fd(FeatureStats(4).add(torch.randn(5, 4)))
    with pytest.raises(UserError, match="different extractors"):
        FeatureStats(4).add(torch.randn(5, 4)).fd(FeatureStats(3).add(torch.randn(5, 3)))
    with pytest.raises(UserError, match="not a FeatureStats state"):
        FeatureStats.from_state_dict({"sum": torch.zeros(3)})
    # FD of a set against itself is 0; against a shifted set it is the squared shift (identity covariance)
    a = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sa = FeatureStats(4).add(a)
    assert sa.fd(FeatureStats(4).add(a)) == pytest.approx(0, abs=1e-9)
    assert sa.fd(FeatureStats(4).add(a + 1)) == pytest.approx(4, rel=1e-6)


# ---------------------------------------------------------------------------------------------- Inception

def test_inception_architecture_matches_the_published_layout():
    net = X.FIDInceptionV3()
    sd = net.state_dict()
    # torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696) and with the FID net's
    # 1008-way fc instead of 1000 (+8 * 2049): 23,850,960
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    for k, shape in {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                     "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                     "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                     "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048)}.items():
        assert tuple(sd[k].shape) == shape
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_tf1_bilinear_resize():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    y = X.resize_bilinear_tf1(x, 8)
    # TF1 (align_corners=False): output i samples input i * 4/8 = i/2, clamped at the last row/column
    assert torch.equal(y[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    assert torch.equal(y[0, 0, :, 0], torch.tensor([0, 2, 4, 6, 8, 10, 12, 12.]))
    assert torch.equal(X.resize_bilinear_tf1(x, 4), x)


def test_inception_extractor_on_a_converted_random_net(inception_files):
    d, st, sd = inception_files
    ex = X.load_extractor(f"inception:{st}")
    assert (ex.name, ex.num_features) == ("inception", 2048)
    x = _images(2)
    f = ex.embed(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float64
    assert (f[0] - f[1]).abs().max() > 0   # features depend on the image
    # the documented preprocessing, by hand: 8-bit levels, TF1 bilinear to 299, (x - 128) / 128
    assert torch.equal(ex.prepare(x), (X.resize_bilinear_tf1(((x + 1) * 127.5).round(), 299) - 128) / 128)
    got = ex.net.state_dict()   # the weights are the file's (num_batches_tracked aside: absent from some files)
    assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    desc = ex.describe()
    assert desc["kind"] == "inception" and len(desc["sha256"]) == 64 and "299" in desc["resize"]


def test_inception_bad_files_are_one_line_errors(inception_files, tmp_path, monkeypatch):
    d, st, sd = inception_files
    bad = dict(sd)
    bad["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(bad, tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match="torchvision's ImageNet"):
        X.convert_inception(tmp_path / "imagenet.pth", tmp_path / "x.safetensors")
    wrong = {k: v for k, v in sd.items() if not k.startswith("Mixed_7c")}
    torch.save(wrong, tmp_path / "short.pth")
    with pytest.raises(UserError, match=r"tensors missing \(first: Mixed_7c"):
        X.convert_inception(tmp_path / "short.pth", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()   # nothing half-written
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    for spec, needle in [(f"inception:{tmp_path / 'other.safetensors'}", "not the FID Inception-V3"),
                         (f"inception:{d / 'pt_inception-2015-12-05-6726825d.pth'}", "a pickled PyTorch file"),
                         (f"inception:{tmp_path / 'missing.safetensors'}", "not found"),
                         ("inception:", "name the file"), ("nope-not-here", "no such feature-net folder"),
                         ("", "empty spec")]:
        with pytest.raises(UserError, match=needle) as e:
            X.load_extractor(spec)
        assert "\n" not in str(e.value)
    # `inception` alone: the cached file, else the download; offline that is a one-line error with the fix
    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "cache"))

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="download of https://github.com/mseitzer.*convert-inception") as e:
        X.load_extractor("inception")
    assert "\n" not in str(e.value) and not list((tmp_path / "cache" / "inception").iterdir())
    target = X.default_inception_file()
    target.write_bytes(st.read_bytes())
    assert X.load_extractor("inception").weights == target


def test_convert_inception_cli(inception_files, tmp_path, capsys):
    from safetensors.torch import load_file

    d, st, sd = inception_files
    out = tmp_path / "inc.safetensors"
    assert _code(["metrics", "convert-inception", "--pth", str(d / "pt_inception-2015-12-05-6726825d.pth"),
                  "--out", str(out)]) == 0
    got, want = load_file(str(out)), load_file(str(st))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert "inception:" in capsys.readouterr().out
    assert _code(["metrics", "convert-inception", "--pth", str(d / "pt_inception-2015-12-05-6726825d.pth"),
                  "--out", str(out)]) == 0   # an earlier conversion is replaced; nothing else is
    (tmp_path / "other.safetensors").write_bytes(b"x")
    assert _code(["metrics", "convert-inception", "--pth", str(d / "pt_inception-2015-12-05-6726825d.pth"),
                  "--out", str(tmp_path / "other.safetensors")]) == 2
    assert "not a converted Inception file" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    assert _code(["metrics", "convert-inception", "--pth", str(tmp_path / "junk.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unreadable as plain PyTorch weights" in err and "\n" not in err


# ---------------------------------------------------------------------------------------------- CLIP / DINOv2

def test_clip_and_dinov2_extractors_and_clip_score(hf_folders):
    clip_dir, dino_dir = hf_folders
    x = _images(4)
    ex = X.load_extractor(f"clip:{clip_dir}")
    f = ex.embed(x, batch_size=3)
    assert f.shape == (4, 16) and f.dtype == torch.float64 and ex.describe()["kind"] == "clip"
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)   # uint8 input is the same image
    torch.testing.assert_close(ex.embed(u8), f, rtol=1e-6, atol=1e-6)
    # the documented preprocessing by hand: 8-bit, shorter side -> 32 bicubic antialiased, centre crop, CLIP norm
    y = ((x + 1) * 127.5).round() / 255
    y = F.interpolate(y, size=(32, 45), mode="bicubic", align_corners=False, antialias=True)[..., 6:38]
    y = (y - torch.tensor(X.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(X.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ex.model.visual_projection(ex.model.vision_model(pixel_values=y).pooler_output)
    torch.testing.assert_close(f, want.double(), rtol=1e-5, atol=1e-5)
    caps = ["a red cat", "dog", "x", "a blue square"]
    s = X.clip_score(x, caps, ex)
    per = X.CLIPScorer(ex).scores(x, caps)
    assert 0 <= s <= 100 and s == pytest.approx(float(per.mean()))
    streamed = X.CLIPScorer(str(clip_dir))
    streamed.update(x[:1], caps[:1])
    streamed.update(x[1:], caps[1:])
    assert streamed.compute() == pytest.approx(s, rel=1e-6)
    with pytest.raises(UserError, match="4 images but 3 captions"):
        X.clip_score(x, caps[:3], ex)

    dx = X.load_extractor(f"dinov2:{dino_dir}")
    g = dx.embed(x)
    assert g.shape == (4, 32) and dx.size == 28 and "28x28" in dx.describe()["resize"]
    # the wrong architecture for the spec: one line naming what the folder holds
    mixed = clip_dir.parent / "mixed"   # a CLIP config over DINOv2 weights: transformers would init at random
    mixed.mkdir()
    (mixed / "config.json").write_text((clip_dir / "config.json").read_text())
    (mixed / "model.safetensors").write_bytes((dino_dir / "model.safetensors").read_bytes())
    for spec, needle in [(f"clip:{mixed}", "does not match its config.json as a CLIPModel"),(f"clip:{dino_dir}", "holds a 'dinov2' model, not 'clip'"),
                         (f"dinov2:{clip_dir}", "holds a 'clip' model, not 'dinov2'"),
                         (f"clip:{clip_dir / 'nope'}", "is not a folder")]:
        with pytest.raises(UserError, match=needle) as e:
            X.load_extractor(spec)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- folder nets

def test_contrastive_pieces():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    v = _views(x, g)
    assert v.shape == x.shape
    # values are only moved (flip / integer shift with reflection), never resampled
    assert set(v.unique().tolist()) <= set(x.unique().tolist())
    z = torch.randn(6, 8)
    assert nt_xent(z, z) < nt_xent(z, torch.randn(6, 8))


def test_metrics_train_on_a_folder_dataset(tmp_path, capsys):
    data = _folder_dataset(tmp_path / "data")
    out = tmp_path / "feat"
    argv = ["metrics", "train", "--data", str(data), "--out", str(out), "--minutes", "0.01", "--width", "4",
            "--num-features", "32", "--batch-size", "8", "--resolution", "16", "--no-progress"]
    assert _code(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"]["data"] == "folder" and cfg["arch"]["resolution"] == 16
    assert cfg["dataset"]["distinct_images"] == 24 and cfg["heldout"]["num"] == 2
    assert cfg["dataset"]["num_train"] == 22 and "NT-Xent" in cfg["train"]["objective"]
    assert 0 <= cfg["heldout_accuracy"]["retrieval"] <= 1
    net = load_feature_net(out)
    ex = X.load_extractor(str(out))
    imgs = get_dataset(str(data), 16).images(range(24))
    f = ex.embed(imgs)
    assert f.shape == (24, 32) and ex.describe()["data"] == "folder"
    assert retrieval_accuracy(net, imgs) == pytest.approx(retrieval_accuracy(net, imgs))
    # FD of the folder's images against a blurred copy is larger than against themselves
    real = FeatureStats(32).add(f)
    blurred = FeatureStats(32).add(ex.embed(F.avg_pool2d(imgs, 3, 1, 1, count_include_pad=False)))
    # (the self-FD is matrix-square-root round-off: ~1e-8 with 24 samples in 32-d, thread-count dependent)
    assert real.fd(FeatureStats(32).add(f)) < 1e-6 < real.fd(blurred)

    # bad input: too few images, a resolution that is not a multiple of 8, shapes at another resolution
    tiny = _folder_dataset(tmp_path / "tiny", n=3)
    for args, needle in [(["--data", str(tiny)], "at least 4"),
                         (["--data", str(data), "--resolution", "20"], "multiple of 8"),
                         (["--data", "shapes", "--resolution", "64"], "32x32"),
                         (["--data", str(tmp_path / "absent")], "not 'shapes', 'photos' or an existing folder"),
                         (["--data", str(tmp_path)], "--out")]:   # --out inside the dataset folder
        assert _code(["metrics", "train", "--out", str(tmp_path / "o"), "--minutes", "0.01", "--no-progress",
                      *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err
        assert not (tmp_path / "o" / "config.json").exists()
    assert FeatureTrainConfig().resolution == 32
