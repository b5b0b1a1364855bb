"""`twostep demo`: the README's main job, end to end on the committed `shapes` teacher.

teacher cache → Turbo++ distillation at today's defaults (configs/demo-defaults.yaml: time-budgeted, batch 16)
→ eval of teacher 8-step / naive 2-step (2 NFE, no CFG) /
naive 2-step with CFG (4 NFE) / student 2-step → report.html (grids, metric table, loss curves, the critic's
accuracy curve and whether it sat at chance) + metrics.json.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from .config import COUNT, POSITIVE, SEED
from .data import get_dataset
from .errors import UserError
from .evaluate import EVAL_NUM, evaluate, format_table
from .io.checkpoints import latest_checkpoint
from .io.files import atomic_write_text
from .io.folders import LOCK_FILE, check_output_path, read_config
from .io.lock import holds_lock
from .methods import REGISTRY, load_config
from .model import load_teacher
from .paths import committed_config, committed_model
from .report import comparison_grids, critic_curve, critic_line, critic_summary, log_curves, write_report
from .sampling import TeacherSampler, load_generator, naive_generators
from .teacher.cache import build_cache
from .train import distill

NAIVE_LABELS = {"naive-2step-nocfg": "naive 2-step (no CFG)", "naive-2step-cfg": "naive 2-step (g={g:g})"}


DEMO_FILES = ("cache", "run", "metrics.json", "report.html", "loss_curves.png", "critic_accuracy.png")
DEMO_CONFIG = "demo-defaults.yaml"  # today's Turbo++ defaults at the demo's budget (configs/demo.yaml: the older one)


def _check_demo_out(out: Path) -> None:
    """The demo writes only into a new or empty folder, or one that holds a previous demo's files."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in (*DEMO_FILES, LOCK_FILE) and not (p.name.startswith("grid_") and p.suffix == ".png"))
    if foreign:
        raise UserError(f"--out {out}: holds {foreign[0]!r}, which a demo does not write (not a previous demo's "
                        "folder); choose a new or empty --out")


@holds_lock("out", "--out")  # one demo per folder
def run_demo(out: Path = Path("out/demo"), data: str = "shapes", teacher_dir: Path | None = None,
             cache_num: int = 1024, minutes: float = 9.0, eval_num: int = 500, seed: int = 0,
             sets: list[str] | None = None, config: Path | None = None) -> dict:
    """teacher_dir: default teacher-<data> of twostep.paths; config: default DEMO_CONFIG of twostep.paths.
    `minutes` is the distillation's time budget, the discriminator's head start included, and must be > 0 (the demo
    config's 100 000 updates are never meant to be reached); 9 minutes keep the whole demo ≤ 15 min on 2 cores."""
    COUNT.check(cache_num, "cache_num")
    POSITIVE.check(minutes, "minutes")
    EVAL_NUM.check(eval_num, "eval_num")
    SEED.check(seed, "seed")
    t0 = time.time()
    out = Path(out)
    teacher_dir = Path(teacher_dir) if teacher_dir else committed_model(f"teacher-{data}", "--teacher DIR")
    cfg = load_config(Path(config) if config else committed_config(DEMO_CONFIG, "--config FILE"),
                      [f"train.minutes={minutes}", *(sets or [])])
    if cfg.train.minutes <= 0:  # a --set train.minutes=0 would leave the demo config's 100 000 updates unbudgeted
        raise UserError("demo: train.minutes=0 leaves the distillation without a time budget; drop that --set and "
                        "give --minutes > 0")
    check_output_path(out, "--out", {"--teacher": teacher_dir}, folder=True)  # before the work
    _check_demo_out(out)
    REGISTRY[cfg.method].check_blocks(cfg, int(read_config(teacher_dir)["transformer"]["n_layers"]))  # before the cache
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    print(f"[1/4] teacher cache: {cache_num} samples of {teacher_dir}", flush=True)
    build_cache(teacher_dir, data, cache_num, out / "cache", seed=seed)
    timings["cache_s"] = time.time() - t0

    print(f"[2/4] Turbo++ distillation ({minutes} min budget)", flush=True)
    run = out / "run"
    distill(cfg, teacher_dir, out / "cache", run, resume=latest_checkpoint(run / "checkpoints") is not None)
    timings["distill_s"] = time.time() - t0 - timings["cache_s"]

    print(f"[3/4] eval ({eval_num} images each, seed {seed}, reference = {data} data)", flush=True)
    teacher = load_teacher(teacher_dir)
    gens = {f"teacher 8-step (g={float(teacher.sampling['guidance']):g})": TeacherSampler(teacher),
            **{NAIVE_LABELS[k].format(g=gen.guidance): gen for k, gen in naive_generators(teacher).items()},
            "Turbo++ student 2-step": load_generator(run)}
    rows = []
    for name, gen in gens.items():
        r = evaluate(gen, data, num=eval_num, seed=seed, teacher_dir=teacher_dir)
        r["model"] = name
        rows.append(r)
        print(format_table([r]).splitlines()[-1], flush=True)
    timings["eval_s"] = time.time() - t0 - timings["cache_s"] - timings["distill_s"]

    print("[4/4] report", flush=True)
    caps = get_dataset(data).sample(6, seed=seed, split="test").captions
    grids = comparison_grids(gens, caps, out, seed=seed)
    teacher_fd, naive_fd, student_fd = rows[0]["fd"], rows[1]["fd"], rows[-1]["fd"]
    summary = {"data": data, "eval_num": eval_num, "seed": seed, "rows": rows, "timings_s": timings,
               "student_fd_over_naive_fd": student_fd / naive_fd if naive_fd else None,
               "student_fd_over_teacher_fd": student_fd / teacher_fd if teacher_fd else None,
               "wall_minutes": (time.time() - t0) / 60}
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    critic = critic_summary(records)
    summary["critic"] = critic
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1))
    extras = [(t, f) for t, f, ok in (
        ("Loss curves", "loss_curves.png", log_curves(records, REGISTRY[cfg.method].log_keys, out / "loss_curves.png")),
        ("Critic accuracy", "critic_accuracy.png", critic_curve(records, out / "critic_accuracy.png"))) if ok]
    print(critic_line(critic), flush=True)
    write_report(out / "report.html", f"twostep demo — Turbo++ on {data}", grids, caps, rows, extra_images=extras,
                 notes=f"FD/KID in the {data} feature net, {eval_num} images, seed {seed}, reference = held-out "
                       f"data. Student FD / naive 2-step FD = {summary['student_fd_over_naive_fd']:.3f}, / teacher "
                       f"8-step FD = {summary['student_fd_over_teacher_fd']:.3f}; wall time "
                       f"{summary['wall_minutes']:.1f} min.</p><p>{html.escape(critic_line(critic))}")
    print(f"done in {summary['wall_minutes']:.1f} min: {out / 'report.html'}")
    return summary
