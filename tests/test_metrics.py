"""Metrics: FD/KID through torchmetrics with the committed feature nets, SWD, alignment, PSNR, diversity.

Fast (small N) but meaningful: the committed feature nets must classify held-out data, FD must be ~0 for a
set against itself, small for two real sets, and grow monotonically with blur and with noise.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twostep.data import get_dataset
from twostep.errors import UserError
from twostep.metrics import (DistributionMetrics, alignment, alignment_report, diversity, fd, fd_kid, psnr, swd,
                             swd_levels)
from twostep.metrics.features import FeatureTrainConfig, accuracy, load_feature_net, train_feature_net

ROOT = Path(__file__).resolve().parents[1]
N = 300          # images per set for FD (small: the FD floor between two real sets is then a few units)
BLURS = [0.5, 1.0, 1.5, 2.0]
NOISES = [0.05, 0.1, 0.2]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def add_noise(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module", params=["shapes", "photos"])
def bench(request):
    data = request.param
    net = load_feature_net(ROOT / "models" / f"features-{data}")
    ds = get_dataset(data)
    a = ds.sample(N, seed=0, split="ref")
    b = ds.sample(N, seed=1, split="ref")
    return {"data": data, "net": net, "a": a.images, "b": b.images, "ds": ds}


@pytest.fixture(scope="module")
def shapes_net():
    return load_feature_net(ROOT / "models" / "features-shapes")


# ------------------------------------------------------------------------------------------- feature nets

def test_committed_feature_nets_heldout_accuracy(bench):
    net = bench["net"]
    held = bench["ds"].sample(600, seed=123, split="test")   # fresh: training used seed 0's splits
    acc = accuracy(net, held.images, held.labels)
    expected = {"shapes": {"shape", "empty", "colour", "size", "background", "object"},
                "photos": {"source"}}[bench["data"]]
    assert set(acc) == expected
    for k, v in acc.items():
        assert v >= 0.95, f"{bench['data']} feature net: held-out {k} accuracy {v:.4f} < 0.95"
    cfg = json.loads((ROOT / "models" / f"features-{bench['data']}" / "config.json").read_text())
    assert cfg["command"].startswith(("python -m twostep.metrics.features", "twostep metrics train"))
    assert all(cfg["heldout_accuracy"][k] >= 0.95 for k in expected)
    assert net.num_features == cfg["arch"]["num_features"] == net.embed_images(held.images[:3]).shape[1]


def test_committed_folders_are_small():
    for d in ("shapes", "photos"):
        size = sum(p.stat().st_size for p in (ROOT / "models" / f"features-{d}").iterdir())
        assert size < 2 * 2 ** 20


def test_load_feature_net_errors(tmp_path, shapes_net):
    with pytest.raises(UserError, match="does not exist"):
        load_feature_net(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="config.json: missing"):
        load_feature_net(empty)
    src = ROOT / "models" / "features-shapes"
    cfg_text = (src / "config.json").read_text()
    weights = (src / "model.safetensors").read_bytes()

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(cfg_text)
    with pytest.raises(UserError, match="missing"):
        load_feature_net(no_weights)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(cfg_text)
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_feature_net(corrupt)

    bad_cfg = tmp_path / "bad_cfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text("{not json")
    (bad_cfg / "model.safetensors").write_bytes(weights)
    with pytest.raises(UserError, match="not a valid feature-net config"):
        load_feature_net(bad_cfg)

    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    cfg = json.loads(cfg_text)
    cfg["arch"]["width"] = 16
    (mismatch / "config.json").write_text(json.dumps(cfg))
    (mismatch / "model.safetensors").write_bytes(weights)
    with pytest.raises(UserError, match="do not match"):
        load_feature_net(mismatch)


def test_train_feature_net_smoke(tmp_path):
    out = tmp_path / "feat"
    cfg = train_feature_net(FeatureTrainConfig("photos", minutes=0.01, num_train=32, num_test=16, width=8,
                                               num_features=32), out, progress=False)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["heldout_accuracy"] == cfg["heldout_accuracy"] and "source" in saved["heldout_accuracy"]
    assert "--data photos" in saved["command"] and saved["train"]["steps"] >= 1
    net = load_feature_net(out)
    assert net.num_features == 32 and not net.training
    x = get_dataset("photos").sample(4, seed=0).images
    assert net.embed_images(x).shape == (4, 32)


# ------------------------------------------------------------------------------------------------ FD / KID

def test_fd_self_zero_and_real_sets_close(bench):
    net, a, b = bench["net"], bench["a"], bench["b"]
    vs_real = DistributionMetrics(net, a, kid_subsets=20)
    same = vs_real(a)
    assert same["fd"] < 1e-6 and abs(same["kid_mean"]) < 0.05
    base = vs_real(b)                              # another real set: only the finite-sample floor
    blurred = [vs_real(gaussian_blur(b, s)) for s in (1.0, 2.0)]
    assert 0 < base["fd"] < blurred[1]["fd"] / 3, (base, blurred)
    assert base["kid_std"] > 0
    # blur σ ≥ 1 stands out of the real-vs-real floor, in FD and in KID
    assert base["fd"] < blurred[0]["fd"] < blurred[1]["fd"]
    assert base["kid_mean"] < blurred[0]["kid_mean"] < blurred[1]["kid_mean"]
    # the one-call helpers agree with each other
    fd1, kid1, _ = fd_kid(a[:64], b[:64], net, kid_subsets=5)
    assert fd1 == pytest.approx(fd(a[:64], b[:64], net), rel=1e-9) and math.isfinite(kid1)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fd_matches_scipy_on_the_same_features(bench):
    from scipy import linalg

    net, a, b = bench["net"], bench["a"], bench["b"]
    fa, fb = net.embed_images(a).double().numpy(), net.embed_images(b).double().numpy()
    mu1, mu2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert fd(a, b, net) == pytest.approx(ref, rel=1e-4)


def test_fd_grows_with_blur_and_noise(bench):
    net, a, b = bench["net"], bench["a"], bench["b"]
    vs_clean = DistributionMetrics(net, b, kid_subsets=10)     # degraded copies of b vs b itself
    blur = [vs_clean(gaussian_blur(b, s))["fd"] for s in BLURS]
    assert all(x < y for x, y in zip([0.0] + blur, blur)), f"FD vs blur {BLURS}: {blur}"
    noise = [vs_clean(add_noise(b, s))["fd"] for s in NOISES]
    assert all(x < y for x, y in zip([0.0] + noise, noise)), f"FD vs noise {NOISES}: {noise}"


def test_distribution_metrics_inputs(shapes_net):
    x = get_dataset("shapes").sample(8, seed=0).images
    with pytest.raises(UserError, match=r"\[N, 3, H, W\]"):
        fd(x[:, :1], x, shapes_net)
    with pytest.raises(UserError, match="kid_subset_size"):
        fd_kid(x, x, shapes_net, kid_subset_size=50)
    # uint8 [0, 255] and other resolutions are accepted (converted / resized)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert fd(x, u8, shapes_net) < 1e-2
    assert math.isfinite(fd(x, F.interpolate(x, size=64, mode="nearest"), shapes_net))


# ----------------------------------------------------------------------------------------------------- SWD

def test_swd_grows_with_blur(bench):
    a, b = bench["a"][:200], bench["b"][:200]
    kw = {"nhoods_per_image": 64}
    # σ = 0.5 is below the finite-sample floor of two real sets at this N on shapes (flat regions, few edges)
    sigmas = [1.0, 1.5, 2.0]
    levels = [swd_levels(a, b, **kw)] + [swd_levels(a, gaussian_blur(b, s), **kw) for s in sigmas]
    fine = [lv[0] for lv in levels]
    mean = [sum(lv) / len(lv) for lv in levels]
    assert all(x < y for x, y in zip(fine, fine[1:])), f"finest-level SWD vs blur [0] + {sigmas}: {fine}"
    assert all(x < y for x, y in zip(mean, mean[1:])), f"SWD vs blur [0] + {sigmas}: {mean}"
    assert swd(a, b, **kw) == pytest.approx(mean[0])       # seeded: repeatable; swd = mean over levels
    assert len(levels[0]) == 2                             # 32² band-pass + 16² low-pass at min_res 16


# ------------------------------------------------------------------------------------------------ alignment

def test_alignment_real_vs_shuffled(shapes_net):
    ex = get_dataset("shapes").sample(400, seed=7, split="test")
    assert alignment(ex.images, ex.labels, shapes_net) >= 0.95
    rep = alignment_report(ex.images, ex.labels, shapes_net)
    assert rep["extra_objects"] < 0.02 and rep["background"] >= 0.95 and rep["image"] >= 0.9
    shuffled = {k: v.roll(1, dims=0) for k, v in ex.labels.items()}
    assert alignment(ex.images, shuffled, shapes_net) < 0.2


def test_alignment_needs_shapes_net():
    photos_net = load_feature_net(ROOT / "models" / "features-photos")
    ex = get_dataset("shapes").sample(4, seed=0)
    with pytest.raises(UserError, match="shapes attribute classifier"):
        alignment(ex.images, ex.labels, photos_net)


# ------------------------------------------------------------------------------------------- PSNR, diversity

def test_psnr():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    assert psnr(a, a) == math.inf
    sign = torch.randint(0, 2, a.shape, generator=g).float() * 2 - 1
    assert psnr(a, a + 0.1 * sign) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-6)   # 26.02 dB
    with pytest.raises(UserError):
        psnr(a, a[:2])


def test_diversity(shapes_net):
    x = get_dataset("shapes").sample(6, seed=0).images
    same = torch.cat([x[:1]] * 3 + [x[1:2]] * 3)
    assert diversity(same, ["p"] * 3 + ["q"] * 3, shapes_net) == pytest.approx(0.0, abs=1e-5)
    assert diversity(x, [0, 0, 0, 1, 1, 1], shapes_net) > 0.1
    # pixel space: two samples differing by a constant c have RMS distance c
    y = torch.zeros(2, 3, 4, 4)
    y[1] += 0.5
    assert diversity(y, ["p", "p"], space="pixels") == pytest.approx(0.5)
    with pytest.raises(UserError, match="2 or more samples"):
        diversity(x[:2], ["p", "q"], shapes_net)
