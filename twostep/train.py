"""The one training loop every distillation method uses (accelerate; one process or many).

It knows nothing of what the losses mean: it asks the method for `critic_loss(batch)` (d_updates times) and
`student_loss(batch)` per update, steps AdamW for each parameter set, keeps an EMA of the student, logs,
draws fixed-noise grids, and writes atomic, resumable checkpoints. Batches come from the teacher cache.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from . import flow
from . import faults
from .io.checkpoints import latest_checkpoint, read_checkpoint, write_checkpoint
from .io.files import all_finite, atomic_write_text, load_tensors, tensors_sha256
from .config import Config, dump_config, to_dict
from .errors import UserError
from .images import grid, save_png
from .methods import build_method
from .model import load_teacher
from .student import deepcopy_sharing_frozen, save_student, student_config


def _accelerator(cfg: Config):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())


class BatchSource:
    """Deterministic batches from the teacher cache. `batch_size` is the GLOBAL batch: update k draws the global
    batch's indices from a generator seeded by (seed, k) alone, and rank r of `world` processes takes rows
    [r·B/W, (r+1)·B/W), so N processes see exactly the halves/quarters of the one-process batch, and a resumed
    run sees exactly the batches an uninterrupted one would."""

    def __init__(self, cache, needs: set[str], sigma_mid: float, seed: int, data_real: torch.Tensor | None,
                 rank: int = 0, world: int = 1, device="cpu"):
        self.cache, self.needs, self.seed, self.rank, self.world = cache, needs, seed, rank, world
        self.device = torch.device(device)
        self.mid = cache.state_at(sigma_mid) if "teacher_mid" in needs else None
        self.data_real = data_real

    def get(self, update: int, sub: int, batch_size: int) -> dict:
        if batch_size % self.world:
            raise UserError(f"train.batch_size={batch_size} is the global batch and must be divisible by the "
                            f"{self.world} processes")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + update * 101 + sub * 7)
        per = batch_size // self.world
        mine = slice(self.rank * per, (self.rank + 1) * per)
        idx = torch.randint(0, len(self.cache), (batch_size,), generator=g)
        j = torch.randint(0, len(self.data_real), (batch_size,), generator=g) if self.data_real is not None else None
        fresh = torch.randn((batch_size, *self.cache.noise.shape[1:]), generator=g)
        idx = idx[mine]
        b = {"noise": self.cache.noise[idx], "text": [self.cache.text[i] for i in idx.tolist()], "index": idx}
        if "teacher_final" in self.needs:
            b["teacher_final"] = self.cache.final[idx]
        if self.mid is not None:
            b["teacher_mid"] = self.mid[idx]
        if j is not None:
            b["data_real"] = self.data_real[j[mine]]
        b["fresh_noise"] = fresh[mine]
        if self.device.type != "cpu":  # drawn on the CPU (device-independent batches), used on the accelerator
            b = {k: (v if k == "index" else [t.to(self.device) for t in v] if isinstance(v, list) else
                     v.to(self.device, non_blocking=True)) for k, v in b.items()}
        return b


def _sync_grads(acc, params):
    """Average gradients across processes (a no-op in one process). Works for any call pattern of the method,
    unlike a DDP wrapper, which only syncs what goes through forward()."""
    if acc.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = acc.reduce(p.grad, reduction="mean")


def _all_ranks(acc, flag: bool) -> bool:
    """True when `flag` is true on every process (so all ranks take the same branch and no collective hangs)."""
    if acc.num_processes == 1:
        return bool(flag)
    return bool(acc.reduce(torch.tensor([float(bool(flag))], device=acc.device), reduction="sum").item()
                == acc.num_processes)


def _mean_over_ranks(acc, logs: dict) -> dict:
    """Float log values averaged over processes (equal per-rank batches: the global-batch value of a mean loss)."""
    keys = sorted(k for k, v in logs.items() if isinstance(v, float))
    if acc.num_processes == 1 or not keys:
        return logs
    vals = acc.reduce(torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=acc.device), reduction="mean")
    return {**logs, **{k: float(v) for k, v in zip(keys, vals.tolist())}}


def _rank_seed(seed: int, rank: int, update: int) -> int:
    """Seed of the global torch RNG (the methods' σ and re-noising draws) for update k on rank r of a multi-process
    run: distinct per rank (no two ranks draw the same σ for different samples) and a function of k (resume-exact)."""
    return (seed * 1_000_003 + update * 7_919 + (rank + 1) * 104_729) % (2**63)


def enable_grad_checkpointing(method) -> int:
    """train.grad_checkpointing: diffusers' activation checkpointing (non-reentrant) on every Z-Image transformer
    the loop back-propagates through: the student's, the frozen teacher's (the discriminator pass reaches the
    student through the teacher's blocks) and a critic's own (DMD2's fake score). Returns how many were switched on."""
    mods = []
    for name in ("student", "teacher", "critic"):
        if isinstance(getattr(method, name, None), torch.nn.Module):
            mods += list(getattr(method, name).modules())
    n = 0
    for m in mods:
        if getattr(m, "_supports_gradient_checkpointing", False) and hasattr(m, "enable_gradient_checkpointing"):
            if not getattr(m, "gradient_checkpointing", False):
                m.enable_gradient_checkpointing(gradient_checkpointing_func=adapter_safe_checkpoint)
                n += 1
    return n


def adapter_safe_checkpoint(block, *args):
    """torch.utils.checkpoint (non-reentrant) of one transformer block that re-runs it, in the backward pass, with
    the LoRA adapter that was active in its forward pass. The lora student runs both steps on one base and
    switches adapters per step, so plain checkpointing would recompute step 1's blocks with step 2's adapter
    (wrong gradients, silently; tests/test_grad_checkpointing.py). Also restores requires_grad, which peft's
    set_adapter changes, so the recomputation saves the same tensors as the forward."""
    from torch.utils.checkpoint import checkpoint

    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        BaseTunerLayer = ()
    layers = [m for m in block.modules() if isinstance(m, BaseTunerLayer)] if BaseTunerLayer else []
    if not layers:
        return checkpoint(block, *args, use_reentrant=False)
    active = [list(m.active_adapters) for m in layers]
    flags = [(p, p.requires_grad) for p in block.parameters()]

    def run(*a):
        for m, names in zip(layers, active):
            if list(m.active_adapters) != names:
                m.set_adapter(names)
        for p, f in flags:
            if p.requires_grad != f:
                p.requires_grad_(f)
        return block(*a)

    return checkpoint(run, *args, use_reentrant=False)


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


def _ema_update(ema, model, decay):
    """EMA of the trainable parameters. Under FSDP both modules hold DTensor shards with the same placement, and
    lerp_ works shard by shard (no communication)."""
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            if pm.requires_grad:
                pe.lerp_(pm, 1 - decay)


# -- FSDP2 (train.fsdp): the student's trainable transformers sharded, everything else replicated ------------

def _use_fsdp(acc, cfg) -> bool:
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


def shard_student(acc, *students) -> int:
    """torch FSDP2 (`fully_shard`) over all processes: every ZImageTransformerBlock of each trainable transformer of
    each student (the training student and its EMA), then the transformer itself (embedders, final layer, pad
    tokens), all resharded after forward. Parameters become DTensors sharded on dim 0; FSDP all-gathers them per
    unit in forward/backward and reduce-scatters (averages) their gradients. Returns the number of units."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    n = 0
    for st in students:
        for name in ("step1", "step2", "shared"):
            bb = getattr(st, name, None)
            if bb is None:
                continue
            for m in bb.transformer.modules():
                if isinstance(m, ZImageTransformerBlock):
                    fully_shard(m, mesh=mesh, reshard_after_forward=True)
                    n += 1
            fully_shard(bb.transformer, mesh=mesh, reshard_after_forward=True)
            n += 1
    return n


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t, keep: bool):
    """The whole tensor of a DTensor shard (a collective: every rank calls it, in the same order); on the CPU
    when `keep`, dropped (None) otherwise. A plain tensor is returned as is."""
    if _is_dtensor(t):
        t = t.full_tensor()
        return t.cpu() if keep else None
    return t


def _full_state(module, keep: bool) -> dict | None:
    """A module's state dict with full tensors, kept on the rank that writes files (None elsewhere)."""
    out = {k: _full(v.detach(), keep) for k, v in module.state_dict().items()}
    return out if keep else None


def _full_optim_state(opt, keep: bool) -> dict | None:
    """An optimizer's state dict (integer parameter ids, as torch writes it) with full tensors: the same file
    format as an unsharded run (tests/test_fsdp.py compares them; resuming across the two is not tested)."""
    sd = opt.state_dict()
    state = {pid: {k: _full(v, keep) for k, v in sorted(sd["state"][pid].items())} for pid in sorted(sd["state"])}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def _shard_like(full: torch.Tensor, like):
    """A full tensor read from a file, as this rank's part of `like` (its shard when `like` is a DTensor)."""
    if _is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)  # every rank read the file: slice locally, no communication
    return full


def _load_module(module, path: Path, fsdp: bool):
    if not fsdp:
        module.load_state_dict(load_tensors(path))
        return
    like = module.state_dict()
    module.load_state_dict(load_tensors(path, lambda k, t: _shard_like(t, like[k]) if k in like else t))


def _optim_transform(opt):
    """read_checkpoint transform for an optimizer over FSDP parameters: each saved full moment → its shard."""
    params = [p for g in opt.param_groups for p in g["params"]]

    def tf(key, t):
        p = params[int(key.split(".", 1)[0])]
        return _shard_like(t, p) if t.dim() > 0 and tuple(t.shape) == tuple(p.shape) else t
    return tf


def student_lr(train: dict, decoupling: str) -> float:
    """The student's learning rate: `train.lr_lora` for per-step LoRA adapters, `train.lr_student` otherwise
    (a config written before lr_lora existed trained its adapters at lr_student)."""
    if decoupling == "lora":
        return train.get("lr_lora", train["lr_student"])
    return train["lr_student"]


def _apply_resumed_hparams(acc, opts, prev: dict | None, cfg) -> None:
    """A checkpoint's optimizer state carries its learning rates, so loading it would silently undo a changed
    `--set train.lr_student=...` on --resume. Apply the current config: the learning rate scaled by what the run
    did to it (the NaN rollback's halvings survive), betas and weight decay as configured."""
    t, dec = cfg.train, cfg.student.decoupling
    now_t = to_dict(cfg)["train"]
    prev_t = (prev or {}).get("train") or now_t
    lrs = {"student": (student_lr(prev_t, dec), student_lr(now_t, dec), "lr_lora" if dec == "lora" else "lr_student"),
           "critic": (prev_t["lr_disc"], now_t["lr_disc"], "lr_disc")}
    for name, (was, now, key) in lrs.items():
        if name not in opts:
            continue
        for g in opts[name].param_groups:
            g["lr"] = g["lr"] * now / was
            g["betas"] = tuple(t.betas)
            g["weight_decay"] = t.weight_decay if name == "student" else t.weight_decay_disc
        if now != was:
            acc.print(f"resumed with train.{key}={now:g} (the run had {was:g})")


def _load_state(acc, ck: Path, method, ema, opts, c_params, fsdp: bool) -> dict:
    """Student, EMA, critic and optimizer state from a checkpoint (full tensors; sharded on load under FSDP)."""
    _load_module(method.student, ck / "student.safetensors", fsdp)
    _load_module(ema, ck / "ema.safetensors", fsdp)
    if c_params:
        method.critic.load_state_dict(load_tensors(ck / "critic.safetensors"))
    tfs = {"student": _optim_transform(opts["student"])} if fsdp else None
    return read_checkpoint(ck, opts, tfs)


def distill(cfg: Config, teacher_dir: Path, cache_dir: Path, out: Path, resume: bool = False,
            progress: bool = True) -> Path:
    from .teacher.cache import load_cache

    out = Path(out)
    acc = _accelerator(cfg)
    fsdp = _use_fsdp(acc, cfg)  # docs/sizing.md: what is and is not verified
    ck = latest_checkpoint(out / "checkpoints")
    if ck is not None and not resume:
        raise UserError(f"{out}: already holds a run (checkpoint {ck.name}); pass --resume to continue it or "
                        "choose another --out")
    prev = None
    if resume and (out / "config.yaml").exists():
        import yaml
        prev = yaml.safe_load((out / "config.yaml").read_text())
        now = to_dict(cfg)
        diff = [f"{s}.{k}" for s in now if isinstance(now[s], dict) for k in now[s]
                if s != "train" and prev.get(s, {}).get(k) != now[s][k]]
        if diff:
            raise UserError(f"{out}: --resume with a different config ({', '.join(diff[:3])}); use the run's "
                            "config.yaml or another --out")
    teacher = load_teacher(teacher_dir)
    cache = load_cache(cache_dir, expect_teacher=teacher_dir)
    if tuple(cache.noise.shape[1:]) != (teacher.channels, teacher.resolution, teacher.resolution):
        raise UserError(f"{cache_dir}: cache images {tuple(cache.noise.shape[1:])} do not match the teacher "
                        f"({teacher.channels}×{teacher.resolution}²); rebuild the cache with this teacher")
    torch.manual_seed(cfg.train.seed)
    teacher.backbone.to(acc.device)  # every module on the accelerator's device; batches follow (BatchSource)
    method = build_method(cfg, teacher.backbone)
    for name in ("student", "critic"):
        if isinstance(getattr(method, name, None), torch.nn.Module):
            getattr(method, name).to(acc.device)
    if teacher.parts is not None and getattr(method, "_null", 0) is None:  # DMD2's "": the pipeline's encoder
        method._null = (teacher.null_text(1)[0] if cfg.dmd.guidance != 0      # (loaded for CFG only)
                        else torch.zeros(1, teacher.backbone.cap_feat_dim))
    teacher_hash = tensors_sha256([teacher.backbone.state_dict()])
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(method)
    data_real = None
    if getattr(cfg, "disc", None) is not None and cfg.disc.real == "data":
        if teacher.parts is not None:
            raise UserError("disc.real=data needs a pixel-space teacher; a ZImagePipeline teacher distills in latent "
                            "space: use disc.real=teacher")
        from .data import get_dataset
        data_real = get_dataset(cache.manifest["data"]).sample(min(len(cache), 5000), seed=cfg.train.seed, split="train").images
    src = BatchSource(cache, method.needs(), cfg.student.sigma_mid, cfg.train.seed, data_real,
                      acc.process_index, acc.num_processes, acc.device)

    t = cfg.train
    ema = deepcopy_sharing_frozen(method.student).requires_grad_(False)  # EMA of a frozen weight = that weight
    if fsdp:  # before the optimizers: fully_shard replaces the parameters by DTensor shards
        units = shard_student(acc, method.student, ema)
        acc.print(f"FSDP2: student and EMA sharded over {acc.num_processes} processes ({units} units)")
    s_params, c_params = method.student_parameters(), method.critic_parameters()
    lr_s = student_lr(to_dict(cfg)["train"], cfg.student.decoupling)
    opt_s = torch.optim.AdamW(s_params, lr=lr_s, betas=tuple(t.betas), weight_decay=t.weight_decay)
    opt_c = (torch.optim.AdamW(c_params, lr=t.lr_disc, betas=tuple(t.betas), weight_decay=t.weight_decay_disc)
             if c_params else None)
    opts = {"student": opt_s, **({"critic": opt_c} if opt_c else {})}

    update, log = 0, []
    if ck is not None:
        meta = _load_state(acc, ck, method, ema, opts, c_params, fsdp)
        update, log = meta["step"], meta.get("log", [])
        acc.print(f"resumed from {ck} at update {update}")
        _apply_resumed_hparams(acc, opts, prev, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        (out / "grids").mkdir(exist_ok=True)
    scfg = student_config(teacher.config, cfg, Path(teacher_dir))
    scfg["cache"] = str(cache_dir)

    grid_inputs = _grid_inputs(teacher, cache, acc.device)
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm
        if t.minutes > 0:  # time-budgeted: the bar (and its ETA) counts minutes, updates go in the postfix
            bar = tqdm(total=round(t.minutes, 2), desc=f"distill[{cfg.method}]", unit="min",
                       bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]")
        else:
            bar = tqdm(total=t.updates, initial=update, desc=f"distill[{cfg.method}]", unit="upd")
    t_start = time.time()
    logf = open(out / "log.jsonl", "a") if acc.is_main_process else None
    skipped = in_a_row = 0
    warned_chance = False

    def critic_step(batch: dict, logs: dict) -> int:
        """One discriminator / critic update; returns 1 if it was skipped (non-finite loss or gradient)."""
        c_loss, clogs = method.critic_loss(batch)
        opt_c.zero_grad(set_to_none=True)
        if not _all_ranks(acc, bool(torch.isfinite(c_loss))):
            return 1
        c_loss.backward()
        _sync_grads(acc, c_params)
        if not _clip(c_params, t.grad_clip):
            return 1
        opt_c.step()
        logs.update(clogs)
        return 0

    if update == 0 and opt_c is not None and t.d_warmup > 0:
        # Discriminator warm-up: critic-only updates against the initial student, so that the student's first
        # adversarial gradients come from an informative discriminator (benchmarks/results/disc_probe.md:
        # from scratch the heads need a few hundred updates to separate the teacher's 8-step samples from
        # the initial 2-step ones). Checkpoints start after update 1, so a resume never repeats it.
        wlogs: dict = {}
        wbar = range(t.d_warmup)
        if progress and acc.is_main_process:
            from tqdm.auto import tqdm
            wbar = tqdm(wbar, desc="discriminator warm-up", unit="upd", leave=False)
        with acc.autocast():
            for k in wbar:
                skipped += critic_step(src.get(0, 1_000_000 + k, t.batch_size), wlogs)
        if wlogs:
            rec = {"update": 0, "d_warmup": t.d_warmup, **{k: round(v, 5) for k, v in _mean_over_ranks(acc, wlogs).items()}}
            log.append(rec)
            if logf:
                logf.write(json.dumps(rec) + "\n"); logf.flush()
            acc.print(f"discriminator warm-up ({t.d_warmup} updates): acc real {rec['d_acc_real']:.2f}, "
                      f"fake {rec['d_acc_fake']:.2f}, d_loss {rec['d_loss']:.3f}")
    while update < t.updates:
        if t.minutes > 0 and not _all_ranks(acc, time.time() - t_start <= t.minutes * 60):  # ranks stop together
            acc.print(f"time budget of {t.minutes} min reached at update {update}")
            break
        if acc.num_processes > 1:  # per-rank σ / re-noising draws (one process keeps its single RNG stream)
            torch.manual_seed(_rank_seed(t.seed, acc.process_index, update))
        ts = time.time()
        logs: dict = {}
        with acc.autocast():
            if opt_c is not None:
                for k in range(t.d_updates):
                    skipped += critic_step(src.get(update, 1 + k, t.batch_size), logs)
            s_loss, slogs = method.student_loss(src.get(update, 0, t.batch_size))
        logs.update(slogs)
        opt_s.zero_grad(set_to_none=True)
        ok = _all_ranks(acc, bool(torch.isfinite(s_loss)))
        if ok:
            s_loss.backward()
            if not fsdp:  # FSDP has reduce-scattered (averaged) the sharded gradients in backward
                _sync_grads(acc, s_params)
            ok = _clip(s_params, t.grad_clip)
            if ok:
                opt_s.step()
        if not ok:  # non-finite loss or gradient: skip the update, count it, roll back after too many in a row
            skipped += 1
            in_a_row += 1
            logs["skipped_updates"] = skipped
            if in_a_row >= t.max_nonfinite:
                update, log = _rollback(acc, out, method, ema, opts, c_params, fsdp)
                in_a_row = 0
                continue
        else:
            in_a_row = 0
        update += 1
        faults.point("update")
        _ema_update(ema, method.student, min(t.ema, (1 + update) / (10 + update)))
        logs["sec_per_update"] = time.time() - ts
        if update % t.log_every == 0 or update == t.updates:
            logs = _mean_over_ranks(acc, logs)
            rec = {"update": update, **{k: round(v, 5) if isinstance(v, float) else v for k, v in logs.items()}}
            if "d_acc_real" in logs:  # a discriminator at chance adds nothing over regression: say so
                rec["d_at_chance"] = abs((logs["d_acc_real"] + logs["d_acc_fake"]) / 2 - 0.5) < 0.05
                if rec["d_at_chance"] and not warned_chance and update >= 50:
                    warned_chance = True
                    msg = (f"update {update}: the discriminator sits at chance (acc real {logs['d_acc_real']:.2f}, "
                           f"fake {logs['d_acc_fake']:.2f}); consider disc.sigma_mean<0, a higher lr_disc or disc.r1")
                    (bar.write(msg) if bar is not None else acc.print(msg))
            log.append(rec)
            if logf:
                logf.write(json.dumps(rec) + "\n"); logf.flush()
        if bar is not None:
            if t.minutes > 0:
                bar.n = round(min((time.time() - t_start) / 60, t.minutes), 2)
            else:
                bar.update(1)
            show = {"upd": update, **{k: f"{logs[k]:.3f}" for k in ("g_loss", "d_loss", "d_acc_real", "d_acc_fake",
                                                                   "step1") if k in logs}}
            bar.set_postfix(show, refresh=False)
        if (acc.is_main_process or fsdp) and t.grid_every and (update % t.grid_every == 0 or update == t.updates):
            _write_grid(out / "grids" / f"grid-{update:06d}.png", grid_inputs, ema,  # FSDP: every rank runs the
                        save=acc.is_main_process)                                    # sharded EMA, rank 0 saves
        if t.checkpoint_every and update % t.checkpoint_every == 0 and update < t.updates:
            _checkpoint(acc, out, method, ema, opts, update, log, t.keep_checkpoints, scfg, fsdp)
    if bar is not None:
        bar.close()
    if logf:
        logf.close()
    _checkpoint(acc, out, method, ema, opts, update, log, t.keep_checkpoints, scfg, fsdp)
    check_ranks_in_sync(acc, out, [method.student, ema] + ([method.critic] if c_params else []))
    if tensors_sha256([teacher.backbone.state_dict()]) != teacher_hash:  # the teacher never changes
        raise RuntimeError("teacher weights changed during distillation: this is a bug in the method")
    if acc.is_main_process:
        _loss_curves(log, out / "loss_curves.png")
    return out


def _clip(params, max_norm: float) -> bool:
    """Clip gradients (when max_norm > 0); False when the gradient norm is not finite."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if _is_dtensor(norm):  # FSDP shards: the norm over all shards of all ranks (clip_grad_norm_ reduces it)
        norm = norm.full_tensor()
    return bool(torch.isfinite(norm))


def _rollback(acc, out, method, ema, opts, c_params, fsdp=False):
    """Too many non-finite updates in a row: reload the newest complete checkpoint and halve the learning rates."""
    ck = latest_checkpoint(out / "checkpoints")
    lrs = {k: [g["lr"] * 0.5 for g in o.param_groups] for k, o in opts.items()}
    if ck is None:
        raise RuntimeError("non-finite losses in a row and no checkpoint to roll back to; lower the learning "
                           "rates (train.lr_student / train.lr_disc)")
    meta = _load_state(acc, ck, method, ema, opts, c_params, fsdp)
    for k, o in opts.items():
        for g, lr in zip(o.param_groups, lrs[k]):
            g["lr"] = lr
    acc.print(f"rolled back to {ck.name} (update {meta['step']}) after repeated non-finite losses; learning "
              f"rates halved to {', '.join(f'{k}={v[0]:.3g}' for k, v in lrs.items())}")
    return meta["step"], meta.get("log", [])


def _checkpoint(acc, out, method, ema, opts, update, log, keep, scfg, fsdp=False):
    """Rank 0 writes a checkpoint and the run folder's model files, always full tensors (under FSDP every rank
    takes part in gathering them first), in the same format with or without FSDP."""
    acc.wait_for_everyone()
    main = acc.is_main_process
    if fsdp:
        sd, ema_sd = _full_state(method.student, main), _full_state(ema, main)
        opt_state = {**opts, "student": _full_optim_state(opts["student"], main)}
    elif main:
        sd, ema_sd, opt_state = method.student.state_dict(), ema.state_dict(), opts
    if not main:
        return
    if not all_finite(sd):
        acc.print(f"update {update}: non-finite student weights; checkpoint NOT written")
        return
    mods = {"student": sd, "ema": ema_sd}
    if method.critic_parameters():
        mods["critic"] = method.critic.state_dict()
    write_checkpoint(out / "checkpoints", mods, {"step": update, "log": log}, keep=keep, optimizers=opt_state)
    save_student(ema, {**scfg, "updates": update}, out, state=ema_sd)  # the usable model: EMA weights + config


def _grid_inputs(teacher, cache, device="cpu", n: int = 8):
    n = min(n, len(cache))
    text = [t.to(device) for t in cache.text[:n]]
    noise = cache.noise[:n].to(device)
    naive = teacher.sample(text, noise, steps=2, guidance=0.0).x0.cpu()
    return {"text": text, "noise": noise, "teacher": cache.final[:n], "naive": naive, "decode": teacher.decode}


@torch.no_grad()
def _write_grid(path, gi, student, save: bool = True):
    """Rows: teacher 8-step | naive 2-step (2 NFE) | student 2-step — same noise and prompts."""
    was = student.training
    student.eval()
    st = student(gi["noise"], gi["text"])["x0_2"].float().cpu()
    student.train(was)
    if save:
        save_png(grid(gi["decode"](torch.cat([gi["teacher"], gi["naive"], st])), nrow=len(st), scale=3), path)


def _loss_curves(log, path):
    if not log:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("g_adv", "step1", "paired", "g_dmd", "fake_fm", "d_loss", "d_acc_real", "d_acc_fake",
                        "mse_vs_teacher")
            if any(k in r for r in log)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs = [r["update"] for r in log if k in r]
        ax.plot(xs, [r[k] for r in log if k in r])
        ax.set_title(k); ax.set_xlabel("update")
        if k.startswith("d_acc"):
            ax.axhline(0.5, ls="--", c="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
