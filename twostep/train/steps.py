"""One update of a parameter set, as the loop does it (and benchmarks/memory.py measures it): the loss of each
micro-batch (train.grad_accum of them) is skipped when non-finite on any rank, back-propagated at once (its
activations freed before the next), gradients are averaged over ranks and clipped, AdamW steps (at the warm-up's
fraction of the learning rate, train.warmup). `acc=None`: one process, no accelerator. Also the activation
checkpointing of the transformers an update back-propagates through (train.grad_checkpointing)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .distributed import all_ranks, clip_grads, sync_grads


def optimizer_step(opt, params, loss, grad_clip: float, acc=None, sync: bool = True, lr_scale: float = 1.0) -> bool:
    """zero_grad; backward of `loss` — a tensor, or a list of callables, one per micro-batch (gradient accumulation),
    each returning its mean loss, back-propagated as loss / n right away; gradients averaged over ranks (`sync`;
    FSDP reduce-scatters its own); clipped to `grad_clip` (0 = off); opt.step() at lr × `lr_scale` (the warm-up;
    the optimizer's own lr is left as it was). False (and no step) when a loss or the gradient norm is not finite
    on some rank. With n equal micro-batches of a mean loss, the summed gradient is the gradient of the mean over
    their union: the same update as one batch of n × their size, to float rounding (tests/test_accum.py)."""
    opt.zero_grad(set_to_none=True)
    micro = loss if isinstance(loss, (list, tuple)) else [lambda: loss]
    n = len(micro)
    for f in micro:
        lo = f()
        if not all_ranks(acc, bool(torch.isfinite(lo))):
            return False
        (lo / n if n > 1 else lo).backward()
    if sync:
        sync_grads(acc, params)
    if not clip_grads(params, grad_clip):
        return False
    if lr_scale == 1.0:
        opt.step()
        return True
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = g["lr"] * lr_scale
    try:
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
    return True


def warmup_scale(update: int, warmup: int) -> float:
    """train.warmup: the learning-rate factor of update `update` (1, 2, ...): min(1, update / warmup), linear
    (Goyal et al. 2017, "Accurate, large minibatch SGD", §2.2 gradual warm-up); 1 when warmup = 0."""
    return min(1.0, update / warmup) if warmup > 0 else 1.0


def lr_scale(update: int, warmup: int, half_life: int = 0) -> float:
    """The student's learning-rate factor of update `update` (1, 2, ...): the warm-up (warmup_scale) times
    train.lr_half_life's exponential decay 0.5 ** (update / half_life) (1 when half_life = 0). It depends on the
    update alone, never on train.updates, so a run continued to a larger budget follows the same schedule."""
    decay = 0.5 ** (update / half_life) if half_life > 0 else 1.0
    return warmup_scale(update, warmup) * decay


def split_batch(batch: dict, n: int) -> list[dict]:
    """A batch (this rank's rows of one global draw) as n micro-batches of equal, consecutive rows (train.grad_accum;
    the loop draws batch_size × grad_accum rows, so the micro-batches together are exactly the big batch)."""
    if n == 1:
        return [batch]
    rows = len(batch["text"])
    if rows % n:
        raise UserError(f"{rows} rows per process do not split into train.grad_accum={n} equal micro-batches; make "
                        "train.batch_size divisible by the number of processes")
    per = rows // n

    def part(v, i):  # per-row values (tensors, lists) are split; anything else is the batch's, shared
        return v[i * per:(i + 1) * per] if torch.is_tensor(v) or isinstance(v, (list, tuple)) else v
    return [{k: part(v, i) for k, v in batch.items()} for i in range(n)]


def _mean_logs(logs: list[dict]) -> dict:
    """The micro-batches' logs as one: float values averaged (each a mean over equal micro-batches: the mean over
    the update's whole batch), others from the last."""
    if len(logs) == 1:
        return logs[0]
    out = {k: v for lg in logs for k, v in lg.items()}
    for k, v in out.items():
        if isinstance(v, float):  # over the micro-batches that log it (LADD's mse_vs_teacher: those with step 2)
            have = [lg[k] for lg in logs if isinstance(lg.get(k), float)]
            out[k] = sum(have) / len(have)
    return out


def _micro_losses(loss_fn, batches: list[dict], logs: list, autocast=None):
    def one(b):
        def f():
            with autocast() if autocast is not None else nullcontext():
                loss, lg = loss_fn(b)
            logs.append(lg)
            return loss
        return f
    return [one(b) for b in batches]


def critic_step(method, opt, params, batch, grad_clip: float, acc=None) -> dict | None:
    """One discriminator / critic update (under the caller's autocast) on a batch or a list of micro-batches
    (train.grad_accum); its logs, or None when it was skipped (non-finite loss or gradient)."""
    opt.zero_grad(set_to_none=True)
    if isinstance(batch, dict):
        loss, logs = method.critic_loss(batch)
        return logs if optimizer_step(opt, params, loss, grad_clip, acc) else None
    logs: list = []
    ok = optimizer_step(opt, params, _micro_losses(method.critic_loss, batch, logs), grad_clip, acc)
    return _mean_logs(logs) if ok else None


def student_step(method, opt, params, batch, grad_clip: float, acc=None, fsdp: bool = False,
                 lr_scale: float = 1.0) -> tuple[bool, dict]:
    """One student update on a batch or a list of micro-batches (train.grad_accum): each loss under the
    accelerator's autocast, its backward outside it; stepped at lr × lr_scale (train.warmup). (stepped, logs)."""
    autocast = acc.autocast if acc is not None else None
    opt.zero_grad(set_to_none=True)  # the previous update's gradients are not kept alive through the forward
    if isinstance(batch, dict):
        with autocast() if autocast is not None else nullcontext():
            loss, logs = method.student_loss(batch)
        return optimizer_step(opt, params, loss, grad_clip, acc, sync=not fsdp, lr_scale=lr_scale), logs
    logs_: list = []
    ok = optimizer_step(opt, params, _micro_losses(method.student_loss, batch, logs_, autocast), grad_clip, acc,
                        sync=not fsdp, lr_scale=lr_scale)
    return ok, _mean_logs(logs_) if logs_ else {}


def enable_grad_checkpointing(method) -> int:
    """train.grad_checkpointing: diffusers' activation checkpointing (non-reentrant) on every Z-Image transformer
    the loop back-propagates through (`method.backprop_modules()`: the student's, the frozen teacher's — the
    discriminator pass reaches the student through the teacher's blocks — and a critic's own, e.g. DMD2's fake
    score). Returns how many were switched on."""
    n = 0
    for mod in method.backprop_modules():
        for m in mod.modules():
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
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer  # heavy: only with checkpointing on
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
