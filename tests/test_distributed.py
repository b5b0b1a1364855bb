"""Data-parallel `twostep distill` on CPU: 2 processes (torchrun, gloo) end with identical weights on both ranks
and follow the loss curve of 1 process with the same global batch (2 × 2 rows vs 1 × 4 rows)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from twostep.methods import load_config
from twostep.train import BatchSource, distill

from tiny import BLOCKS_1

UPDATES = 4
# σ of the discriminator's re-noising pinned to its floor (1e-3): the methods draw σ and ε from each process's own
# RNG, so 2 processes cannot reproduce 1 process's draws; at σ = 1e-3 those draws barely move the losses, and what
# is left to compare is the data split, the gradient all-reduce and the logged mean over ranks.
SETTINGS = [f"train.updates={UPDATES}", "train.d_warmup=0", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=0",
            "train.grid_every=0", "disc.sigma_std=0.0", "disc.sigma_mean=-10.0", BLOCKS_1]
KEYS = ("g_loss", "g_adv", "step1", "d_loss", "mse_vs_teacher")


def _log(run):
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]


def test_rank_batches_are_the_halves_of_the_global_batch(tiny_loop):
    from twostep.teacher.cache import load_cache

    root, teacher, cache_dir = tiny_loop
    cache = load_cache(cache_dir, expect_teacher=teacher)
    needs = {"noise", "text", "teacher_final", "teacher_mid"}
    one = BatchSource(cache, needs, 0.75, seed=3, data_real=None).get(5, 1, 4)
    halves = [BatchSource(cache, needs, 0.75, seed=3, data_real=None, rank=r, world=2).get(5, 1, 4) for r in (0, 1)]
    for k in ("noise", "teacher_final", "teacher_mid", "fresh_noise", "index"):
        assert torch.equal(torch.cat([h[k] for h in halves]), one[k]), k
    halves_text = [t for h in halves for t in h["text"]]  # (rows read from the cache: equal tensors, not the same)
    assert len(halves_text) == len(one["text"]) and all(torch.equal(a, b) for a, b in zip(halves_text, one["text"]))


def test_two_processes_stay_in_sync_and_match_one_process(tiny_loop):
    root, teacher, cache = tiny_loop
    ref = distill(load_config(None, SETTINGS), teacher, cache, root / "one", progress=False)
    rec1 = json.loads((ref / "distributed.json").read_text())
    assert rec1["num_processes"] == 1 and rec1["ranks_in_sync"]

    out = root / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "twostep", "--threads", "1", "distill", "--teacher", str(teacher), "--cache", str(cache),
           "--out", str(out), "--no-progress"]
    for s in SETTINGS:
        cmd += ["--set", s]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]

    rec = json.loads((out / "distributed.json").read_text())
    assert rec["num_processes"] == 2 and rec["ranks_in_sync"] is True
    assert len(rec["param_digests"]) == 2 and len(set(rec["param_digests"])) == 1

    a, b = _log(ref), _log(out)
    assert [r["update"] for r in b] == list(range(1, UPDATES + 1))
    for ra, rb in zip(a, b):
        for k in KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=2e-3, abs=1e-4), (ra["update"], k, ra[k], rb[k])
    from safetensors.torch import load_file
    w1, w2 = load_file(str(ref / "step2.safetensors")), load_file(str(out / "step2.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


@pytest.mark.parametrize("kind,settings,match", [
    ("DEEPSPEED", [], "DEEPSPEED.*ddp.yaml"),
    ("FSDP", ["student.decoupling=lora"], "lora.*ddp.yaml"),        # accelerate's FSDP plugin switches FSDP on
    ("MULTI_CPU", ["student.decoupling=lora", "train.fsdp=true"], "lora.*ddp.yaml"),
])
def test_unsupported_sharding_is_refused_with_a_pointer_to_the_docs(tiny_loop, monkeypatch, kind, settings, match):
    """DeepSpeed is not supported; FSDP (tests/test_fsdp.py) shards full/shared students only: a lora student's
    trainable adapters are small and its frozen base is the teacher, so lora + FSDP is refused, not half-sharded."""
    from accelerate.utils import DistributedType

    import twostep.train.loop as loop
    from twostep.errors import UserError

    class FakeAcc:
        distributed_type = DistributedType[kind]
        num_processes = 2

    root, teacher, cache = tiny_loop
    monkeypatch.setattr(loop, "accelerator", lambda cfg: FakeAcc())
    with pytest.raises(UserError, match=match):
        distill(load_config(None, SETTINGS + settings), teacher, cache, root / "refused", progress=False)
    assert not (root / "refused").exists()


def test_the_cli_ends_the_process_group_on_success_and_on_error(tmp_path, monkeypatch):
    """Left to interpreter exit, a gloo group can abort a rank after a complete run (SIGABRT, "terminate called
    without an active exception"; pytorch#190489): `main` destroys it, also when the command fails."""
    import torch.distributed as dist

    from twostep import cli
    from twostep.errors import UserError

    def fails(a):
        raise UserError("bad input")
    for fn, rc in ((lambda a: None, 0), (fails, 2)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{rc}'}", rank=0, world_size=1)
        parser = cli.build_parser()
        monkeypatch.setattr(cli, "build_parser", lambda: parser)
        monkeypatch.setattr(parser, "parse_args", lambda argv: type("A", (), {"fn": staticmethod(fn), "threads": torch.get_num_threads()})())
        assert cli.main([]) == rc
        assert not dist.is_initialized()
