"""Does a feature net trained on a folder dataset (`twostep metrics train --data FOLDER`, contrastive, no labels)
give an FD that sees what FD must see? Writes `photos` crops to a folder (images + captions.jsonl), trains on
it, and prints the held-out retrieval score and FD between two real sets and against blurred / noisy copies,
beside the committed (supervised) photos feature net.

    .venv/bin/python benchmarks/folder_features.py --minutes 1 [--num 2000] [--threads 1]
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from twostep.cli import main as cli_main
from twostep.data import get_dataset
from twostep.metrics import FeatureStats, load_extractor
from twostep.paths import committed_model


def blur(x, sigma):
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def noise(x, std):
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ds = get_dataset("photos")
    root = Path(tempfile.mkdtemp())
    data = root / "data"
    data.mkdir()
    imgs = ds.sample(a.num, seed=0, split="train").images
    lines = []
    for i, x in enumerate(((imgs + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(np.ascontiguousarray(x)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": "a photo"}))
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    t0 = time.time()
    rc = cli_main(["metrics", "train", "--data", str(data), "--out", str(root / "feat"), "--minutes", str(a.minutes),
                   "--no-progress"])
    assert rc == 0
    cfg = json.loads((root / "feat" / "config.json").read_text())
    print(f"trained {cfg['train']['steps']} steps in {time.time() - t0:.0f} s; held-out retrieval "
          f"{cfg['heldout_accuracy']['retrieval']:.3f} of {cfg['heldout']['num']} (chance "
          f"{1 / cfg['heldout']['num']:.4f})")
    ref = ds.sample(1000, seed=0, split="ref").images
    other = ds.sample(1000, seed=1, split="ref").images
    rows = [("real vs real", other)] + [(f"blur sigma {s}", blur(other, s)) for s in (0.5, 1.0, 1.5, 2.0)] + \
        [(f"noise std {s}", noise(other, s)) for s in (0.05, 0.1, 0.2)]
    for name, spec in (("folder (contrastive)", str(root / "feat")),
                       ("photos (supervised)", str(committed_model("features-photos", "--features")))):
        ex = load_extractor(spec)
        r = FeatureStats(ex.num_features).add(ex.embed(ref))
        print(f"{name:22s} " + "  ".join(f"{n}: {r.fd(FeatureStats(ex.num_features).add(ex.embed(x))):.3g}"
                                         for n, x in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
