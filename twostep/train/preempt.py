"""Preemption: SIGTERM / SIGINT during `twostep distill` stop the run after the current update, with a checkpoint.

A scheduler that preempts a job (SLURM, Kubernetes, spot instances) sends SIGTERM and kills the job a grace period
later. While the loop trains, the first SIGTERM or SIGINT only sets a flag (`Stop`); the loop finishes the update
it is in, the ranks agree that one of them was signalled (`Stop.requested`: one all-reduce of a flag per update),
every rank takes part in writing a checkpoint of that update, status.json stays unfinished, and the process exits
with 128 + the signal: 143 for SIGTERM, 130 for SIGINT (`Preempted`, turned into the exit code by the CLI).
`twostep distill ... --resume` (status.json's `resume`) continues with no update lost.

A second signal aborts at once (the default action of the signal: no checkpoint, the newest complete one stays).
A repeat of the first signal within ECHO_S seconds is not a second request: a terminal's Ctrl-C reaches torchrun
and its workers together, and torchrun then forwards the same signal to the workers.

SLURM: `#SBATCH --signal=TERM@120` sends SIGTERM 120 s before the time limit (`--requeue` or a job array resumes);
torchrun forwards it to its workers and SIGKILLs them `--shutdown_timeout` seconds later (30 by default: give it
the checkpoint's write time, e.g. 110). docs/cluster.md has the full recipe.
"""

from __future__ import annotations

import signal
import threading
import time

ECHO_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing update `update`; `code` is the exit status (128 + signal)."""

    def __init__(self, signum: int, update: int, checkpoint: str | None):
        self.signum, self.update, self.code = int(signum), update, 128 + int(signum)
        name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint}" if checkpoint else "nothing to save yet (no update done)"
        super().__init__(f"{name}: stopped at update {update}, {saved}; the run is unfinished, resume it with "
                         "the command in its status.json")


class Stop:
    """Context manager: once `arm`ed (when training starts: loading is not worth waiting for), SIGTERM / SIGINT set
    `signum` instead of ending the process, until the context ends (the previous handlers come back). Outside the
    main thread (where Python cannot install handlers) it does nothing and `signum` stays None."""

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0
        self._old: dict = {}

    def __enter__(self):
        return self

    def arm(self) -> None:
        if not self._old and threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            return
        if signum == self.signum and time.monotonic() - self.at < ECHO_S:
            return  # the launcher forwarding the same request (module docstring)
        for s in SIGNALS:  # a second request: the signal's default action, at once
            signal.signal(s, signal.SIG_DFL)
        signal.raise_signal(signum)

    def requested(self, acc=None) -> int | None:
        """The signal when any rank was signalled (every rank calls it at the same point: with several processes it
        is one all-reduce, so the ranks stop after the same update), else None."""
        if acc is None or acc.num_processes == 1:
            return self.signum
        import torch

        import torch.distributed as dist

        got = torch.tensor([float(self.signum or 0)], device=acc.device)
        dist.all_reduce(got, op=dist.ReduceOp.MAX)  # SIGTERM (15) over SIGINT (2) when ranks got different ones
        return int(got.item()) or None
