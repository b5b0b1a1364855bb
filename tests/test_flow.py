"""Property tests for the conventions in twostep.flow (round trips in float64, σ grids, diffusers agreement)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twostep import flow

sig = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)


def _rand(seed, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@given(seeds, sig)
def test_x0_u_roundtrip(seed, s):
    x0, eps = _rand(seed), _rand(seed + 1)
    xs = flow.add_noise(x0, eps, s)
    u = flow.flow_target(x0, eps)                       # the exact raw output u = x0 − ε
    assert torch.allclose(flow.x0_from_u(xs, s, u), x0, atol=1e-10)
    assert torch.allclose(flow.u_from_x0(xs, s, x0), u, atol=1e-8)
    assert torch.allclose(flow.eps_from_x0(xs, s, x0), eps, atol=1e-8)


@given(seeds, st.lists(sig, min_size=3, max_size=3))
def test_per_sample_sigma_broadcast(seed, ss):
    x0, eps = _rand(seed), _rand(seed + 1)
    s = torch.tensor(ss, dtype=torch.float64)
    xs = flow.add_noise(x0, eps, s)
    for i in range(3):
        assert torch.allclose(xs[i], (1 - ss[i]) * x0[i] + ss[i] * eps[i])


@given(seeds, sig, st.floats(0.0, 1.0))
def test_euler_step_on_exact_x0_follows_the_straight_path(seed, s, frac):
    # With the true x0, the ODE path is a straight line: one Euler step lands exactly on x_σ'.
    x0, eps = _rand(seed), _rand(seed + 1)
    sn = s * frac
    out = flow.euler_step(flow.add_noise(x0, eps, s), s, sn, x0)
    assert torch.allclose(out, flow.add_noise(x0, eps, sn), atol=1e-10)


def test_t_sigma_and_velocity_sign():
    assert flow.sigma_to_t(1.0) == 0.0 and flow.sigma_to_t(0.0) == 1.0
    assert flow.t_to_sigma(flow.sigma_to_t(0.3)) == pytest.approx(0.3)
    x0, eps = torch.ones(1), torch.zeros(1)
    assert flow.velocity_from_u(flow.flow_target(x0, eps)).item() == -1.0  # dx/dσ = ε − x0


def test_grids_match_the_brief():
    assert np.allclose(flow.sigma_grid(8).numpy(), [1, .9545, .9, .8333, .75, .6429, .5, .3, 0], atol=5e-5)
    assert np.allclose(flow.sigma_grid(2).numpy(), [1, .75, 0])
    assert flow.sigma_grid(8)[4].item() == pytest.approx(0.75, abs=1e-12)  # 8-step grid passes through σm


@given(st.integers(1, 64), st.floats(1.0, 10.0))
def test_grid_properties(n, shift):
    g = flow.sigma_grid(n, shift)
    assert len(g) == n + 1 and g[0] == 1 and g[-1] == 0
    assert bool((g[1:] < g[:-1]).all())


def _pipeline_scheduler(n):
    """The scheduler as ZImagePipeline drives it: sigmas = linspace(1, 1/n, n), static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sch.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist())
    return sch


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 50))
def test_grid_agrees_with_diffusers_scheduler(n):
    sch = _pipeline_scheduler(n)
    ours = flow.sigma_grid(n, 3.0)
    assert np.allclose(sch.sigmas.double().numpy(), ours.numpy(), atol=1e-5)
    # the timesteps diffusers hands the pipeline are 1000·σ, and the pipeline passes t = (1000 − ts)/1000
    assert np.allclose(((1000 - sch.timesteps.double()) / 1000).numpy(), flow.sigma_to_t(ours[:-1]).numpy(), atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 12), seeds)
def test_sampler_matches_diffusers_euler_step(n, seed):
    """Our Euler step on x̂0 equals diffusers' scheduler.step on the pipeline's negated output."""
    sch = _pipeline_scheduler(n)
    target = _rand(seed, (1, 3, 4, 4)).float()

    def raw(x, s):  # a fake transformer: u = target − x (any smooth function would do)
        return target - x

    def denoiser(x, s, text):
        return flow.x0_from_u(x, s, raw(x, s))

    x_ours = flow.sample_euler(denoiser, _rand(seed + 7, (1, 3, 4, 4)).float(), None, flow.sigma_grid(n)).x0
    x = _rand(seed + 7, (1, 3, 4, 4)).float()
    for ts in sch.timesteps:
        s = ts / 1000
        x = sch.step(-raw(x, s), ts, x).prev_sample  # the pipeline negates u before the step
    assert torch.allclose(x_ours, x, atol=1e-5)


def test_cfg_form_and_nfe():
    pos, neg = torch.tensor([2.0]), torch.tensor([1.0])
    assert flow.apply_guidance(pos, neg, 0.0).item() == 2.0
    assert flow.apply_guidance(pos, neg, 1.5).item() == 2.0 + 1.5
    assert flow.nfe(8, 0.0) == 8 and flow.nfe(8, 2.0) == 16 and flow.nfe(2, 0) == 2


def test_sampler_counts_nfe_and_returns_trajectory():
    calls = []

    def den(x, s, text):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    noise = torch.randn(2, 3, 4, 4)
    r = flow.sample_euler(den, noise, ["a", "b"], flow.sigma_grid(8), return_trajectory=True)
    assert r.nfe == 8 and len(calls) == 8 and len(r.trajectory) == 9
    assert torch.equal(r.trajectory[0], noise)
    calls.clear()
    r = flow.sample_euler(den, noise, ["a", "b"], flow.sigma_grid(2), guidance=2.0, neg_text=["", ""])
    assert r.nfe == 4 and calls == [4, 4]  # CFG batches pos+neg: 2 forward passes' worth per step
    with pytest.raises(ValueError):
        flow.sample_euler(den, noise, ["a", "b"], flow.sigma_grid(2), guidance=2.0)
    with pytest.raises(ValueError):
        flow.sigma_grid(0)
