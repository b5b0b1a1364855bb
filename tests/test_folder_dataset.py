"""FolderDataset: images + captions.jsonl; every bad input is a one-line UserError naming file and line."""

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from twostep.data import get_dataset
from twostep.data.folder import FolderDataset
from twostep.errors import UserError


def png_bytes(w=40, h=30, mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    elif mode == "L":
        im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    else:
        im = Image.new(mode, (w, h))
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


GOOD_PNG = png_bytes()


def write_folder(root: Path, lines, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    body = b"\n".join(l if isinstance(l, bytes) else (l if isinstance(l, str) else json.dumps(l)).encode()
                      for l in lines)
    (root / "captions.jsonl").write_bytes(body + b"\n")
    return root


def good_folder(root: Path, n=5) -> Path:
    files = {f"img{i}.png": png_bytes(40 + i, 30, seed=i) for i in range(n)}
    lines = [{"file_name": f"img{i}.png", "text": f"caption {i}"} for i in range(n)]
    return write_folder(root, lines, files)


def test_good_folder_loads(tmp_path):
    ds = get_dataset(str(good_folder(tmp_path / "mydata")), resolution=16)
    assert isinstance(ds, FolderDataset)
    assert ds.name == "mydata" and ds.resolution == 16 and ds.has_attributes is False and len(ds) == 5
    ex = ds.sample(3, seed=1)
    assert ex.images.shape == (3, 3, 16, 16) and ex.images.dtype == torch.float32
    assert ex.images.min() >= -1 and ex.images.max() <= 1 and ex.labels is None
    assert len(set(ex.captions)) == 3  # n <= size: a permutation prefix, no repeats
    again = ds.sample(3, seed=1)
    assert torch.equal(again.images, ex.images) and again.captions == ex.captions
    assert sorted(ds.sample(5, seed=3).captions) == sorted(ds.captions)  # a full permutation
    big = ds.sample(12, seed=2)  # n > size: with replacement
    assert len(big) == 12 and set(big.captions) <= set(ds.captions)
    assert ds.sample(0).images.shape == (0, 3, 16, 16)
    assert ds.skipped == 0 and ds.converted == 0 and ds.upscaled == 0


def test_modes_converted_crop_and_upscale(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent → white
    pal = Image.new("P", (20, 20))
    b16 = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    strip = np.zeros((32, 96, 3), np.uint8)  # red | green | blue thirds → the center crop is green
    strip[:, :32, 0] = 255
    strip[:, 32:64, 1] = 255
    strip[:, 64:, 2] = 255
    files = {}
    for name, im in [("rgba.png", rgba), ("pal.png", pal), ("b16.png", b16), ("strip.png", Image.fromarray(strip)),
                     ("tiny.png", Image.new("RGB", (4, 4), (0, 0, 255))),
                     ("gray.jpg", Image.fromarray(np.full((20, 20), 128, np.uint8)))]:
        b = io.BytesIO()
        im.save(b, format="JPEG" if name.endswith(".jpg") else "PNG")
        files[name] = b.getvalue()
    lines = [{"file_name": n, "text": n, "extra": 1} for n in files] + ["", "   "]
    ds = FolderDataset(write_folder(tmp_path / "d", lines, files), resolution=8)
    assert len(ds) == 6 and ds.converted == 4 and ds.upscaled == 1  # rgba, pal, b16, gray; tiny.png
    x = {c: ds.images([i])[0] for i, c in enumerate(ds.captions)}
    assert torch.allclose(x["rgba.png"], torch.ones(3, 8, 8))
    assert torch.allclose(x["b16.png"], torch.ones(3, 8, 8))
    s = x["strip.png"][:, :, 1:-1]  # (PIL's filter reads a little past the crop box at the edges)
    assert s[1].min() > 0.9 and s[0].max() < -0.9 and s[2].max() < -0.9
    t = x["tiny.png"]
    assert t[2].min() > 0.99 and t[0].max() < -0.99


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def _trunc(b):
    return b[: len(b) // 2]


BAD_CASES = {
    "invalid_json": ([b'{"file_name": "a.png", "text": '], {}, "not valid JSON"),
    "not_object": (["[1, 2]"], {}, "expected a JSON object"),
    "missing_file_name": ([{"text": "x"}], {}, 'missing "file_name"'),
    "missing_text": ([{"file_name": "a.png"}], {}, 'missing "text"'),
    "text_not_string": ([{"file_name": "a.png", "text": 3}], {}, '"text" must be a string'),
    "file_name_not_string": ([{"file_name": None, "text": "x"}], {}, '"file_name" must be a string'),
    "absolute_path": ([{"file_name": "/etc/passwd", "text": "x"}], {}, "must be a path relative"),
    "escapes_folder": ([{"file_name": "../a.png", "text": "x"}], {}, "must be a path relative"),
    "not_utf8": ([b'{"file_name": "a.png", "text": "\xff\xfe"}'], {}, "not valid UTF-8"),
    "lone_surrogate": (['{"file_name": "a.png", "text": "\\ud800"}'], {}, "lone surrogate"),
    "missing_image": ([{"file_name": "nope.png", "text": "x"}], {}, "'nope.png' not found"),
    "directory_image": ([{"file_name": "sub", "text": "x"}], {"sub/x.png": GOOD_PNG}, "is not a file"),
    "random_bytes_image": ([{"file_name": "b.png", "text": "x"}], {"b.png": b"\x00garbage" * 10}, "unreadable"),
    "truncated_png": ([{"file_name": "b.png", "text": "x"}], {"b.png": _trunc(png_bytes(64, 64))}, "unreadable"),
    "empty_image_file": ([{"file_name": "b.png", "text": "x"}], {"b.png": b""}, "unreadable"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_user_error(tmp_path, case):
    bad_lines, files, needle = BAD_CASES[case]
    # line 1 and 2 good, the bad line is line 3
    lines = [{"file_name": "a.png", "text": "good"}, {"file_name": "a.png", "text": "good 2"}] + bad_lines
    root = write_folder(tmp_path / "d", lines, {"a.png": GOOD_PNG, **files})
    with pytest.raises(UserError) as e:
        FolderDataset(root)
    msg = one_line(e)
    assert f"captions.jsonl line 3:" in msg and needle in msg and "--skip-bad" in msg, msg
    ds = FolderDataset(root, skip_bad=True)  # the same folder with --skip-bad
    assert len(ds) == 2 and ds.skipped == 1 and needle in ds.skip_reasons[0]


def test_missing_captions_and_empty_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(GOOD_PNG)
    with pytest.raises(UserError) as e:
        FolderDataset(tmp_path / "d")
    assert "captions.jsonl: missing" in one_line(e)
    (tmp_path / "d" / "captions.jsonl").write_text("\n\n")
    for skip in (False, True):
        with pytest.raises(UserError) as e:
            FolderDataset(tmp_path / "d", skip_bad=skip)
        assert "captions.jsonl: no examples" in one_line(e)
    with pytest.raises(UserError) as e:
        FolderDataset(tmp_path / "nowhere")
    assert "not a folder" in one_line(e)


def test_skip_bad_counts_and_summarises(tmp_path, capsys):
    lines = [{"file_name": "a.png", "text": "a"}, "{oops", {"file_name": "gone.png", "text": "g"},
             {"file_name": "bad.png", "text": "b"}, {"file_name": "bad.png", "text": "b again"},
             {"file_name": "a.png", "text": "a again"}]
    root = write_folder(tmp_path / "d", lines, {"a.png": GOOD_PNG, "bad.png": b"nope"})
    with pytest.raises(UserError):
        FolderDataset(root)
    capsys.readouterr()
    ds = FolderDataset(root, skip_bad=True)
    assert ds.captions == ["a", "a again"] and ds.skipped == 4 and len(ds.skip_reasons) == 4
    assert [r.split(":")[0].rsplit(" ", 1)[-1] for r in ds.skip_reasons] == ["2", "3", "4", "5"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 4 of 6 caption lines" in err[0]
    # all bad → an error even with skip_bad
    root2 = write_folder(tmp_path / "e", ["{oops", {"file_name": "gone.png", "text": "g"}], {})
    with pytest.raises(UserError) as e:
        FolderDataset(root2, skip_bad=True)
    assert "no usable examples" in one_line(e)


# ---- fuzzing: only success or a one-line UserError, never another exception --------------------------------

NAMES = ["a.png", "b.png", "c.jpg", "sub/d.png"]
json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                        st.sampled_from(NAMES), st.lists(st.integers(), max_size=2))
obj_lines = st.dictionaries(st.sampled_from(["file_name", "text", "other"]), json_values, max_size=3).map(json.dumps)
name_lines = st.builds(lambda n, t: json.dumps({"file_name": n, "text": t}), st.sampled_from(NAMES + ["x/../a.png"]),
                       st.text(max_size=10))
lines = st.lists(st.one_of(name_lines, name_lines, name_lines, st.binary(max_size=40), obj_lines,
                           st.text(max_size=30)), max_size=6)  # name_lines weighted up: reach the images
image_bytes = st.one_of(st.binary(max_size=200), st.just(GOOD_PNG), st.just(png_bytes(8, 8, "L")),
                        st.builds(lambda k: GOOD_PNG[:k], st.integers(0, len(GOOD_PNG))),
                        st.builds(lambda k, v: GOOD_PNG[:k] + bytes([v]) + GOOD_PNG[k + 1:],
                                  st.integers(0, len(GOOD_PNG) - 1), st.integers(0, 255)))
images = st.dictionaries(st.sampled_from(NAMES), image_bytes, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=lines, files=images, skip=st.booleans())
def test_fuzz_reader_only_user_errors(lines, files, skip):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        root.mkdir()
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        (root / "captions.jsonl").write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode("utf-8", "surrogatepass")
                                                         for l in lines))
        try:
            ds = FolderDataset(root, resolution=8, skip_bad=skip)
        except UserError as e:
            assert "\n" not in str(e) and str(e)
            return
        ex = ds.sample(3)
        assert ex.images.shape == (3, 3, 8, 8) and len(ex.captions) == 3
        assert ex.images.min() >= -1 and ex.images.max() <= 1
