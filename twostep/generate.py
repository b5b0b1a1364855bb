"""One interface over every image generator twostep evaluates: a teacher sampled with N Euler steps (with or
without CFG), and (later) a distilled student. `generate(text, noise) -> SampleResult` with a truthful NFE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import flow
from .errors import UserError
from .io.folders import read_config
from .model import load_teacher


class TeacherSampler:
    """The teacher with a fixed sampling setting (steps, guidance, shift)."""

    def __init__(self, teacher, steps: int | None = None, guidance: float | None = None):
        self.teacher = teacher
        s = teacher.sampling
        self.steps = int(s["steps"] if steps is None else steps)
        self.guidance = float(s["guidance"] if guidance is None else guidance)
        self.shift = float(s.get("shift", flow.DEFAULT_SHIFT))
        self.resolution = teacher.resolution
        self.image_resolution = teacher.image_resolution
        self.config = teacher.config

    @property
    def nfe(self) -> int:
        return flow.nfe(self.steps, self.guidance)

    def describe(self) -> str:
        return f"teacher {self.steps}-step, g={self.guidance:g}, {self.nfe} NFE"

    def encode(self, prompts):
        return self.teacher.encode(prompts)

    def noise(self, n: int, seed: int):
        return self.teacher.noise(n, seed)

    def decode(self, x):
        return self.teacher.decode(x)

    def generate(self, text, noise, return_trajectory: bool = False) -> flow.SampleResult:
        return self.teacher.sample(text, noise, steps=self.steps, guidance=self.guidance,
                                   return_trajectory=return_trajectory)


def cfg_guidance(teacher) -> float:
    """The g for a "with CFG" comparison row: the teacher's default, or, when FD chose g = 0, the tuned g > 0 with
    the lowest FD (1.0 if the teacher was never tuned)."""
    g = float(teacher.sampling["guidance"])
    if g != 0:
        return g
    fds = {float(k): v for k, v in (teacher.config.get("guidance_tuned") or {}).get("fd_by_guidance", {}).items()
           if float(k) > 0}
    return min(fds, key=fds.get) if fds else 1.0


def load_generator(folder, steps: int | None = None, guidance: float | None = None):
    cfg = read_config(Path(folder))
    kind = cfg.get("kind")
    if kind == "teacher":
        return TeacherSampler(load_teacher(folder), steps, guidance)
    if kind == "student":
        if steps is not None or guidance is not None:
            raise UserError(f"{folder}: a student knows its own steps and runs without CFG; drop --steps/--guidance")
        from .student import load_student_generator
        return load_student_generator(folder)
    raise UserError(f"{folder}/config.json: unknown model kind {kind!r}; expected 'teacher' or 'student'")
