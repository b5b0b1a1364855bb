"""Semantics of the Diffusion2GAN peer pinned: the regression target is the teacher's sample for the SAME noise,
both images of a pair get the SAME augmentation, the GAN's real images are the teacher's outputs, the
discriminator is multi-scale on the frozen teacher's blocks, and one parameter set runs both steps end to end."""

from pathlib import Path

import pytest
import torch

from twostep.methods import load_config
from twostep.errors import UserError
from twostep.methods import build_method
from twostep.methods import diffusion2gan as d2g
from twostep.methods.diffusion2gan import Diffusion2GAN, apply_augment, paired_augment

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "diffusion2gan.yaml"


from tiny import fake_batch as _batch  # noqa: E402
from tiny import tiny_teacher_backbone as _teacher  # noqa: E402


def _method(*sets):
    torch.manual_seed(0)
    return build_method(load_config(CONFIG, list(sets)), _teacher())


def test_regression_target_is_the_paired_teacher_sample():
    m = _method("d2g.gan_weight=0.0")
    b = _batch()
    with torch.no_grad():
        own = m.student(b["noise"], b["text"])["x0_2"]
    b["teacher_final"] = own.clone()                 # the "teacher sample" for exactly this noise
    _, logs = m.student_loss(b)
    assert logs["paired"] < 1e-10                    # target = the pair of this noise (and same augmentation)
    b["teacher_final"] = own.flip(0)                 # pairs swapped: another noise's sample
    _, logs = m.student_loss(b)
    assert logs["paired"] > 1e-3
    assert m.needs() == {"noise", "text", "teacher_final"}


def test_augmentation_is_identical_for_both_images_and_differentiable(monkeypatch):
    a = torch.randn(4, 3, 32, 32, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    x, y = paired_augment(a, a.detach().clone(), 0.125, True, generator=g)
    assert torch.equal(x.detach(), y)                # same flip + shift on both images of each pair
    assert not torch.equal(x.detach(), a.detach())   # and it is not the identity
    x.sum().backward()
    assert a.grad is not None
    # the augmentation itself: flip, then shift by (dy, dx) with zero fill
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    p = {"flip": torch.tensor([True]), "dy": torch.tensor([1]), "dx": torch.tensor([-1]), "pad": 1}
    want = torch.zeros(1, 1, 4, 4)
    want[..., 1:, :3] = img.flip(-1)[..., :3, 1:]
    assert torch.equal(apply_augment(img, p), want)
    # inside the method: the two images handed to the perceptual distance carry the same augmentation
    m = _method("d2g.gan_weight=0.0")
    seen = []
    orig = d2g.feature_distance
    monkeypatch.setattr(d2g, "feature_distance", lambda disc, u, v, t: seen.append((u, v)) or orig(disc, u, v, t))
    b = _batch()
    with torch.no_grad():
        b["teacher_final"] = m.student(b["noise"], b["text"])["x0_2"]
    torch.manual_seed(1)
    m.student_loss(b)
    (u, v), = seen
    assert torch.allclose(u.detach(), v, atol=1e-6)


def test_gan_real_is_teacher_outputs_and_fake_is_student_for_same_noise(monkeypatch):
    m = _method()
    b = _batch()
    seen = []
    orig = m.critic.features
    monkeypatch.setattr(m.critic, "features", lambda x0, *a: seen.append(x0.detach().clone()) or orig(x0, *a))
    m.critic_loss(b)
    assert torch.equal(seen[0], b["teacher_final"])
    with torch.no_grad():
        assert torch.allclose(seen[1], m.student(b["noise"], b["text"])["x0_2"], atol=1e-6)


def test_multiscale_discriminator_on_frozen_teacher_blocks(monkeypatch):
    m = _method()
    assert m.critic.scales == [1, 2] and len(m.critic.discs) == 2
    for d in m.critic.discs:
        assert d.teacher is m.teacher and d.blocks == list(range(m.teacher.num_blocks))   # all blocks
    teacher_ids = {id(p) for p in m.teacher.parameters()}
    assert teacher_ids.isdisjoint({id(p) for p in m.critic_parameters()})
    seen = []
    orig = m.critic.discs[1].features
    monkeypatch.setattr(m.critic.discs[1], "features", lambda x0, *a: seen.append(x0.detach().clone()) or orig(x0, *a))
    x = torch.randn(2, 3, 32, 32)
    logits = m.critic(x, _batch()["text"])
    half = torch.nn.functional.avg_pool2d(x, 2)
    assert torch.allclose(seen[0], torch.nn.functional.interpolate(half, scale_factor=2, mode="bilinear"))
    assert logits.shape == (2, 2 * 2 * 8 * 8)       # 2 scales × 2 blocks × 8×8 token logits
    with pytest.raises(UserError, match="shared"):
        Diffusion2GAN(load_config(CONFIG, ["student.decoupling=lora"]), _teacher())


def test_shared_params_full_two_step_rollout_end_to_end(monkeypatch):
    m = _method()
    assert {id(p) for p in m.student.step_parameters(1)} == {id(p) for p in m.student.step_parameters(2)}
    outs = []
    orig = m.student.forward
    monkeypatch.setattr(m.student, "forward", lambda *a, **k: outs.append((k, orig(*a, **k))) or outs[-1][1])
    loss, _ = m.student_loss(_batch())
    (kw, out), = outs
    assert kw.get("gradient", "end_to_end") == "end_to_end"
    assert out["x_m"].requires_grad and out["x0_1"].requires_grad           # step 1 is in the graph
    (g_xm,) = torch.autograd.grad(loss, out["x_m"], retain_graph=True)
    assert g_xm.abs().sum() > 0                                              # the final loss reaches step 1
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student_parameters())
    assert all(p.grad is None for p in m.critic_parameters())


def test_teacher_unchanged_after_updates():
    m = _method("disc.r1=0.1")
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt_s = torch.optim.AdamW(m.student_parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(m.critic_parameters(), lr=1e-3)
    for i in range(2):
        l, logs = m.critic_loss(_batch(seed=i)); opt_c.zero_grad(); l.backward(); opt_c.step()
        assert "r1" in logs
        l, _ = m.student_loss(_batch(seed=i)); opt_s.zero_grad(); l.backward(); opt_s.step()
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())
