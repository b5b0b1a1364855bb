"""Semantics of Turbo++ pinned: what the discriminator sees as real and fake, what is detached, which
parameters each loss reaches, and that the teacher never changes."""

import copy

import pytest
import torch

from twostep.methods import load_config
from twostep.methods.turbopp import TurboPP


from tiny import fake_batch as _batch  # noqa: E402
from tiny import tiny_teacher_backbone as _teacher  # noqa: E402
from tiny import BLOCKS_2  # noqa: E402


def _method(*sets):
    torch.manual_seed(0)
    return TurboPP(load_config(None, [BLOCKS_2, *sets]), _teacher())


def _grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _nonzero(grads):
    return any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("real", ["teacher", "data"])
def test_discriminator_real_is_teacher_samples_and_fake_is_student_output(real, monkeypatch):
    m = _method(f"disc.real={real}", "loss.step1_loss=none")
    batch = _batch()
    seen = []
    orig_feat = m.critic.features

    def spy(x0, text, sigma, noise):
        seen.append(x0.detach().clone())
        return orig_feat(x0, text, sigma, noise)

    monkeypatch.setattr(m.critic, "features", spy)
    m.critic_loss(batch)
    with torch.no_grad():
        student_out = m.student(batch["noise"], batch["text"])["x0_2"]
    want_real = batch["teacher_final"] if real == "teacher" else batch["data_real"]
    assert torch.equal(seen[0], want_real)                       # real batch
    assert torch.allclose(seen[1], student_out, atol=1e-6)       # fake batch = the student's final image


def test_critic_step_does_not_touch_student_and_student_step_does_not_train_critic():
    m = _method()
    batch = _batch()
    loss, logs = m.critic_loss(batch)
    loss.backward()
    assert all(p.grad is None for p in m.student.parameters())
    assert _nonzero(_grads(m.critic.parameters()))
    for p in m.critic.parameters():
        p.grad = None
    before = copy.deepcopy(m.critic.state_dict())
    loss, logs = m.student_loss(batch)
    loss.backward()
    assert all(p.grad is None for p in m.critic.parameters())  # adversarial loss does not update D
    assert all(torch.equal(before[k], v) for k, v in m.critic.state_dict().items())
    assert all(p.requires_grad for p in m.critic.parameters())  # and D is trainable again afterwards


def test_end_to_end_reaches_theta1_and_detach_blocks_it():
    for mode, expect in [("end_to_end", True), ("detach", False)]:
        m = _method(f"loss.gradient={mode}", "loss.step1_loss=none")
        loss, _ = m.student_loss(_batch())
        loss.backward()
        g1 = _grads(m.student.step_parameters(1))
        assert _nonzero(g1) == expect, mode
        if not expect:
            assert all(g is None or g.abs().sum() == 0 for g in g1)  # exactly zero
        assert _nonzero(_grads(m.student.step_parameters(2)))


@pytest.mark.parametrize("kind", ["traj", "adv"])
def test_step1_loss_reaches_theta1_only(kind):
    m = _method(f"loss.step1_loss={kind}", "loss.adv_weight=0.0")
    loss, logs = m.student_loss(_batch())
    assert "step1" in logs
    loss.backward()
    assert _nonzero(_grads(m.student.step_parameters(1)))
    assert not _nonzero(_grads(m.student.step_parameters(2)))


def test_traj_target_is_teacher_state_at_sigma_mid():
    m = _method("loss.step1_loss=traj", "loss.adv_weight=0.0")
    b = _batch()
    with torch.no_grad():
        x0_1 = m.student(b["noise"], b["text"])["x0_1"]
    # choose the teacher state so that its implied x0 equals x̂0₁ exactly: the loss must then be 0
    b["teacher_mid"] = 0.25 * x0_1 + 0.75 * b["noise"]
    loss, logs = m.student_loss(b)
    assert logs["step1"] < 1e-10


@pytest.mark.parametrize("mode", ["full", "lora", "shared"])
def test_decoupling_parameter_sets(mode):
    m = _method(f"student.decoupling={mode}", "student.lora_rank=2")
    p1, p2 = m.student.step_parameters(1), m.student.step_parameters(2)
    ids1, ids2 = {id(p) for p in p1}, {id(p) for p in p2}
    if mode == "shared":
        assert ids1 == ids2
    else:
        assert ids1.isdisjoint(ids2)
    base_before = None
    if mode == "lora":
        base_before = {n: p.detach().clone() for n, p in m.student.base.named_parameters() if "lora_" not in n}
        assert all(not p.requires_grad for n, p in m.student.base.named_parameters() if "lora_" not in n)
    before1 = [p.detach().clone() for p in p1]
    before2 = [p.detach().clone() for p in p2]
    opt = torch.optim.SGD(m.student_parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        loss, _ = m.student_loss(_batch())
        loss.backward()
        opt.step()
    changed1 = any(not torch.equal(a, b) for a, b in zip(before1, p1))
    changed2 = any(not torch.equal(a, b) for a, b in zip(before2, p2))
    assert changed1 and changed2
    if mode == "lora":
        for n, p in m.student.base.named_parameters():
            if "lora_" not in n:
                assert torch.equal(p, base_before[n]), n   # the base never changes


def test_student_starts_at_the_teacher_and_runs_two_steps_at_sigma_grid():
    m = _method("student.decoupling=lora", "student.lora_rank=2")
    b = _batch()
    t = m.teacher
    from twostep import flow
    with torch.no_grad():
        out = m.student(b["noise"], b["text"])
        ref = flow.sample_euler(t.denoise, b["noise"], b["text"], [1.0, 0.75, 0.0]).x0
    assert torch.allclose(out["x0_2"], ref, atol=1e-5)  # LoRA B = 0: step1/step2 = teacher's naive 2 steps


def test_teacher_is_bit_identical_after_training_updates():
    m = _method("loss.step1_loss=adv", "disc.r1=0.1", "loss.paired_weight=1.0")
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt_s = torch.optim.AdamW(m.student_parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(m.critic_parameters(), lr=1e-3)
    for _ in range(2):
        l, _ = m.critic_loss(_batch()); opt_c.zero_grad(); l.backward(); opt_c.step()
        l, _ = m.student_loss(_batch()); opt_s.zero_grad(); l.backward(); opt_s.step()
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(id(p) not in {id(q) for q in m.teacher.parameters()} for p in m.critic_parameters())


def test_step1_consistency_targets_the_detached_final_image_and_reaches_theta1_only():
    m = _method("loss.step1_loss=consistency", "loss.adv_weight=0.0")
    b = _batch()
    loss, logs = m.student_loss(b)
    with torch.no_grad():
        out = m.student(b["noise"], b["text"])
    assert logs["step1"] == pytest.approx(torch.nn.functional.mse_loss(out["x0_1"], out["x0_2"]).item(), rel=1e-5)
    loss.backward()
    assert _nonzero(_grads(m.student.step_parameters(1)))
    assert not _nonzero(_grads(m.student.step_parameters(2)))  # sg(x̂0₂): the target never trains θ2


def test_mismatch_critic_sees_teacher_reals_with_rolled_captions_as_extra_fakes(monkeypatch):
    from twostep import discriminator as D
    m = _method("disc.mismatch_weight=1.0", "loss.step1_loss=none")
    b = _batch()
    b["text"] = [t + i for i, t in enumerate(b["text"])]   # distinct captions
    seen = []
    orig = m.critic.features

    def spy(x0, text, sigma, noise):
        seen.append((x0.detach().clone(), [t.clone() for t in text]))
        return orig(x0, text, sigma, noise)

    monkeypatch.setattr(m.critic, "features", spy)
    loss_m, logs = m.critic_loss(b)
    assert len(seen) == 3                                          # real, fake, real with the wrong caption
    x, text = seen[2]
    assert torch.equal(x, b["teacher_final"])                      # the teacher's reals ...
    rolled = b["text"][1:] + b["text"][:1]
    assert all(torch.equal(a, r) for a, r in zip(text, rolled))    # ... with the next row's caption
    assert "d_acc_mismatch" in logs
    # the extra term is a fake term: with it, the loss is larger than without (same draws)
    torch.manual_seed(1)
    loss_m, _ = m.critic_loss(b)
    m.cfg.disc.mismatch_weight = 0.0
    torch.manual_seed(1)
    loss_0, _ = m.critic_loss(b)
    assert loss_m.item() > loss_0.item()


def test_mismatch_skips_rows_whose_rolled_caption_is_their_own():
    from twostep.discriminator import mismatched_captions
    a, c = torch.zeros(3, 4), torch.ones(2, 4)
    rolled, keep = mismatched_captions([a, a, c])
    assert keep.tolist() == [False, True, True]
    assert rolled[0] is a and rolled[2] is a
