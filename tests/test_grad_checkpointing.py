"""train.grad_checkpointing: switched on in the student and the teacher, same gradients, fewer saved activations
(the lora student too, whose two steps share one base and switch adapters)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import BLOCKS_2, fake_batch, tiny_teacher_backbone  # noqa: E402

from twostep.methods import load_config  # noqa: E402
from twostep.methods import build_method  # noqa: E402
from twostep.train import enable_grad_checkpointing  # noqa: E402


def _student_update(decoupling, checkpointing):
    cfg = load_config(None, [BLOCKS_2, f"student.decoupling={decoupling}",
                             f"train.grad_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    method = build_method(cfg, tiny_teacher_backbone())
    n = enable_grad_checkpointing(method) if checkpointing else 0
    saved = [0]

    def pack(t):  # tensors kept for the backward pass outside checkpointed blocks
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = method.student_loss(fake_batch(2))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in method.student.named_parameters() if p.grad is not None}
    flags = [m.gradient_checkpointing for m in [*method.student.modules(), *method.teacher.modules()]
             if hasattr(m, "gradient_checkpointing")]
    return n, flags, saved[0], loss.item(), grads


@pytest.mark.parametrize("decoupling,transformers", [("full", 3), ("lora", 2)])
def test_checkpointing_is_on_same_gradients_fewer_saved_activations(decoupling, transformers):
    _, flags0, saved0, loss0, g0 = _student_update(decoupling, False)
    n, flags1, saved1, loss1, g1 = _student_update(decoupling, True)
    assert not any(flags0) and n == transformers and all(flags1) and len(flags1) == transformers
    assert loss1 == loss0
    assert g1.keys() == g0.keys() and len(g0) > 0
    for k in g0:  # lora: step 1's blocks are recomputed with step 1's adapter, not the last one set (step 2's)
        assert torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-7), k
    assert saved1 < 0.5 * saved0, (saved0, saved1)
