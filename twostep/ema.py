"""Exponential moving average of a model's weights, with warm-up: one formula for every training loop
(teacher training and distillation)."""

from __future__ import annotations

import torch


def ema_decay(step: int, target: float) -> float:
    """EMA warm-up (as in timm/EDM practice): the decay grows as (1 + n)/(10 + n) up to the target."""
    return min(target, (1 + step) / (10 + step))


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for the trainable parameters (frozen ones are shared or equal).
    Under FSDP both modules hold DTensor shards with the same placement, and lerp_ works shard by shard."""
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            if pm.requires_grad:
                pe.lerp_(pm, 1 - decay)
