"""Peak host RSS per process while writing one checkpoint of a `full` FSDP student: the files layout (rank 0
gathers every full tensor) against DCP (each rank writes its own shards; twostep/train/dcp.py), 1 vs 2 processes.

    .venv/bin/python benchmarks/checkpoint_memory.py [--dim 1024] [--layers 8]                       # 1 process
    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        benchmarks/checkpoint_memory.py [--dim 1024] [--layers 8]                                     # 2 processes

Builds the loop's student and EMA (meta, sharded under FSDP with 2 processes, filled from a random tiny-config
teacher of width --dim), AdamW with its moments allocated (one step on zero gradients), then writes one checkpoint in
each layout (twostep.train.state.checkpoint, the loop's own call) and prints, per process and layout, the peak RSS
above the RSS just before the save (Linux: /proc/self/clear_refs resets the peak, VmHWM reads it) beside the bytes
of the checkpoint's tensors in all (student + EMA + AdamW moments). CPU, gloo.

    .venv/bin/python benchmarks/checkpoint_memory.py --model

prints the modelled peaks at 6B instead (twostep.train.dcp.host_peaks), the table of docs/sizing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config
from twostep.methods import build_method, load_config
from twostep.student import deepcopy_sharing_frozen, trainable_copies_on_meta
from twostep.train.distributed import materialize, shard_student
from twostep.train.state import checkpoint, optimizers


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Freed memory back to the system (glibc keeps it otherwise, and the next save would reuse it unseen), then
    the peak RSS reset to the current RSS."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Acc:
    """The accelerator's part that checkpoint() uses (wait_for_everyone, is_main_process, num_processes, device)."""

    def __init__(self, world: int, rank: int):
        self.num_processes, self.process_index = world, rank
        self.is_main_process, self.device = rank == 0, torch.device("cpu")

    def wait_for_everyone(self):
        if self.num_processes > 1:
            dist.barrier()

    def reduce(self, t, reduction="sum"):
        dist.all_reduce(t)
        return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None, help="where to write the checkpoints (default: a temporary folder)")
    ap.add_argument("--model", action="store_true", help="print the modelled 6B table (no measurement)")
    ap.add_argument("--file-mib", type=int, default=None, help="DCP's bytes per shard-file index (default: "
                    "twostep.train.dcp.FILE_BYTES; smaller mimics a model many times that size)")
    a = ap.parse_args()
    if a.model:
        print(model_table())
        return
    torch.set_num_threads(1)
    if a.file_mib:
        from twostep.train import dcp
        dcp.FILE_BYTES = a.file_mib << 20
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    acc = _Acc(world, rank)
    teacher = ZImageBackbone.from_config(tiny_zimage_config(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 128,
                                                            n_refiner_layers=2)).requires_grad_(False)
    cfg = load_config(None, ["student.decoupling=full", "disc.blocks=[0]", "loss.adv_weight=0.0"])
    with trainable_copies_on_meta():
        method = build_method(cfg, teacher)
    ema = deepcopy_sharing_frozen(method.student).requires_grad_(False)
    fsdp = world > 1
    if fsdp:
        shard_student(types.SimpleNamespace(device=acc.device, num_processes=world), method.student, ema)
    for m in (method.student, ema):
        materialize(m, teacher, acc.device)
    opts = optimizers(cfg, method.student_parameters(), method.critic_parameters())
    for o in opts.values():  # AdamW's moments allocated, as after any update
        for g in o.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        o.step()
        o.zero_grad(set_to_none=True)
    nbytes = sum(p.numel() * 4 * 4 for p in method.student_parameters())  # student, EMA, exp_avg, exp_avg_sq (fp32)
    root = Path(a.out or tempfile.mkdtemp(prefix="ckmem-"))
    if world > 1:  # every rank writes into rank 0's folder
        obj = [str(root)]
        dist.broadcast_object_list(obj)
        root = Path(obj[0])
    rows = []
    for layout in ("files", "dcp"):
        out = root / f"{layout}-{world}"
        out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        _reset_peak()
        before = _status("VmRSS")
        t0 = time.time()
        checkpoint(acc, out, method, ema, opts, 1, [], 1, {"kind": "student"}, fsdp, sharded=layout == "dcp")
        acc.wait_for_everyone()
        rows.append({"processes": world, "rank": rank, "layout": layout, "dim": a.dim, "layers": a.layers,
                     "checkpoint_tensors_MiB": round(nbytes / 2**20),
                     "rss_before_MiB": round(before), "save_peak_above_MiB": round(_status("VmHWM") - before),
                     "seconds": round(time.time() - t0, 1)})
    for r in rows:
        print(json.dumps(r), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0 and a.out is None:
        shutil.rmtree(root, ignore_errors=True)


def model_table() -> str:
    """docs/sizing.md's table: modelled host RAM per process while saving / loading one checkpoint at 6B."""
    from twostep.train.dcp import host_peaks

    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    rows = ["| run | checkpoint (GiB) | files: save, rank 0 | files: save, other ranks | files: load | "
            "DCP: save, rank 0 | DCP: save, other ranks | DCP: load |", "|---|---|---|---|---|---|---|---|"]
    for name, dec, world in (("full, FSDP×8", "full", 8), ("shared, FSDP×8", "shared", 8), ("lora, 1 GPU", "lora", 1),
                             ("full, FSDP×16 (2 nodes)", "full", 16)):
        h = host_peaks(load_config(None, [f"student.decoupling={dec}", "train.frozen_dtype=bf16"]), world)
        f, d = h["files"], h["dcp"]
        rows.append(f"| {name} | {gib(h['checkpoint_total']['bytes'])} | {gib(f['save_rank0'])} | "
                    f"{gib(f['save_other'])} | {gib(f['load'])} | {gib(d['save_rank0'])} | {gib(d['save_other'])} | "
                    f"{gib(d['load'])} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
