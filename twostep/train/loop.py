"""The one training loop every distillation method uses (accelerate; one process or many).

It knows nothing of what the losses mean: it asks the method (methods/base.py: the Method contract) for
`critic_loss(batch)` (train.d_updates times) and `student_loss(batch)` per update, steps AdamW for each parameter
set, keeps an EMA of the student, logs, draws fixed-noise grids, and writes atomic, resumable checkpoints.
Batches come from the teacher cache. The rooms: batches.py (inputs), steps.py (one update), distributed.py
(processes, FSDP), state.py (run folder, optimizers, checkpoints), viz.py (bar, log, grids, curves).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import faults
from ..config import Config, to_dict
from ..errors import NonFiniteWeights, UserError
from ..ema import ema_decay, ema_update
from ..io.files import tensors_sha256
from ..io.folders import read_config
from ..io.lock import holds_lock
from ..methods import REGISTRY, build_method
from ..model import load_teacher, num_parameters
from ..student import deepcopy_sharing_frozen, student_config, trainable_copies_on_meta
from .batches import BatchSource, load_inputs, real_images
from .best import keep_best
from .distributed import (accelerator, all_ranks, check_ranks_in_sync, critic_copies, frozen_dtype, materialize,
                          materialize_backbones, mean_over_ranks, rank_seed, shard_critic, shard_student, use_fsdp)
from .state import (apply_resumed_hparams, check_run_folder, checkpoint, load_state, mark_run, optimizers,
                    resume_command, rollback, run_identity, saved_modules, start_run_folder)
from .dcp import use_dcp
from .preempt import Preempted, Stop
from .steps import critic_step, enable_grad_checkpointing, lr_scale, split_batch, student_step
from .viz import (Progress, QuickFD, RunLog, Trackers, at_chance, check_eval_features, check_tracker, eval_extractor,
                  grid_inputs, log_record, quick_eval, training_rows, write_grid)


def prepare_method(cfg: Config, teacher, device, acc=None, fsdp: bool = False):
    """(method, EMA of its student), on `device`, set up with the teacher, after the method's checks of it.

    Built where nothing blows up: the student's full / shared copies of the teacher on the meta device
    (student.trainable_copies_on_meta), its EMA likewise, FSDP-sharded when `fsdp` (train.mixed_precision bf16:
    bf16 all-gathers, fp32 reduce), then given storage on `device` from the teacher's weights (each process only
    its shards); only then is the frozen teacher moved to `device`, in train.frozen_dtype (bf16 on CUDA), never
    upcast. A lora student's frozen base is the teacher's own Parameters, so it follows."""
    with trainable_copies_on_meta():
        method = build_method(cfg, teacher.backbone)
    ema = deepcopy_sharing_frozen(method.student).requires_grad_(False)  # EMA of a frozen weight = that weight
    if fsdp:  # before the optimizers: fully_shard replaces the parameters by DTensor shards
        units = shard_student(acc, method.student, ema, mixed_precision=cfg.train.mixed_precision)
        acc.print(f"FSDP2: student and EMA sharded over {acc.num_processes} processes ({units} units)" +
                  ("; parameters all-gathered in bf16, gradients reduced in fp32"
                   if cfg.train.mixed_precision == "bf16" else ""))
        cu = shard_critic(acc, method, cfg.train.mixed_precision)  # DMD2's fake score: sharded like the student
        if cu:
            acc.print(f"FSDP2: the critic's copy of the teacher sharded too ({cu} units)")
    for m in (method.student, ema):
        materialize(m, teacher.backbone, device)
    materialize_backbones(critic_copies(method), teacher.backbone, device)
    teacher.backbone.to(device=device, dtype=frozen_dtype(cfg, device))
    shared = {p.data_ptr() for p in teacher.backbone.parameters()}
    if any(p.data_ptr() not in shared for n, p in method.student.named_parameters()
           if not p.requires_grad and "lora_" not in n and p.numel()):
        raise RuntimeError("the lora student's frozen base is no longer the teacher's own weights after moving it "
                           "(Module.to replaced the shared Parameters); this is a bug in the loop")
    for m in (*method.modules().values(), ema):
        m.to(device)
    method.setup(teacher)
    method.check_teacher(teacher)
    return method, ema


def parameter_counts(cfg, teacher_dir: Path) -> dict[str, int]:
    """What a distillation trains (`twostep distill --dry-run`): the frozen teacher's parameters and the
    trainable ones of the method's student and critic."""
    teacher = load_teacher(teacher_dir)
    with trainable_copies_on_meta():  # counted, never allocated
        m = build_method(cfg, teacher.backbone)
    return {"teacher": num_parameters(teacher.backbone.parameters()),
            "student": num_parameters(m.student_parameters()), "critic": num_parameters(m.critic_parameters())}


@holds_lock("out", "--out", "student")  # one writer per run folder (rank 0 holds it: twostep/io/lock.py)
def distill(cfg: Config, teacher_dir: Path, cache_dir: Path, out: Path, resume: bool = False,
            progress: bool = True, verify_cache: bool = False) -> Path:
    """Train; returns the run folder. A SIGTERM / SIGINT while training: a checkpoint of the update in progress,
    then preempt.Preempted (the CLI exits 143 / 130; twostep/train/preempt.py)."""
    with Stop() as stop:
        return _distill(cfg, teacher_dir, cache_dir, out, resume, progress, verify_cache, stop)


def _distill(cfg: Config, teacher_dir: Path, cache_dir: Path, out: Path, resume: bool, progress: bool,
             verify_cache: bool, stop: Stop) -> Path:
    out, t = Path(out), cfg.train
    check_tracker(t.log_with)  # train.log_with's package (wandb is not a dependency), before any work
    if t.eval_every:  # from the cache's manifest: before any weight is read
        check_eval_features(t.eval_features, cache_dir)
    REGISTRY[cfg.method].check_blocks(cfg, int(read_config(teacher_dir)["transformer"]["n_layers"]))  # as well
    acc = accelerator(cfg)
    fsdp = use_fsdp(acc, cfg)  # docs/sizing.md: what is and is not verified
    sharded = use_dcp(cfg, acc.num_processes)  # checkpoints through torch.distributed.checkpoint (train/dcp.py)
    if t.batch_size % acc.num_processes:  # before anything is written (BatchSource would refuse it at update 1)
        raise UserError(f"train.batch_size={t.batch_size} is the global batch (of each micro-batch, with "
                        f"train.grad_accum) and must be divisible by the {acc.num_processes} processes")
    # the teacher read in train.frozen_dtype (never a whole fp32 copy of a bf16 6B model per process); the cache lazy
    teacher, cache = load_inputs(teacher_dir, cache_dir, verify=verify_cache, dtype=frozen_dtype(cfg, acc.device))
    identity = run_identity(cache)  # never --out = --teacher / --cache; a resume only of a run of these inputs
    ck, prev = check_run_folder(out, cfg, resume, identity, {"--teacher": teacher_dir, "--cache": cache_dir},
                                teacher.config)
    torch.manual_seed(t.seed)
    # every module on the accelerator's device (batches follow, BatchSource); the student and EMA built there
    method, ema = prepare_method(cfg, teacher, acc.device, acc, fsdp)
    teacher_hash = tensors_sha256([teacher.backbone.state_dict()])
    if t.grad_checkpointing:
        enable_grad_checkpointing(method)
    needs = method.needs()
    src = BatchSource(cache, needs, cfg.student.sigma_mid, t.seed, real_images(cache, needs, t.seed),
                      acc.process_index, acc.num_processes, acc.device, rows=training_rows(len(cache), t, prev))
    quick = None  # train.eval_every: the held-out rows' quick FD (the main process scores; FSDP ranks run along)
    if t.eval_every and (acc.is_main_process or fsdp):
        quick = QuickFD(teacher, cache, range(src.rows, len(cache)),
                        eval_extractor(t.eval_features, cache, acc.device) if acc.is_main_process else None,
                        max(1, t.batch_size // acc.num_processes), acc.device, score=acc.is_main_process)

    s_params, c_params = method.student_parameters(), method.critic_parameters()
    opts = optimizers(cfg, s_params, c_params)
    opt_s, opt_c = opts["student"], opts.get("critic")

    update, records = 0, []
    if ck is not None:
        meta = load_state(ck, method, ema, opts, fsdp, teacher_hash)
        update, records = meta["step"], meta.get("log", [])
        acc.print(f"resumed from {ck} at update {update}")
        apply_resumed_hparams(acc, opts, prev, cfg)
    start_run_folder(acc, out, cfg, identity, resume_command(teacher_dir, cache_dir, out), update)
    scfg = {**student_config(teacher.config, cfg, Path(teacher_dir)), "cache": str(cache_dir),
            # lora: the frozen base is the teacher; checkpoints and the run folder point at it by this hash
            **({"base_sha256": teacher_hash} if cfg.student.decoupling == "lora" else {})}

    grids = grid_inputs(teacher, cache, acc.device,  # the validation columns only where grids are drawn
                        prompts=t.validation_prompts if acc.is_main_process or fsdp else ())
    bar = Progress(progress and acc.is_main_process, t, f"distill[{cfg.method}]", update, method.log_keys, acc.print)
    t_start = time.time()
    log = RunLog(out / "log.jsonl", records, acc.is_main_process,  # + train.log_with, loss_curves.png
                 Trackers(t.log_with, out, to_dict(cfg), acc.is_main_process, resumed_at=update), method.log_keys)
    skipped = in_a_row = rollbacks = 0  # rollbacks: at most train.max_nonfinite, then the run gives up (state.rollback)
    applied = 0  # student updates applied (not skipped) by this process: none at all is not a trained student
    warned_chance = False
    stopped = None  # why the run stopped before train.updates (a time budget: the run is complete)

    def batch(update: int, sub: int):
        """This rank's rows of the update's batch; train.grad_accum > 1: batch_size × grad_accum rows drawn as one
        global batch, as that many micro-batches of batch_size rows (over all processes)."""
        if t.grad_accum == 1:
            return src.get(update, sub, t.batch_size)
        return split_batch(src.get(update, sub, t.batch_size * t.grad_accum), t.grad_accum)

    def critic_updates(update: int, subs, logs: dict) -> int:
        """Critic updates on the batches (update, sub) for each sub; returns how many were skipped."""
        n = 0
        with acc.autocast():
            for sub in subs:
                clogs = critic_step(method, opt_c, c_params, batch(update, sub), t.grad_clip, acc)
                n += clogs is None
                logs.update(clogs or {})
        return n

    stop.arm()  # from here a signal stops the run after the update in progress, with a checkpoint
    start, signalled = update, None
    if update == 0 and opt_c is not None and t.d_warmup > 0:
        # Discriminator warm-up: critic-only updates against the initial student, so that the student's first
        # adversarial gradients come from an informative discriminator. Checkpoints start after update 1, so a
        # resume never repeats it.
        # Under a time budget (train.minutes) the warm-up ends early once it has used half of it, so the student
        # always gets the other half (on a loaded machine 300 critic updates could otherwise take the whole budget).
        wlogs: dict = {}
        tw = time.time()
        done = [0]

        def warmup_subs():
            for k in bar.warmup(t.d_warmup):
                if t.minutes > 0 and not all_ranks(acc, time.time() - t_start <= t.minutes * 30):
                    acc.print(f"discriminator warm-up stopped after {k} of {t.d_warmup} updates: half of the "
                              f"{t.minutes:g}-min time budget used")
                    return
                if stop.requested(acc):
                    return
                done[0] = k + 1
                yield 1_000_000 + k
        skipped += critic_updates(0, warmup_subs(), wlogs)
        if wlogs:  # sec_d_warmup: its seconds (with sec_per_update, a run's training time; benchmarks/run.py)
            rec = log_record(0, {"d_warmup": done[0], **mean_over_ranks(acc, wlogs),
                                 "sec_d_warmup": time.time() - tw})
            log.add(rec)
            acc.print(f"discriminator warm-up ({done[0]} updates): " +
                      ", ".join(f"{k} {rec[k]:.3f}" for k in method.log_keys if k in rec))
    while update < t.updates:
        signalled = stop.requested(acc)  # any rank signalled: all stop here, after the same update
        if signalled:
            break
        if t.minutes > 0 and not all_ranks(acc, time.time() - t_start <= t.minutes * 60):  # ranks stop together
            acc.print(f"time budget of {t.minutes} min reached at update {update}")
            stopped = f"time budget of {t.minutes:g} min"
            break
        if acc.num_processes > 1:  # per-rank σ / re-noising draws (one process keeps its single RNG stream)
            torch.manual_seed(rank_seed(t.seed, acc.process_index, update))
        ts = time.time()
        logs: dict = {}
        if opt_c is not None:
            skipped += critic_updates(update, range(1, 1 + t.d_updates), logs)
        ok, slogs = student_step(method, opt_s, s_params, batch(update, 0), t.grad_clip, acc, fsdp,
                                 lr_scale(update + 1, t.warmup, t.lr_half_life))
        logs.update(slogs)
        if not ok:  # non-finite loss or gradient: skip the update, count it, roll back after too many in a row
            skipped += 1
            in_a_row += 1
            logs["skipped_updates"] = skipped
            if in_a_row >= t.max_nonfinite:
                rollbacks += 1
                update, log.records = rollback(acc, out, method, ema, opts, fsdp, f"{in_a_row} non-finite losses "
                                               "in a row", rollbacks, t.max_nonfinite)
                in_a_row = 0
                continue
        else:
            in_a_row = 0
            applied += 1
        update += 1
        faults.point("update")
        ema_update(ema, method.student, ema_decay(update, t.ema))
        logs["sec_per_update"] = time.time() - ts
        if update % t.log_every == 0 or update == t.updates:
            logs = mean_over_ranks(acc, logs)
            rec = log_record(update, logs)
            chance = at_chance(logs)
            if chance is not None:
                rec["d_at_chance"] = chance
                if chance and not warned_chance and update >= 50:
                    warned_chance = True
                    bar.say(f"update {update}: the discriminator sits at chance (acc real {logs['d_acc_real']:.2f}, "
                            f"fake {logs['d_acc_fake']:.2f}); consider disc.sigma_mean<0, a higher lr_disc or disc.r1")
            log.add(rec)
        bar.update(update, logs)
        if (acc.is_main_process or fsdp) and t.grid_every and (update % t.grid_every == 0 or update == t.updates):
            image = write_grid(out / "grids" / f"grid-{update:06d}.png", grids, ema,  # FSDP: every rank runs
                               save=acc.is_main_process)                      # the sharded EMA, rank 0 saves
            if image is not None:
                log.image("grid", image, update)
        if t.eval_every and (update % t.eval_every == 0 or update == t.updates):
            q = quick_eval(acc, quick, ema)
            if t.keep_best and q["eval_num"]:  # train.keep_best: the EMA of the lowest quick FD in RUN/best/
                q["best"] = int(keep_best(acc, out, ema, update, q["eval_fd"], scfg, fsdp))
            log.add(log_record(update, q))
        if t.checkpoint_every and update % t.checkpoint_every == 0 and update < t.updates:
            try:
                checkpoint(acc, out, method, ema, opts, update, log.records, t.keep_checkpoints, scfg, fsdp, sharded)
            except NonFiniteWeights as e:  # nothing was saved: back to the newest checkpoint, like NaN losses
                rollbacks += 1
                update, log.records = rollback(acc, out, method, ema, opts, fsdp, f"NaN/inf weights in "
                                               f"{', '.join(e.parts) or 'a module'} at update {update}", rollbacks,
                                               t.max_nonfinite)
                in_a_row = 0
                continue
            mark_run(acc, out, t.updates)
    bar.close()
    log.close()  # the final loss_curves.png; the tracker finishes
    if signalled and update == start:  # no update done by this process: nothing new to save
        raise Preempted(signalled, update, None)
    if update > start and applied == 0:  # every update skipped: an untrained student is never marked complete
        raise UserError(f"{out}: all {update - start} student updates were skipped (a non-finite loss or gradient "
                        "each time): the student is untrained and the run stays unfinished; check the cache with "
                        "`twostep distill --verify-cache` (NaN inputs) or lower the learning rates, then re-run")
    checkpoint(acc, out, method, ema, opts, update, log.records, t.keep_checkpoints, scfg, fsdp, sharded)
    check_ranks_in_sync(acc, out, list(saved_modules(method, ema).values()))
    if tensors_sha256([teacher.backbone.state_dict()]) != teacher_hash:  # the teacher never changes
        raise RuntimeError("teacher weights changed during distillation: this is a bug in the method")
    # last: the completion marker (a run stopped by SIGINT or an error stays unfinished: status.json says so)
    mark_run(acc, out, t.updates, complete=update >= t.updates or (stopped is not None and update > 0),
             stopped=stopped)
    if signalled:
        raise Preempted(signalled, update, f"step-{update:08d}")
    return out
