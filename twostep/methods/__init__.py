"""Distillation methods. A method owns its networks and losses and knows nothing of processes, checkpoints or
progress bars; the one training loop (twostep.train) calls `critic_loss(batch)` and `student_loss(batch)`."""


def build_method(cfg, teacher):
    if cfg.method == "turbopp":
        from .turbopp import TurboPP
        return TurboPP(cfg, teacher)
    from ..errors import UserError
    raise UserError(f"method {cfg.method!r} is not implemented yet (available: turbopp)")
