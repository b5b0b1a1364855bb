"""Feature networks for the distribution metrics (FD / KID / diversity) and for prompt alignment.

Pretrained nets (the FID Inception-V3, CLIP, DINOv2: extractors.py) need weights a benchmark may not have, and
know nothing of our 32² toy data, so each benchmark (and any folder dataset) gets its own small CNN, trained on
real data; `extractors.load_extractor(FOLDER)` wraps one for FD/KID:

- `shapes`: an attribute classifier. From one image it predicts, for each of the 9 grid cells, the shape
  (0 = empty, 1..4 = circle/square/triangle/cross), the colour (7) and the size (small/large) of the object
  there, and the background type (4). Colour and size are trained and scored only on non-empty cells.
- `photos`: a source-photo classifier (which of the 6 scikit-image photographs a crop comes from).
- a folder dataset (images + captions.jsonl, data/folder.py; `twostep metrics train --data FOLDER`): no labels
  exist, so the net is trained by instance discrimination — SimCLR's NT-Xent loss (Chen et al. 2020,
  temperature `CONTRASTIVE_T`) between two views of each image, through a 2-layer projection head that is
  dropped at use. The views differ only by a horizontal flip and an integer translation of up to 1/8 of the
  side (reflect-padded): no colour jitter, blur, resampling or noise, so nothing FD must see (colour casts,
  blur, noise, lost detail) is trained away — telling images apart needs exactly those cues. Captions are not
  used (they may be absent, repeated or uninformative). Held-out score: `retrieval`, the fraction of held-out
  images whose first view's nearest neighbour (cosine) among all second views is its own (chance 1/N).

Architecture (details in `FeatureNet`): a small VGG-style trunk of 3×3 conv + BatchNorm + ReLU at 32² and 16².
shapes pools the 16² map into the 3×3 grid cells and reads each cell with shared weights; photos adds two
8² layers and global pooling. The embedding (the penultimate layer, post-ReLU like Inception's pool3,
`num_features` = 256) is what FD/KID/diversity measure; it is rescaled by one fixed factor so its RMS on real
training images is 1. The trunk keeps full resolution in its first layers and no augmentation blurs, resamples
or adds noise, so the embedding reacts to lost high-frequency detail (tests/test_metrics.py checks that FD
grows monotonically with blur and with noise). Weights are stored as float16 (< 1 MB per folder); the
held-out accuracy in config.json is measured with the stored (rounded) weights.

Training is time-budgeted (`--minutes`), so two runs differ in their number of steps (recorded in
config.json) and are not bit-identical.

Train with `python -m twostep.metrics.features --data shapes --out models/features-shapes --minutes 5`.
A folder holds `config.json` (architecture, held-out accuracy per attribute, the training command) and
`model.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..command_configs import BUILTIN_DATA, CELL_DIM, FEATURE_FLAGS as FLAGS, NUM_CELLS, FeatureTrainConfig
from ..config import add_config_flags, load_flagged_config, to_dict
from ..data import get_dataset
from ..errors import NonFiniteWeights, UserError
from ..io.files import atomic_save_tensors, atomic_write_text, load_tensors, nonfinite_parts, sha256_file
from ..io.folders import LOCK_FILE, NAMES, claim_output, require_complete, write_status
from ..io.folders import progress as run_progress
from ..io.lock import holds_lock

SHAPES_HEADS = {"shape": 5, "colour": 7, "size": 2}   # per cell
NUM_BACKGROUNDS = 4
NUM_SOURCES = 6
FORMAT = "twostep-features-v1"
PROJ_DIM = 128          # output of the contrastive projection head (folder nets)
CONTRASTIVE_T = 0.2     # NT-Xent temperature (SimCLR's range is 0.1-0.5)


def _heads_for(data: str) -> dict[str, int]:
    if data == "shapes":
        out = {f"{k} (per cell)": n for k, n in SHAPES_HEADS.items()}
        out["background"] = NUM_BACKGROUNDS
        return out
    if data == "photos":
        return {"source": NUM_SOURCES}
    if data == "folder":
        return {"projection (contrastive)": PROJ_DIM}
    raise UserError(f"feature net: unknown benchmark {data!r}; use 'shapes', 'photos' or 'folder'")


class FeatureNet(nn.Module):
    """Small CNN: images in [-1, 1], [N, 3, 32, 32] -> `num_features`-d embedding -> task heads.

    Trunk (both benchmarks): 3×3 conv + BatchNorm + ReLU, width w at 32² (2 layers), 2w at 16² (2 layers, the
    first strided), 4w at 16².
    shapes: the 16² map is average- and max-pooled into the 3×3 grid cells, a per-cell MLP (1×1 convs, shared
    by all cells) gives a `cell_dim` vector per cell, and shared linear heads read shape/colour/size from each
    cell's vector (weight sharing across cells makes the shape head learn 9× faster). A global average pool
    gives a `global_dim` vector for the background head. Embedding = [9 cell vectors, global vector]
    (num_features = 9·cell_dim + global_dim).
    photos: two more layers (4w at 8²), global average + max pooling, a linear layer to `num_features` (ReLU)
    = the embedding, and a linear source head.
    folder: as photos (at any resolution that is a multiple of 8: the tail works at resolution/4), with a
    projection head Linear-ReLU-Linear to PROJ_DIM for the contrastive loss instead of a classifier.
    """

    def __init__(self, data: str = "shapes", width: int = 32, num_features: int = 256, resolution: int = 32,
                 cell_dim: int = CELL_DIM):
        super().__init__()
        if resolution % 8:
            raise UserError(f"feature net: resolution {resolution} must be a multiple of 8")
        self.data, self.width, self.resolution = data, width, resolution
        self.head_sizes = _heads_for(data)
        w = width

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(3, w), *block(w, w),                  # 32²
            *block(w, 2 * w, 2), *block(2 * w, 2 * w),   # 16²
            *block(2 * w, 4 * w),                        # 16²
        )
        if data == "shapes":
            self.cell_dim = int(cell_dim)
            self.global_dim = int(num_features) - NUM_CELLS * self.cell_dim
            if self.global_dim < 4:
                raise UserError(f"feature net: num_features {num_features} too small for 9 cells × {cell_dim}")
            self.cell_mlp = nn.Sequential(nn.Conv2d(8 * w, 4 * w, 1), nn.ReLU(inplace=True),
                                          nn.Conv2d(4 * w, self.cell_dim, 1), nn.ReLU(inplace=True))
            self.global_mlp = nn.Sequential(nn.Linear(4 * w, self.global_dim), nn.ReLU(inplace=True))
            self.cell_head = nn.Linear(self.cell_dim, sum(SHAPES_HEADS.values()))
            self.bg_head = nn.Linear(self.global_dim, NUM_BACKGROUNDS)
        else:
            self.cell_dim = 0
            self.tail = nn.Sequential(*block(4 * w, 4 * w, 2), *block(4 * w, 4 * w))   # 8²
            self.embed = nn.Sequential(nn.Linear(8 * w, int(num_features)), nn.ReLU(inplace=True))
            if data == "folder":
                self.proj_head = nn.Sequential(nn.Linear(int(num_features), int(num_features)), nn.ReLU(inplace=True),
                                               nn.Linear(int(num_features), PROJ_DIM))
            else:
                self.src_head = nn.Linear(int(num_features), NUM_SOURCES)
        self.num_features = int(num_features)
        # One global factor fixed after training so the embedding has RMS 1 on real training images: FD/KID
        # then have a scale independent of training details (KID's cubic kernel needs xᵀy/d ≈ O(1)).
        self.register_buffer("feature_scale", torch.ones(()))

    def config(self) -> dict:
        return {"data": self.data, "width": self.width, "num_features": self.num_features,
                "cell_dim": self.cell_dim, "resolution": self.resolution, "storage_dtype": "float16"}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Embedding [N, num_features] (float32) of images in [-1, 1]."""
        h = self.trunk(images.float())
        if self.data == "shapes":
            cells = torch.cat([F.adaptive_avg_pool2d(h, 3), F.adaptive_max_pool2d(h, 3)], 1)
            cells = self.cell_mlp(cells).flatten(2).transpose(1, 2).flatten(1)   # [N, 9·cell_dim], cell-major
            return torch.cat([cells, self.global_mlp(h.mean((2, 3)))], 1) * self.feature_scale
        h = self.tail(h)
        return self.embed(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)) * self.feature_scale

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head. shapes: shape/colour/size as [N, 9, classes], background [N, 4]; photos: source [N, 6]."""
        f = self.features(images)
        if self.data == "photos":
            return {"source": self.src_head(f / self.feature_scale)}
        if self.data == "folder":
            return {"projection": self.proj_head(f / self.feature_scale)}
        f = f / self.feature_scale
        cells = f[:, :NUM_CELLS * self.cell_dim].view(len(f), NUM_CELLS, self.cell_dim)
        y = self.cell_head(cells)
        out, i = {}, 0
        for k, n in SHAPES_HEADS.items():
            out[k] = y[..., i:i + n]
            i += n
        out["background"] = self.bg_head(f[:, NUM_CELLS * self.cell_dim:])
        return out

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """Eval-mode embedding of a (large) image set, in batches; returns float32 [N, num_features] on CPU."""
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [self.features(images[i:i + batch_size].to(dev)).cpu() for i in range(0, len(images), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.num_features)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
        """Eval-mode class predictions (argmax) per head, on CPU."""
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        parts: dict[str, list] = {}
        for i in range(0, len(images), batch_size):
            for k, v in self(images[i:i + batch_size].to(dev)).items():
                parts.setdefault(k, []).append(v.argmax(-1).cpu())
        self.train(was)
        return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------- losses / eval

def _loss(net: FeatureNet, logits: dict, labels: dict) -> torch.Tensor:
    if net.data == "photos":
        return F.cross_entropy(logits["source"], labels["source"])
    loss = F.cross_entropy(logits["shape"].reshape(-1, 5), labels["shape"].reshape(-1))
    # colour / size: only where there is an object (label -1 elsewhere)
    loss = loss + F.cross_entropy(logits["colour"].reshape(-1, 7), labels["colour"].reshape(-1), ignore_index=-1)
    loss = loss + F.cross_entropy(logits["size"].reshape(-1, 2), labels["size"].reshape(-1), ignore_index=-1)
    return loss + F.cross_entropy(logits["background"], labels["background"])


def _views(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view per image for the contrastive objective: a horizontal flip (p = 1/2) and an integer
    translation of up to side/8 pixels with reflect padding — no resampling, colour change, blur or noise."""
    n, c, h, w = x.shape
    py, px = max(1, h // 8), max(1, w // 8)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = F.pad(x, (px, px, py, py), mode="reflect")
    dy = torch.randint(0, 2 * py + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * px + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = CONTRASTIVE_T) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1): each of the 2n views must pick its partner among the other
    2n − 1 by cosine similarity / temperature (cross-entropy, mean over the 2n views)."""
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.t() / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def retrieval_accuracy(net: FeatureNet, images: torch.Tensor, seed: int = 0) -> float:
    """Fraction of images whose first view's nearest embedding (cosine) among all second views is its own view
    (views by `_views` with a generator seeded `seed`; chance = 1 / len(images))."""
    g = torch.Generator().manual_seed(seed)
    e1 = F.normalize(net.embed_images(_views(images, g)), dim=1)
    e2 = F.normalize(net.embed_images(_views(images, g)), dim=1)
    return (e1 @ e2.t()).argmax(1).eq(torch.arange(len(images))).float().mean().item()


def accuracy(net: FeatureNet, images: torch.Tensor, labels: dict | None) -> dict[str, float]:
    """Held-out accuracy per attribute.

    shapes: `shape` = shape class correct, over non-empty cells; `empty` = empty-vs-object correct, over all
    cells; `colour`, `size` = over non-empty cells; `background` = per image; `object` = shape, colour and size
    all correct, over non-empty cells. photos: `source` = per image. folder: `retrieval` (retrieval_accuracy).
    """
    if net.data == "folder":
        return {"retrieval": retrieval_accuracy(net, images)}
    pred = net.predict(images)
    if net.data == "photos":
        return {"source": (pred["source"] == labels["source"]).float().mean().item()}
    obj = labels["shape"] > 0
    sh_ok = pred["shape"] == labels["shape"]
    col_ok = pred["colour"] == labels["colour"]
    size_ok = pred["size"] == labels["size"]
    return {
        "shape": sh_ok[obj].float().mean().item(),
        "empty": ((pred["shape"] > 0) == obj).float().mean().item(),
        "colour": col_ok[obj].float().mean().item(),
        "size": size_ok[obj].float().mean().item(),
        "background": (pred["background"] == labels["background"]).float().mean().item(),
        "object": (sh_ok & col_ok & size_ok)[obj].float().mean().item(),
    }


def _augment(data: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """photos: random horizontal flips (label-preserving, no resampling). shapes: none (any flip or shift would
    move objects between cells or change stripe direction)."""
    if data == "photos":
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


# ---------------------------------------------------------------------------------------------- train / io

def _to_storage(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in sd.items()}


def _from_storage(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _folder_pools(cfg: FeatureTrainConfig, progress: bool):
    """A folder dataset's distinct images (by file name; several captions of one image are one instance),
    split by a permutation seeded `cfg.seed`: the first n_test held out, the next up to num_train trained on."""
    ds = get_dataset(cfg.data, cfg.resolution)
    first: dict[str, int] = {}
    for i, name in enumerate(ds.file_names):
        first.setdefault(name, i)
    uniq = torch.tensor(sorted(first.values()), dtype=torch.long)
    n = len(uniq)
    n_test = min(cfg.num_test, max(2, n // 10))
    if n - n_test < 2:
        raise UserError(f"--data {cfg.data}: {n} distinct images; a folder feature net needs at least 4 (2 held out "
                        "for its score, 2 to train on); add images")
    perm = uniq[torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))]
    test, train = perm[:n_test], perm[n_test:n_test + cfg.num_train]
    if progress:
        print(f"[features] {cfg.data}: {n} distinct images, {len(train)} to train on, {n_test} held out",
              file=sys.stderr, flush=True)
    info = {"path": str(Path(cfg.data).resolve()), "distinct_images": n, "captions_sha256":
            sha256_file(ds.captions_file), "num_train": len(train), "num_heldout": n_test}
    return ds, ds.images(train), ds.images(test), info


@holds_lock("out", "--out", "features")  # one writer per feature-net folder
def train_feature_net(cfg: FeatureTrainConfig, out: Path, progress: bool = True, command: str | None = None) -> dict:
    """Train the feature network of `cfg.data` ('shapes' | 'photos' | a folder dataset) for `cfg.minutes` of wall
    time (data generation not included), evaluate on `cfg.num_test` held-out images (`split="test"`; a folder:
    images set aside before training) and write `out/train_config.json`, `out/model.safetensors` and
    `out/config.json` (last). Returns the config.json dict (with `heldout_accuracy`).

    Adam with a time-based schedule: linear warm-up over the first 3% of the budget, then cosine decay to 0.
    shapes / photos: cross-entropy of their labels; a folder: NT-Xent between two views (module docstring).
    """
    data, minutes, num_train, seed, batch_size, lr = (cfg.data, cfg.minutes, cfg.num_train, cfg.seed,
                                                      cfg.batch_size, cfg.lr)
    out = Path(out)
    folder = data not in BUILTIN_DATA
    if folder and not Path(data).is_dir():
        raise UserError(f"--data {data!r}: not 'shapes', 'photos' or an existing folder with captions.jsonl")
    inputs = {"--data": Path(data)} if folder else None   # never into (or around) the dataset folder
    claim_output(out, "features", inputs=inputs)  # before any work: new or empty (never a teacher, a run, ...)
    t_start = time.time()
    torch.manual_seed(seed)
    dataset_info = None
    if folder:
        ds, tr_images, te_images, dataset_info = _folder_pools(cfg, progress)
        tr_labels = te_labels = None
        num_train = len(tr_images)
    else:
        ds = get_dataset(data)
        if progress:
            print(f"[features] generating {num_train} training images of {data} ...", file=sys.stderr, flush=True)
        tr = ds.sample(num_train, seed=seed, split="train")
        te = ds.sample(cfg.num_test, seed=seed, split="test")
        tr_images, tr_labels, te_images, te_labels = tr.images, tr.labels, te.images, te.labels
    t_data = time.time() - t_start

    net = FeatureNet("folder" if folder else data, width=cfg.width, num_features=cfg.num_features,
                     resolution=tr_images.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    budget = minutes * 60.0
    t0 = time.time()
    step, seen, last_log = 0, 0, t0
    net.train()
    while True:
        el = time.time() - t0
        frac = el / budget if budget > 0 else 1.0
        if frac >= 1.0:
            break
        warm = 0.03
        scale = frac / warm if frac < warm else 0.5 * (1 + math.cos(math.pi * (frac - warm) / (1 - warm)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        if folder:   # distinct images in a batch (a repeat would be a false negative of the contrastive loss)
            idx = torch.randperm(num_train, generator=g)[:batch_size]
            x = tr_images[idx]
            v1, v2 = _views(x, g), _views(x, g)
            loss = nt_xent(net(v1)["projection"], net(v2)["projection"])
        else:
            idx = torch.randint(0, num_train, (batch_size,), generator=g)
            x = _augment(data, tr_images[idx], g)
            labels = {k: v[idx] for k, v in tr_labels.items()}
            loss = _loss(net, net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += batch_size
        if progress and time.time() - last_log > 30:
            last_log = time.time()
            print(f"[features] {data} step {step} ({el / 60:.1f}/{minutes:g} min) loss {loss.item():.4f} "
                  f"lr {lr * scale:.2e}", file=sys.stderr, flush=True)
    train_s = time.time() - t0
    net.eval()
    with torch.no_grad():
        net.feature_scale.fill_(1.0)
        f = net.embed_images(tr_images[:2000])
        net.feature_scale.fill_(float(f.pow(2).mean().rsqrt()))
    # Weights are stored as float16 (keeps the committed folders small); evaluate the rounded weights so the
    # recorded accuracy is exactly that of the saved model.
    sd16 = _to_storage(net.state_dict())
    bad = nonfinite_parts({"feature net": sd16})  # what is saved (float16: an overflow is caught too)
    if bad:
        raise NonFiniteWeights(f"{out}: training diverged: NaN/inf weights in {bad[0]} after {step} steps; nothing "
                               f"saved: lower --lr (now {lr:g}) and train again", bad)
    net.load_state_dict(_from_storage(sd16))
    net.eval()
    acc = accuracy(net, te_images, te_labels)
    if progress:
        print(f"[features] {data}: {step} steps, held-out accuracy " +
              ", ".join(f"{k} {v:.4f}" for k, v in acc.items()), file=sys.stderr, flush=True)
    record = {
        "format": FORMAT,
        "arch": net.config(),
        "data_version": getattr(ds, "version", None),  # shapes v1/v2 (twostep/data/shapes.py); evaluation checks it
        "heads": net.head_sizes,
        "heldout_accuracy": {k: round(v, 5) for k, v in acc.items()},
        "heldout": ({"split": "test", "seed": seed, "num": cfg.num_test} if not folder else
                    {"split": "set aside before training (first of a seeded permutation of the distinct images)",
                     "seed": seed, "num": len(te_images)}),
        **({"dataset": dataset_info} if folder else {}),
        "train": {"num_train": num_train, "batch_size": batch_size, "lr": lr, "optimizer": "Adam",
                  "schedule": "3% linear warm-up then cosine to 0 over the time budget", "minutes": minutes,
                  "steps": step, "images_seen": seen, "seed": seed,
                  **({"objective": f"NT-Xent (SimCLR), temperature {CONTRASTIVE_T}, two views per image"}
                     if folder else {}),
                  "augment": ("random horizontal flip" if data == "photos" else
                              "two views: random horizontal flip + integer translation up to side/8 (reflect)"
                              if folder else "none"),
                  "data_seconds": round(t_data, 1), "train_seconds": round(train_s, 1),
                  "total_seconds": round(time.time() - t_start, 1), "torch": torch.__version__,
                  "threads": torch.get_num_threads()},
        "command": command or f"python -m twostep.metrics.features --data {data} --out {out} --minutes {minutes:g} "
                              f"--num-train {num_train} --seed {seed}",
    }
    # written under a temporary sibling, status.json last, and renamed into place: never a half feature net
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        atomic_write_text(tmp / "train_config.json", json.dumps(to_dict(cfg), indent=1) + "\n")
        atomic_save_tensors(sd16, tmp / "model.safetensors", metadata={"format": FORMAT})
        atomic_write_text(tmp / "config.json", json.dumps(record, indent=1) + "\n")
        write_status(tmp, "features", {"data": data, "arch": net.config(), "seed": seed}, True,
                     run_progress(step, step, "updates"))
        if claim_output(out, "features", inputs=inputs).kind is not None:  # empty (or a half folder of an older version)
            shutil.rmtree(out)
        elif out.exists():
            (out / LOCK_FILE).unlink(missing_ok=True)  # our own lock (twostep.io.lock): the folder is replaced
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _weights_arch(sd: dict[str, torch.Tensor]) -> dict:
    """The FeatureNet settings a state dict's names and shapes imply (those that can be read off it)."""
    got: dict = {}
    if "cell_head.weight" in sd:
        got["data"] = "shapes"
    elif "src_head.weight" in sd:
        got["data"] = "photos"
    elif "proj_head.2.weight" in sd:
        got["data"] = "folder"
    if "trunk.0.weight" in sd:
        got["width"] = int(sd["trunk.0.weight"].shape[0])
    if got.get("data") == "shapes" and "cell_mlp.2.weight" in sd and "global_mlp.0.weight" in sd:
        got["cell_dim"] = int(sd["cell_mlp.2.weight"].shape[0])
        got["num_features"] = NUM_CELLS * got["cell_dim"] + int(sd["global_mlp.0.weight"].shape[0])
    elif got.get("data") in ("photos", "folder") and "embed.0.weight" in sd:
        got["num_features"] = int(sd["embed.0.weight"].shape[0])
    return got


def load_feature_net(folder: Path | str) -> FeatureNet:
    """Load a feature net folder (config.json + model.safetensors) in eval mode, frozen."""
    folder = Path(folder)
    st = require_complete(folder, "feature net")
    if st.kind not in (None, "features", "other", "file"):
        raise UserError(f"{folder}: holds a {NAMES[st.kind]}, not a feature net; pass a feature-net folder (e.g. "
                        "models/features-shapes), or train one with `twostep metrics train --data shapes|photos|FOLDER "
                        "--out NEW_FOLDER`")
    hint = ("re-create it with `twostep metrics train --data shapes|photos|FOLDER --out "
            f"{folder if st.kind is None else 'NEW_FOLDER'}`")
    if not folder.is_dir():
        raise UserError(f"{folder}: feature-net folder does not exist; {hint}")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{cfg_path}: missing, so {folder} is not a complete feature-net folder; {hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{cfg_path}: not a valid feature-net config ({type(e).__name__}); {hint}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("arch"), dict):
        got = type(cfg).__name__ if not isinstance(cfg, dict) else f"arch {type(cfg.get('arch')).__name__}"
        raise UserError(f"{cfg_path}: not a valid feature-net config (expected a JSON object with an 'arch' "
                        f"mapping, got {got}); {hint}")
    if cfg.get("format") != FORMAT:
        raise UserError(f"{cfg_path}: not a valid feature-net config (format {cfg.get('format')!r}, expected "
                        f"{FORMAT!r}); {hint}")
    arch = {"resolution": 32, "cell_dim": 24, **cfg["arch"]}
    if arch.get("data") not in ("shapes", "photos", "folder"):
        raise UserError(f"{cfg_path}: arch.data {arch.get('data')!r} must be 'shapes', 'photos' or 'folder'; {hint}")
    mins = {"width": 1, "num_features": 1, "resolution": 8, "cell_dim": 1 if arch["data"] == "shapes" else 0}
    for k, lo in mins.items():
        if k not in arch or not isinstance(arch[k], int) or isinstance(arch[k], bool) or arch[k] < lo:
            raise UserError(f"{cfg_path}: arch.{k} {arch.get(k)!r} must be an integer >= {lo}; {hint}")
    sd = _from_storage(load_tensors(folder / "model.safetensors"))
    for k, v in _weights_arch(sd).items():  # config.json against the weights: name the field that disagrees
        if arch[k] != v:
            raise UserError(f"{cfg_path}: weights do not match config.json (arch.{k} is {arch[k]!r} but "
                            f"model.safetensors holds a net with {k} {v!r}); {hint}")
    try:
        net = FeatureNet(arch["data"], width=arch["width"], num_features=arch["num_features"],
                         resolution=arch["resolution"], cell_dim=arch["cell_dim"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{cfg_path}: bad architecture entry ({type(e).__name__}: {e}); {hint}") from None
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError:
        raise UserError(f"{folder / 'model.safetensors'}: weights do not match config.json's architecture; "
                        f"{hint}") from None
    if not all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()):
        raise UserError(f"{folder / 'model.safetensors'}: contains NaN/inf weights; {hint}")
    net.eval()
    net.requires_grad_(False)
    net.folder_config = {**cfg, "_folder": str(folder)}
    return net


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m twostep.metrics.features",
                                description="Train the small CNN feature network used by FD/KID/alignment.")
    p.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    add_config_flags(p, FeatureTrainConfig, FLAGS, required=("data",))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cmd = "python -m twostep.metrics.features " + " ".join(shlex.quote(s) for s in (argv or sys.argv[1:]))
    try:
        cfg = train_feature_net(load_flagged_config(FeatureTrainConfig, a, FLAGS), Path(a.out),
                                progress=not a.no_progress, command=cmd)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(cfg["heldout_accuracy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
