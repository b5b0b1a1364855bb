"""How a run was launched, so that status.json's `resume` starts it again the same way.

An 8-GPU FSDP run resumed as a plain `twostep distill ... --resume` would be one process with FSDP off (and no
`--gpu-memory` fit check): the command must keep its launcher. A process started by `twostep launch`, torchrun
(`python -m torch.distributed.run`) or `accelerate launch` is a child of that launcher (its elastic agent), so the
launcher's own command line (/proc/<parent>/cmdline on Linux) up to `distill` is the launch prefix (the launcher,
its flags, the program `-m twostep` or the `twostep` script, twostep's global flags, `launch --processes N`); after
it come `distill` with the run's inputs, `--config RUN/config.yaml --out RUN --resume`, and the flags that matter
to a resume (RESUME_FLAGS). On a multi-node launch it
is node 0's command: run it on every node (docs/cluster.md). `launch.json` in the run folder records the launcher,
the number of processes and nodes, and those flags.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from ..io.files import atomic_write_text

RESUME_FLAGS = {"--gpu-memory": 1, "--world-size": 1, "--verify-cache": 0, "--no-progress": 0}  # flag: values
GLOBAL_FLAGS = {"--threads": 1}


def _parent_argv() -> list[str] | None:
    """The parent process's command line, when this process was started by an elastic launcher."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    try:
        return [a.decode() for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:-1]]
    except (OSError, UnicodeDecodeError):
        return None


def _launcher_argv() -> list[str] | None:
    """The launcher's command line up to `distill` (module docstring), when this process was started by one."""
    argv = _parent_argv()
    if not argv:
        return None
    for i, a in enumerate(argv):
        if (a in ("-m", "--module") and argv[i + 1:i + 2] == ["twostep"]) or (i and Path(a).name == "twostep"):
            j = i + 2 if a in ("-m", "--module") else i + 1
            return argv[:argv.index("distill", j)] if "distill" in argv[j:] else argv[:j]
    return None


def launcher_name(argv: list[str] | None) -> str:
    if not argv:
        return "none"
    if any(Path(a).name == "accelerate" for a in argv[:2]) and "launch" in argv:
        return "accelerate launch"
    if "torch.distributed.run" in argv or any(Path(a).name == "torchrun" for a in argv[:2]):
        return "torchrun"
    return "twostep launch"


def _kept(argv: list[str], flags: dict[str, int]) -> list[str]:
    """The `flags` (with their values) among `argv`, as given (`--flag V` or `--flag=V`)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in flags:
            n = 0 if "=" in a else flags[name]
            out += argv[i:i + 1 + n]
            i += 1 + n
        else:
            i += 1
    return out


def cli_args() -> tuple[list[str], list[str]] | None:
    """(global flags, distill flags) of this process's `twostep ... distill ...` command line that a resume keeps;
    None when distill was not started from the command line (a library call)."""
    argv = sys.argv
    if Path(argv[0]).name not in ("twostep", "__main__.py") or "distill" not in argv:
        return None
    k = argv.index("distill")
    return _kept(argv[1:k], GLOBAL_FLAGS), _kept(argv[k + 1:], RESUME_FLAGS)


def resume_argv(teacher_dir, cache_dir, out) -> list[str]:
    """The command that continues the run in `out`, launched as this one was (module docstring)."""
    glob, flags = cli_args() or ([], [])
    prefix = _launcher_argv() or ["twostep", *glob]  # a launcher's prefix holds twostep's global flags
    return [*prefix, "distill", "--teacher", str(teacher_dir), "--cache", str(cache_dir), "--config",
            str(Path(out) / "config.yaml"), "--out", str(out), "--resume", *flags]


def resume_command(teacher_dir, cache_dir, out) -> str:
    return shlex.join(resume_argv(teacher_dir, cache_dir, out))


def record(out: Path, num_processes: int, resume: str, say=print) -> dict:
    """launch.json (main process): the launcher, processes, nodes, the kept flags and the resume command. A run
    resumed with another number of processes says so (`say`): its checkpoints reshard (files: full tensors;
    DCP: train/dcp.py)."""
    argv = _launcher_argv()
    try:
        was = json.loads((Path(out) / "launch.json").read_text()).get("num_processes")
    except (OSError, ValueError, AttributeError):
        was = None
    if isinstance(was, int) and was != num_processes:
        say(f"resuming a run of {was} processes with {num_processes}: its checkpoint is resharded on load")
    rec = {"launcher": launcher_name(argv), "launcher_argv": argv, "num_processes": num_processes,
           "num_nodes": int(os.environ.get("GROUP_WORLD_SIZE", "0") or 0) or
           max(1, num_processes // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", num_processes) or 1))),
           "flags": (cli_args() or ([], []))[1], "resume": resume}
    atomic_write_text(Path(out) / "launch.json", json.dumps(rec, indent=1))
    return rec
