"""One interface over every image generator twostep samples, evaluates and times.

A Generator has the sample space of twostep.model.SampleSpace (the one `encode`, `decode`, `noise`) and
    steps, guidance, nfe         its sampling setting, with a truthful NFE (CFG doubles every step)
    describe() -> str            one line naming it and its cost
    generate(text, noise, return_trajectory=False) -> flow.SampleResult

Generators: `TeacherSampler` (a teacher at any steps / CFG scale), `NaiveSampler` (the naive peer: the teacher
itself at 2 Euler steps, no training; `naive_generators` gives its two settings) and `StudentGenerator` (a
distilled 2-step student, no CFG). `load_generator(folder)` opens a teacher or student folder as one;
`save_student` / `load_student_generator` write and read a student folder;
`load_checkpoint_generator(run, update)` reads the EMA student of one of a run's checkpoints.
Each loader takes `dtype`: the weights are read in it, every tensor cast as it is loaded (no fp32 copy of the
model first); None (the default) reads them as always, into fp32 modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import faults, flow
from .config import COUNT, NON_NEGATIVE
from .backbones.zimage import check_transformer_config, check_weights
from .errors import UserError
from .io.checkpoints import link_file
from .io.files import all_finite, atomic_save_tensors, atomic_write_text, load_tensors
from .io.folders import CONFIG, check_stamps, read_config, save_stamped
from .model import SampleSpace, check_size_fields, default_sampling, load_teacher
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
        self.steps = int(COUNT.check(s["steps"] if steps is None else steps, "steps"))
        self.guidance = float(NON_NEGATIVE.check(s["guidance"] if guidance is None else guidance, "guidance"))
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


def save_student(student: TwoStepStudent, config: dict, folder: Path, state: dict | None = None,
                 linked: Path | None = None):
    """Write a student folder (stamped weight files, config.json last: io.folders.save_stamped). `state`: the
    student's full state dict, when the module holds FSDP shards (see TwoStepStudent.export_state).

    Small checkpoints: `linked`, a checkpoint's `ema/` folder that already holds some of these files
    byte for byte (twostep.train.state writes them there): those are hard-linked, not written again. A lora
    student's frozen base (config["base_sha256"]: the hash of the teacher weights it is) is written once per run:
    kept when the folder's base.safetensors already carries that hash, stamped with it instead of the update."""
    frozen = TwoStepStudent.FROZEN_STEMS[student.decoupling] if config.get("base_sha256") else ()
    if linked is None and not frozen:
        save_stamped(student.export_state(state), config, folder, on_file=lambda: faults.point("model.save"))
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, sd in student.export_state(state).items():
        path, src = folder / f"{stem}.safetensors", None if linked is None else Path(linked) / f"{stem}.safetensors"
        if stem in frozen:
            if file_stamp(path, "base_sha256") != config["base_sha256"]:
                atomic_save_tensors(sd, path, metadata={"base_sha256": config["base_sha256"]})
        elif src is not None and src.is_file():
            link_file(src, path)
        else:
            atomic_save_tensors(sd, path, metadata={"updates": config.get("updates", 0)})
        faults.point("model.save")
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1))


def file_stamp(path: Path, key: str) -> str | None:
    """A safetensors file's metadata entry `key` (None when the file or the entry is missing or unreadable)."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get(key)
    except Exception:  # missing, truncated: not the file wanted
        return None


def check_student_config(c, folder: Path) -> None:
    """A student folder's config.json, checked before anything is built: one UserError naming the field."""
    where, fix = folder / "config.json", "restore the run's original config.json (or re-run `twostep distill`)"
    if not isinstance(c, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(c).__name__}; {fix}")
    for key in ("transformer", "decoupling", "sigma_mid", *(() if "height" in c or "width" in c else ("resolution",))):
        if key not in c:
            raise UserError(f"{where}: required field {key!r} is missing; {fix}")
    if c["decoupling"] not in STUDENT_FILES:
        raise UserError(f"{where}: decoupling {c['decoupling']!r} is not one of {', '.join(STUDENT_FILES)}; {fix}")
    sm = c["sigma_mid"]
    if not isinstance(sm, (int, float)) or isinstance(sm, bool) or not 0 < sm < 1:
        raise UserError(f"{where}: sigma_mid {sm!r} must be a number in (0, 1); {fix}")
    check_size_fields(c, where, fix)  # resolution, or height and width (a non-square model)
    if c["decoupling"] == "lora":
        rank = c.get("lora_rank", 16)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise UserError(f"{where}: lora_rank {rank!r} must be an integer >= 1; {fix}")
    check_transformer_config(c["transformer"], str(where), complete=False)  # a mapping; the rest after the weights


# the files of a student folder that hold a whole transformer (checked against config.json's transformer section)
WHOLE_TRANSFORMER = {"full": ["step1", "step2"], "shared": ["model"], "lora": ["base"]}


def resolve_student(folder, weights: str = "best") -> Path:
    """The student folder that `folder` stands for: a run trained with train.keep_best holds its lowest-quick-FD EMA
    in folder/best/ (twostep.train.best), which `weights="best"` (the default of export, sample and eval) takes;
    `weights="last"`, or a run without one, the folder itself (the last EMA)."""
    folder = Path(folder)
    if weights not in ("best", "last"):
        raise UserError(f"--weights {weights!r}: expected best or last")
    best = folder / "best"
    if weights == "best" and (best / CONFIG).is_file():
        return best
    return folder


def load_student_generator(folder, dtype: torch.dtype | None = None, weights: str = "best",
                           adapters_as_stored: bool = False) -> StudentGenerator:
    """A student folder (checked: config, stamps, frozen base, weights) as a generator, its weights in `dtype`;
    a run's best EMA unless `weights="last"` (resolve_student). `adapters_as_stored`: a lora student's adapter
    files are read as saved (fp32), only its whole transformers in `dtype` (export merges them in fp32)."""
    folder = resolve_student(folder, weights)
    c = read_config(folder)
    check_student_config(c, folder)
    stems = STUDENT_FILES[c["decoupling"]]
    frozen = [s for s in TwoStepStudent.FROZEN_STEMS[c["decoupling"]] if c.get("base_sha256")]
    check_stamps(folder, [s for s in stems if s not in frozen], c)
    _check_frozen_base(folder, frozen, c)
    return _student_from_files(c, {s: folder / f"{s}.safetensors" for s in stems}, folder, folder, dtype,
                               adapters_as_stored)


def _check_frozen_base(folder: Path, frozen, c: dict) -> None:
    for s in frozen:  # written once per run, stamped with the teacher's weights hash (save_student)
        if file_stamp(folder / f"{s}.safetensors", "base_sha256") != c["base_sha256"]:
            raise UserError(f"{folder / f'{s}.safetensors'}: missing or not the frozen base config.json names (a "
                            "save was interrupted); run `twostep distill --resume` on it to rewrite the model files")


def _student_from_files(c: dict, paths: dict, config_dir: Path, folder: Path,
                        dtype: torch.dtype | None = None, adapters_as_stored: bool = False) -> StudentGenerator:
    """The StudentGenerator of the checked config `c` from its weight files `paths` ({stem: file}, stamps checked);
    `config_dir`: where config.json is (for messages); `folder`: the generator's folder (its weight files).
    `dtype`: each tensor read in it, into a student built without storage; None: as stored, into fp32 modules."""
    whole = WHOLE_TRANSFORMER[c["decoupling"]]
    overflow: list[str] = []

    def cast(path: Path):   # each tensor read in `dtype`; a finite weight that does not fit it is named
        def fn(name, t):
            if not t.is_floating_point() or t.dtype == dtype:
                return t
            out = t.to(dtype)
            if not overflow and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
                overflow.append(f"{path.name}: {name}")
            return out
        return fn

    files = {s: load_tensors(p, None if dtype is None or (adapters_as_stored and s not in whole) else cast(p))
             for s, p in paths.items()}
    if overflow:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
        raise UserError(f"{config_dir}: the student's weights overflow {name} (values beyond its range, first "
                        f"{overflow[0]}); use --dtype fp32")
    for s in whole:
        check_weights(c["transformer"], files[s], paths[s], str(config_dir / "config.json"))
    check_transformer_config(c["transformer"], str(config_dir / "config.json"), complete=not c.get("pipeline"))
    for s, sd in files.items():
        if not all_finite(sd):
            raise UserError(f"{paths[s]}: holds NaN/inf weights (saved by a run that diverged); "
                            "distill again with lower learning rates")
    try:
        st = build_student_from_config(c, meta=dtype is not None)
        st.load_export_state(files, assign=dtype is not None)
    except UserError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, AssertionError) as e:  # torch / peft / diffusers
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(e).__name__)[:200]
        raise UserError(f"{config_dir}: its weights do not match its config.json ({msg}); restore the run's original "
                        "config.json and weight files together (or re-run `twostep distill`)") from None
    st.requires_grad_(False)
    return StudentGenerator(st, c, folder)


def checkpoint_updates(run_dir) -> list[int]:
    """The updates of a run folder's complete checkpoints (meta.json written), oldest first."""
    cks = Path(run_dir) / "checkpoints"
    return sorted(int(p.name[len("step-"):]) for p in cks.glob("step-*")
                  if p.is_dir() and not p.name.endswith(".partial") and (p / "meta.json").is_file()) \
        if cks.is_dir() else []


def load_checkpoint_generator(run_dir, update: int | None = None,
                              dtype: torch.dtype | None = None) -> StudentGenerator:
    """The EMA student of a distillation run's checkpoint at `update` (None: the newest complete one): what
    `twostep eval --model RUN` evaluates once the run has finished at that update (a run folder's model files are
    its newest checkpoint's ema/ files, twostep.train.state), for budget curves taken from one run
    (benchmarks/run.py --eval-at). The run may be unfinished or already past `update`; the checkpoint must be
    complete and of the small format (ema/<stem>.safetensors); a lora run's frozen base is the run
    folder's base.safetensors (the same for every checkpoint: stamped with the teacher's hash). The generator's
    `folder` is the checkpoint's ema/ folder and its config the run's config.json at that update; its weights are
    read in `dtype` (None: as stored, into fp32 modules)."""
    run_dir = Path(run_dir)
    have = checkpoint_updates(run_dir)
    step = have[-1] if update is None and have else (None if update is None else int(update))
    ck = run_dir / "checkpoints" / f"step-{step or 0:08d}"
    if step is None or step not in have:
        raise UserError(f"{run_dir}: no complete checkpoint at update {'(newest)' if update is None else update} "
                        f"(complete ones: {', '.join(map(str, have)) or 'none'}); keep more with "
                        "train.keep_checkpoints, or evaluate the finished run folder with `twostep eval`")
    if not (ck / "ema").is_dir():
        raise UserError(f"{ck}: a checkpoint from before the small format (no ema/ folder); evaluate the run "
                        "folder after `twostep distill --resume` instead")
    try:
        c = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir / CONFIG}: missing or unreadable ({type(e).__name__}); resume the run with "
                        "`twostep distill --resume` to rewrite it") from None
    check_student_config(c, run_dir)
    c = {**c, "updates": step}  # config.json names the newest update; everything else is the run's
    stems = STUDENT_FILES[c["decoupling"]]
    frozen = [s for s in TwoStepStudent.FROZEN_STEMS[c["decoupling"]] if c.get("base_sha256")]
    check_stamps(ck / "ema", [s for s in stems if s not in frozen], c)
    _check_frozen_base(run_dir, frozen, c)
    paths = {s: (run_dir if s in frozen else ck / "ema") / f"{s}.safetensors" for s in stems}
    return _student_from_files(c, paths, run_dir, ck / "ema", dtype)


def load_generator(folder, steps: int | None = None, guidance: float | None = None,
                   dtype: torch.dtype | None = None, weights: str = "best") -> Generator:
    """A teacher folder (at `steps` / `guidance`, default: its own) or a student folder as a Generator, its
    transformer weights read in `dtype` (None: as always, fp32)."""
    cfg = read_config(Path(folder))
    kind = cfg.get("kind")
    if kind == "teacher":
        return TeacherSampler(load_teacher(folder, dtype), steps, guidance)
    if kind == "student":
        if steps is not None or guidance is not None:
            raise UserError(f"{folder}: a student knows its own steps and runs without CFG; drop --steps/--guidance")
        return load_student_generator(folder, dtype, weights)
    raise UserError(f"{folder}/config.json: unknown model kind {kind!r}; expected 'teacher' or 'student'")
