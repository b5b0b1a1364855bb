"""Files written and read safely: atomic text/tensor writes, safetensors reads (never pickle), sha256 hashes.

The one place twostep hashes things: `sha256_file` (one file's bytes), `sha256_text` (a string), `sha256_files`
(a set of files: their names and contents), `tensors_sha256` (in-memory state dicts: names, dtypes, shapes and
bytes, e.g. to prove that processes hold the same weights or that the teacher never changed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError


def _drop(tmp: Path):
    try:
        tmp.unlink()
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes | str):
    """Write `data` (bytes, or text as UTF-8) to a temporary sibling, fsync, and rename it over `path` (the sibling
    is removed if that fails: no `.tmp` is left behind)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        _drop(tmp)
        if isinstance(e, Exception) and cause(e) is not None:  # a full disk, a permission: one line, its cause
            raise unwritable(path, e) from None
        raise


def atomic_write_text(path: Path, text: str):
    """atomic_write_bytes of `text` (UTF-8)."""
    atomic_write_bytes(path, text)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    """safetensors to a temporary sibling, renamed over `path` (removed if that fails)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    md = {k: str(v) for k, v in (metadata or {}).items()}
    if not tensors and not md:  # safetensors writes an unreadable header for no tensors + {} metadata (e.g. the
        md = None               # empty state of an optimizer that never stepped); files with tensors keep {}
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=md)
        tmp.replace(path)
    except BaseException as e:
        _drop(tmp)
        if isinstance(e, Exception) and cause(e) is not None:  # a full disk, a permission: one line, its cause
            raise unwritable(path, e) from None
        raise


def load_tensors(path: Path, transform=None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file. With `transform(name, tensor)`, tensors are read one at a time and
    only the transformed values are kept (an FSDP rank keeps its shard of each full tensor, never the whole file)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing; the folder is not a complete twostep checkpoint/model")
    try:
        if transform is not None:
            with safe_open(str(path), "pt") as f:
                return {k: transform(k, f.get_tensor(k)) for k in f.keys()}
        return load_file(str(path))
    except Exception as e:
        raise unreadable(path, e, "delete it and re-create it") from None


# Errors classified by cause: what went wrong while a file was read or written is said as what it is. Running out
# of memory, a full disk or a permission is never reported as "truncated or corrupt" (a user would delete a good
# model for it); only an error about the bytes themselves is.
_OS_CAUSES = {errno.ENOSPC: "the disk is full (free space on it, or write elsewhere)",
              errno.EDQUOT: "the disk quota is exceeded (free space, or write elsewhere)",
              errno.EACCES: "permission denied (fix the file's permissions, or use another path)",
              errno.EPERM: "operation not permitted (fix the file's permissions, or use another path)",
              errno.EROFS: "the filesystem is read-only (use another path)",
              errno.ENOMEM: "out of memory"}
_MEMORY_WORDS = ("cannot allocate memory", "can't allocate memory", "out of memory", "os error 12")


def cause(e: BaseException) -> str | None:
    """What an exception says about its cause when that is not the file's contents: memory, disk space,
    permissions (None: an error about the bytes, e.g. a truncated header). Memory errors come as MemoryError,
    as an OSError ENOMEM, or as a RuntimeError from torch's allocator or safetensors' mmap."""
    if isinstance(e, MemoryError) or any(w in str(e).lower() for w in _MEMORY_WORDS):
        return "out of memory (the file is not at fault: free memory, or use a smaller dtype / batch)"
    if isinstance(e, OSError) and e.errno in _OS_CAUSES:
        return _OS_CAUSES[e.errno]
    m = re.search(r"\(os error (\d+)\)", str(e))  # safetensors' Rust I/O errors: "... (os error 28)"
    if m and int(m.group(1)) in _OS_CAUSES:
        return _OS_CAUSES[int(m.group(1))]
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return f"{e.strerror or type(e).__name__}"
    return None


def unreadable(path, e: BaseException, fix: str = "delete it and re-create it") -> UserError:
    """The UserError for a weights file `path` that could not be read because of `e`: its cause when it is not the
    file (`cause`), else "truncated or corrupt" and `fix`."""
    why = cause(e)
    if why is not None:
        return UserError(f"{path}: cannot be read: {why}")
    return UserError(f"{path}: unreadable safetensors ({type(e).__name__}); the file is truncated or corrupt, {fix}")


def unwritable(path, e: BaseException) -> UserError:
    """The UserError for a file `path` that could not be written because of `e` (an OSError): its cause."""
    why = cause(e) or (getattr(e, "strerror", None) or type(e).__name__)
    return UserError(f"{path}: cannot be written: {why}")


def cast_floats(dtype: torch.dtype | None):
    """A load_tensors `transform` reading every floating-point tensor in `dtype` as it is loaded (None: as stored)."""
    if dtype is None:
        return None
    return lambda name, t: t.to(dtype) if t.is_floating_point() else t


def all_finite(sd: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def nonfinite_parts(states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """The state dicts (by name) that hold a NaN/inf value, each as "name (k of n tensors)"; [] when all are finite.
    What a save checks: every state dict it writes, not a stand-in (an EMA can be NaN while the student is not)."""
    out = []
    for name, sd in states.items():
        floats = [v for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()]
        bad = sum(not bool(torch.isfinite(v).all()) for v in floats)
        if bad:
            out.append(f"{name} ({bad} of {len(floats)} tensors)")
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of one file's bytes (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """sha256 of a string's UTF-8 bytes (e.g. a list of prompts, or of checksums, joined)."""
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_files(paths, cached: bool = False) -> str:
    """One sha256 over a set of files: each file's name and sha256, in the order given (`cached`: each file's
    through weights_sha256, for large weight files that do not change)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}:{weights_sha256(p) if cached else sha256_file(p)}\n".encode())
    return h.hexdigest()


# -- identity without re-reading 12 GB: a weights file's sha256, computed once ------------------------------------

HASH_RECORD = "weights_sha256.json"   # under $TWOSTEP_CACHE (default ~/.cache/twostep)
_VERIFY_HASHES: ContextVar[bool] = ContextVar("twostep_verify_hashes", default=False)


def hash_record_path() -> Path:
    return Path(os.environ.get("TWOSTEP_CACHE", Path.home() / ".cache" / "twostep")) / HASH_RECORD


@contextmanager
def verify_hashes(on: bool = True):
    """Inside, weights_sha256 reads every file again and corrects the record (`--verify`, `--verify-cache`)."""
    token = _VERIFY_HASHES.set(bool(on) or _VERIFY_HASHES.get())
    try:
        yield
    finally:
        _VERIFY_HASHES.reset(token)


def _hash_key(path: Path) -> tuple[str, dict]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def weights_sha256(path) -> str:
    """sha256 of a weights file (sha256_file's value), read once: kept in a small record ($TWOSTEP_CACHE/
    weights_sha256.json) keyed by the file's resolved path, size and mtime, and reused while all three are
    unchanged, so a 12 GB teacher is not re-read by every cache, distill and eval on every process. Under
    verify_hashes() the file is read again and a record that disagrees is replaced. An unreadable or unwritable
    record only costs the reuse."""
    path = Path(path)
    key, stamp = _hash_key(path)
    rec_path = hash_record_path()
    try:
        record = json.loads(rec_path.read_text())
        record = record if isinstance(record, dict) else {}
    except (OSError, ValueError, RecursionError):
        record = {}
    old = record.get(key)
    if not _VERIFY_HASHES.get() and isinstance(old, dict) and {k: old.get(k) for k in stamp} == stamp \
            and isinstance(old.get("sha256"), str):
        return old["sha256"]
    digest = sha256_file(path)
    if _hash_key(path)[1] == stamp:   # not rewritten while it was read
        record = {k: v for k, v in record.items() if os.path.exists(k)}   # files gone: their entries too
        record[key] = {**stamp, "sha256": digest}
        try:
            rec_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(rec_path, json.dumps(record, indent=0, sort_keys=True))
        except (OSError, UserError):   # a read-only or full cache folder, another process's rename in between
            pass
    return digest


def tensors_sha256(state_dicts) -> str:
    """sha256 of state dicts (names, dtypes, shapes and bytes, keys sorted). A DTensor shard is gathered whole
    first (a collective: every rank must call this in the same order)."""
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for sd in state_dicts:
        for k, v in sorted(sd.items()):
            v = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def one_line(e) -> str:
    """An exception's message on one line, at most 160 characters."""
    s = " ".join(str(e).split())
    return s if len(s) < 160 else s[:157] + "..."
