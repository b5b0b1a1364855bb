"""The naive peer pinned: the teacher itself, unchanged, sampled with 2 Euler steps on the [1, .75, 0] grid,
with truthful NFE (2 without CFG, 4 with)."""

import torch

from twostep import flow
from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config
from twostep.model import Teacher
from twostep.sampling import NaiveSampler, naive_generators


def _teacher(guidance=1.5):
    tcfg = tiny_zimage_config(dim=32, n_layers=2, n_heads=1)
    bb = ZImageBackbone.from_config(tcfg, seed=0).requires_grad_(False).eval()
    return Teacher(bb, {"kind": "teacher", "transformer": tcfg, "resolution": 32,
                        "sampling": {"steps": 8, "shift": 3.0, "guidance": guidance}})


def _inputs(b=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5 + i, 384, generator=g) for i in range(b)], torch.randn(b, 3, 32, 32, generator=g)


def test_naive_is_the_unchanged_teacher_at_two_euler_steps(monkeypatch):
    t = _teacher()
    null = torch.randn(3, 384, generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(t, "null_text", lambda n: [null] * n)      # "" features without the text encoder
    before = {k: v.clone() for k, v in t.backbone.state_dict().items()}
    gens = naive_generators(t)
    assert set(gens) == {"naive-2step-nocfg", "naive-2step-cfg"}
    nocfg, withcfg = gens["naive-2step-nocfg"], gens["naive-2step-cfg"]
    assert isinstance(nocfg, NaiveSampler) and nocfg.teacher is t and withcfg.teacher is t
    assert (nocfg.steps, nocfg.guidance, nocfg.nfe) == (2, 0.0, 2)
    assert (withcfg.steps, withcfg.guidance, withcfg.nfe) == (2, 1.5, 4)    # the teacher's own guidance
    text, noise = _inputs()
    grid = [1.0, 0.75, 0.0]
    out = nocfg.generate(text, noise)
    ref = flow.sample_euler(t.backbone.denoise, noise, text, grid)
    assert torch.allclose(out.sigmas.float(), torch.tensor(grid)) and out.nfe == 2
    assert torch.allclose(out.x0, ref.x0, atol=1e-6)
    out = withcfg.generate(text, noise)
    ref = flow.sample_euler(t.backbone.denoise, noise, text, grid, guidance=1.5, neg_text=[null, null])
    assert out.nfe == 4 and torch.allclose(out.x0, ref.x0, atol=1e-6)
    assert not torch.allclose(out.x0, nocfg.generate(text, noise).x0)
    assert all(torch.equal(before[k], v) for k, v in t.backbone.state_dict().items())   # weights unchanged
    assert "2-step" in nocfg.describe() and "4 NFE" in withcfg.describe()


def test_guidance_override_and_no_cfg_teacher():
    assert set(naive_generators(_teacher(guidance=0.0))) == {"naive-2step-nocfg"}
    gens = naive_generators(_teacher(guidance=0.0), guidance=3.0)
    assert gens["naive-2step-cfg"].guidance == 3.0 and gens["naive-2step-cfg"].nfe == 4
