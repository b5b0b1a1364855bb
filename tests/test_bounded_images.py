"""Images stay bounded at any size: grids never upscale images of 256 px or more (a 1024² grid of 10 columns, as
the training grids write, is under 40 MP), what goes to a tracker is at most 4 MP, and small images still get the
nearest-neighbour upscale that makes them readable. (The VAE's chunked decode: test_pipeline_teacher.)"""

import numpy as np
import torch

from twostep.images import TRACKER_PIXELS, fit_pixels, grid, grid_scale
from twostep.train import viz


def test_a_1024_grid_of_10_columns_is_not_upscaled():
    x = torch.zeros(1, 3, 1024, 1024).expand(30, -1, -1, -1)   # teacher | naive | student rows, 10 columns
    g = grid(x, nrow=10, scale=3)   # write_grid's scale
    assert g.shape == (2 + 3 * 1026, 2 + 10 * 1026, 3)
    assert g.shape[0] * g.shape[1] <= 40_000_000
    assert grid_scale(4, 256, 64) == 1 and grid_scale(4, 255, 255) == 4


def test_small_images_are_still_upscaled():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    g = grid(x, nrow=2, scale=3)
    assert g.shape == (3 * (2 + 2 * 34), 3 * (2 + 2 * 34), 3)
    assert np.array_equal(g[::3, ::3], grid(x, nrow=2))   # nearest neighbour


def test_tracker_images_are_at_most_4_mp():
    big = np.random.default_rng(0).integers(0, 256, (3080, 10262, 3), dtype=np.uint8)   # the 1024² grid above
    small = fit_pixels(big)
    assert small.shape[0] * small.shape[1] <= TRACKER_PIXELS and small.shape[1] > 2000
    assert small.dtype == np.uint8
    tiny = big[:100, :100]
    assert fit_pixels(tiny) is tiny

    seen = []

    class Fake:
        def log_images(self, d, step, **kw):
            seen.append(next(iter(d.values())))

    t = viz.Trackers.__new__(viz.Trackers)
    t.tracker, t.kind = Fake(), "tensorboard"
    t.image("grid", big, 10)
    assert seen[0].shape[1] * seen[0].shape[2] <= TRACKER_PIXELS
