"""Semantics of the DMD2 peer pinned: the fake score trains by flow matching on the DETACHED student output,
the generator's DMD gradient is (p_real − p_fake)/mean|p_real| exactly, the real score is the teacher with CFG,
backward simulation runs under no_grad, the GAN head reads the FAKE-SCORE network's features against real data,
and the teacher never changes."""

from pathlib import Path

import pytest
import torch

from twostep import flow
from twostep.methods import load_config
from twostep.errors import UserError
from twostep.methods import build_method
from twostep.methods.dmd2 import DMD2

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dmd2.yaml"


from tiny import fake_batch as _batch  # noqa: E402
from tiny import tiny_teacher_backbone as _teacher  # noqa: E402
from tiny import BLOCKS_2  # noqa: E402


NULL = torch.randn(3, 384, generator=torch.Generator().manual_seed(99))


def _method(*sets):
    torch.manual_seed(0)
    m = build_method(load_config(CONFIG, [BLOCKS_2, *sets]), _teacher())
    m.null_caption = NULL  # the "" caption without loading the text encoder
    return m


def _force_steps(m, monkeypatch, k):
    monkeypatch.setattr(m, "sample_steps", lambda b, device: torch.full((b,), k, dtype=torch.long))


def test_config_two_time_scale_real_data_shared_params():
    cfg = load_config(CONFIG)
    assert cfg.train.d_updates == 5 and cfg.disc.real == "data" and cfg.dmd.gan_weight == 5e-3
    m = _method()
    assert isinstance(m, DMD2) and "data_real" in m.needs()
    assert {id(p) for p in m.student.step_parameters(1)} == {id(p) for p in m.student.step_parameters(2)}
    critic_ids = {id(p) for p in m.critic_parameters()}
    assert {id(p) for p in m.critic.fake.parameters()} <= critic_ids          # fake score is trained ...
    assert {id(p) for p in m.critic.gan.heads.parameters()} <= critic_ids     # ... with the GAN head
    assert critic_ids.isdisjoint({id(p) for p in m.teacher.parameters()})
    assert len(critic_ids) == len(m.critic_parameters())                      # no parameter listed twice
    with pytest.raises(UserError, match="shared"):
        DMD2(load_config(CONFIG, ["student.decoupling=full"]), _teacher())


@pytest.mark.parametrize("k", [1, 2])
def test_fake_score_trains_by_flow_matching_on_detached_student_output(k, monkeypatch):
    m = _method()
    _force_steps(m, monkeypatch, k)
    batch = _batch()
    seen = []
    orig = flow.flow_target
    monkeypatch.setattr(flow, "flow_target", lambda x0, eps: seen.append((x0, eps)) or orig(x0, eps))
    raw_in = []
    orig_raw = m.critic.fake.raw_output
    monkeypatch.setattr(m.critic.fake, "raw_output", lambda x, s, t: raw_in.append((x, s)) or orig_raw(x, s, t))
    loss, logs = m.critic_loss(batch)
    (x0, eps), = seen
    with torch.no_grad():
        out = m.student(batch["noise"], batch["text"])
    assert not x0.requires_grad                                               # sg(generator output)
    assert torch.allclose(x0, out["x0_1" if k == 1 else "x0_2"], atol=1e-6)
    x_t, sigma = raw_in[0]                                                    # the flow-matching call
    assert torch.allclose(x_t, flow.add_noise(x0, eps, sigma))
    assert torch.all((sigma >= 0.02) & (sigma <= 0.98))
    loss.backward()
    assert all(p.grad is None for p in m.student.parameters())                # nothing reaches the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.critic.fake.parameters())


def test_dmd_gradient_normalisation_is_exact(monkeypatch):
    m = _method()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g).requires_grad_(True)
    A = torch.randn(2, 3, 32, 32, generator=g)   # x̂0 of the real score
    B = torch.randn(2, 3, 32, 32, generator=g)   # x̂0 of the fake score
    monkeypatch.setattr(m, "real_x0", lambda x_t, s, t: A)
    monkeypatch.setattr(m, "fake_x0", lambda x_t, s, t: B)
    loss, grad = m.dmd_loss(x, _batch()["text"])
    p_real, p_fake = x.detach() - A, x.detach() - B
    want = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad, want, atol=1e-6)
    loss.backward()
    assert torch.allclose(x.grad, want / x.numel(), atol=1e-9, rtol=1e-5)     # d loss / dx = grad / N
    assert torch.allclose(loss, 0.5 * want.square().mean(), rtol=1e-5)
    # sign: with the fake score predicting x itself, a descent step moves x towards the real score's x̂0
    monkeypatch.setattr(m, "fake_x0", lambda x_t, s, t: x.detach())
    _, grad = m.dmd_loss(x, _batch()["text"])
    step = x.detach() - 0.1 * grad
    assert (step - A).abs().mean() < (x.detach() - A).abs().mean()


def test_real_score_is_the_teacher_with_cfg(monkeypatch):
    m = _method("dmd.guidance=1.5")
    batch = _batch()
    x_t, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        pos = m.teacher.denoise(x_t, sigma, batch["text"])
        neg = m.teacher.denoise(x_t, sigma, [NULL, NULL])
    assert torch.allclose(m.real_x0(x_t, sigma, batch["text"]), flow.apply_guidance(pos, neg, 1.5), atol=1e-5)
    calls = []
    orig = m.teacher.denoise
    monkeypatch.setattr(m.teacher, "denoise", lambda x, s, t: calls.append((x.shape[0], list(t))) or orig(x, s, t))
    m.student_loss(batch)
    (n, texts), = calls                                                       # one batched guided call
    assert n == 4                                                             # positive + negative: doubled
    assert all(a is b for a, b in zip(texts[:2], batch["text"]))
    assert all(torch.equal(t, NULL) for t in texts[2:])


def test_backward_simulation_runs_under_no_grad(monkeypatch):
    m = _method("dmd.gan_weight=0.0")
    _force_steps(m, monkeypatch, 2)
    batch = _batch()
    calls = []
    bb = m.student.step_backbone(2)
    orig = bb.denoise

    def spy(x, sigma, text):
        out = orig(x, sigma, text)
        calls.append((torch.is_grad_enabled(), x.requires_grad, out.requires_grad, sigma.detach().clone()))
        return out

    monkeypatch.setattr(bb, "denoise", spy)
    loss, _ = m.student_loss(batch)
    (g1, _, o1, s1), (g2, x2, o2, s2) = calls
    assert not g1 and not o1 and torch.all(s1 == 1.0)                         # step 1: rolled out, no graph
    assert not x2 and o2 and torch.allclose(s2, torch.full_like(s2, 0.75))    # step 2: grad only from here
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student_parameters())


def test_gan_head_reads_fake_score_features_against_real_data(monkeypatch):
    m = _method()
    assert m.critic.gan.teacher is m.critic.fake and m.critic.fake is not m.teacher
    batch = _batch()
    fake_calls, teacher_calls = [], []
    of, ot = m.critic.fake.features, m.teacher.features
    monkeypatch.setattr(m.critic.fake, "features", lambda x, *a: fake_calls.append(x.detach().clone()) or of(x, *a))
    monkeypatch.setattr(m.teacher, "features", lambda *a: teacher_calls.append(1) or ot(*a))
    seen = []
    og = m.critic.gan.features
    monkeypatch.setattr(m.critic.gan, "features", lambda x0, *a: seen.append(x0.detach().clone()) or og(x0, *a))
    m.critic_loss(batch)
    assert len(fake_calls) == 2 and not teacher_calls
    assert torch.equal(seen[0], batch["data_real"])                           # REAL = real data
    loss, logs = m.student_loss(batch)
    assert len(fake_calls) == 3 and not teacher_calls and "g_adv" in logs
    loss.backward()
    assert all(p.grad is None for p in m.critic_parameters())                 # G's loss does not train critic
    assert all(p.requires_grad for p in m.critic_parameters())


def test_teacher_unchanged_after_updates():
    m = _method()
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt_s = torch.optim.AdamW(m.student_parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(m.critic_parameters(), lr=1e-3)
    fake_before = [p.detach().clone() for p in m.critic.fake.parameters()]
    for i in range(2):
        l, _ = m.critic_loss(_batch(seed=i)); opt_c.zero_grad(); l.backward(); opt_c.step()
        l, _ = m.student_loss(_batch(seed=i)); opt_s.zero_grad(); l.backward(); opt_s.step()
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, m.critic.fake.parameters()))


def test_setup_takes_the_null_caption_from_a_pipeline_teacher_and_data_real_needs_pixels():
    """Method.setup: a ZImagePipeline teacher's "" features (its encoder only when CFG is on); a pixel-space
    teacher leaves the MiniLM "" to the first use. check_teacher refuses real data with a latent teacher."""
    from types import SimpleNamespace
    bb = _teacher()
    calls = []
    latent = SimpleNamespace(parts=object(), backbone=bb, null_text=lambda n: calls.append(n) or [NULL] * n)
    m = build_method(load_config(CONFIG, [BLOCKS_2]), bb)
    m.setup(latent)
    assert m.null_caption is NULL and calls == [1]
    m = build_method(load_config(CONFIG, [BLOCKS_2, "dmd.guidance=0"]), bb)
    m.setup(latent)
    assert torch.equal(m.null_caption, torch.zeros(1, bb.cap_feat_dim)) and calls == [1]
    pixel = SimpleNamespace(parts=None, backbone=bb)
    fresh = build_method(load_config(CONFIG, [BLOCKS_2]), bb)
    fresh.setup(pixel)
    assert fresh.null_caption is None                                         # encoded on first use
    with pytest.raises(UserError, match="disc.real=data needs a pixel-space teacher"):
        m.check_teacher(latent)
    m.check_teacher(pixel)
    build_method(load_config(CONFIG, [BLOCKS_2, "disc.real=teacher"]), bb).check_teacher(latent)
