"""Semantics of the LADD peer pinned: the GAN head reads the frozen TEACHER's features, real = teacher samples,
the earlier student step is rolled out without gradient, one parameter set for both steps, high-noise σ."""

from pathlib import Path

import pytest
import torch

from twostep.methods import load_config
from twostep.errors import UserError
from twostep.methods import build_method
from twostep.methods.ladd import LADD

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ladd.yaml"


from tiny import fake_batch as _batch  # noqa: E402
from tiny import tiny_teacher_backbone as _teacher  # noqa: E402
from tiny import BLOCKS_2  # noqa: E402


def _method(*sets):
    torch.manual_seed(0)
    return build_method(load_config(CONFIG, [BLOCKS_2, *sets]), _teacher())


def _force_steps(m, monkeypatch, k):
    monkeypatch.setattr(m, "sample_steps", lambda b, device: torch.full((b,), k, dtype=torch.long))


def test_config_is_ladd_with_shared_params_and_high_noise():
    m = _method()
    assert isinstance(m, LADD) and m.student.decoupling == "shared"
    ids1 = {id(p) for p in m.student.step_parameters(1)}
    assert ids1 == {id(p) for p in m.student.step_parameters(2)}         # one parameter set for both steps
    assert m.critic.sigma_dist == "logit_normal" and m.critic.sigma_mean == 1.0
    torch.manual_seed(0)
    assert m.critic.sample_sigma(4000, "cpu").mean() > 0.65             # biased to high noise (mean 0.5 at μ=0)
    with pytest.raises(UserError, match="shared"):
        LADD(load_config(CONFIG, ["student.decoupling=full"]), _teacher())


def test_gan_head_reads_frozen_teacher_features(monkeypatch):
    m = _method()
    assert m.critic.teacher is m.teacher                                  # the extractor IS the teacher object
    teacher_ids = {id(p) for p in m.teacher.parameters()}
    assert teacher_ids.isdisjoint({id(p) for p in m.critic_parameters()})
    assert teacher_ids.isdisjoint({id(p) for p in m.student_parameters()})
    calls = []
    orig = m.teacher.features
    monkeypatch.setattr(m.teacher, "features", lambda *a, **k: calls.append(1) or orig(*a, **k))
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt_s = torch.optim.AdamW(m.student_parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(m.critic_parameters(), lr=1e-3)
    for i in range(2):
        l, _ = m.critic_loss(_batch(seed=i)); opt_c.zero_grad(); l.backward(); opt_c.step()
        n = len(calls)
        l, _ = m.student_loss(_batch(seed=i)); opt_s.zero_grad(); l.backward(); opt_s.step()
        assert len(calls) == n + 1                                        # the student's fake goes through it
    assert len(calls) == 2 * (2 + 1)                                      # critic: real + fake, student: fake
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())   # bit-identical


@pytest.mark.parametrize("k", [1, 2])
def test_real_is_teacher_samples_and_fake_is_student_at_step_k(k, monkeypatch):
    m = _method()
    _force_steps(m, monkeypatch, k)
    batch = _batch()
    seen = []
    orig = m.critic.features
    monkeypatch.setattr(m.critic, "features", lambda x0, *a: seen.append(x0.detach().clone()) or orig(x0, *a))
    m.critic_loss(batch)
    assert torch.equal(seen[0], batch["teacher_final"])                   # REAL = the teacher's samples
    with torch.no_grad():
        out = m.student(batch["noise"], batch["text"])                    # the inference rollout
    assert torch.allclose(seen[1], out["x0_1" if k == 1 else "x0_2"], atol=1e-6)


def test_step2_input_is_the_students_own_step1_rolled_out_without_grad(monkeypatch):
    m = _method()
    _force_steps(m, monkeypatch, 2)
    batch = _batch()
    calls = []
    bb = m.student.step_backbone(2)
    orig = bb.denoise

    def spy(x, sigma, text):
        out = orig(x, sigma, text)
        calls.append({"grad_on": torch.is_grad_enabled(), "x_req": x.requires_grad, "x": x.detach().clone(),
                      "sigma": sigma.detach().clone(), "out_req": out.requires_grad})
        return out

    monkeypatch.setattr(bb, "denoise", spy)
    loss, _ = m.student_loss(batch)
    step1, step2 = calls
    assert not step1["grad_on"] and not step1["out_req"]                  # step 1 under no_grad
    assert torch.all(step1["sigma"] == 1.0)
    assert not step2["x_req"] and step2["out_req"]                        # x_m carries no graph; step 2 does
    assert torch.allclose(step2["sigma"], torch.full_like(step2["sigma"], 0.75))
    with torch.no_grad():
        x_m = m.student(batch["noise"], batch["text"])["x_m"]
    assert torch.allclose(step2["x"], x_m, atol=1e-6)                     # same-noise re-noising, as at inference


def test_student_gradient_is_that_of_the_final_step_alone(monkeypatch):
    """The gradient w.r.t. the step-1 output path is zero: the loss's gradient equals that of step 2 run on a
    constant x_m."""
    m = _method()
    _force_steps(m, monkeypatch, 2)
    batch = _batch()
    params = m.student_parameters()
    torch.manual_seed(5)
    loss, _ = m.student_loss(batch)
    g_method = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        x_m = m.student(batch["noise"], batch["text"])["x_m"]
    torch.manual_seed(5)
    x0_2 = m.student.step_backbone(2).denoise(x_m, torch.full((2,), 0.75), batch["text"])
    from twostep.discriminator import g_loss
    ref = g_loss(m.critic(x0_2, batch["text"]))
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    assert torch.allclose(loss, ref)
    for a, b in zip(g_method, g_ref):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_steps_are_drawn_from_both_and_losses_reach_only_their_parameters():
    m = _method()
    k = m.sample_steps(400, "cpu")
    assert set(k.tolist()) == {1, 2} and 0.4 < (k == 2).float().mean() < 0.6
    loss, _ = m.critic_loss(_batch())
    loss.backward()
    assert all(p.grad is None for p in m.student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.critic.parameters())
    for p in m.critic.parameters():
        p.grad = None
    loss, _ = m.student_loss(_batch())
    loss.backward()
    assert all(p.grad is None for p in m.critic.parameters()) and all(p.requires_grad for p in m.critic.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student_parameters())
    assert m.needs() == {"noise", "text", "teacher_final"}
