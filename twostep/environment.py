"""The command line's other inputs: the bytes of argv and the environment variables twostep reads, checked once at
the entry point (`twostep.cli.main`) before anything is parsed, loaded or written.

- argv: Python decodes the command line with `surrogateescape`, so bytes that are not UTF-8 arrive as lone
  surrogates ("\\udcff"), which fail later, deep inside a tokenizer or a hash, as a traceback. Every argument must
  be valid Unicode that encodes as UTF-8 (`check_argv`).
- The environment (`check_environment`): `WORLD_SIZE`, `RANK`, `LOCAL_RANK` are integers in range, and
  `WORLD_SIZE` > 1 only with the rest of a launcher's environment (torchrun and accelerate launch set RANK,
  LOCAL_RANK, MASTER_ADDR and MASTER_PORT together); `TWOSTEP_CACHE`, `TWOSTEP_MODELS`, `TWOSTEP_CONFIGS` name
  folders (or nothing yet), never a file or an empty string.

Each problem is one `UserError` naming the argument or variable and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
FOLDER_VARS = ("TWOSTEP_CACHE", "TWOSTEP_MODELS", "TWOSTEP_CONFIGS")


def shown(s: str, n: int = 60) -> str:
    """`s` for an error line: ASCII, undecodable bytes as \\xNN, at most `n` characters."""
    try:
        raw = s.encode("utf-8", "surrogateescape")  # undecodable bytes back to bytes, shown as \xNN
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "backslashreplace")  # a lone surrogate (not an escaped byte) as \udNNN
    t = raw.decode("utf-8", "backslashreplace").encode("ascii", "backslashreplace").decode("ascii")
    t = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in t)
    return repr(t)[0] + (t if len(t) <= n else t[: n - 3] + "...") + repr(t)[0]


EMPTY_OK = ("--prompt",)  # flags whose value may be empty ("" is the unconditional caption)


def check_argv(argv) -> None:
    """Every argument encodes as UTF-8: no undecodable byte (a surrogate-escaped one) and no lone surrogate; and
    no flag is given an empty value (`--device ""` is not `--device auto`: leave the flag out for its default)."""
    for i, a in enumerate(argv):
        if not isinstance(a, str):
            continue
        flag, eq, val = a.partition("=")
        if eq and flag.startswith("--") and flag not in EMPTY_OK and not val.strip():
            raise UserError(f"{flag}= is empty; give a value, or leave {flag} out for its default")
        if i > 0 and not a.strip() and str(argv[i - 1]).startswith("--") and "=" not in argv[i - 1] \
                and argv[i - 1] not in EMPTY_OK:
            raise UserError(f"{argv[i - 1]} {a!r}: an empty value; give one, or leave {argv[i - 1]} out for its "
                            "default")
        try:
            a.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = a[e.start]
            what = (f"the byte 0x{ord(bad) - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= ord(bad) <= 0xDCFF
                    else f"a lone surrogate U+{ord(bad):04X}")
            raise UserError(f"argument {i + 1} {shown(a)} holds {what} (at character {e.start}); pass text in "
                            "UTF-8") from None


def _int_var(name: str, low: int) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        n = int(v.strip())
    except ValueError:
        n = None
    if n is None or n < low:
        raise UserError(f"{name}={shown(v)}: must be an integer >= {low} (torchrun / accelerate launch set it); "
                        f"unset it or fix it")
    return n


def check_environment() -> None:
    """The environment variables twostep reads (module docstring)."""
    world = _int_var("WORLD_SIZE", 1)
    rank = _int_var("RANK", 0)
    _int_var("LOCAL_RANK", 0)
    if world is not None and world > 1:
        missing = [v for v in LAUNCHER_VARS if not os.environ.get(v)]
        if missing:
            raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                            "unset: not started by a launcher; start it with torchrun / accelerate launch, or unset "
                            "WORLD_SIZE (distill --dry-run takes --world-size N)")
        if rank is not None and rank >= world:
            raise UserError(f"RANK={rank} is not below WORLD_SIZE={world}; start it with torchrun / accelerate "
                            "launch")
    elif world is not None and rank not in (None, 0):
        raise UserError(f"RANK={rank} with WORLD_SIZE={world}: the only process has rank 0; unset RANK")
    for name in FOLDER_VARS:
        v = os.environ.get(name)
        if v is None:
            continue
        if not v.strip():
            raise UserError(f"{name} is set but empty; unset it or name a folder")
        if Path(v).exists() and not Path(v).is_dir():
            raise UserError(f"{name}={shown(v)}: not a folder; unset it or name a folder")
