"""Processes: the accelerator, rank agreement (all ranks / mean over ranks / gradient averaging), the per-rank RNG
seed, the end-of-run check that every rank holds the same weights, and torch FSDP2 (`train.fsdp`): the student's
trainable transformers sharded, everything else replicated, full tensors gathered for files and sharded on load.

Every function takes the accelerator `acc`; `acc=None` means one process (benchmarks that call the update step
without an accelerator).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..io.files import atomic_write_text, load_tensors, tensors_sha256
from ..model import compute_dtype


def accelerator(cfg):
    """The run's accelerate.Accelerator (CPU when no GPU is present)."""
    from accelerate import Accelerator  # heavy: loaded when a run starts

    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())


def close_processes(ok: bool) -> None:
    """End the process group, if this process is one of several (torchrun). Left to interpreter exit, the gloo
    group's threads can be torn down while still running and a rank aborts ("terminate called without an active
    exception") after a complete run. ok: the command succeeded on this rank, so the ranks meet first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def world_size(acc) -> int:
    return 1 if acc is None else acc.num_processes


def sync_grads(acc, params):
    """Average gradients across processes (a no-op in one process). Works for any call pattern of the method,
    unlike a DDP wrapper, which only syncs what goes through forward()."""
    if world_size(acc) == 1:
        return
    for p in params:
        if is_dtensor(p):  # an FSDP shard: its gradient was reduce-scattered (averaged) in the backward
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = acc.reduce(p.grad, reduction="mean")


def all_ranks(acc, flag: bool) -> bool:
    """True when `flag` is true on every process (so all ranks take the same branch and no collective hangs)."""
    if world_size(acc) == 1:
        return bool(flag)
    return bool(acc.reduce(torch.tensor([float(bool(flag))], device=acc.device), reduction="sum").item()
                == acc.num_processes)


def mean_over_ranks(acc, logs: dict) -> dict:
    """Float log values averaged over processes (equal per-rank batches: the global-batch value of a mean loss).
    A value some ranks do not log (LADD's mse_vs_teacher needs a step-2 sample in the rank's batch) is averaged over
    the ranks that do: the ranks first agree on the keys, so every rank reduces the same tensor."""
    if world_size(acc) == 1:
        return logs
    import torch.distributed as dist  # loaded with torch; only multi-process runs get here

    mine = sorted(k for k, v in logs.items() if isinstance(v, float))
    every: list = [None] * acc.num_processes
    dist.all_gather_object(every, mine)
    keys = sorted(set().union(*every))
    if not keys:
        return logs
    vals = torch.tensor([[logs.get(k, 0.0) if k in mine else 0.0 for k in keys],
                         [float(k in mine) for k in keys]], dtype=torch.float64, device=acc.device)
    tot = acc.reduce(vals, reduction="sum")
    return {**logs, **{k: float(s / c) for k, s, c in zip(keys, tot[0].tolist(), tot[1].tolist())}}


def rank_seed(seed: int, rank: int, update: int) -> int:
    """Seed of the global torch RNG (the methods' σ and re-noising draws) for update k on rank r of a multi-process
    run: distinct per rank (no two ranks draw the same σ for different samples) and a function of k (resume-exact)."""
    return (seed * 1_000_003 + update * 7_919 + (rank + 1) * 104_729) % (2**63)


def clip_grads(params, max_norm: float) -> bool:
    """Clip gradients (when max_norm > 0); False when the gradient norm is not finite."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if is_dtensor(norm):  # FSDP shards: the norm over all shards of all ranks (clip_grad_norm_ reduces it)
        norm = norm.full_tensor()
    return bool(torch.isfinite(norm))


def _digest(modules) -> int:
    """63 bits of io.files.tensors_sha256 of the modules' state dicts (an integer, to all-gather as a tensor)."""
    return int(tensors_sha256([m.state_dict() for m in modules])[:16], 16) >> 1


def check_ranks_in_sync(acc, out: Path, modules) -> dict:
    """End of a run: all-gather a digest of the student, EMA and critic weights from every process; write
    `distributed.json` (num_processes, ranks_in_sync, digests) to the run folder; raise if the ranks differ."""
    n = acc.num_processes
    digests = [] if n == 1 else [int(x) for x in acc.gather(torch.tensor([_digest(modules)], device=acc.device)).tolist()]
    rec = {"num_processes": n, "ranks_in_sync": len(set(digests)) <= 1, "distributed_type": str(acc.distributed_type),
           "param_digests": [f"{d:016x}" for d in digests]}
    if acc.is_main_process:
        atomic_write_text(out / "distributed.json", json.dumps(rec, indent=1))
    if not rec["ranks_in_sync"]:
        raise RuntimeError(f"the {n} processes ended with different weights (digests {rec['param_digests']}): "
                           "a gradient or update was not synchronised; this is a bug in the loop or the method")
    return rec


# -- FSDP2 (train.fsdp): the student's trainable transformers sharded, everything else replicated ------------

def use_fsdp(acc, cfg) -> bool:
    """FSDP on: train.fsdp, or an accelerate FSDP launch (its plugin is only read as the switch: the loop shards
    with its own settings, see shard_student). Refuses what it cannot do. One process: nothing to shard."""
    kind = acc.distributed_type.name
    if kind == "DEEPSPEED":
        raise UserError("accelerate DEEPSPEED is not supported by twostep's loop; launch with "
                        "configs/accelerate/fsdp.yaml (or train.fsdp=true) or ddp.yaml (see docs/sizing.md)")
    want = bool(cfg.train.fsdp) or kind == "FSDP"
    if want and cfg.student.decoupling == "lora":
        raise UserError("FSDP with student.decoupling=lora: not supported and not needed (the trainable LoRA "
                        "adapters are ~1.3 % of the model and the frozen base is the teacher's own weights, "
                        "shared); launch with configs/accelerate/ddp.yaml and train.fsdp=false (docs/sizing.md)")
    if want and acc.num_processes == 1:
        acc.print("train.fsdp: one process, nothing to shard (the student stays whole)")
    return want and acc.num_processes > 1


def shard_student(acc, *students, mixed_precision: str = "no") -> int:
    """torch FSDP2 (`fully_shard`) over all processes: every ZImageTransformerBlock of each trainable transformer of
    each student (the training student and its EMA; `student.transformers()`), then the transformer itself
    (embedders, final layer, pad tokens), all resharded after forward. Parameters become DTensors sharded on dim 0;
    FSDP all-gathers them per unit in forward/backward and reduce-scatters (averages) their gradients.
    `mixed_precision="bf16"` (train.mixed_precision): MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32),
    the all-gathers in bf16 (half the traffic and the unsharded memory), gradients reduced in fp32 into the fp32
    shards (master weights and AdamW state stay fp32). Call it on students built on the meta device
    (student.trainable_copies_on_meta), then `materialize`: no process ever holds a whole copy. Returns the
    number of units."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock  # heavy, FSDP runs only
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision == "bf16" else MixedPrecisionPolicy())
    n = 0
    for st in students:
        for bb in st.transformers().values():
            for m in bb.transformer.modules():
                if isinstance(m, ZImageTransformerBlock):
                    fully_shard(m, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
                    n += 1
            fully_shard(bb.transformer, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
            n += 1
    return n


def critic_copies(method) -> list:
    """The critic's trainable copies of the teacher (ZImageBackbone modules of `method.critic`: DMD2's fake score),
    built on the meta device like the student's (student.trainable_copies_on_meta)."""
    from ..backbones.zimage import ZImageBackbone  # lazy: the backbone is needed only with a critic copy

    c = getattr(method, "critic", None)
    return [] if c is None else [m for m in c.modules() if isinstance(m, ZImageBackbone)
                                 and m is not getattr(method, "teacher", None)
                                 and any(p.requires_grad for p in m.parameters())]


def shard_critic(acc, method, mixed_precision: str = "no") -> int:
    """FSDP2 for a critic that holds copies of the teacher (critic_copies; none: the critic stays replicated, its
    gradients all-reduced): each copy's blocks and transformer like the student's (shard_student), then every
    other child of the critic with parameters (DMD2's GAN heads) as one unit, so all its parameters are DTensor
    shards (one gradient norm, one optimizer over them). Returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    copies = critic_copies(method)
    if not copies:
        return 0
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision == "bf16" else MixedPrecisionPolicy())
    n = sum(_shard_backbone(bb, mesh, mp) for bb in copies)
    for child in method.critic.children():
        if child not in copies and any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
            n += 1
    return n


def _shard_backbone(bb, mesh, mp) -> int:
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
    from torch.distributed.fsdp import fully_shard

    n = 0
    for m in bb.transformer.modules():
        if isinstance(m, ZImageTransformerBlock):
            fully_shard(m, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
            n += 1
    fully_shard(bb.transformer, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    return n + 1


def materialize(student, teacher, device) -> int:
    """Storage on `device` for the trainable transformers a student (or its EMA) holds on the meta device
    (student.trainable_copies_on_meta), filled with the frozen teacher's weights (a ZImageBackbone, read where it
    is, one tensor at a time). Sharded (after shard_student): each process allocates and fills only its own shards.
    Returns how many transformers were filled (0: nothing was on meta)."""
    return materialize_backbones(student.transformers().values(), teacher, device)


def materialize_backbones(backbones, teacher, device) -> int:
    """materialize for any ZImageBackbone copies of the teacher (a student's, or critic_copies)."""
    sd = teacher.transformer.state_dict()
    n = 0
    for bb in backbones:
        if not any(p.device.type == "meta" for p in bb.parameters()):
            continue
        bb.to_empty(device=device)
        own = bb.transformer.state_dict()
        with torch.no_grad():
            for k, v in sd.items():
                _fill(own[k], v)
        n += 1
    return n


def _fill(param, full: torch.Tensor) -> None:
    """Copy `full` (a frozen teacher tensor, anywhere) into `param`, or into this process's shard of it: for
    FSDP2's dim-0 sharding (torch.chunk: rank r holds rows [r·c, r·c + its length), c = ceil(rows / world)) a
    narrowed view of `full` is copied, so nothing but the shard is ever allocated; other layouts via
    distribute_tensor."""
    if not is_dtensor(param):
        param.copy_(full)
        return
    from torch.distributed.tensor import Shard  # see is_dtensor

    local = param.to_local()
    if tuple(param.placements) == (Shard(0),) and tuple(param.shape) == tuple(full.shape):
        if local.numel():
            c = -(-full.shape[0] // param.device_mesh.size())
            local.copy_(full.narrow(0, param.device_mesh.get_local_rank() * c, local.shape[0]))
        return
    local.copy_(_shard_like(full, param).to_local())


def frozen_dtype(cfg, device) -> torch.dtype:
    """train.frozen_dtype resolved for the run's device: auto = bf16 on CUDA, fp32 elsewhere."""
    return compute_dtype(cfg.train.frozen_dtype, device)


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor  # ~0.5 s to import: loaded on first use, not with the package

    return isinstance(t, DTensor)


def _full(t, keep: bool):
    """The whole tensor of a DTensor shard (a collective: every rank calls it, in the same order); on the CPU
    when `keep`, dropped (None) otherwise. A plain tensor is returned as is."""
    if is_dtensor(t):
        t = t.full_tensor()
        return t.cpu() if keep else None
    return t


def full_state(module, keep: bool) -> dict | None:
    """A module's state dict with full tensors, kept on the rank that writes files (None elsewhere)."""
    out = {k: _full(v.detach(), keep) for k, v in module.state_dict().items()}
    return out if keep else None


def full_optim_state(opt, keep: bool) -> dict | None:
    """An optimizer's state dict (integer parameter ids, as torch writes it) with full tensors: the same file
    format as an unsharded run (tests/test_fsdp.py compares them; resuming across the two is not tested)."""
    sd = opt.state_dict()
    state = {pid: {k: _full(v, keep) for k, v in sorted(sd["state"][pid].items())} for pid in sorted(sd["state"])}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def _shard_like(full: torch.Tensor, like):
    """A full tensor read from a file, as this rank's part of `like` (its shard when `like` is a DTensor)."""
    if is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor  # see is_dtensor

        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)  # every rank read the file: slice locally, no communication
    return full


def load_module(module, path: Path, fsdp: bool, prefix: str = "", strict: bool = True) -> list[str]:
    """A module's weights from a safetensors file of full tensors (each sharded like the module's under FSDP);
    the file's names are the module's state-dict names minus `prefix`. strict=False: the file may hold a part
    of the module (a small checkpoint's trainable tensors); every name in it must still be the module's.
    Returns the names it loaded."""
    like = module.state_dict()
    sd = load_tensors(path, (lambda k, t: _shard_like(t, like[prefix + k]) if prefix + k in like else t)
                      if fsdp else None)
    sd = {prefix + k: v for k, v in sd.items()}
    unknown = [k for k in sd if k not in like]
    if unknown:
        raise UserError(f"{path}: holds {unknown[0]!r}, which this run's student does not have; the checkpoint "
                        "is of another configuration (resume with the run's config.yaml)")
    module.load_state_dict(sd, strict=strict)
    return list(sd)


def optim_transform(opt):
    """read_checkpoint transform for an optimizer over FSDP parameters: each saved full moment → its shard."""
    params = [p for g in opt.param_groups for p in g["params"]]

    def tf(key, t):
        p = params[int(key.split(".", 1)[0])]
        return _shard_like(t, p) if t.dim() > 0 and tuple(t.shape) == tuple(p.shape) else t
    return tf
