"""Shared fixtures-as-functions for the method tests: a tiny frozen Z-Image teacher and a fake training batch."""

import torch

from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config

# disc.blocks indexes the teacher's blocks; its default [1, 2, 3] needs 4 and an out-of-range entry is refused (never
# taken modulo the count), so a config for a tiny teacher names blocks it has: the ones [1, 2, 3] used to wrap to.
BLOCKS_2 = "disc.blocks=[0, 1]"   # tiny_teacher_backbone below (2 blocks)
BLOCKS_1 = "disc.blocks=[0]"      # conftest.make_tiny_teacher (1 block)


def tiny_teacher_backbone():
    bb = ZImageBackbone.from_config(tiny_zimage_config(dim=32, n_layers=2, n_heads=1), seed=0)
    return bb.requires_grad_(False).eval()


def fake_batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, 3, 32, 32, generator=g)
    return {"noise": r(), "text": [torch.randn(6 + i, 384, generator=g) for i in range(b)],
            "teacher_final": r().clamp(-1, 1), "teacher_mid": r(), "data_real": r().clamp(-1, 1),
            "fresh_noise": r()}
