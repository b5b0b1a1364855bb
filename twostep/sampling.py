"""One interface over every image generator twostep samples, evaluates and times.

A Generator has the sample space of twostep.model.SampleSpace (the one `encode`, `decode`, `noise`) and
    steps, guidance, nfe         its sampling setting, with a truthful NFE (CFG doubles every step)
    describe() -> str            one line naming it and its cost
    generate(text, noise, return_trajectory=False) -> flow.SampleResult

Generators: `TeacherSampler` (a teacher at any steps / CFG scale), `NaiveSampler` (the naive peer: the teacher
itself at 2 Euler steps, no training; `naive_generators` gives its two settings) and `StudentGenerator` (a
distilled 2-step student, no CFG). `load_generator(folder)` opens a teacher or student folder as one;
`save_student` / `load_student_generator` write and read a student folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import faults, flow
from .errors import UserError
from .io.files import load_tensors
from .io.folders import check_stamps, read_config, save_stamped
from .model import SampleSpace, default_sampling, load_teacher
from .student import TwoStepStudent, build_student_from_config
from .teacher.pipeline_folder import parts_for_model


class Generator(SampleSpace):
    """The protocol (see the module docstring); subclasses set `config`, `parts`, `steps` and `guidance`."""

    steps: int
    guidance: float

    @property
    def nfe(self) -> int:
        return flow.nfe(self.steps, self.guidance)

    def describe(self) -> str:
        raise NotImplementedError

    def generate(self, text, noise, return_trajectory: bool = False) -> flow.SampleResult:
        raise NotImplementedError


class TeacherSampler(Generator):
    """The teacher with a fixed sampling setting (steps, guidance; the teacher's defaults where not given)."""

    def __init__(self, teacher, steps: int | None = None, guidance: float | None = None):
        self.teacher = teacher
        s = teacher.sampling
        self.steps = int(s["steps"] if steps is None else steps)
        self.guidance = float(s["guidance"] if guidance is None else guidance)
        self.shift = float(s.get("shift", flow.DEFAULT_SHIFT))

    @property
    def config(self) -> dict:
        return self.teacher.config

    @property
    def parts(self):
        return self.teacher.parts

    def describe(self) -> str:
        return f"teacher {self.steps}-step, g={self.guidance:g}, {self.nfe} NFE"

    def generate(self, text, noise, return_trajectory: bool = False) -> flow.SampleResult:
        return self.teacher.sample(text, noise, steps=self.steps, guidance=self.guidance,
                                   return_trajectory=return_trajectory)


# -- the naive peer: the teacher at 2 Euler steps (σ = 1, 0.75, 0 at shift 3), what the method must beat --------

NAIVE_STEPS = 2


class NaiveSampler(TeacherSampler):
    """The teacher, unchanged (the same object and weights), at NAIVE_STEPS Euler steps on its own shifted grid."""

    def __init__(self, teacher, guidance: float = 0.0):
        super().__init__(teacher, steps=NAIVE_STEPS, guidance=guidance)


def naive_guidance(teacher_config: dict) -> float | None:
    """The CFG scale of the naive "with CFG" setting: the teacher's default g; when FD chose g = 0, the tuned
    g > 0 with the lowest FD; None (no CFG setting to offer) for a g = 0 teacher that was never tuned."""
    g = float(default_sampling(teacher_config)["guidance"])
    if g != 0:
        return g
    fds = {float(k): v for k, v in (teacher_config.get("guidance_tuned") or {}).get("fd_by_guidance", {}).items()
           if float(k) > 0}
    return min(fds, key=fds.get) if fds else None


def naive_settings(teacher_config: dict, guidance: float | None = None) -> dict[str, float]:
    """{"naive-2step-nocfg": 0.0, "naive-2step-cfg": g}: the naive peer's two settings, both truthful about
    cost (2 NFE without CFG, 4 with). g: `guidance`, else naive_guidance; no CFG setting when it is None or 0."""
    g = naive_guidance(teacher_config) if guidance is None else float(guidance)
    return {"naive-2step-nocfg": 0.0, **({"naive-2step-cfg": g} if g else {})}


def naive_generators(teacher, guidance: float | None = None) -> dict[str, NaiveSampler]:
    """naive_settings as generators of `teacher` (a twostep.model.Teacher)."""
    return {name: NaiveSampler(teacher, g) for name, g in naive_settings(teacher.config, guidance).items()}


# -- the distilled student --------------------------------------------------------------------------------

class StudentGenerator(Generator):
    """A distilled student sampled with its own 2-step σ grid, no CFG (2 NFE)."""

    def __init__(self, student: TwoStepStudent, config: dict, folder: Path | None = None):
        self.student = student.eval()
        self.config = config
        self.folder = folder
        self.steps, self.guidance = 2, 0.0
        self.parts = parts_for_model(config, folder)  # a ZImagePipeline teacher's text encoder / VAE (lazy)

    def describe(self) -> str:
        return f"student 2-step ({self.student.decoupling}, σm={self.student.sigma_mid:g}), {self.nfe} NFE"

    def generate(self, text, noise, return_trajectory: bool = False) -> flow.SampleResult:
        out = self.student.generate(noise, text)  # no_grad; mid_noise=fresh: ε' seeded by the noise
        traj = [noise, out["x_m"], out["x0_2"]] if return_trajectory else []
        return flow.SampleResult(x0=out["x0_2"], nfe=self.nfe,
                                 sigmas=torch.tensor(self.student.sigmas, dtype=torch.float64), trajectory=traj)


STUDENT_FILES = {"full": ["step1", "step2"], "shared": ["model"], "lora": ["base", "step1", "step2"]}


def save_student(student: TwoStepStudent, config: dict, folder: Path, state: dict | None = None):
    """Write a student folder (io.folders.save_stamped: stamped weight files, config.json last).
    `state`: the student's full state dict, when the module holds FSDP shards (see TwoStepStudent.export_state)."""
    save_stamped(student.export_state(state), config, folder, on_file=lambda: faults.point("model.save"))


def load_student_generator(folder) -> StudentGenerator:
    folder = Path(folder)
    c = read_config(folder)
    st = build_student_from_config(c)
    stems = STUDENT_FILES[c["decoupling"]]
    check_stamps(folder, stems, c)
    st.load_export_state({s: load_tensors(folder / f"{s}.safetensors") for s in stems})
    st.requires_grad_(False)
    return StudentGenerator(st, c, folder)


def load_generator(folder, steps: int | None = None, guidance: float | None = None) -> Generator:
    """A teacher folder (at `steps` / `guidance`, default: its own) or a student folder as a Generator."""
    cfg = read_config(Path(folder))
    kind = cfg.get("kind")
    if kind == "teacher":
        return TeacherSampler(load_teacher(folder), steps, guidance)
    if kind == "student":
        if steps is not None or guidance is not None:
            raise UserError(f"{folder}: a student knows its own steps and runs without CFG; drop --steps/--guidance")
        return load_student_generator(folder)
    raise UserError(f"{folder}/config.json: unknown model kind {kind!r}; expected 'teacher' or 'student'")
