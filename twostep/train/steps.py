"""One update of a parameter set, as the loop does it (and benchmarks/memory.py measures it): the loss is
skipped when non-finite on any rank, gradients are averaged over ranks and clipped, AdamW steps. `acc=None`:
one process, no accelerator. Also the activation checkpointing of the transformers an update back-propagates
through (train.grad_checkpointing)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from .distributed import all_ranks, clip_grads, sync_grads


def optimizer_step(opt, params, loss: torch.Tensor, grad_clip: float, acc=None, sync: bool = True) -> bool:
    """zero_grad; backward of `loss`; gradients averaged over ranks (`sync`; FSDP reduce-scatters its own);
    clipped to `grad_clip` (0 = off); opt.step(). False (and no step) when the loss or the gradient norm is not
    finite on some rank."""
    opt.zero_grad(set_to_none=True)
    if not all_ranks(acc, bool(torch.isfinite(loss))):
        return False
    loss.backward()
    if sync:
        sync_grads(acc, params)
    if not clip_grads(params, grad_clip):
        return False
    opt.step()
    return True


def critic_step(method, opt, params, batch: dict, grad_clip: float, acc=None) -> dict | None:
    """One discriminator / critic update (under the caller's autocast); its logs, or None when it was skipped
    (non-finite loss or gradient)."""
    loss, logs = method.critic_loss(batch)
    return logs if optimizer_step(opt, params, loss, grad_clip, acc) else None


def student_step(method, opt, params, batch: dict, grad_clip: float, acc=None,
                 fsdp: bool = False) -> tuple[bool, dict]:
    """One student update: the loss under the accelerator's autocast, the backward outside it. (stepped, logs)."""
    with acc.autocast() if acc is not None else nullcontext():
        loss, logs = method.student_loss(batch)
    return optimizer_step(opt, params, loss, grad_clip, acc, sync=not fsdp), logs


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
