"""Plan before work: what a count implies (rows, bytes in memory, bytes on disk) is estimated from the arguments
and checked against what the machine has, before any caption is built or any image rendered.

`teacher cache --num`, `eval --num` and `sample --num/--seeds-per-prompt` (times the rows) call `check` with their
own per-item sizes; a size that cannot fit is refused with one line naming the flag, the number, the estimate and
what is available, instead of running for minutes and then dying with MemoryError or a full disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def human(n: float) -> str:
    """Bytes as 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never refuse for it


def free_disk(path) -> int:
    """Free bytes on the filesystem that would hold `path` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 1 << 62


def check(flag: str, n: int, what: str, memory: int = 0, disk: int = 0, disk_at=None, fix: str = "") -> str:
    """Refuse (UserError) a count `n` given by `flag` whose estimated `memory` bytes exceed the available memory
    or whose `disk` bytes exceed the free space at `disk_at`; returns the plan as one line."""
    line = f"{flag} {n:,}: {what}"
    if memory:
        have = available_memory()
        line += f", ~{human(memory)} of memory"
        if memory > have:
            raise UserError(f"{line}, but {human(have)} is available; {fix or 'lower ' + flag}")
    if disk:
        have = free_disk(disk_at)
        line += f", ~{human(disk)} on disk"
        if disk > have:
            raise UserError(f"{line}, but {disk_at} has {human(have)} free; {fix or 'lower ' + flag}")
    return line
