"""`twostep eval`: quality and cost of a generator on a benchmark, deterministic at a fixed seed on CPU.

Protocol (every figure names it): prompts = `num` captions of the benchmark's held-out `test` split drawn with
`seed`; noise = N(0, I) from a generator seeded with `seed`; reference = `num` images of the `ref` split
(`--ref data`) or the teacher's default samples for the same prompts and noise (`--ref teacher`).
Metrics: FD and KID (torchmetrics, in the benchmark's own feature net), multi-scale SWD (×1e3), alignment
(`shapes` only), PSNR to the teacher's default sample for the same noise and prompt, within-prompt diversity
(feature space, DIVERSITY_PROMPTS prompts × DIVERSITY_SAMPLES noises), NFE and sec/image of generation.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import GUIDANCES, SEED, at_least
from .data import get_dataset
from .errors import UserError
from .io.files import atomic_save_tensors, atomic_write_text
from .io.folders import CONFIG, check_output_path, read_config, save_teacher_settings, teacher_identity
from .io.pipeline_format import SIDECAR
from .model import batched, check_pair, load_teacher, num_parameters
from .paths import committed_model
from .sampling import TeacherSampler
from .text import default_cache_dir

DIVERSITY_PROMPTS, DIVERSITY_SAMPLES = 25, 4
NOISE_OFFSET = 777_000  # eval noise seeds live apart from training seeds
EVAL_NUM = at_least(10, "FD/KID need at least 10 images")  # the range of `num` (and of the CLI's --num)


def features_dir_for(data: str, features: str | None) -> Path:
    """--features, else the committed feature net of a built-in benchmark (features-<data> in twostep.paths)."""
    if features:
        return Path(features)
    if data in ("shapes", "photos"):
        return committed_model(f"features-{data}", "--features DIR")
    raise UserError(f"--data {data}: no built-in feature network for a folder dataset; train one and pass "
                    "--features DIR")


def generate_all(gen, text, noise, batch_size: int = 250, progress: bool = False, desc: str = "sample"):
    outs, t = [], 0.0
    it = list(batched(len(text), batch_size))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=desc, unit="batch", leave=False)
    for sl in it:
        t0 = time.perf_counter()
        outs.append(gen.generate(text[sl], noise[sl]).x0)
        t += time.perf_counter() - t0
    return torch.cat(outs), t / max(1, len(text))


def teacher_reference(teacher_dir: Path, data: str, captions, text, noise, seed: int, progress=False):
    """The teacher's default samples for these prompts/noise, cached on disk (keyed by teacher + protocol)."""
    key = hashlib.sha1(json.dumps([teacher_identity(teacher_dir), data, len(captions), seed]).encode()).hexdigest()[:20]
    f = default_cache_dir().parent / "eval" / f"teacher-{key}.safetensors"
    if f.exists():
        try:
            return load_file(str(f))["x0"]
        except Exception:
            pass
    ts = TeacherSampler(load_teacher(teacher_dir))
    x, _ = generate_all(ts, text, noise, progress=progress, desc="teacher reference")
    x = ts.decode(x)  # images (a ZImagePipeline teacher's latents through its VAE)
    f.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors({"x0": x}, f)
    return x


def check_data_version(ds, net, model_cfg: dict, data: str) -> None:
    """A versioned benchmark (shapes v1/v2) must match the version its feature net and the model were made on:
    otherwise FD compares a model of one benchmark with the reference images of another."""
    want = getattr(ds, "version", None)
    if want is None:
        return
    got = net.folder_config.get("data_version") or 1  # feature nets from before versions are v1
    if got != want:
        raise UserError(f"feature net {net.folder_config.get('_folder', '?')} was trained on {data} v{got} but the "
                        f"benchmark is v{want}; retrain it with `twostep metrics train --data {data} --out DIR`")
    if model_cfg.get("data") == data:
        mv = model_cfg.get("data_version") or 1
        if mv != want:
            raise UserError(f"this {model_cfg.get('kind', 'model')} was trained on {data} v{mv} but the benchmark is "
                            f"v{want}; retrain it (twostep teacher train --data {data} ...) or distill from a "
                            f"v{want} teacher")


def evaluate(gen, data: str, num: int = 1000, seed: int = 0, ref: str = "data", features: str | None = None,
             teacher_dir: Path | None = None, progress: bool = True) -> dict:
    # lazy: torchmetrics (with transformers, scipy and matplotlib) adds ~2.5 s to every command's start-up
    from .metrics import DistributionMetrics, alignment, diversity, load_feature_net, psnr, swd

    EVAL_NUM.check(num, "num")
    SEED.check(seed, "seed")
    if ref not in ("data", "teacher"):
        raise UserError(f"--ref {ref}: use data or teacher")
    net = load_feature_net(features_dir_for(data, features))
    early = teacher_dir or (gen.config.get("teacher") if gen.config.get("kind") == "student" else None)
    if early is not None and Path(early).exists():  # before any sampling: a mismatched teacher is bad input
        check_pair(gen.config, Path(early))
    ds = get_dataset(data, gen.image_resolution)
    check_data_version(ds, net, gen.config, data)
    ex = ds.sample(num, seed=seed, split="test")
    text = gen.encode(ex.captions)
    noise = gen.noise(num, NOISE_OFFSET + seed)
    fake, spi = generate_all(gen, text, noise, progress=progress, desc=gen.describe())
    fake = gen.decode(fake)  # latents → images for a latent-space model (not timed: sec/image is generation)

    # the teacher's default sample for the same noise and prompt (PSNR, and the reference when --ref teacher)
    tdir = teacher_dir or (gen.config.get("teacher") if gen.config.get("kind") == "student" else None)
    is_teacher_default = gen.config.get("kind") == "teacher" and (gen.steps, gen.guidance) == (
        int(gen.config["sampling"]["steps"]), float(gen.config["sampling"]["guidance"]))
    if gen.config.get("kind") == "teacher" and tdir is None:
        tdir = gen.teacher.folder
    tref = None
    if is_teacher_default:
        tref = fake
    elif tdir is not None and Path(tdir).exists():
        tref = teacher_reference(Path(tdir), data, ex.captions, text, noise, seed, progress)

    if ref == "data":
        reference = ds.sample(num, seed=seed, split="ref").images
    else:
        if tref is None:
            raise UserError("--ref teacher: this model names no teacher folder; pass --teacher DIR")
        reference = tref
    dm = DistributionMetrics(net, reference, seed=seed)
    d = dm(fake)
    res = {
        "fd": d["fd"], "kid": d["kid_mean"], "kid_std": d["kid_std"],
        "swd": swd(reference, fake),
        "alignment": alignment(fake, ex.labels, net) if getattr(ds, "has_attributes", False) else None,
        "psnr_vs_teacher": None if (tref is None or is_teacher_default) else psnr(fake, tref),
    }
    # within-prompt diversity: the first prompts, each with several noises
    k = min(DIVERSITY_PROMPTS, num)
    dtext = [t for t in text[:k] for _ in range(DIVERSITY_SAMPLES)]
    dnoise = gen.noise(k * DIVERSITY_SAMPLES, NOISE_OFFSET + 500_000 + seed)
    dx, _ = generate_all(gen, dtext, dnoise)
    dx = gen.decode(dx)
    res["diversity"] = diversity(dx, [i // DIVERSITY_SAMPLES for i in range(len(dx))], net)
    res.update({"nfe": gen.nfe, "sec_per_image": spi, "num": num, "seed": seed, "ref": ref, "data": data,
                "model": gen.describe(), "steps": gen.steps, "guidance": gen.guidance})
    return res


TABLE_COLUMNS = ["model", "nfe", "fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "sec_per_image"]


def format_cell(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, record: dict) -> Path:
    """A metrics record (`twostep eval --json`, `twostep speed --json`), written atomically; parents created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


# -- the teacher's default CFG scale, chosen by FD -----------------------------------------------------------

def tune_guidance(teacher_dir: Path, data: str, grid=(0.0, 1.0, 2.0, 3.0, 4.0), num: int = 500, seed: int = 1,
                  features: str | None = None, log=None) -> tuple[float, Path]:
    """Evaluate the teacher at its default steps for each g of `grid` and store the g with the lowest FD, the FD
    of every g and the parameter count in its settings (config.json, or twostep.json of a ZImagePipeline folder).
    The default eval seed is 1, so the reported seed 0 is not tuned on. `log`, if given, gets a line per g.
    Returns (chosen g, the settings file written)."""
    GUIDANCES.check(list(grid), "grid")
    EVAL_NUM.check(num, "num")
    SEED.check(seed, "seed")
    teacher = load_teacher(teacher_dir)
    settings = Path(teacher_dir) / (SIDECAR if teacher.config.get("pipeline") else CONFIG)
    check_output_path(settings, "--teacher")  # before the work: the settings file can be rewritten
    fds = {}
    for g in grid:
        r = evaluate(TeacherSampler(teacher, guidance=g), data, num=num, seed=seed, progress=False, features=features)
        fds[g] = r["fd"]
        if log:
            log(f"g={g:g}: FD {r['fd']:.4g}  SWD {r['swd']:.4g}" + (f"  alignment {r['alignment']:.3f}"
                if r["alignment"] is not None else ""))
    best = min(fds, key=fds.get)
    cfg = read_config(Path(teacher_dir))
    cfg["sampling"]["guidance"] = best
    cfg["num_parameters"] = num_parameters(teacher.backbone.parameters())
    cfg["guidance_tuned"] = {"metric": "fd", "data": data, "num": num, "seed": seed,
                             "fd_by_guidance": {f"{g:g}": v for g, v in fds.items()}}
    save_teacher_settings(Path(teacher_dir), cfg)
    return best, Path(teacher_dir) / (SIDECAR if cfg.get("pipeline") else CONFIG)
