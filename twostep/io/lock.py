"""One writer per folder: an exclusive `fcntl.flock` on `FOLDER/.twostep.lock`, taken before a command's first
write into its output folder and released on every exit path (return, UserError, exception, KeyboardInterrupt;
a killed process's lock is released by the kernel).

- A second writer (another process, here or, on a shared file system that supports flock, on another host)
  exits 2 with one line naming the holder's pid and host, which the holder writes into the lock file.
- A stale lock file (its holder was killed: SIGKILL, OOM, a pre-empted machine) holds no flock any more: the
  next writer takes it over and says whose lock it took over.
- The lock file is removed when the lock is released (an inode check makes a writer that opened a file just
  removed retry), and a folder the lock created is removed again when nothing else was written into it.
- Distributed runs: the process of rank 0 (RANK, as torchrun / accelerate launch / twostep launch set it) holds
  the lock for all ranks (a multi-process teacher cache: rank 0 locks, every rank writes its shards). The other
  ranks never lock; they read the lock file and refuse a folder held by a live process of another job on this
  host (its `job`: TORCHELASTIC_RUN_ID), so a double-submitted job stops on every rank with the same line.

`holds_lock("out")` decorates a function whose argument `out` is the folder it writes (distill, teacher cache,
export, teacher train, metrics train); `folder_lock(folder)` is the context manager (eval's --work folder).
`inspect_folder` never counts the lock file as content (io.folders.LOCK_FILE).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from .folders import LOCK_FILE, check_output_path, inspect_folder


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _job() -> str | None:
    """The distributed job this process belongs to (the same for all its ranks), None for one process."""
    ws = os.environ.get("WORLD_SIZE", "1")
    if not ws.isdigit() or int(ws) <= 1:
        return None
    return os.environ.get("TORCHELASTIC_RUN_ID") or \
        f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def _other_job_holds(folder: Path, flag: str) -> None:
    """A rank other than 0 never locks (rank 0 holds the lock for its job), but it refuses a folder whose lock is
    held by a live process of ANOTHER job on this host, so that every rank of a double-submitted job exits 2 with
    the same line instead of running on until the launcher stops it. Reads the lock file only (never locks it)."""
    try:
        h = json.loads((folder / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if not isinstance(h, dict) or h.get("job") == _job() or h.get("host") != socket.gethostname():
        return
    try:
        os.kill(int(h.get("pid")), 0)
    except (OSError, TypeError, ValueError):
        return  # gone: a stale lock file, which rank 0 takes over
    raise UserError(f"{folder}: another twostep command is writing this folder ({_describe(h)}); wait for it to "
                    f"finish (or stop it), or choose another {flag}")


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        h = json.loads(os.read(fd, 4096).decode() or "{}")
        return h if isinstance(h, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _describe(h: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["since"])) if isinstance(h.get("since"), (int, float)) else "?"
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, `{h.get('command', 'twostep')}` since {since}"


class FolderLock:
    """The lock of one folder (module docstring): acquire() / release(); `took_over`: the holder of a stale lock
    file that was taken over (None when there was none)."""

    def __init__(self, folder: Path, flag: str = "--out"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.created: list[Path] = []
        self.took_over: dict | None = None

    def acquire(self) -> "FolderLock":
        if not self.folder.exists():  # the folders made here (top first), removed again if still empty
            self.created = [d for d in (*reversed(self.folder.parents), self.folder) if not d.exists()]
            self.folder.mkdir(parents=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                h = _holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                self._drop_created()
                raise UserError(f"{self.folder}: another twostep command is writing this folder ({_describe(h)}); "
                                f"wait for it to finish (or stop it), or choose another {self.flag}") from None
            try:  # the file we locked must still be the lock file (a releasing holder removes it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _holder(fd)
        if old.get("pid") is not None:
            self.took_over = old
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": ("twostep " + " ".join(sys.argv[1:])).strip()[:160], "job": _job()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None
        self._drop_created()

    def _drop_created(self) -> None:
        for d in reversed(self.created):  # folders made only to hold the lock, still empty: gone again
            try:
                d.rmdir()
            except OSError:
                break
        self.created = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextmanager
def folder_lock(folder, flag: str = "--out", kind: str | None = None):
    """Hold `folder`'s lock for the block (module docstring). Not taken by ranks other than 0, nor for a path that
    is a file or holds a folder of another kind than `kind` (the command refuses it with its own message before
    writing anything, so no lock file is ever put into a folder it does not own)."""
    if folder is not None and _rank() != 0:
        _other_job_holds(Path(folder), flag)
    if folder is None or _rank() != 0 or not _lockable(Path(folder), kind, flag):
        yield None
        return
    lock = FolderLock(Path(folder), flag).acquire()
    try:
        if lock.took_over:
            print(f"{folder}: took over the lock of a writer that is gone ({_describe(lock.took_over)})",
                  file=sys.stderr)
        yield lock
    finally:
        lock.release()


def _lockable(folder: Path, kind: str | None, flag: str) -> bool:
    try:  # a file, an unwritable place, a path inside another twostep folder: the command's own refusal follows
        check_output_path(folder, flag, folder=True)
        st = inspect_folder(folder)
    except UserError:
        return False
    return st.kind is None or kind is None or st.kind == kind


def holds_lock(arg: str = "out", flag: str = "--out", kind: str | None = None):
    """Decorator: the function holds the lock of the folder passed as its argument `arg` while it runs."""
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            folder = sig.bind(*args, **kwargs).arguments.get(arg)
            with folder_lock(folder, flag, kind):
                return fn(*args, **kwargs)
        return wrapper
    return deco
