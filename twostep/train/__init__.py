"""Distillation training: `distill` (loop.py) and the public pieces it is made of, for tests and benchmarks.

loop.py orchestrates; batches.py (teacher + cache, BatchSource), steps.py (one update, grad checkpointing),
distributed.py (accelerator, rank agreement, FSDP2), state.py (run folder, optimizers, checkpoints, resume,
rollback), viz.py (progress bar, log, grids, loss curves). Imports: methods, student, model, teacher.cache,
io, config, ema and below; nothing above (evaluate, export, cli) imports back.
"""

from .batches import BatchSource, load_inputs, real_images
from .distributed import (accelerator, check_ranks_in_sync, clip_grads, frozen_dtype, materialize, shard_student,
                          use_fsdp)
from .loop import distill, parameter_counts
from .state import apply_resumed_hparams, checkpoint, checkpoint_bytes, load_state, optimizers, rollback, student_lr
from .steps import (adapter_safe_checkpoint, critic_step, enable_grad_checkpointing, optimizer_step, split_batch,
                    student_step, warmup_scale)
from .viz import grid_inputs, loss_curves, write_grid

__all__ = ["BatchSource", "accelerator", "adapter_safe_checkpoint", "apply_resumed_hparams", "check_ranks_in_sync",
           "checkpoint", "checkpoint_bytes", "clip_grads", "critic_step", "distill", "enable_grad_checkpointing",
           "frozen_dtype", "grid_inputs", "load_inputs", "load_state", "loss_curves", "materialize", "optimizer_step",
           "optimizers", "parameter_counts", "real_images", "rollback", "shard_student", "split_batch", "student_lr",
           "student_step", "use_fsdp", "warmup_scale", "write_grid"]
