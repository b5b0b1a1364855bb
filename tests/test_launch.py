"""`twostep launch` (twostep/launch.py) without starting processes: what it hands torch's elastic launcher, and how
it ends when the launcher is signalled (the 2-process SIGTERM story itself is tests/test_cluster.py)."""

import signal

import pytest
import torch.distributed.run as tdr
from torch.distributed.elastic.multiprocessing.api import SignalException

from twostep.cli import build_parser
from twostep.launch import SHUTDOWN_TIMEOUT, launch


@pytest.fixture
def seen(monkeypatch):
    got = {}
    monkeypatch.setattr(tdr, "run", lambda args: got.update(vars(args)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return got


def test_the_command_and_the_shutdown_timeout_reach_the_launcher(seen):
    cmd = ["teacher", "cache", "--teacher", "T", "--data", "shapes", "--num", "20", "--out", "C"]
    assert launch(2, cmd, shutdown_timeout=7) == 0
    assert seen["training_script_args"] == cmd and seen["nproc_per_node"] == "2" and seen["module"] is True
    assert seen["shutdown_timeout"] == 7  # the grace its processes get for a preemption checkpoint
    assert launch(2, cmd) == 0 and seen["shutdown_timeout"] == SHUTDOWN_TIMEOUT == 600  # not torchrun's 30
    a = build_parser().parse_args(["launch", "--processes", "2", "--shutdown-timeout", "90", *cmd])
    assert (a.shutdown_timeout, a.command) == (90, cmd)
    assert build_parser().parse_args(["launch", "--processes", "2", *cmd]).shutdown_timeout == SHUTDOWN_TIMEOUT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_launcher_exits_128_plus_the_signal_with_one_line(monkeypatch, capsys, sig):
    def stopped(args):  # what the elastic agent raises once it has forwarded the signal and waited
        raise SignalException(f"Process 1 got signal: {sig}", sigval=sig)

    monkeypatch.setattr(tdr, "run", stopped)
    assert launch(2, ["distill", "--teacher", "T", "--cache", "C", "--out", "R"]) == 128 + int(sig)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"twostep launch: {sig.name}: the processes were stopped")
