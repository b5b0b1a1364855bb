"""Peak memory of building an FSDP2 `full` student and its EMA, per process (issue 17 §1), the old way and the new.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/fsdp_build.py [--dim 1024]
        [--layers 12] [--way copy|meta]

copy: the student's two trainable copies of the teacher and the EMA's two made whole on every process (deepcopy),
then sharded (the loop before issue 17); meta: made on the meta device, sharded, then each process allocates and
fills only its shards from the teacher (twostep.train.loop.prepare_method; then checks every shard against the
teacher). Prints each process's peak RSS above its RSS once the teacher was built, beside the shards' own size
(CPU, gloo; on GPUs the same code runs under NCCL, not measured here: no GPU was lent to this session).

Measured (dim 1024, 12 + 2 + 2 blocks, teacher 829 MiB fp32, 2 processes): copy 3355 MiB per process (the four
whole copies), meta 1677 MiB (the shards: 1659 MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import types

import torch
import torch.distributed as dist

from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config
from twostep.methods import build_method, load_config
from twostep.student import deepcopy_sharing_frozen, trainable_copies_on_meta
from twostep.train.distributed import materialize, shard_student


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--way", choices=["copy", "meta"], default="meta")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    acc = types.SimpleNamespace(device=torch.device("cpu"), num_processes=world)
    teacher = ZImageBackbone.from_config(tiny_zimage_config(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 128,
                                                            n_refiner_layers=2)).requires_grad_(False)
    cfg = load_config(None, ["student.decoupling=full", "disc.blocks=[0]"])
    base = rss_mib()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if a.way == "meta":
        with trainable_copies_on_meta():
            method = build_method(cfg, teacher)
    else:
        method = build_method(cfg, teacher)
    ema = deepcopy_sharing_frozen(method.student).requires_grad_(False)
    shard_student(acc, method.student, ema)
    for m in (method.student, ema):
        materialize(m, teacher, acc.device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    teacher_mib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
    ref = teacher.transformer.state_dict()
    for mod in (method.student, ema):  # every shard holds its part of the teacher (full_tensor: all-gathers)
        for bb in mod.transformers().values():
            for k, v in bb.transformer.state_dict().items():
                assert torch.equal(v.full_tensor(), ref[k]), k
    rec = {"rank": rank, "way": a.way, "teacher_MiB": round(teacher_mib), "rss_after_teacher_MiB": round(base),
           "peak_above_that_MiB": round(peak - max(base, peak0)),
           "ideal_shards_MiB": round(4 * teacher_mib / world)}
    print(json.dumps(rec), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
