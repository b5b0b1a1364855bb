"""Distillation methods. A method owns its networks and losses and knows nothing of processes, checkpoints or
progress bars; the one training loop (twostep.train) calls `critic_loss(batch)` and `student_loss(batch)`.

turbopp — the method; ladd, dmd2, diffusion2gan — the trained peers (docs/peers.md); the untrained naive peer
(the teacher at 2 Euler steps) lives in .naive as generators, not as a method."""

METHODS = ("turbopp", "ladd", "dmd2", "diffusion2gan")


def build_method(cfg, teacher):
    if cfg.method == "turbopp":
        from .turbopp import TurboPP
        return TurboPP(cfg, teacher)
    if cfg.method == "ladd":
        from .ladd import LADD
        return LADD(cfg, teacher)
    if cfg.method == "dmd2":
        from .dmd2 import DMD2
        return DMD2(cfg, teacher)
    if cfg.method == "diffusion2gan":
        from .diffusion2gan import Diffusion2GAN
        return Diffusion2GAN(cfg, teacher)
    from ..errors import UserError
    raise UserError(f"method {cfg.method!r} is not implemented (available: {', '.join(METHODS)})")
