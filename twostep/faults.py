"""Fault injection for the reliability tests (tests/test_kill_resume.py, docs/reliability.md).

`TWOSTEP_FAULT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches `<point>` — the same
abrupt death as an OOM kill or a pre-empted machine, but at a chosen instant (e.g. half-way through writing a
checkpoint). Unset (always, outside tests) it costs one dict lookup.

Points: `update` (after an optimizer step, before anything is saved), `ckpt.mid` (a checkpoint folder
half-written: weights on disk, optimizer/RNG/meta not yet), `ckpt.rename` (complete but not yet renamed into
place), `ckpt.prune` (renamed, older checkpoints not yet deleted), `model.save` (while writing the usable model
files of the run folder).
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("TWOSTEP_FAULT")
    if not spec:
        return
    where, _, n = spec.rpartition(":")
    if where != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
