"""What a run shows: the progress bar, fixed-noise sample grids and the loss-curves PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..images import grid, save_png
from ..sampling import NaiveSampler


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
    """The run's log: records in memory (saved in checkpoints) and, on the main process, lines of log.jsonl."""

    def __init__(self, path: Path, records: list[dict], write: bool):
        self.records = records
        self.file = open(path, "a") if write else None

    def add(self, rec: dict):
        self.records.append(rec)
        if self.file:
            self.file.write(json.dumps(rec) + "\n"); self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def log_record(update: int, logs: dict) -> dict:
    """A log line: the update and its logs, floats rounded to 5 decimals."""
    return {"update": update, **{k: round(v, 5) if isinstance(v, float) else v for k, v in logs.items()}}


def at_chance(logs: dict) -> bool | None:
    """Whether a discriminator that reports its accuracies (d_acc_real, d_acc_fake) sits at chance (None when
    it does not report them): at chance it adds nothing over regression."""
    if "d_acc_real" not in logs:
        return None
    return abs((logs["d_acc_real"] + logs["d_acc_fake"]) / 2 - 0.5) < 0.05


def grid_inputs(teacher, cache, device="cpu", n: int = 8) -> dict:
    """The fixed prompts and noise of the run's grids, with the teacher's 8-step and naive 2-step rows."""
    n = min(n, len(cache))
    text = [t.to(device) for t in cache.text[:n]]
    noise = cache.noise[:n].to(device)
    naive = NaiveSampler(teacher).generate(text, noise).x0.cpu()
    return {"text": text, "noise": noise, "teacher": cache.final[:n], "naive": naive, "decode": teacher.decode}


@torch.no_grad()
def write_grid(path, gi, student, save: bool = True):
    """Rows: teacher 8-step | naive 2-step (2 NFE) | student 2-step — same noise and prompts."""
    was = student.training
    student.eval()
    st = student(gi["noise"], gi["text"])["x0_2"].float().cpu()
    student.train(was)
    if save:
        save_png(grid(gi["decode"](torch.cat([gi["teacher"], gi["naive"], st])), nrow=len(st), scale=3), path)


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
    fig.savefig(path, dpi=80)
    plt.close(fig)
