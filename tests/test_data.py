"""The embedded benchmarks: deterministic, captions name every attribute, crops come from the six photos."""

import torch

from twostep.data import get_dataset
from twostep.data import photos as P
from twostep.data import shapes as S


def test_shapes_deterministic_and_in_range():
    a, b = get_dataset("shapes").sample(20, seed=3), get_dataset("shapes").sample(20, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (20, 3, 32, 32) and a.images.min() >= -1 and a.images.max() <= 1
    c = get_dataset("shapes").sample(20, seed=3, split="test")
    assert c.captions != a.captions  # splits differ


def test_shapes_caption_names_every_attribute():
    ex = get_dataset("shapes").sample(200, seed=0)
    for cap, shape, colour, size, bg in zip(ex.captions, ex.labels["shape"], ex.labels["colour"],
                                            ex.labels["size"], ex.labels["background"]):
        n_obj = int((shape > 0).sum())
        assert 1 <= n_obj <= 3
        assert cap.endswith(f"{S.BACKGROUNDS[bg]} background")
        for cell in range(9):
            if shape[cell] > 0:
                phrase = f"{S.SIZES[size[cell]]} {S.COLOUR_NAMES[colour[cell]]} {S.SHAPES[shape[cell] - 1]} " \
                         f"{S.POSITION_PHRASE[cell]}"
                assert phrase in cap, (phrase, cap)


def test_shapes_object_pixels_have_the_named_colour():
    rng = __import__("numpy").random.default_rng(0)
    objs = [(0, 0, 1, 4)]  # a large red circle in the center
    img = S.render_scene(objs, 0, 32, rng)
    assert tuple(img[16, 16]) == S.COLOURS["red"]
    assert tuple(img[1, 1]) == (15, 15, 15)


def test_shapes_captions_fit_one_sequence_multiple():
    """Every caption ≤ 32 MiniLM tokens: one Z-Image padding multiple, no attention mask needed."""
    from twostep.text import get_encoder
    enc = get_encoder()
    enc._load()
    caps = get_dataset("shapes").sample(300, seed=0).captions
    assert max(len(enc._tok(c)["input_ids"]) for c in caps) <= 32


def test_photos_are_crops_of_the_six_photos():
    assert P.NAMES == ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
    ex = get_dataset("photos").sample(60, seed=0)
    assert ex.images.shape == (60, 3, 32, 32)
    assert set(ex.captions) <= set(P.CAPTIONS)
    for cap, src in zip(ex.captions, ex.labels["source"]):
        assert cap == f"a photo crop of {P.NAMES[src].replace('_', ' ')}"
    assert len(set(ex.labels["source"].tolist())) == 6
    # random position and scale: crops of the same photo differ
    same = ex.images[ex.labels["source"] == 0]
    assert (same[0] - same[1]).abs().mean() > 0.01


def test_shapes_v2_adds_unnamed_variation_v1_kept():
    """v2 (default) rotates and jitters objects the caption does not describe: the same caption renders
    differently; v1 stays reproducible for the recorded v1 numbers."""
    import numpy as np
    assert S.VERSION == 2 and get_dataset("shapes").version == 2
    objs = [(1, 0, 1, 4)]  # a large red square in the center
    a = [S.render_scene(objs, 1, 32, np.random.default_rng(s)) for s in range(8)]
    b = [S.render_scene(objs, 1, 32, np.random.default_rng(s), version=1) for s in range(8)]
    spread = lambda imgs: np.stack(imgs).astype(float).std(0).mean()
    assert spread(a) > 1.5 * spread(b) > 0  # measured 3.8 vs 2.0 (mean per-pixel std over 8 renders)
    v1 = S.Shapes(32, version=1).sample(5, seed=0)
    assert torch.equal(v1.images, S.Shapes(32, version=1).sample(5, seed=0).images)
    assert not torch.equal(v1.images, S.Shapes(32).sample(5, seed=0).images)


def test_eval_refuses_a_benchmark_version_mismatch(tmp_path):
    """A v1 feature net or a v1 model scored against v2 shapes is bad input: one line, naming the fix."""
    import json
    import shutil

    import pytest

    from conftest import make_tiny_teacher
    from twostep.errors import UserError
    from twostep.evaluate import check_data_version
    from twostep.metrics import load_feature_net

    net = load_feature_net("models/features-shapes")
    ds = get_dataset("shapes")
    teacher = json.loads((make_tiny_teacher(tmp_path / "t") / "config.json").read_text())
    check_data_version(ds, net, teacher, "shapes")  # all v2: fine
    with pytest.raises(UserError, match="trained on shapes v1 but the benchmark is v2; retrain"):
        check_data_version(ds, net, {**teacher, "data_version": None}, "shapes")
    old = tmp_path / "features-v1"
    shutil.copytree("models/features-shapes", old)
    cfg = json.loads((old / "config.json").read_text())
    cfg.pop("data_version")
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="feature net .*features-v1 was trained on shapes v1 but the benchmark is v2"):
        check_data_version(ds, load_feature_net(old), teacher, "shapes")
    check_data_version(get_dataset("photos"), net, teacher, "photos")  # unversioned benchmark: nothing to check
