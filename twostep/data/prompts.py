"""Prompt files: a plain list of prompts for `teacher cache`, `eval` and `sample` (`--prompts FILE`).

Formats (by extension, case-insensitive):
  .txt      one prompt a line, used verbatim (only the line ending "\\n" or "\\r\\n" is removed)
  .jsonl    one JSON object a line; the prompt is under `key` (`--prompt-key`) or else the first of
            "text", "prompt", "caption" the object has
  .csv      a header row naming the columns; the prompt column is `key` or else the first of text/prompt/caption
            (stdlib csv: quoted fields may hold commas and newlines)
  .parquet  a string column named like a .csv's, read with pyarrow one record batch at a time

Rules (decided here, documented for users):
- Streamed: the file is read once, line by line (Parquet: batch by batch), and only the drawn prompts are kept,
  so a 1,000,000-line file with `num=2000` holds ~2000 prompts (plus one read buffer) in memory.
- A bad record is a one-line UserError naming the file, its line (Parquet: its row, counting from 0) and the
  fix: an empty or whitespace-only prompt, a line that is not UTF-8, holds a NUL byte or is longer than 1 MiB,
  invalid JSON, a JSON value that is not an object, a missing key/column, a prompt that is not a string (or a
  Parquet null). With `skip_bad=True` bad records are skipped, counted and summarised on one stderr line.
  Blank lines at the end of a file are ignored (an editor's trailing newlines); a blank line anywhere else is an
  empty prompt. A file with no usable prompt is always an error, so is a binary file (NUL bytes in its first
  8 KiB) and a UTF-16 one.
- The held-out split (`HOLDOUT`): a prompt is held out when a salted hash of its text falls in the lowest
  `HOLDOUT.fraction` (5 %), so the rule needs no count, the same text is always on the same side (duplicates
  never leak across), and adding lines to a file moves no other prompt. split="train" draws from the rest,
  "test" and "ref" from the held-out prompts (each split with its own seed), "all" from every prompt. A file
  with fewer than `HOLDOUT.min_prompts` (100) usable prompts has no held-out split: every split draws from all
  of them (with a warning when "test"/"ref" asks), like a folder dataset.
- The draw: every record gets a priority, a 64-bit mix of (seed, split, its ordinal among the file's records,
  bad ones included, so the same prompts in any of the four formats draw alike); the ceil(num / seeds_per_prompt)
  eligible records of lowest priority are drawn, in priority order (a uniform sample without replacement, in a
  random order, independent of numpy's version). A split holding fewer prompts than that is refused (UserError
  naming the count needed and the file size that gives it), unless `allow_repeats`: then all of them are taken
  in that order, then again in a fresh order per round ("epoch"), so every prompt is used as evenly as possible,
  and the draw's record counts the repeats. Each drawn prompt is repeated `seeds_per_prompt` times in a row
  (the cache gives each row its own noise) and the list is cut to `num`.
- Every draw counts the file's prompts and both splits (`draw_prompts` returns them; `describe_draw` is the line
  the commands print, and the cache manifest and eval record keep the counts).
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..io.files import sha256_file

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
KEYS = ("text", "prompt", "caption")   # looked up in this order when no key is given
SPLITS = ("train", "test", "ref", "all")
MAX_LINE_BYTES = 1 << 20                # a longer line is a bad record (and is never held in memory whole)
SNIFF_BYTES = 8192                      # NUL bytes here: a binary file
PARQUET_BATCH = 8192                    # rows per pyarrow record batch
MAX_SHOWN = 120                         # characters of an offending value shown in an error
FORMATS_HELP = ("a .txt (one prompt a line), .jsonl (key text/prompt/caption or --prompt-key), .csv or .parquet "
                "(column text/prompt/caption or --prompt-key) file")

__all__ = ["FORMATS", "HOLDOUT", "Holdout", "KEYS", "SPLITS", "describe_draw", "draw_prompts", "head_prompts",
           "prompt_file_identity", "read_prompts", "repeat_prompts"]


@dataclass(frozen=True)
class Holdout:
    """The held-out split rule (module docstring). `held_out(text)` decides one prompt."""

    fraction: float = 0.05
    min_prompts: int = 100
    salt: str = "twostep-holdout-v1"

    def held_out(self, text: str) -> bool:
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=self.salt.encode()).digest()
        return int.from_bytes(h, "little") < self.fraction * 2.0 ** 64

    def describe(self) -> dict:
        return {"rule": "blake2b(text, key=salt) < fraction", **asdict(self)}


HOLDOUT = Holdout()

_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): a bijection on 64-bit integers."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _draw_key(seed: int, split: str, epoch: int) -> int:
    h = hashlib.blake2b(f"twostep-prompts:{int(seed)}:{split}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def _short(s, n: int = MAX_SHOWN) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(v), type(v).__name__)


# -- reading records --------------------------------------------------------------------------------------------
def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if not path.exists():
        raise UserError(f"{path}: prompt file not found; --prompts takes {FORMATS_HELP}")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; --prompts takes {FORMATS_HELP} (a folder dataset goes to --data)")
    if not path.is_file():  # os.stat, never open: reading a FIFO would block for ever, a device never end
        raise UserError(f"{path}: not a regular file (a FIFO, socket or device); --prompts takes {FORMATS_HELP}, "
                        "saved to disk")
    if fmt is None:
        what = f"unknown prompt file type {path.suffix!r}" if path.suffix else "no file extension to tell its format"
        raise UserError(f"{path}: {what}; --prompts takes {FORMATS_HELP}")
    return fmt


class _Reader:
    """Yields (index, text) for each usable prompt of one file, index = the record's ordinal among all records
    (so the same prompts as .txt, .jsonl, .csv or .parquet draw alike); bad records raise or are counted."""

    def __init__(self, path, key=None, skip_bad=False):
        self.path = Path(path)
        self.fmt = _format(self.path)
        if key is not None and (not isinstance(key, str) or not key):
            raise UserError(f"--prompt-key {key!r}: must be a non-empty name of a JSON key or column")
        if key is not None and self.fmt == "txt":
            raise UserError(f"{self.path}: a .txt file holds one prompt a line and has no keys; drop --prompt-key "
                            f"{key!r} (or use a .jsonl/.csv/.parquet file)")
        self.key, self.skip_bad = key, bool(skip_bad)
        self.records = 0            # usable + bad
        self.bad: list[str] = []
        self.kinds: Counter = Counter()
        self.unit = "row" if self.fmt == "parquet" else "line"

    def _bad(self, n: int, reason: str, kind: str, fix: str = "fix it"):
        msg = f"{self.path} {self.unit} {n}: {reason}"
        if not self.skip_bad:
            raise UserError(f"{msg}; {fix} or pass --skip-bad")
        self.records += 1
        self.bad.append(msg)
        self.kinds[kind] += 1

    def _ok(self) -> int:
        """A usable record: its index among all records (usable or bad, 0-based; a header is not a record)."""
        self.records += 1
        return self.records - 1

    def _text(self, n: int, v, what: str):
        """A prompt value → its text, or None after reporting it as bad."""
        if not isinstance(v, str):
            self._bad(n, f"{what} must be a string, got {_type_name(v)}", "not a string")
            return None
        if not v.strip():
            self._bad(n, f"{what} is empty", "empty")
            return None
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800" from a JSON escape
            self._bad(n, f"{what} holds an invalid unicode escape (lone surrogate)", "bad unicode")
            return None
        return v

    def __iter__(self):
        size = self.path.stat().st_size
        if size == 0:
            raise UserError(f"{self.path}: empty file, no prompts; --prompts takes {FORMATS_HELP}")
        if self.fmt == "parquet":
            yield from self._parquet()
        else:
            self._sniff()
            yield from {"txt": self._txt, "jsonl": self._jsonl, "csv": self._csv}[self.fmt]()
        self.summarise()

    def summarise(self):
        if not self.bad or len(self.bad) == self.records:  # nothing usable: no_prompts() says it in one line
            return
        what = ", ".join(f"{v} {k}" for k, v in self.kinds.most_common())
        if os.environ.get("RANK", "0") not in ("", "0"):  # under a launcher every rank reads the file: said once
            return
        print(f"warning: {self.path}: skipped {len(self.bad)} of {self.records} prompt {self.unit}s ({what}); "
              f"first: {self.bad[0]}", file=sys.stderr)

    def no_prompts(self) -> UserError:
        if self.bad:
            return UserError(f"{self.path}: no usable prompts (all {len(self.bad)} {self.unit}s were skipped; "
                             f"first: {self.bad[0]}); fix the file")
        return UserError(f"{self.path}: no prompts; --prompts takes {FORMATS_HELP}")

    # text formats -----------------------------------------------------------------------------------------
    def _sniff(self):
        try:
            with open(self.path, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError as e:
            raise UserError(f"{self.path}: unreadable ({_short(e)}); check its permissions")
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise UserError(f"{self.path}: UTF-16 text; save it as UTF-8")
        if b"\x00" in head:
            raise UserError(f"{self.path}: a binary file (NUL bytes in its first {SNIFF_BYTES} bytes), not a "
                            f"prompt file; --prompts takes {FORMATS_HELP} in UTF-8")

    def _lines(self, blank: bool = False):
        """(line number, decoded line or None when bad) for every physical line; trailing blank lines dropped,
        other blank lines reported as empty prompts (`blank`: yielded as "" instead, for a CSV, where a blank
        line may be part of a quoted field). Lines are read with a 1 MiB cap (a huge line is skipped in chunks,
        never held whole)."""
        pending: list[int] = []   # blank lines not yet followed by a non-blank one
        with open(self.path, "rb") as f:
            n = 0
            while True:
                raw = f.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                n += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while True:  # skip the rest of the line
                        more = f.readline(MAX_LINE_BYTES)
                        if not more or more.endswith(b"\n"):
                            break
                    yield n, self._bad_line(pending, n, f"longer than {MAX_LINE_BYTES} bytes", "too long")
                    continue
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if b"\x00" in raw:
                    yield n, self._bad_line(pending, n, "holds a NUL byte (binary data?)", "NUL byte")
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield n, self._bad_line(pending, n, f"not valid UTF-8 (byte {e.start})", "not UTF-8",
                                            "save the file as UTF-8")
                    continue
                if not line.strip() and not blank:
                    pending.append(n)
                    continue
                if pending:
                    self._flush(pending)
                yield n, line

    def _bad_line(self, pending, n, reason, kind, fix="fix it"):
        self._flush(pending)
        self._bad(n, reason, kind, fix)
        return None

    def _flush(self, pending):
        for m in pending:
            self._bad(m, "empty line (an empty prompt)", "empty")
        pending.clear()

    def _txt(self):
        for n, line in self._lines():
            if line is not None:
                yield self._ok(), line

    def _jsonl(self):
        for n, line in self._lines():
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                self._bad(n, f"not valid JSON ({e.msg} at column {e.colno})", "invalid JSON")
                continue
            except (ValueError, RecursionError) as e:  # absurdly deep nesting, huge numbers
                self._bad(n, f"not valid JSON ({_short(e)})", "invalid JSON")
                continue
            if not isinstance(obj, dict):
                self._bad(n, f'expected a JSON object like {{"text": "a prompt"}}, got {_type_name(obj)}',
                          "not an object")
                continue
            key = self.key if self.key is not None else next((k for k in KEYS if k in obj), None)
            if key is None or key not in obj:
                want = f"key {self.key!r}" if self.key is not None else 'a "text", "prompt" or "caption" key'
                self._bad(n, f"no {want} (keys: {_short(sorted(obj), 60)})", "missing key",
                          "choose the key with --prompt-key KEY, fix the line,")
                continue
            text = self._text(n, obj[key], f'"{key}"')
            if text is not None:
                yield self._ok(), text

    def _column(self, names: list[str], what: str) -> str:
        if self.key is not None:
            if self.key not in names:
                raise UserError(f"{self.path}: no {what} {self.key!r} (columns: {_short(names, 80)}); pass "
                                f"--prompt-key with one of them")
            return self.key
        for k in KEYS:
            if k in names:
                return k
        raise UserError(f"{self.path}: no {what} named text, prompt or caption (columns: {_short(names, 80)}); "
                        "pass --prompt-key COLUMN")

    def _csv(self):
        lines = self._lines(blank=True)  # blank lines go to the csv reader: inside quotes they are the field's
        start = [0]  # line number of the record being parsed

        def physical():
            for n, line in lines:
                if line is not None:
                    if not start[0]:
                        start[0] = n
                    yield line + "\n"

        reader = csv.reader(physical(), strict=True)
        col = None
        pending: list[int] = []  # blank lines outside quotes (empty rows) not yet followed by a record
        while True:
            start[0] = 0
            try:
                row = next(reader)
            except StopIteration:
                break  # blank lines at the end are dropped
            except csv.Error as e:
                if col is None:
                    raise UserError(f"{self.path} line {start[0] or 1}: the header row is not valid CSV "
                                    f"({_short(e)}); fix it")
                self._bad(start[0], f"not valid CSV ({_short(e)})", "invalid CSV")
                continue
            n = start[0]
            if not row or (len(row) == 1 and not row[0].strip()):
                pending.append(n)  # a blank line between records: an empty prompt unless only blanks follow
                continue
            self._flush(pending)
            if col is None:
                names = [c.strip() for c in row]
                col = names.index(self._column(names, "column"))
                continue
            if col >= len(row):
                self._bad(n, f"has {len(row)} fields, the prompt column is field {col + 1}", "missing column")
                continue
            text = self._text(n, row[col], "the prompt")
            if text is not None:
                yield self._ok(), text

    # parquet ------------------------------------------------------------------------------------------------
    def _parquet(self):
        import pyarrow as pa  # lazy: pyarrow costs ~0.3 s of start-up, only Parquet files need it
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UserError(f"{self.path}: not a readable Parquet file ({_short(e)}); --prompts takes "
                            f"{FORMATS_HELP}")
        schema = pf.schema_arrow
        name = self._column(list(schema.names), "column")
        if list(schema.names).count(name) > 1:
            raise UserError(f"{self.path}: {list(schema.names).count(name)} columns are named {name!r}; rename "
                            "them apart (or pass --prompt-key with another column)")
        typ = schema.field(name).type
        if pa.types.is_dictionary(typ):
            typ = typ.value_type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
                or getattr(pa.types, "is_string_view", lambda t: False)(typ)):
            raise UserError(f"{self.path}: column {name!r} holds {typ}, not strings; pass --prompt-key with a "
                            "string column")
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=[name]):
                for v in batch.column(0).to_pylist():
                    text = self._text(row, v, f"column {name!r}") if v is not None else \
                        self._bad(row, f"column {name!r} is null", "null")
                    if text is not None:
                        yield self._ok(), text
                    row += 1
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: unreadable Parquet data after row {row} ({_short(e)}); rewrite the file")


# -- the public API -----------------------------------------------------------------------------------------------
def repeat_prompts(distinct: list[str], num: int, seeds_per_prompt: int = 1) -> list[str]:
    """Each prompt `seeds_per_prompt` times in a row, cut to `num` (the rows of a cache with several seeds per
    prompt: row i has its own noise, so the seeds differ)."""
    return [p for p in distinct for _ in range(seeds_per_prompt)][:num]


def _check_args(num, seeds_per_prompt, split):
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    if isinstance(seeds_per_prompt, bool) or not isinstance(seeds_per_prompt, int) or seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be an integer >= 1, got {seeds_per_prompt!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")


def read_prompts(path, num: int, seed: int = 0, split: str = "train", key: str | None = None,
                 seeds_per_prompt: int = 1, skip_bad: bool = False, allow_repeats: bool = False) -> list[str]:
    """`num` prompts drawn from a prompt file (module docstring: formats, bad records, the held-out split, the
    draw), deterministic for (file, seed, split, key, seeds_per_prompt). Streamed: holds O(num) prompts."""
    return draw_prompts(path, num, seed, split, key, seeds_per_prompt, skip_bad, allow_repeats)[0]


def _split_name(split: str, has_split: bool) -> str:
    if not has_split:
        return "file (too few for a held-out split)"
    return {"train": "training split", "all": "file"}.get(split, "held-out split")


def describe_draw(d: dict) -> str:
    """The line `teacher cache` / `eval` print: what the file holds and what was drawn."""
    held = f"{d['train']} for training, {d['held_out']} held out" if d["has_split"] else \
        f"no held-out split (< {HOLDOUT.min_prompts})"
    drew = f"{d['distinct']} distinct" + (f", {d['repeats']} repeats (--allow-repeats)" if d["repeats"] else
                                          ", no repeats")
    rows = f" x {d['seeds_per_prompt']} seeds" if d["seeds_per_prompt"] > 1 else ""
    return f"prompts: {d['file']}: {d['prompts']} prompts ({held}); drew {d['needed']} from the {d['split']} " \
        f"split{rows}: {drew}"


def draw_prompts(path, num: int, seed: int = 0, split: str = "train", key: str | None = None,
                 seeds_per_prompt: int = 1, skip_bad: bool = False,
                 allow_repeats: bool = False) -> tuple[list[str], dict]:
    """read_prompts, and the draw's record: the file's prompt count, both split sizes, the prompts needed
    (ceil(num / seeds_per_prompt)), how many distinct ones were drawn and how many draws repeat one."""
    _check_args(num, seeds_per_prompt, split)
    k = math.ceil(num / seeds_per_prompt)
    reader = _Reader(path, key, skip_bad)
    dkey = _draw_key(seed, split, 0)
    heap: list[tuple[int, int, str]] = []   # (-priority, index, text): the k lowest priorities seen
    first: list[tuple[int, str]] = []       # the first HOLDOUT.min_prompts usable prompts (small-file fallback)
    usable = held = 0
    bar = _M64 + 1                          # the k-th lowest priority kept so far (a record must beat it)
    want_held = split in ("test", "ref")
    for idx, text in reader:
        usable += 1
        if usable <= HOLDOUT.min_prompts:
            first.append((idx, text))
        is_held = HOLDOUT.held_out(text)  # every record: the split sizes are part of the draw's record
        held += is_held
        pri = _mix64(dkey ^ idx)
        if pri >= bar:
            continue
        if split != "all" and is_held != want_held:
            continue
        if len(heap) < k:
            heapq.heappush(heap, (-pri, idx, text))
        else:
            heapq.heapreplace(heap, (-pri, idx, text))
        if len(heap) == k:
            bar = -heap[0][0]
    if not usable:
        raise reader.no_prompts()
    if usable < HOLDOUT.min_prompts:    # too few for a held-out split: every split draws from all prompts
        if split in ("test", "ref"):
            print(f"warning: {reader.path}: {usable} prompts (< {HOLDOUT.min_prompts}) have no held-out split; "
                  f"split {split!r} draws from all of them", file=sys.stderr)
        pool = first
    else:
        if not heap:
            side = "held out" if split != "train" else "outside the held-out split"
            raise UserError(f"{reader.path}: none of its {usable} prompts is {side} (the held-out split is "
                            f"{HOLDOUT.fraction:.0%} by a hash of the text); add prompts")
        pool = [(idx, text) for _, idx, text in heap]
    has_split = usable >= HOLDOUT.min_prompts
    size = usable if split == "all" or not has_split else (held if want_held else usable - held)
    record = {"file": str(path), "prompts": usable, "has_split": has_split, "train": usable - held if has_split
              else usable, "held_out": held if has_split else usable, "split": split, "split_size": size,
              "seeds_per_prompt": seeds_per_prompt, "needed": k, "distinct": min(k, size),
              "repeats": max(0, k - size)}
    if k > size and not allow_repeats:
        name = _split_name(split, has_split)
        frac = 1.0 if split == "all" or not has_split else (HOLDOUT.fraction if want_held else 1 - HOLDOUT.fraction)
        per = f" (--num {num} / --seeds-per-prompt {seeds_per_prompt})" if seeds_per_prompt > 1 else \
            f" (--num {num})"
        raise UserError(f"{reader.path}: {size} prompts in the {name}, this draw needs {k} distinct ones{per}; "
                        f"use a file with about {math.ceil(round(k / frac, 6)):,} prompts, lower --num, or pass "
                        "--allow-repeats to reuse prompts (counted in the record)")
    if len(pool) >= k:
        pool.sort(key=lambda r: _mix64(dkey ^ r[0]))
        drawn = [t for _, t in pool[:k]]
    else:  # fewer prompts than needed: all of them, in a fresh order each round
        drawn, epoch = [], 0
        while len(drawn) < k:
            ekey = _draw_key(seed, split, epoch)
            drawn += [t for _, t in sorted(pool, key=lambda r: _mix64(ekey ^ r[0]))]
            epoch += 1
        drawn = drawn[:k]
    return repeat_prompts(drawn, num, seeds_per_prompt), record


def head_prompts(path, num: int | None = None, key: str | None = None, skip_bad: bool = False) -> list[str]:
    """The first `num` usable prompts of a file in file order (all of them when num is None): the rows of
    `twostep sample --prompts FILE`. Reads only as far as it needs."""
    if num is not None:
        _check_args(num, 1, "all")
    reader = _Reader(path, key, skip_bad)
    out: list[str] = []
    it = iter(reader)
    for _, text in it:
        out.append(text)
        if num is not None and len(out) >= num:
            it.close()
            reader.summarise()
            break
    if not out:
        raise reader.no_prompts()
    return out


def prompt_file_identity(path, key: str | None = None) -> dict:
    """What a cache built from a prompt file records to recognise it: format, key, size, sha256 of the bytes
    and the held-out rule. Content only: neither path nor name is part of it (a moved or renamed file holds the same
    prompts; a caller that wants to show the path records it beside)."""
    p = Path(path)
    fmt = _format(p)
    if key is not None and fmt == "txt":
        _Reader(p, key)  # the one-line error about --prompt-key on a .txt file
    return {"format": fmt, "key": key if key is not None else "auto", "bytes": p.stat().st_size,
            "sha256": sha256_file(p), "holdout": HOLDOUT.describe()}
