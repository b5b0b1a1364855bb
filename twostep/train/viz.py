"""What a run shows: the progress bar, the log (log.jsonl and the train.log_with tracker), fixed-noise sample grids
(with train.validation_prompts), the quick held-out FD (train.eval_every) and the loss-curves PNG."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import UserError
from ..io.files import atomic_write_text
from ..images import fit_pixels, grid, save_png
from ..metrics.extractors import load_extractor
from ..metrics.fd import FeatureStats
from ..paths import committed_model
from ..sampling import NaiveSampler, TeacherSampler

VALIDATION_SEED = 5_000_011  # noise of the train.validation_prompts grid columns: the same in every run
CURVES_EVERY_S = 60.0        # loss_curves.png is redrawn at most this often while a run goes (and at its end),
CURVES_SHARE = 0.05          # and never more often than keeps the drawing under 5 % of the run's time
EVAL_KEYS = ("eval_fd",)     # what the quick FD adds to the loss curves
DECODE_BATCH = 2             # latents per VAE call in grids and the quick FD (1024² fp32 decodes are GBs each)


class Progress:
    """The run's progress bar on the main process (or none: `enabled` false). A time-budgeted run
    (train.minutes > 0) counts minutes, with the update in the postfix; otherwise it counts updates. The postfix
    shows `keys` (the method's log keys) that the update logged."""

    def __init__(self, enabled: bool, train, desc: str, update: int, keys, say=print):
        self.minutes, self.keys, self.say_fallback = train.minutes, tuple(keys), say
        self.t_start = time.time()
        self.bar = None
        if not enabled:
            return
        from tqdm.auto import tqdm  # heavy: only with a bar

        if train.minutes > 0:
            self.bar = tqdm(total=round(train.minutes, 2), desc=desc, unit="min",
                            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=train.updates, initial=update, desc=desc, unit="upd")

    def warmup(self, n: int):
        """The discriminator warm-up's iterations (a transient bar of its own when the run has a bar)."""
        if self.bar is None:
            return range(n)
        from tqdm.auto import tqdm

        return tqdm(range(n), desc="discriminator warm-up", unit="upd", leave=False)

    def update(self, update: int, logs: dict):
        if self.bar is None:
            return
        if self.minutes > 0:
            self.bar.n = round(min((time.time() - self.t_start) / 60, self.minutes), 2)
        else:
            self.bar.update(1)
        show = {"upd": update, **{k: f"{logs[k]:.3f}" for k in self.keys if k in logs}}
        self.bar.set_postfix(show, refresh=False)

    def say(self, msg: str):
        """A message that does not break the bar."""
        (self.bar.write(msg) if self.bar is not None else self.say_fallback(msg))

    def close(self):
        if self.bar is not None:
            self.bar.close()


class RunLog:
    """The run's log: records in memory (saved in checkpoints) and, on the main process, lines of log.jsonl, the
    same numbers to the tracker (`trackers`: train.log_with) at their update, and loss_curves.png beside log.jsonl
    (panels: `curve_keys` and eval_fd) redrawn as records come: at most every CURVES_EVERY_S seconds, and at most
    CURVES_SHARE of the time (matplotlib takes ~0.5-4 s for the 7 panels of a turbopp run on a busy CPU)."""

    def __init__(self, path: Path, records: list[dict], write: bool, trackers: Trackers | None = None,
                 curve_keys=()):
        self.records = records
        if write:  # the file holds exactly `records` (a resume: the checkpoint's), never lines past them twice
            atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))
        self.file = open(path, "a") if write else None
        self.trackers = trackers
        self.curve_keys, self.curves_path = tuple(curve_keys), Path(path).with_name("loss_curves.png")
        self.drawn, self.draw_s = time.time(), 0.0  # the first redraw comes CURVES_EVERY_S after the start

    def add(self, rec: dict):
        self.records.append(rec)
        if self.file:
            self.file.write(json.dumps(rec) + "\n"); self.file.flush()
            if self.trackers is not None:
                self.trackers.log(rec)
            self.curves()

    def image(self, name: str, image, update: int):
        """A uint8 [H, W, 3] image (a grid) to the tracker."""
        if self.file and self.trackers is not None:
            self.trackers.image(name, image, update)

    def curves(self, final: bool = False):
        """Redraw loss_curves.png (main process): now when `final`, else when CURVES_EVERY_S have passed since the
        last drawing and it took at most CURVES_SHARE of that time."""
        wait = max(CURVES_EVERY_S, self.draw_s / CURVES_SHARE) if CURVES_EVERY_S > 0 else 0.0
        if self.file is None or self.file.closed or not (final or time.time() - self.drawn >= wait):
            return
        t0 = time.time()
        loss_curves(self.records, self.curve_keys + EVAL_KEYS, self.curves_path)
        self.drawn, self.draw_s = time.time(), time.time() - t0

    def close(self):
        if self.file:
            self.curves(final=True)
            self.file.close()
        if self.trackers is not None:
            self.trackers.close()


# -- train.log_with: an accelerate tracker ------------------------------------------------------------------

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(kind: str) -> None:
    """train.log_with's package can be imported (checked before a run starts): wandb is not a twostep dependency."""
    pkg = TRACKER_PACKAGES.get(kind)
    if pkg is not None and importlib.util.find_spec(pkg) is None:
        other = "; or train.log_with=tensorboard" if kind == "wandb" else ""
        raise UserError(f"train.log_with={kind}: the {pkg} package is not installed; `pip install {pkg}`"
                        + (" (WANDB_MODE=offline logs without an account)" if kind == "wandb" else "") + other)


def flat_config(cfg: dict) -> dict:
    """A config dict as the trackers' hyper-parameters: `section.key` → a number, bool or string (lists as JSON)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flat_config(v).items()})
        else:
            out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


class Trackers:
    """train.log_with's accelerate tracker, on the main process (`enabled`; nothing with log_with=none): the run's
    config as hyper-parameters once, then every log record's numbers as scalars at its update and the grids as
    images. tensorboard writes `out/tensorboard/`; wandb logs to project "twostep", run name = the run folder's
    name, files under `out/wandb/` (WANDB_MODE and the other WANDB_* variables apply; a resumed run is a new W&B
    run of the same name)."""

    def __init__(self, kind: str, out: Path, config: dict, enabled: bool = True, resumed_at: int = 0):
        """resumed_at: the checkpoint's update on a resume; tensorboard hides the earlier run's events past it
        (SummaryWriter's purge_step), so no update shows twice."""
        self.kind, self.tracker = kind, None
        if kind == "none" or not enabled:
            return
        check_tracker(kind)
        from accelerate.tracking import TensorBoardTracker, WandBTracker  # heavy: only with a tracker

        out = Path(out)
        if kind == "tensorboard":
            self.tracker = TensorBoardTracker("", os.fspath(out / "tensorboard"),
                                              **({"purge_step": resumed_at + 1} if resumed_at else {}))
        else:
            self.tracker = WandBTracker("twostep", name=out.name, dir=os.fspath(out))
        self.tracker.start()
        self.tracker.store_init_configuration(flat_config(config))

    def log(self, rec: dict):
        if self.tracker is None:
            return
        nums = {k: (int(v) if isinstance(v, bool) else v) for k, v in rec.items()
                if k != "update" and isinstance(v, (bool, int, float))}
        if nums:
            self.tracker.log(nums, step=int(rec["update"]))

    def image(self, name: str, image, update: int):
        """A grid to the tracker, downsampled to at most TRACKER_PIXELS (the PNG on disk keeps every pixel)."""
        if self.tracker is None:
            return
        image = fit_pixels(image)
        if self.kind == "tensorboard":
            self.tracker.log_images({name: image[None]}, step=update, dataformats="NHWC")
        else:
            self.tracker.log_images({name: [image]}, step=update)

    def close(self):
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def log_record(update: int, logs: dict) -> dict:
    """A log line: the update and its logs, floats rounded to 5 decimals."""
    return {"update": update, **{k: round(v, 5) if isinstance(v, float) else v for k, v in logs.items()}}


def at_chance(logs: dict) -> bool | None:
    """Whether a discriminator that reports its accuracies (d_acc_real, d_acc_fake) sits at chance (None when
    it does not report them): at chance it adds nothing over regression."""
    if "d_acc_real" not in logs:
        return None
    return abs((logs["d_acc_real"] + logs["d_acc_fake"]) / 2 - 0.5) < 0.05


def grid_inputs(teacher, cache, device="cpu", n: int = 8, prompts=()) -> dict:
    """The fixed prompts and noise of the run's grids, with the teacher's 8-step and naive 2-step rows: the first
    `n` cache rows, then one column per prompt of `prompts` (train.validation_prompts; add_prompt_columns)."""
    n = min(n, len(cache))
    text = [t.to(device) for t in cache.text[:n]]
    noise = cache.noise[:n].to(device)
    naive = NaiveSampler(teacher).generate(text, noise).x0.cpu()
    gi = {"text": text, "noise": noise, "teacher": cache.final[:n], "naive": naive,
          "decode": device_decoder(teacher, device)}
    return add_prompt_columns(gi, teacher, prompts, device) if prompts else gi


def device_decoder(teacher, device="cpu"):
    """Samples → images in [-1, 1] on the CPU. A ZImagePipeline teacher's VAE is moved to `device` (the grids and
    the quick FD decode there, DECODE_BATCH latents at a time, whatever device the latents come from); a pixel-space
    teacher's decode is the identity, unchanged."""
    parts = teacher.parts
    if parts is None:
        return teacher.decode
    device = torch.device(device)
    if device.type != "cpu":
        parts._vae().to(device)  # as evaluate.place: the VAE beside the transformer

    def decode(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([teacher.decode(x[i:i + DECODE_BATCH].to(device)).cpu()
                          for i in range(0, len(x), DECODE_BATCH)]) if len(x) else teacher.decode(x)
    return decode


def add_prompt_columns(gi: dict, teacher, prompts, device="cpu") -> dict:
    """The grid inputs `gi` with one more column per prompt: its text features, noise seeded by VALIDATION_SEED
    (fixed, so every grid and every run shows the same draw), the teacher's default sample (steps, shift, guidance
    of its config, as the cache was built) and the naive 2-step sample."""
    prompts = list(prompts)
    noise = teacher.noise(len(prompts), VALIDATION_SEED).to(device)
    with _text_encoder(teacher, device):  # the CFG sample encodes "" too: both while the encoder is there
        text = [t.to(device) for t in teacher.encode(prompts)]
        ref = TeacherSampler(teacher).generate(text, noise).x0.float().cpu()
    naive = NaiveSampler(teacher).generate(text, noise).x0.float().cpu()
    return {**gi, "text": list(gi["text"]) + text, "noise": torch.cat([gi["noise"], noise.to(gi["noise"].dtype)]),
            "teacher": torch.cat([gi["teacher"].float(), ref]), "naive": torch.cat([gi["naive"].float(), naive])}


@contextmanager
def _text_encoder(teacher, device):
    """A ZImagePipeline teacher's text encoder for a few prompts: on the accelerator (bf16 on CUDA) when it is not
    loaded yet, and dropped afterwards (the 6B pipeline's Qwen3-4B is 8 GB that training has no use for; the
    null-prompt features CFG needs stay cached). A pixel-space (MiniLM) teacher: nothing to do."""
    parts = teacher.parts
    if parts is None or "text_encoder" in parts.loaded:
        yield
        return
    device = torch.device(device)
    parts.place(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        yield
    finally:
        parts.text_pipe = None  # PipelineParts loads it again at its next use
        if device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def write_grid(path, gi, student, save: bool = True):
    """Rows: teacher 8-step | naive 2-step (2 NFE) | student 2-step — same noise and prompts. Returns the grid
    (uint8 [H, W, 3]) when it saved it, else None."""
    was = student.training
    student.eval()
    st = student(gi["noise"], gi["text"])["x0_2"].float().cpu()
    student.train(was)
    if save:
        image = grid(gi["decode"](torch.cat([gi["teacher"], gi["naive"], st])), nrow=len(st), scale=3)
        save_png(image, path)
        return image
    return None


# -- train.eval_every: a quick FD of the EMA student against held-out teacher samples of the cache -------------

def training_rows(num_rows: int, train, prev: dict | None = None) -> int:
    """How many cache rows training draws from: all of them, or, when train.eval_every > 0, all but the last
    train.eval_num, which are the quick FD's held-out teacher samples (never trained on; with seeds_per_prompt
    they are whole prompts with all their seeds, as the cache keeps a prompt's seeds together). At the default
    eval_every = 0 nothing is held out, so the batches are those of a run without this option. A resume (`prev`:
    the run's previous config) must hold out the same rows, or the held-out ones would have been trained on."""
    if prev is not None:
        p = prev.get("train") or {}
        was, now = (p.get("eval_num", 64) if p.get("eval_every") else 0), (train.eval_num if train.eval_every else 0)
        if was != now:
            raise UserError(f"--resume: the run held out {was} cache rows for train.eval_every (now {now}); "
                            "resume with its train.eval_every on/off and train.eval_num (as its status.json "
                            "records them), or start a new --out")
    if not train.eval_every:
        return num_rows
    if train.eval_num > num_rows // 2:
        raise UserError(f"train.eval_num={train.eval_num} would hold out more than half of the cache's {num_rows} "
                        f"rows for train.eval_every; lower train.eval_num (<= {num_rows // 2}) or build a bigger cache")
    return num_rows - train.eval_num


def _default_features(data) -> None:
    if data not in ("shapes", "photos"):
        raise UserError(f"train.eval_every: this cache's prompts ({data or 'a prompt file'}) have no committed "
                        "feature net; set train.eval_features (a feature-net folder from `twostep metrics "
                        "train`, inception, inception:FILE.safetensors, clip:DIR or dinov2:DIR)")


def check_eval_features(spec: str, cache_dir) -> None:
    """train.eval_every's extractor checked from the cache's manifest alone, before any weight is read: the default
    ('') exists only for a shapes / photos cache. An unreadable manifest is left to the cache loader's error."""
    if spec:
        return
    try:
        manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    except (OSError, ValueError, RecursionError):
        return
    if isinstance(manifest, dict):
        _default_features(manifest.get("data"))


def eval_extractor(spec: str, cache, device="cpu"):
    """The quick FD's feature extractor: train.eval_features (twostep.metrics.extractors spec), or '' = the
    committed feature net of the cache's benchmark (features-shapes / features-photos under $TWOSTEP_MODELS)."""
    if not spec:
        data = (cache.manifest or {}).get("data")
        _default_features(data)
        spec = str(committed_model(f"features-{data}", "train.eval_features"))
    try:
        return load_extractor(spec, device)
    except UserError as e:  # name the config key that holds the spec
        raise UserError(f"train.eval_features: {e}") from None


def _rows(cache, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(noise, final, text) of cache rows `idx`, float32 on the CPU (the lazy cache reads only these rows)."""
    r = cache.rows(idx, ("noise", "final"))
    return r["noise"], r["final"], cache.text_rows(idx)


class QuickFD:
    """train.eval_every: FD between the EMA student's 2-step samples and the teacher's cached samples of the held-out
    cache rows `rows` (the same noise and prompts: the distillation error, not FD against data), in `extractor`'s
    features (metrics.fd.FeatureStats). The teacher's features are embedded once, here; each call samples the
    student in batches of `batch` on `device`, decodes and embeds them. `score` false (an FSDP rank other than the
    main one): the call only runs the sharded student's forwards, as every rank must, and scores nothing."""

    def __init__(self, teacher, cache, rows, extractor, batch: int, device="cpu", score: bool = True):
        self.cache, self.extractor, self.device, self.score = cache, extractor, device, score
        self.decode = device_decoder(teacher, device) if score else None
        rows = list(rows)
        self.chunks = [rows[i:i + batch] for i in range(0, len(rows), max(1, batch))]
        self.num = len(rows)
        self.real = None
        if score:
            self.real = FeatureStats(extractor.num_features, keep=False)  # FD only: O(D²) whatever eval_num
            for ix in self.chunks:
                self.real.add(extractor.embed(self.decode(_rows(cache, ix)[1])))

    @torch.no_grad()
    def __call__(self, student) -> dict:
        t0 = time.time()
        was = student.training
        student.eval()
        fake = FeatureStats(self.extractor.num_features, keep=False) if self.score else None
        cuda = [self.device] if torch.device(self.device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the training RNG streams never see the eval
            for ix in self.chunks:
                noise, _, text = _rows(self.cache, ix)
                x = student.generate(noise.to(self.device), [t.to(self.device) for t in text])["x0_2"]
                if fake is not None:
                    fake.add(self.extractor.embed(self.decode(x.float())))
        student.train(was)
        fd = self.real.fd(fake) if fake is not None else 0.0
        return {"eval_fd": fd, "eval_num": self.num, "eval_sec": time.time() - t0}


def quick_eval(acc, quick: QuickFD | None, student) -> dict:
    """The quick FD's log values on every process: computed where `quick` is (the main process; every process
    under FSDP, the main one scoring), then the main process's figures sent to all (each keeps the log)."""
    out = quick(student) if quick is not None else {"eval_fd": 0.0, "eval_num": 0, "eval_sec": 0.0}
    if acc is not None and acc.num_processes > 1:
        mine = [out["eval_fd"], float(out["eval_num"]), out["eval_sec"]] if acc.is_main_process else [0.0] * 3
        v = acc.reduce(torch.tensor(mine, dtype=torch.float64, device=acc.device), reduction="sum").tolist()
        out = {"eval_fd": v[0], "eval_num": int(v[1]), "eval_sec": v[2]}
    return out


def loss_curves(log: list[dict], keys, path):
    """One panel per key of `keys` that the log holds, against the update."""
    keys = [k for k in keys if any(k in r for r in log)]
    if not keys:
        return
    import matplotlib  # heavy: only at the end of a run
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs = [r["update"] for r in log if k in r]
        ax.plot(xs, [r[k] for r in log if k in r])
        ax.set_title(k); ax.set_xlabel("update")
        if k.startswith("d_acc"):
            ax.axhline(0.5, ls="--", c="gray")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")  # a viewer never sees a half-written PNG (as images.save_png)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
