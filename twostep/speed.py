"""`twostep speed`: teacher (default steps, with its CFG) vs student (2 steps) images/sec, timed interleaved in one
process after warm-up (ratios measured in one run: these machines are noisy). Text features are cached for both.
Both run on one device with their weights in one dtype (evaluate.resolve_placement, as `twostep eval`); on CUDA
the clock is read after torch.cuda.synchronize."""

from __future__ import annotations

import statistics
import time

import torch

from .config import COUNT, NON_NEGATIVE_INT
from .errors import UserError
from .evaluate import place, resolve_placement, sync
from .model import check_pair, dtype_name
from .sampling import load_generator


BATCH, REPEATS = 32, 5


def _check_counts(batch, repeats, warmup=0) -> None:
    COUNT.check(batch, "batch")
    COUNT.check(repeats, "repeats")
    NON_NEGATIVE_INT.check(warmup, "warmup")


def measure(teacher_gen, student_gen, batch: int = BATCH, repeats: int = REPEATS, warmup: int = 1,
            prompts=None, device="cpu") -> dict:
    """Median seconds per batch of each generator (already on `device`), interleaved after `warmup` rounds."""
    _check_counts(batch, repeats, warmup)
    prompts = prompts or ["a large red circle center, gray background"] * batch
    text = [t.to(device) for t in teacher_gen.encode(prompts[:batch])]  # cached text features, shared by both
    noise = teacher_gen.noise(batch, 0).to(device)
    times = {"teacher": [], "student": []}
    gens = {"teacher": teacher_gen, "student": student_gen}
    with torch.inference_mode():
        for _ in range(warmup):
            for g in gens.values():
                g.generate(text, noise)
        for _ in range(repeats):  # interleaved: teacher, student, teacher, student, ...
            for k, g in gens.items():
                sync(device)
                t0 = time.perf_counter()
                g.generate(text, noise)
                sync(device)
                times[k].append(time.perf_counter() - t0)
    res = {"batch": batch, "repeats": repeats}
    for k, g in gens.items():
        med = statistics.median(times[k])
        res[k] = {"model": g.describe(), "nfe": g.nfe, "sec_per_image": med / batch, "images_per_sec": batch / med}
    res["time_ratio_student_over_teacher"] = res["student"]["sec_per_image"] / res["teacher"]["sec_per_image"]
    res["nfe_ratio_student_over_teacher"] = res["student"]["nfe"] / res["teacher"]["nfe"]
    res["ratio_over_nfe_limit"] = res["time_ratio_student_over_teacher"] / res["nfe_ratio_student_over_teacher"]
    return res


def measure_folders(teacher_dir, student_dir, batch: int = BATCH, repeats: int = REPEATS, device: str = "auto",
                    dtype: str = "auto") -> dict:
    """`twostep speed`: measure() of a teacher folder (its default steps and CFG) against a student folder made
    from it (refused when their sample spaces differ), both on `device` (auto | cpu | cuda[:N]) with their weights
    read in `dtype` (auto | bf16 | fp32; auto: bf16 on CUDA, fp32 on the CPU); the record names both."""
    _check_counts(batch, repeats)
    dev, wdtype = resolve_placement(device, dtype)
    student = load_generator(student_dir, dtype=wdtype)
    if student.config.get("kind") != "student":  # a teacher timed against itself is no speed-up to report
        raise UserError(f"--student {student_dir}: a {student.config.get('kind') or 'model'} folder, not a student "
                        "run; pass the --out folder of `twostep distill`")
    check_pair(student.config, teacher_dir)
    teacher = load_generator(teacher_dir, dtype=wdtype)
    for g in (teacher, student):
        place(g, dev, wdtype, vae=False)  # nothing is decoded
    res = measure(teacher, student, batch=batch, repeats=repeats, device=dev)
    return {**res, "device": str(dev), "dtype": dtype_name(wdtype)}


def summary(r: dict) -> str:
    """measure()'s result as the lines `twostep speed` prints."""
    lines = [f"{k:8s} {r[k]['model']:45s} NFE {r[k]['nfe']:3d}  {r[k]['images_per_sec']:8.1f} img/s  "
             f"{1e3 * r[k]['sec_per_image']:.2f} ms/img" for k in ("teacher", "student")]
    lines.append(f"student/teacher time ratio {r['time_ratio_student_over_teacher']:.3f} vs NFE ratio "
                 f"{r['nfe_ratio_student_over_teacher']:.3f} -> {r['ratio_over_nfe_limit']:.3f}x the NFE limit")
    return "\n".join(lines)
