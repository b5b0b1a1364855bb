"""The Z-Image adapter hides list I/O, t = 1 − σ and the output sign; the features hook reads image tokens."""

import torch

from twostep import flow
from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config


def _bb():
    return ZImageBackbone.from_config(tiny_zimage_config(dim=32, n_layers=2, n_heads=1), seed=0)


def _text(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5 + i, 384, generator=g) for i in range(b)]


def test_denoise_is_x_plus_sigma_u_with_t_one_minus_sigma():
    bb = _bb()
    x = torch.randn(3, 3, 32, 32)
    sigma = torch.tensor([1.0, 0.75, 0.3])
    text = _text(3)
    seen = {}
    orig = bb.transformer.forward

    def spy(xs, t, caps, **kw):
        seen["t"], seen["shapes"] = t.clone(), [tuple(v.shape) for v in xs]
        return orig(xs, t, caps, **kw)

    bb.transformer.forward = spy
    x0 = bb.denoise(x, sigma, text)
    assert torch.allclose(seen["t"], 1 - sigma)                 # model time t = 1 − σ
    assert seen["shapes"] == [(3, 1, 32, 32)] * 3               # list of [C, F=1, H, W]
    u = torch.stack(orig([v for v in x.unsqueeze(2).unbind(0)], 1 - sigma, text, patch_size=4,
                         return_dict=False)[0]).squeeze(2)
    assert torch.allclose(x0, x + sigma.view(-1, 1, 1, 1) * u, atol=1e-6)  # raw output is u = x0 − ε


def test_pad_tokens_initialised_and_finite():
    bb = _bb()
    for name in ("x_pad_token", "cap_pad_token"):
        p = getattr(bb.transformer, name)
        assert torch.isfinite(p).all() and p.abs().sum() > 0


def test_features_are_image_tokens_of_requested_blocks():
    bb = _bb()
    x, s, text = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 0.5]), _text(2)
    got = {}
    h = bb.transformer.layers[1].register_forward_hook(lambda m, i, o: got.setdefault("o", o))
    feats = bb.features(x, s, text, blocks=[0, 1])
    h.remove()
    assert len(feats) == 2 and feats[0].shape == (2, 64, 32)   # (32/4)² image tokens, width dim
    assert torch.equal(feats[1], got["o"][:, :64])               # image tokens come first in the sequence
    assert bb.transformer.layers[0]._forward_hooks == {}       # hooks removed


def test_batch_independence_with_variable_caption_lengths():
    bb = _bb()
    x, s, text = torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.2]), _text(2)
    both = bb.denoise(x, s, text)
    one = bb.denoise(x[1:], s[1:], text[1:])
    assert torch.allclose(both[1:], one, atol=1e-5)
