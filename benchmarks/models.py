"""How the committed models were made, and what runs after a new one: the exact commands, one recipe each.

    .venv/bin/python benchmarks/models.py [--dry-run] RECIPE [ARGS]

Recipes (each runs from the repository root and stops at the first failing command; --dry-run prints the
commands without running anything):
  after-shapes-teacher SRC    adopt a newly trained shapes teacher (copy it to models/teacher-shapes), tune its
                              CFG by FD, the teacher-gap rows, the demo and the docs/benchmarks.md tables
  after-teachers              once both teachers are trained: CFG tuning by FD, the teacher-gap table, docs/benchmarks.md
  commit-student DATA         copy out/turbopp-DATA to models/turbopp-DATA, then the records docs/benchmarks.md's results
                              table reads: `twostep eval --num 1000` at seeds 0 1 2 and `twostep speed` at batch 32
                              (benchmarks/results/students/, tabulated by benchmarks/students_table.py)
  turbopp-shapes              the committed shapes student: the demo's config and teacher cache (configs/demo.yaml,
                              out/demo/cache from `make demo`) in three stages: 15 minutes at lr 1e-4 (972 updates on
                              2 threads), turbopp-shapes-more to 1900 updates, turbopp-shapes-anneal to 2400 updates
                              at lr 2e-5; then commit-student shapes
  turbopp-shapes-more [N]     continue out/turbopp-shapes to N updates (default 1900), same config, one thread;
                              evaluated into out/turbopp-shapes-more/
  turbopp-shapes-anneal [N]   continue it to N updates (default 2400) at student lr 2e-5, one thread (the
                              1900-update weights kept in out/turbopp-shapes-1900/); evaluated into
                              out/turbopp-shapes-anneal/
  turbopp-photos [MINUTES]    the former photos student: configs/demo.yaml on a 2048-sample photos teacher cache
                              (benchmarks/run.py's cache: same command and seed), MINUTES of distillation (default
                              30, one thread); then commit-student photos
  curve-student DATA          the committed students since issue 18: today's Turbo++ defaults at batch 8 for 2000
                              updates, i.e. the seed-0 `turbopp` run of the budget curves (benchmarks/run.py
                              --eval-at ..., docs/decoupling_rule.md; resumed, or nothing to do when its points are
                              on disk), copied to models/turbopp-DATA; then commit-student's evals and speed
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
T = ".venv/bin/twostep"
PY = ".venv/bin/python"


@dataclass
class Cmd:
    argv: list[str]
    log: str | None = None  # stdout and stderr to this file instead of the terminal

    def show(self) -> str:
        return shlex.join(self.argv) + (f" > {self.log} 2>&1" if self.log else "")

    def start(self, env: dict) -> subprocess.Popen:
        out = None
        if self.log:
            (ROOT / self.log).parent.mkdir(parents=True, exist_ok=True)
            out = open(ROOT / self.log, "w")
        return subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)


@dataclass
class Together:
    """Commands run at the same time; the next step waits for all of them."""
    cmds: list[Cmd]

    def show(self) -> str:
        return "\n".join(c.show() + " &" for c in self.cmds) + "\nwait"


@dataclass
class Threads:
    """Steps run with OMP_NUM_THREADS=1: always (`force`), or unless the caller set it (a sweep may share the
    cores)."""
    steps: list
    force: bool = False

    def show(self) -> str:
        head = "export OMP_NUM_THREADS=" + ("1" if self.force else "${OMP_NUM_THREADS:-1}")
        return "(" + head + "\n" + "\n".join(s.show() for s in self.steps) + ")"


@dataclass
class Copy:
    names: list[str]
    src: str
    dst: str

    def show(self) -> str:
        return f"mkdir -p {self.dst} && cp {' '.join(f'{self.src}/{n}' for n in self.names)} {self.dst}/"


@dataclass
class Remove:
    path: str

    def show(self) -> str:
        return f"rm -rf {self.path}"


@dataclass
class When:
    """A step run only when `test()` holds at its turn; `what` says the condition in the listing."""
    what: str
    test: Callable[[], bool]
    step: object

    def show(self) -> str:
        return f"# only if {self.what}:\n" + self.step.show()


def run(step, env: dict) -> None:
    if isinstance(step, Threads):
        inner = {**env, "OMP_NUM_THREADS": "1"} if step.force else {"OMP_NUM_THREADS": "1", **env}
        for s in step.steps:
            run(s, inner)
    elif isinstance(step, When):
        if step.test():
            run(step.step, env)
    elif isinstance(step, Copy):
        (ROOT / step.dst).mkdir(parents=True, exist_ok=True)
        for n in step.names:
            shutil.copy(ROOT / step.src / n, ROOT / step.dst / n)
    elif isinstance(step, Remove):
        shutil.rmtree(ROOT / step.path, ignore_errors=True)
    else:
        cmds = step.cmds if isinstance(step, Together) else [step]
        procs = [c.start(env) for c in cmds]
        for c, p in zip(cmds, procs):
            if p.wait() != 0:
                raise SystemExit(f"failed (exit {p.returncode}): {c.show()}")


def exists(path: str) -> Callable[[], bool]:
    return lambda: (ROOT / path).exists()


def missing(path: str) -> Callable[[], bool]:
    return lambda: not (ROOT / path).exists()


def incomplete_cache(path: str) -> Callable[[], bool]:
    f = ROOT / path / "manifest.json"
    return lambda: not (f.exists() and json.loads(f.read_text()).get("complete"))


def evals(model: str, data: str, out: str, stem: str, seeds=(0, 1, 2)) -> list[Cmd]:
    return [Cmd([T, "eval", "--model", model, "--data", data, "--num", "1000", "--seed", str(s), "--no-progress",
                 "--json", f"{out}/{stem}-seed{s}.json"]) for s in seeds]


# -- the recipes --------------------------------------------------------------------------------------------

def after_shapes_teacher(src: str) -> list:
    return [Copy(["config.json", "model.safetensors", "loss_log.json", "train_config.json"], src,
                 "models/teacher-shapes"),
            Cmd([T, "teacher", "tune-guidance", "--teacher", "models/teacher-shapes", "--data", "shapes", "--num",
                 "500", "--grid", "0", "0.5", "1", "2", "3"], log="logs/tune-shapes.log"),
            Cmd([PY, "benchmarks/teacher_gap.py", "--data", "shapes", "photos"], log="logs/gap-shapes.log"),
            Remove("out/demo"),  # a demo of the previous teacher: its cache and run would be refused
            Cmd([T, "demo", "--out", "out/demo"], log="logs/demo.log"),
            Cmd([PY, "benchmarks/update_readme.py"])]


def after_teachers() -> list:
    return [Threads(force=True, steps=[
        Together([Cmd([T, "--threads", "1", "teacher", "tune-guidance", "--teacher", f"models/teacher-{d}", "--data",
                       d, "--num", "500", "--grid", "0", "0.5", "1", "2", "3"], log=f"logs/tune-{d}.log")
                  for d in ("shapes", "photos")]),
        Together([Cmd([PY, "benchmarks/teacher_gap.py", "--data", d, "--threads", "1"], log=f"logs/gap-{d}.log")
                  for d in ("shapes", "photos")]),
        Cmd([PY, "benchmarks/teacher_gap.py", "--threads", "1"]),  # all records cached: writes teacher_gap.md
        Cmd([PY, "benchmarks/update_readme.py"])])]


def commit_student(data: str, src: str | None = None) -> list:
    model, out = f"models/turbopp-{data}", "benchmarks/results/students"
    return [Copy(["config.json", "config.yaml", "step1.safetensors", "step2.safetensors", "loss_curves.png"],
                 src or f"out/turbopp-{data}", model),
            *evals(model, data, out, f"turbopp-{data}"),
            Cmd([T, "speed", "--teacher", f"models/teacher-{data}", "--student", model, "--batch", "32",
                 "--json", f"{out}/turbopp-{data}-speed.json"])]


SHAPES_DISTILL = [T, "distill", "--teacher", "models/teacher-shapes", "--cache", "out/demo/cache", "--config",
                  "configs/demo.yaml"]


def turbopp_shapes_more(updates: int = 1900) -> list:
    return [Threads([Cmd([*SHAPES_DISTILL, "--set", "train.minutes=0", "--set", f"train.updates={updates}",
                          "--out", "out/turbopp-shapes", "--no-progress", "--resume"]),
                     *evals("out/turbopp-shapes", "shapes", "out/turbopp-shapes-more", "turbopp-shapes")])]


def turbopp_shapes_anneal(updates: int = 2400) -> list:
    keep = "out/turbopp-shapes-1900"
    return [Threads([When(f"{keep}/step2.safetensors is missing", missing(f"{keep}/step2.safetensors"),
                          Copy(["config.json", "config.yaml", "step1.safetensors", "step2.safetensors"],
                               "out/turbopp-shapes", keep)),
                     Cmd([*SHAPES_DISTILL, "--set", "train.minutes=0", "--set", f"train.updates={updates}", "--set",
                          "train.lr_student=2e-5", "--out", "out/turbopp-shapes", "--no-progress", "--resume"]),
                     *evals("out/turbopp-shapes", "shapes", "out/turbopp-shapes-anneal", "turbopp-shapes")])]


def turbopp_shapes() -> list:
    return [When("out/turbopp-shapes/checkpoints is missing", missing("out/turbopp-shapes/checkpoints"),
                 Cmd([*SHAPES_DISTILL, "--set", "train.minutes=15", "--out", "out/turbopp-shapes", "--no-progress"])),
            *turbopp_shapes_more(1900), *turbopp_shapes_anneal(2400), *commit_student("shapes")]


def turbopp_photos(minutes: float = 30) -> list:
    cache, run_dir = "benchmarks/work/cache-photos-2048", "out/turbopp-photos"  # the cache is run.py's too
    distill = [T, "distill", "--teacher", "models/teacher-photos", "--cache", cache, "--config", "configs/demo.yaml",
               "--set", f"train.minutes={minutes:g}", "--out", run_dir, "--no-progress"]
    return [Threads([When(f"{cache} is not complete", incomplete_cache(cache),
                          Cmd([T, "teacher", "cache", "--teacher", "models/teacher-photos", "--data", "photos", "--num",
                               "2048", "--seed", "0", "--out", cache, "--no-progress"])),
                     When(f"{run_dir}/checkpoints exists", exists(f"{run_dir}/checkpoints"),
                          Cmd([*distill, "--resume"])),
                     When(f"{run_dir}/checkpoints is missing", missing(f"{run_dir}/checkpoints"), Cmd(distill)),
                     *commit_student("photos")])]


CURVES = "benchmarks/results/budget_curves"
CURVE_ARGS = ["--eval-at", "100", "300", "1000", "2000", "--batch", "8", "--cache-num", "2048", "--eval-num", "1000",
              "--threads", "1", "--out", CURVES]  # the budget-curve runs' settings (docs/decoupling_rule.md)


def curve_student(data: str) -> list:
    run_dir = f"{CURVES}/work/run-{data}-turbopp-seed0"
    return [Threads([Cmd([PY, "benchmarks/run.py", "--data", data, *CURVE_ARGS, "--seeds", "0", "--variants",
                          "turbopp"], log=f"logs/curve-student-{data}.log"),
                     *commit_student(data, run_dir)])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    sub = p.add_subparsers(dest="recipe", required=True)
    sub.add_parser("after-shapes-teacher").add_argument("src", help="the new teacher's folder")
    sub.add_parser("after-teachers")
    sub.add_parser("commit-student").add_argument("data", choices=["shapes", "photos"])
    sub.add_parser("turbopp-shapes")
    sub.add_parser("turbopp-shapes-more").add_argument("updates", type=int, nargs="?", default=1900)
    sub.add_parser("turbopp-shapes-anneal").add_argument("updates", type=int, nargs="?", default=2400)
    sub.add_parser("turbopp-photos").add_argument("minutes", type=float, nargs="?", default=30)
    sub.add_parser("curve-student").add_argument("data", choices=["shapes", "photos"])
    return p.parse_args(argv)


def plan(a) -> list:
    return {"after-shapes-teacher": lambda: after_shapes_teacher(a.src), "after-teachers": after_teachers,
            "commit-student": lambda: commit_student(a.data), "turbopp-shapes": turbopp_shapes,
            "turbopp-shapes-more": lambda: turbopp_shapes_more(a.updates),
            "turbopp-shapes-anneal": lambda: turbopp_shapes_anneal(a.updates),
            "turbopp-photos": lambda: turbopp_photos(a.minutes), "curve-student": lambda: curve_student(a.data)}[a.recipe]()


def main(argv=None) -> int:
    a = parse_args(argv)
    steps = plan(a)
    if a.dry_run:
        print("\n".join(s.show() for s in steps))
        return 0
    for s in steps:
        print(f"$ {s.show()}", flush=True)
        run(s, dict(os.environ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
