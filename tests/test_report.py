"""The HTML report renders in headless Chromium and every image loads (CI installs Debian's chromium)."""

import re
import shutil
import subprocess

import pytest
import torch

from twostep.images import grid, save_png
from twostep.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _render(html_path, tmp_path):
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          html_path.as_uri()], capture_output=True, text=True, timeout=120)
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it with apt)")
def test_report_images_load_in_chromium(tmp_path):
    save_png(grid(torch.rand(4, 3, 32, 32) * 2 - 1, nrow=2), tmp_path / "grid_0.png")
    save_png(grid(torch.rand(4, 3, 32, 32) * 2 - 1, nrow=2), tmp_path / "curves.png")
    rows = [{"model": "teacher", "nfe": 16, "fd": 1.0}, {"model": "student", "nfe": 2, "fd": 1.1}]
    write_report(tmp_path / "report.html", "t", [{"name": "teacher", "file": "grid_0.png", "nfe": 16}],
                 ["a red circle"], rows, extra_images=[("Loss curves", "curves.png")])
    dom = _render(tmp_path / "report.html", tmp_path)
    assert 'data-images="2"' in dom and 'data-images-ok="true"' in dom, dom[:500]
    # and the check can fail: a missing image is reported
    (tmp_path / "curves.png").unlink()
    dom = _render(tmp_path / "report.html", tmp_path)
    assert 'data-images-ok="false"' in dom
