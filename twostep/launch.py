"""`twostep launch --processes N COMMAND ...`: a twostep command in N processes on this machine.

The same elastic launcher `torchrun --standalone` and `accelerate launch` use (torch.distributed.run), started
with `python -m twostep COMMAND ...` in each process (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set; each
process takes its own GPU, `accelerate` reads the rest from the environment). Two differences, both the reason it
exists:

- Its parser never abbreviates and passes COMMAND through untouched. torchrun's parser abbreviates its own
  options, and reads twostep's `--num` as an ambiguous `--numa-binding` even after the script, so
  `torchrun ... -m twostep teacher cache --num N` cannot start (accelerate launch's parser does not abbreviate
  and works too).
- Bad input ends as in one process: the commands check their input on every rank before any weight is read, rank 0
  prints the one `error: ...` line and each rank exits 2; the launcher then exits 2 and adds nothing. Under
  torchrun / accelerate launch the same ranks exit 2, but the launcher adds its ChildFailedError report (about 40
  lines, exit 1). Any other failure gets that report here too (exit 1).

A SIGTERM / SIGINT to the launcher is forwarded to every process, which checkpoints the update in progress
(docs/cluster.md); the launcher waits `shutdown_timeout` seconds for them (torchrun's default is 30, too short for a
6B checkpoint) before it SIGKILLs them, then exits 128 + the signal's number with one line, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from .errors import UserError

USER_ERROR = 2  # the exit code of a twostep command stopped by bad input (cli.main)


SHUTDOWN_TIMEOUT = 600  # s a signalled launcher waits for its processes' preemption checkpoint


def launch(processes: int, command: list[str], shutdown_timeout: int = SHUTDOWN_TIMEOUT) -> int:
    """Run `python -m twostep *command` in `processes` local processes; returns the exit code (module docstring)."""
    if not command:
        raise UserError("twostep launch: give the command to run, e.g. twostep launch --processes 8 teacher cache ...")
    if command[0] == "launch":
        raise UserError("twostep launch: the command cannot be another launch")
    from .cli import build_parser  # lazy: the parser only checks COMMAND

    build_parser().parse_args(command)  # a bad flag: argparse's message once, here, exit 2 (not once per process)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(processes), "-m", "twostep"])
    args.training_script_args = list(command)  # never through torchrun's parser (module docstring)
    args.shutdown_timeout = shutdown_timeout
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun's default is 1 thread a process, with a warning
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)  # its per-worker lines; a failure is reported below
    try:
        run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode == USER_ERROR:  # rank's own error line is already printed
            return USER_ERROR
        print(e, file=sys.stderr)
        return 1
    except SignalException as e:  # the agent has forwarded it and waited for the processes (module docstring)
        print(f"twostep launch: {e.sigval.name}: the processes were stopped (see their lines above); "
              "resume with the run's status.json command", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        elastic.setLevel(level)
    return 0
