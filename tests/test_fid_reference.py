"""Our FID Inception port (twostep.metrics.extractors) against the field's: torch-fidelity's
`FeatureExtractorInceptionV3` (the network behind torch-fidelity's and torchmetrics' FID) and its FID formula.

torch-fidelity is installed without its dependencies (`pip install --no-deps --target <venv>/reference/...`,
scripts/setup.sh) and off sys.path: its package `__init__` imports torchvision, which this project never installs,
and torchmetrics imports torch_fidelity whenever it is importable. Its extractor module imports only torch and
three small helper modules of its own package, so the test loads those files directly (importlib from file, under
a bare `torch_fidelity` package entry that has no `__init__` code); `metric_fid.py` is loaded the same way with
its torchvision-importing `utils` replaced by an empty module (its two FID functions use numpy only).

Both networks get the same random weights (BatchNorm statistics calibrated on real activations, so features
depend on the image), saved as the published `.pth`: torch-fidelity reads that file itself, ours reads its
safetensors conversion (`convert_inception`, the product's only path from a .pth).
"""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from twostep.metrics import FeatureStats
from twostep.metrics import extractors as X

TF_VERSION = "0.4.0"   # pinned in constraints.txt


def _tf_dir() -> Path:
    """torch-fidelity's package folder, installed by scripts/setup.sh into <venv>/reference/torch-fidelity (off
    sys.path: torchmetrics imports torch_fidelity, hence torchvision, whenever it is importable)."""
    root = Path(sys.prefix) / "reference" / "torch-fidelity"
    if not (root / f"torch_fidelity-{TF_VERSION}.dist-info").is_dir():
        pytest.fail(f"torch-fidelity {TF_VERSION} is not in {root}: run scripts/setup.sh")
    return root / "torch_fidelity"


@pytest.fixture(scope="module")
def fidelity():
    """torch-fidelity's extractor and FID modules, loaded from their files; sys.modules restored afterwards."""
    root = _tf_dir()
    import torchmetrics.image.fid  # noqa: F401  (first: it probes sys.modules' torch_fidelity, which must be absent)
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    for k in saved:
        del sys.modules[k]
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = []   # a package with no __init__ code and no search path: only what is loaded below exists
    sys.modules["torch_fidelity"] = pkg
    sys.modules["torch_fidelity.utils"] = types.SimpleNamespace(   # metric_fid's import list; unused by FID maths
        get_cacheable_input_name=None, cache_lookup_one_recompute_on_miss=None,
        extract_featuresdict_from_input_id_cached=None, create_feature_extractor=None,
        resolve_feature_extractor=None, resolve_feature_layer_for_metric=None)
    mods = {}
    try:
        for name in ("defaults", "deprecations", "helpers", "feature_extractor_base",
                     "interpolate_compat_tensorflow", "feature_extractor_inceptionv3", "metric_fid"):
            spec = importlib.util.spec_from_file_location(f"torch_fidelity.{name}", root / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            setattr(pkg, name, mod)
            mods[name] = mod
        assert "torchvision" not in sys.modules
        yield mods
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def nets(fidelity, tmp_path_factory):
    d = tmp_path_factory.mktemp("fid_ref")
    torch.manual_seed(0)
    net = X.FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, 96, 96))
    pth = d / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.eval().state_dict(), pth)
    # the loaded reference state dict must be plain tensors (what the test file holds; read as data only)
    assert set(torch.load(pth, weights_only=True)) == set(net.state_dict())
    ours = X.load_extractor(f"inception:{X.convert_inception(pth, d / 'inception.safetensors')}", batch_size=8)
    theirs = fidelity["feature_extractor_inceptionv3"].FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(pth))
    return ours, theirs


def _uint8(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)   # smooth random images (low-frequency noise), as photos are
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def features(nets):
    """Both networks on the same uint8 images: set A = two 32x32 images and one 1024x1024 (batch 1), set B =
    three 299x299. Every image is one Inception pass per network whatever its size (the input is resized to 299),
    so the sizes cost the same; the 1024x1024 one runs alone."""
    ours, theirs = nets
    batches = {"32": _uint8(2, 32, seed=32), "1024": _uint8(1, 1024, seed=1024), "299": _uint8(3, 299, seed=299)}
    out = {}
    with torch.no_grad():
        for k, x in batches.items():
            out[k] = ours.embed(x), theirs(x)[0]
    return out


@pytest.mark.parametrize("size", ["32", "299", "1024"])
def test_pool_features_equal_torch_fidelity(features, size):
    got, want = features[size]
    assert got.shape == want.shape and want.shape[1] == 2048 and got.dtype == torch.float64
    scale = want.abs().max().item()
    assert scale > 0 and (len(got) == 1 or (got[0] - got[1]).abs().max() > 0)   # features depend on the image
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5 * scale)


def test_fid_equals_torch_fidelity(features, fidelity):
    """FID of set A (32x32 and 1024x1024 images) against set B (299x299): torch-fidelity's features and FID
    formula (TTUR's: eigenvalues of sigma1 . sigma2) against ours (our features, FeatureStats.fd = torchmetrics'
    compute). Six images span a 6-d subspace of the 2048-d feature space; both sets' means and covariances lie
    in it, and the Frechet distance is unchanged by an orthonormal change of basis, so both are evaluated in
    that subspace's coordinates (exactly the 2048-d FID, without two 2048x2048 eigenproblems that cost a
    minute each on two cores). The basis comes from torch-fidelity's features and is applied to both."""
    mf = fidelity["metric_fid"]
    ours_a = torch.cat([features["32"][0], features["1024"][0]])
    ours_b = features["299"][0]
    ref_a = torch.cat([features["32"][1], features["1024"][1]]).double()
    ref_b = features["299"][1].double()
    every = torch.cat([ref_a, ref_b])
    basis = torch.linalg.svd(every, full_matrices=False).Vh   # [6, 2048], orthonormal rows
    assert torch.allclose(every @ basis.T @ basis, every, atol=1e-9 * every.abs().max().item())   # lossless
    want = mf.fid_statistics_to_metric(mf.fid_features_to_statistics(ref_a @ basis.T),
                                       mf.fid_features_to_statistics(ref_b @ basis.T),
                                       verbose=False)[mf.KEY_METRIC_FID]
    got = FeatureStats(len(basis)).add(ours_a @ basis.T).fd(FeatureStats(len(basis)).add(ours_b @ basis.T))
    assert want > 0 and np.isfinite(want)
    assert abs(got - want) <= 1e-3 * want, (got, want)
