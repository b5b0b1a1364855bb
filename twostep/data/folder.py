"""A folder dataset: images + `captions.jsonl` (the Hugging Face `imagefolder` convention).

    my_data/
      captions.jsonl        one JSON object per line: {"file_name": "cat.png", "text": "a photo of a cat"}
      cat.png
      sub/dog.jpg           file_name is relative to the folder; sub-folders are fine

Rules (decided here, documented for users):
- Every line is one example. Blank lines are ignored; extra keys besides file_name/text are ignored; the same
  image may appear on several lines (several captions); a leading UTF-8 BOM is accepted. An empty caption ""
  is allowed (it is an unconditional example). Images not named in captions.jsonl are ignored.
- Images are read with PIL, EXIF orientation applied, converted to RGB (grayscale, palette, CMYK, 16-bit
  and images with alpha, which are composited on white; `converted` counts them), center-cropped to a
  square (or, for `resolution=(height, width)`, to the largest centered box of that aspect ratio) and resized to
  `resolution` with PIL's antialiased bicubic filter. Images smaller than the resolution are upscaled (allowed,
  counted in `upscaled`). Values are float32 in [-1, 1].
- All images are decoded once, at construction, and kept in memory as uint8 (3·res² bytes per image), so a
  corrupt file fails up front rather than hours into training.
- Errors are `UserError`s on one line naming the file (and the captions.jsonl line) and the fix. With
  `skip_bad=True` bad lines and unreadable images are skipped, counted in `skipped` (reasons in
  `skip_reasons`) and summarised on one stderr line. A folder with no usable example is always an error.
- A folder has no held-out split: "train", "test" and "ref" all draw from all examples, each with its own
  seed (`split_seed`), so "test" is not disjoint from "train".
- `decode=False` (captions only, e.g. the prompts of `teacher cache --data FOLDER`): captions.jsonl is checked by
  the same rules and each named image must exist, but no image is opened, so memory is the captions only.
  `captions_sample(n, seed, split)` draws the same captions `sample` would when every image decodes (a corrupt
  image that --skip-bad would drop is kept: it is never read).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import Examples, split_seed

CAPTIONS = "captions.jsonl"
MAX_SHOWN = 120  # characters of an offending value / exception message shown in an error


def _short(s: str, n: int = MAX_SHOWN) -> str:
    s = " ".join(str(s).split())  # one line
    return s if len(s) <= n else s[: n - 3] + "..."


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(v), type(v).__name__)


class _Bad(Exception):
    """A bad line or image: `where: reason` is the one-line message, `kind` the short reason for the summary."""

    def __init__(self, where: str, reason: str, kind: str, lineno: int = 0):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason, self.kind, self.lineno = where, reason, kind, lineno


def _to_rgb(im):
    """Any PIL mode → RGB; images with alpha are composited on white. Returns (image, was_converted)."""
    from PIL import Image

    if im.mode == "RGB":
        return im, False
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if a.size and np.nanmax(a) > 255:  # 16-bit (or wider) grayscale: scale to 8 bits
            a = a * (255.0 / 65535.0)
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB"), True
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), True
    return im.convert("RGB"), True


def _crop_box(w: int, h: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """The largest centered (left, top, right, bottom) box of aspect out_w:out_h in a w×h image (square: the
    min(w, h) square, as always)."""
    if w * out_h > h * out_w:  # wider than the target: full height
        ch, cw = h, min(w, max(1, round(h * out_w / out_h)))
    else:
        cw, ch = w, min(h, max(1, round(w * out_h / out_w)))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _load_image(path: Path, resolution) -> tuple[np.ndarray, bool, bool]:
    """Decode, orient, convert, center-crop and resize one image → (uint8 [3, H, W], converted, upscaled);
    `resolution` is the side R (square) or (H, W).

    Raises _Bad-free plain exceptions; the caller turns any failure into a one-line message.
    """
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # absurdly large → unreadable
        with Image.open(path) as im:
            im.verify()  # structural check (checksums of PNG chunks, etc.)
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files (LOAD_TRUNCATED_IMAGES stays False)
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # malformed EXIF: keep the stored orientation
                pass
            im, converted = _to_rgb(im)
            w, h = im.size
            if w < 1 or h < 1:
                raise ValueError("image has zero size")
            oh, ow = (resolution, resolution) if isinstance(resolution, int) else resolution
            box = _crop_box(w, h, oh, ow)
            out = im.resize((ow, oh), Image.Resampling.BICUBIC, box=box)
            a = np.asarray(out, dtype=np.uint8)
    if a.shape != (oh, ow, 3):
        raise ValueError(f"decoded to shape {a.shape}")
    return np.ascontiguousarray(a.transpose(2, 0, 1)), converted, box[3] - box[1] < oh or box[2] - box[0] < ow


class FolderDataset:
    """Images + captions.jsonl in a folder; see the module docstring for the rules."""

    has_attributes = False

    def __init__(self, path, resolution: int = 32, skip_bad: bool = False, progress: bool | None = None,
                 decode: bool = True):
        self.path = Path(path)
        self.decode = bool(decode)
        self.name = self.path.resolve().name or str(self.path)
        # an int side (square), or (height, width) for non-square models (twostep.model.sample_hw)
        self.height, self.width = ((int(resolution),) * 2 if isinstance(resolution, (int, np.integer))
                                   else (int(resolution[0]), int(resolution[1])))
        self.resolution = self.height if self.height == self.width else (self.height, self.width)
        self.skip_bad = bool(skip_bad)
        self.skipped = 0
        self.skip_reasons: list[str] = []
        self.converted = 0
        self.upscaled = 0
        if min(self.height, self.width) < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not a folder; pass a folder holding images and {CAPTIONS}")
        self.captions_file = self.path / CAPTIONS
        entries, n_lines = self._read_captions()
        self._load_images(entries, progress)
        if self.skipped:
            self._bad.sort(key=lambda b: b.lineno)
            self.skip_reasons = [str(b) for b in self._bad]
            kinds = Counter(r.kind for r in self._bad)
            what = ", ".join(f"{v} {k}" for k, v in kinds.most_common())
            print(f"warning: {self.captions_file}: skipped {self.skipped} of {n_lines} caption lines ({what}); "
                  f"first: {self.skip_reasons[0].rsplit('; ', 1)[0]}", file=sys.stderr)
        if not self.captions:
            if self.skipped:
                raise UserError(f"{self.path}: no usable examples (all {self.skipped} caption lines were skipped; "
                                f"first: {self.skip_reasons[0].rsplit('; ', 1)[0]}); fix {CAPTIONS} or the images")
            raise UserError(f"{self.captions_file}: no examples (no caption lines); add one line per image like "
                            '{"file_name": "a.png", "text": "a caption"}')

    # -- captions.jsonl ---------------------------------------------------------------------------------
    def _bad_item(self, err: _Bad, lineno: int):
        err.lineno = lineno
        if not self.skip_bad:
            raise UserError(str(err))
        self.skipped += 1
        self._bad.append(err)
        self.skip_reasons.append(str(err))

    def _read_captions(self) -> tuple[list[tuple[int, str, str]], int]:
        cap = self.captions_file
        self._bad: list[_Bad] = []
        if not cap.exists():
            raise UserError(f"{cap}: missing; a folder dataset needs {CAPTIONS} with one line per image like "
                            '{"file_name": "a.png", "text": "a caption"} (Hugging Face imagefolder format)')
        if not cap.is_file():
            raise UserError(f"{cap}: not a file; it must be a JSON-lines file of "
                            '{"file_name": ..., "text": ...} objects')
        try:
            raw = cap.read_bytes()
        except OSError as e:
            raise UserError(f"{cap}: unreadable ({_short(e)}); check its permissions")
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        entries: list[tuple[int, str, str]] = []
        n_lines = 0
        fix = "fix the line or pass --skip-bad"
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            n_lines += 1
            where = f"{cap} line {lineno}"
            try:
                try:
                    text_line = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _Bad(where, f"not valid UTF-8 (byte {e.start}); save the file as UTF-8 or pass "
                               "--skip-bad", "not UTF-8")
                try:
                    obj = json.loads(text_line)
                except json.JSONDecodeError as e:
                    raise _Bad(where, f"not valid JSON ({e.msg} at column {e.colno}); {fix}", "invalid JSON")
                except (ValueError, RecursionError) as e:  # e.g. absurdly deep nesting
                    raise _Bad(where, f"not valid JSON ({_short(e)}); {fix}", "invalid JSON")
                if not isinstance(obj, dict):
                    raise _Bad(where, f'expected a JSON object {{"file_name": ..., "text": ...}}, got '
                               f"{_type_name(obj)}; {fix}", "not an object")
                for key in ("file_name", "text"):
                    if key not in obj:
                        raise _Bad(where, f'missing "{key}" (keys: {_short(sorted(obj), 60)}); {fix}',
                                   f"missing {key}")
                    if not isinstance(obj[key], str):
                        raise _Bad(where, f'"{key}" must be a string, got {_type_name(obj[key])}; {fix}',
                                   f"bad {key}")
                fname, text = obj["file_name"], obj["text"]
                for key, v in (("file_name", fname), ("text", text)):
                    try:
                        v.encode("utf-8")
                    except UnicodeEncodeError:  # lone surrogates such as "\ud800"
                        raise _Bad(where, f'"{key}" holds an invalid unicode escape (lone surrogate); {fix}',
                                   f"bad {key}")
                bad_name = (not fname.strip() or "\x00" in fname or os.path.isabs(fname)
                            or ".." in Path(fname).parts)
                if bad_name:
                    raise _Bad(where, f'"file_name" {_short(repr(fname), 80)} must be a path relative to '
                               f"{self.path} inside it; {fix}", "bad file_name")
                entries.append((lineno, fname, text))
            except _Bad as err:
                self._bad_item(err, lineno)
        return entries, n_lines

    # -- images -----------------------------------------------------------------------------------------
    def _load_images(self, entries, progress):
        cap = self.captions_file
        by_name: dict[str, int] = {}   # file_name → row in the image table (each file decoded once)
        failed: dict[str, _Bad] = {}
        images: list[np.ndarray] = []
        self.captions: list[str] = []
        self.file_names: list[str] = []
        self.lines: list[int] = []
        index: list[int] = []
        it = entries
        if progress or (progress is None and len(entries) > 2000):
            from tqdm.auto import tqdm
            it = tqdm(entries, desc=f"load images ({self.name})", unit="img", file=sys.stderr)
        for lineno, fname, text in it:
            where = f"{cap} line {lineno}"
            if fname in failed:
                err = failed[fname]
                self._bad_item(_Bad(where, err.reason, err.kind), lineno)
                continue
            if fname not in by_name:
                p = self.path / fname
                if not os.path.isfile(p):  # isfile never raises (long names, odd bytes → False)
                    what = "is not a file" if os.path.exists(p) else "not found"
                    err = _Bad(where, f"image {_short(repr(fname), 80)} {what} in {self.path}; add the file, "
                               "fix the line, or pass --skip-bad", "missing image")
                    failed[fname] = err
                    self._bad_item(err, lineno)
                    continue
                if not self.decode:  # captions only: the file exists, it is never opened
                    by_name[fname] = len(by_name)
                    index.append(by_name[fname])
                    self.captions.append(text)
                    self.file_names.append(fname)
                    self.lines.append(lineno)
                    continue
                try:
                    a, conv, up = _load_image(p, self.resolution)
                except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                    err = _Bad(where, f"image {_short(repr(fname), 80)} is unreadable ({type(e).__name__}: "
                               f"{_short(e)}); replace the file, remove its line, or pass --skip-bad",
                               "unreadable image")
                    failed[fname] = err
                    self._bad_item(err, lineno)
                    continue
                by_name[fname] = len(images)
                images.append(a)
                self.converted += int(conv)
                self.upscaled += int(up)
            index.append(by_name[fname])
            self.captions.append(text)
            self.file_names.append(fname)
            self.lines.append(lineno)
        self._images = (torch.from_numpy(np.stack(images)) if images
                        else torch.zeros(0, 3, self.height, self.width, dtype=torch.uint8))
        self._index = torch.tensor(index, dtype=torch.long)

    # -- the dataset interface -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.captions)

    def images(self, idx) -> torch.Tensor:
        """float32 [len(idx), 3, H, W] in [-1, 1] for example indices `idx`."""
        if not self.decode:
            raise RuntimeError("FolderDataset(decode=False) holds captions only; use captions_sample()")
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return self._images[self._index[idx]].float() / 127.5 - 1

    def sample(self, n: int, seed: int = 0, split: str = "train") -> Examples:
        """n examples, deterministic for (seed, split): a random permutation prefix when n <= len(self), else
        draws with replacement. Every split draws from all examples (a folder has no held-out split)."""
        idx = self._draw(n, seed, split)
        return Examples(self.images(idx), [self.captions[i] for i in idx.tolist()], None)

    def captions_sample(self, n: int, seed: int = 0, split: str = "train") -> list[str]:
        """The captions `sample(n, seed, split)` gives, without touching an image (works with decode=False)."""
        return [self.captions[i] for i in self._draw(n, seed, split).tolist()]

    def _draw(self, n: int, seed: int, split: str) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng(split_seed(seed, split))
        size = len(self)
        idx = rng.permutation(size)[:n] if n <= size else rng.integers(0, size, size=n)
        return torch.from_numpy(np.asarray(idx, dtype=np.int64))

    def summary(self) -> str:
        return (f"{self.path}: {len(self)} examples ({len(self._images)} images), {self.skipped} skipped, "
                f"{self.converted} converted to RGB, {self.upscaled} upscaled to "
                f"{self.resolution if self.height == self.width else f'{self.height}x{self.width}'}px")
