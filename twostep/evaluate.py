"""`twostep eval`: quality and cost of a generator, deterministic at a fixed seed on CPU, at any scale.

Protocol (every figure names it): prompts = `num` captions of the benchmark's held-out `test` split drawn with
`seed` (or, with `prompts=FILE`, `num` prompts of the file's held-out split, twostep.data.prompts); noise =
N(0, I) from a generator seeded with NOISE_OFFSET + `seed`; references: `num` images of the data's `ref` split
(`ref="data"`) and/or the teacher's default samples for the same prompts and noise (`ref="teacher"`: the
distillation error; `ref="both"` reports FD against each).
Metrics: FD and KID (torchmetrics) in a feature extractor (twostep.metrics.extractors: the benchmark's own feature
net by default, `inception`, `clip:DIR`, `dinov2:DIR`), CLIP score (with `clip=DIR`), multi-scale SWD (×1e3),
alignment (`shapes` only), PSNR to the teacher's default sample for the same noise and prompt, within-prompt
diversity (feature space, DIVERSITY_PROMPTS prompts × DIVERSITY_SAMPLES noises), NFE and sec/image of generation.

How it runs (the same path for a 32² benchmark and a 1024² pipeline):
- Sampling runs on `device` in batches of `batch_size` (the noise of batch k is the slice k of the one noise
  tensor, drawn on the CPU batch by batch: `noise_batches`); each batch is decoded (a latent model's fp32 VAE
  decodes 2 latents per call, pipeline_folder.DECODE_BATCH, as the training grids do; the device's peak is the
  transformer and text encoder in the eval dtype, the VAE, one batch of `batch_size` latents and one 2-latent
  decode's activations, about 2 x 3.5 GiB at 1024² (1 GiB each at 512²), whatever `batch_size`) and reduced to
  what the metrics need (per-image PSNR and CLIP scores; features and alignment counts), written to the work folder and
  dropped. A set whose float32 images fit SWD_MAX_BYTES (256 MiB: the embedded 32² benchmarks) keeps its images
  instead: it is embedded as one set, in the extractor's own batches from image 0 (so its features are the bytes
  of the in-memory protocol whatever `batch_size`), and SWD is computed; a larger set is embedded batch by batch,
  never held whole, and SWD (which needs both image sets) is None.
- The work folder (`work=DIR`, else a temporary one) holds one file per batch and set (fake/, teacher/, ref/,
  diversity/, images/ with `save_images`) and a status.json naming the protocol; running again with the same
  folder and protocol reuses every finished batch (an interrupted eval resumes), another protocol is refused.
- The teacher's default samples (PSNR and the teacher reference) are cached per batch, as raw samples (latents
  of a ZImagePipeline teacher, decoded at use), under $TWOSTEP_CACHE/eval/teacher-KEY/, keyed by the teacher's
  identity, the prompts, the seed, the batch size, the device type and the dtype, and shared by every model
  evaluated against that teacher (4·C·H·W bytes per sample: 1 MiB for a 1024² Z-Image latent).
- `dtype` (auto: bf16 on CUDA, fp32 on the CPU): the transformers (model and teacher) and a ZImagePipeline
  model's text encoder are held and run in it, as `twostep teacher cache --dtype` runs the teacher (fp32 states
  and Euler updates, inputs cast to the weights' dtype: model.place_weights); the VAE stays fp32. A non-fp32
  dtype is part of the protocol (status.json, the teacher store's key, the record's `dtype`); fp32 adds nothing,
  so fp32 work folders, stores and records are those of before.
- Images reach each extractor at the generator's real resolution; only the extractor's documented resize is
  applied (`describe()["resize"]`, recorded in the result with a non-default extractor).
At the defaults (the benchmark's feature net, batch_size 250 on the CPU) the numbers are the bytes the in-memory
protocol gave before (benchmarks/identity.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from . import plan
from .command_configs import EVAL_NUM  # the range of `num` (and of the CLI's --num)
from .config import COUNT, GUIDANCES, SEED
from .data import get_dataset
from .data.prompts import draw_prompts, prompt_file_identity
from .errors import UserError
from .images import save_png, to_uint8
from .io.files import atomic_save_tensors, atomic_write_text, load_tensors, sha256_files, sha256_text
from .io.folders import (CONFIG, check_output_path, claim_output, progress as run_progress, read_config,
                         save_teacher_settings, teacher_identity, write_status)
from .io.lock import holds_lock
from .io.pipeline_format import SIDECAR
from .metrics.alignment import alignment_counts
from .metrics.extractors import CLIPExtractor, CLIPScorer, FeatureNetExtractor, load_extractor
from .metrics.fd import FeatureStats
from .metrics.simple import feature_diversity, psnr_values
from .metrics.swd import swd
from .model import check_pair, compute_dtype, dtype_name, load_teacher, num_parameters, place_weights
from .paths import committed_model
from .sampling import STUDENT_FILES, TeacherSampler
from .text import default_cache_dir

DIVERSITY_PROMPTS, DIVERSITY_SAMPLES = 25, 4
NOISE_OFFSET = 777_000  # eval noise seeds live apart from training seeds
EVAL_BATCH = 250        # generation batch: the one the committed eval numbers were made with
PLAN_BYTES_PER_IMAGE = 4096  # features, caption, records per image (the plan's estimate, besides the pixels)
ENCODE_CHUNK = 1000     # prompts encoded per call (>= the default num: the embedded benchmarks encode as before)
SWD_MAX_BYTES = 256 << 20  # SWD holds both image sets in float32: only where each fits (32² x 1000 = 12 MiB)
REF_CHUNK = 512         # data reference images embedded per call (as DistributionMetrics fed torchmetrics)
REFS = ("data", "teacher", "both")
EVAL_DTYPES = ("auto", "bf16", "fp32")
DTYPE_HELP = "auto (bf16 on CUDA, fp32 on the CPU) | bf16 | fp32"
WORK_FORMAT = "twostep-eval-work-v1"
TEACHER_STORE_FORMAT = "twostep-eval-teacher-v2"


def features_dir_for(data: str | None, features: str | None) -> Path:
    """--features, else the committed feature net of a built-in benchmark (features-<data> in twostep.paths)."""
    if features:
        return Path(features)
    if data in ("shapes", "photos"):
        return committed_model(f"features-{data}", "--features DIR")
    if data is None:
        raise UserError("--prompts without a built-in --data: no default feature extractor; pass --extractor "
                        "(inception, inception:FILE.safetensors, clip:DIR, dinov2:DIR or a feature-net folder)")
    raise UserError(f"--data {data}: no built-in feature network for a folder dataset; pass --extractor (inception, "
                    "clip:DIR, dinov2:DIR) or train one (`twostep metrics train --data FOLDER`) and pass --features DIR")


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


# -- the device ------------------------------------------------------------------------------------------

DEVICE_HELP = "auto (CUDA when available, else CPU) | cpu | cuda | cuda:N"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` → cuda when available, else cpu; `cpu`, `cuda`, `cuda:N` as given (checked to exist)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):  # "" is not auto: refused below
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {device!r}: use {DEVICE_HELP}")
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu (or auto)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); choose one of them")
    return d


def resolve_placement(device: str | torch.device | None = "auto",
                      dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, weights' dtype) of a --device and a --dtype (EVAL_DTYPES), as eval, sample and speed read them:
    resolve_device, then model.compute_dtype (auto: bf16 on CUDA, fp32 elsewhere)."""
    if dtype not in EVAL_DTYPES:
        raise UserError(f"--dtype {dtype!r}: use {DTYPE_HELP}")
    dev = resolve_device(device)
    return dev, compute_dtype(dtype, dev)


def place(gen, device: torch.device, dtype: torch.dtype = torch.float32, vae: bool = True):
    """Move a generator's networks to `device`: its transformer(s) in `dtype` and a ZImagePipeline's text encoder
    in `dtype` (model.place_weights, as the teacher cache), its VAE in fp32 (loaded now unless `vae` is False:
    a caller that never decodes). Text features and noise follow the samples (the backbone moves captions to the
    sample's device and casts them to the weights' dtype)."""
    device = torch.device(device)
    parts = getattr(gen, "parts", None)
    text = parts if _moves_text(device, dtype) else None  # on the CPU in fp32 it loads where it always has
    for name in ("teacher", "student"):
        m = getattr(gen, name, None)
        if m is not None:
            place_weights(m.backbone if name == "teacher" else m, text, device, dtype)
    if vae and parts is not None and device.type != "cpu":
        parts._vae().to(device)   # eval decodes every sample: the VAE runs beside the transformer
    return gen


def place_text(gen, device: torch.device, dtype: torch.dtype):
    """Only a ZImagePipeline generator's text encoder, as `place` puts it (features come back fp32 on the CPU)."""
    parts = getattr(gen, "parts", None)
    if parts is not None and _moves_text(torch.device(device), dtype):
        parts.place(device, dtype)


def _moves_text(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type != "cpu" or dtype != torch.float32


def sync(device: torch.device):
    """Wait for `device`'s queued work (CUDA), so that a clock read after it times the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# -- noise and prompts in batches -------------------------------------------------------------------------

def batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


def noise_batches(space, n: int, seed: int, batch_size: int):
    """Yield (slice, noise) over `space.noise(n, seed)` in batches, without drawing all n at once: the CPU's
    normal sampler fills 16 values at a time (aten/src/ATen/native/cpu/DistributionTemplates.h, normal_fill), so
    consecutive draws from one generator concatenate to the one big draw whenever a sample holds a multiple of 16
    values (every latent and every pixel image with H·W % 16 == 0); otherwise, or if the first sample disagrees
    with space.noise (its recipe changed), the whole tensor is drawn once and sliced."""
    first = space.noise(1, seed)
    per = first[0].numel()
    g = torch.Generator().manual_seed(int(seed))
    streamed = per % 16 == 0
    if streamed:
        head = torch.randn(min(n, batch_size), *first.shape[1:], generator=g)
        streamed = torch.equal(head[:1], first)
    if not streamed:
        full = space.noise(n, seed)
        for sl in batch_slices(n, batch_size):
            yield sl, full[sl]
        return
    for i, sl in enumerate(batch_slices(n, batch_size)):
        yield sl, head if i == 0 else torch.randn(sl.stop - sl.start, *first.shape[1:], generator=g)


class _Text:
    """Text features of `captions[start:stop]`, encoded ENCODE_CHUNK prompts at a time (at most two chunks kept)."""

    def __init__(self, gen, captions: list[str]):
        self.gen, self.captions, self.chunks = gen, captions, {}

    def _chunk(self, c: int) -> list:
        if c not in self.chunks:
            if len(self.chunks) >= 2:
                self.chunks.pop(min(self.chunks))
            self.chunks[c] = self.gen.encode(self.captions[c * ENCODE_CHUNK:(c + 1) * ENCODE_CHUNK])
        return self.chunks[c]

    def __getitem__(self, sl: slice) -> list:
        out = []
        for c in range(sl.start // ENCODE_CHUNK, (sl.stop - 1) // ENCODE_CHUNK + 1):
            lo = max(sl.start, c * ENCODE_CHUNK) - c * ENCODE_CHUNK
            hi = min(sl.stop, (c + 1) * ENCODE_CHUNK) - c * ENCODE_CHUNK
            out += self._chunk(c)[lo:hi]
        return out


# -- per-batch records on disk ----------------------------------------------------------------------------

class _Records:
    """One safetensors file per batch of one set (`fake`, `teacher`, `ref`, `diversity`) in a folder; a record
    lacking a wanted tensor, or unreadable, counts as missing (it is computed again)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, k: int) -> Path:
        return self.folder / f"{k:05d}.safetensors"

    def get(self, k: int, want=()) -> dict | None:
        p = self.path(k)
        if not p.is_file():
            return None
        try:
            r = load_tensors(p)
        except (UserError, OSError, ValueError, RuntimeError):
            return None
        return r if all(w in r for w in want) else None

    def has(self, k: int, want=()) -> bool:
        """Whether record k exists with every tensor of `want` (its header only is read)."""
        try:
            with safe_open(str(self.path(k)), "pt") as f:
                names = set(f.keys())
        except Exception:  # missing, or not a safetensors file (safetensors raises its own error types)
            return False
        return all(w in names for w in want)

    def need(self, k: int, want=()) -> dict:
        """Record k, which must be there (written by an earlier pass of this eval)."""
        r = self.get(k, want)
        if r is None:
            raise UserError(f"{self.path(k)}: missing or unreadable (deleted or damaged while the eval ran); "
                            "run the eval again")
        return r

    def put(self, k: int, tensors: dict):
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, self.path(k))


def model_identity(gen, known: dict | None = None) -> dict:
    """What makes two generators' samples the same: a teacher's identity (weights, config) at its steps and
    guidance, or a student's config and weight files. `known`: {folder: teacher identity} already hashed."""
    c = gen.config
    if c.get("kind") == "teacher" and getattr(gen, "teacher", None) is not None and gen.teacher.folder is not None:
        f = gen.teacher.folder
        tid = next((v for k, v in (known or {}).items() if k is not None and v is not None
                    and Path(k).resolve() == Path(f).resolve()), None) or teacher_identity(f, c)
        return {"kind": "teacher", **tid, "steps": gen.steps, "guidance": gen.guidance}
    folder = getattr(gen, "folder", None)
    if c.get("kind") == "student" and folder is not None and c.get("decoupling") in STUDENT_FILES:
        return {"kind": "student", "config_sha256": sha256_text(json.dumps(c, sort_keys=True, default=str)),
                "weights_sha256": sha256_files([Path(folder) / f"{s}.safetensors"
                                                for s in STUDENT_FILES[c["decoupling"]]])}
    return {"kind": c.get("kind"), "describe": gen.describe(),
            "config_sha256": sha256_text(json.dumps(c, sort_keys=True, default=str))}


def _teacher_store(tid: dict, captions: list[str], seed: int, batch_size: int, dev: torch.device,
                   dtype: torch.dtype = torch.float32) -> _Records:
    """Where the teacher's default samples for these prompts / noise / batches live (module docstring); `tid`:
    the teacher's identity (io.folders.teacher_identity). The dtype joins the key unless fp32 (the fp32 keys of
    before)."""
    fields = [TEACHER_STORE_FORMAT, tid, sha256_text("\x00".join(captions)), len(captions), seed, batch_size,
              dev.type] + ([dtype_name(dtype)] if dtype != torch.float32 else [])
    key = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return _Records(default_cache_dir().parent / "eval" / f"teacher-{key[:20]}")


def _images_fit(n: int, shape) -> bool:
    return n * 4 * int(torch.Size(shape).numel()) <= SWD_MAX_BYTES


# -- the eval --------------------------------------------------------------------------------------------

def draw_eval_prompts(prompts, num: int, seed: int = 0, key: str | None = None,
                      allow_repeats: bool = False) -> tuple[list[str], dict]:
    """An eval's prompts from a file: `num` of its held-out split (twostep.data.prompts), and the draw's record
    (split sizes, repeats). Refused when the split holds fewer than `num` prompts, unless `allow_repeats`."""
    return draw_prompts(prompts, num, seed=seed, split="test", key=key, allow_repeats=allow_repeats)


@holds_lock("work", "--work", "eval")  # one writer per --work folder (none without one)
def evaluate(gen, data: str | None = None, num: int = 1000, seed: int = 0, ref: str | None = None,
             features: str | None = None, teacher_dir: Path | None = None, progress: bool = True, *,
             prompts: str | Path | None = None, prompt_key: str | None = None, extractor: str | None = None,
             clip: str | Path | None = None, work: str | Path | None = None, save_images: bool = False,
             batch_size: int = EVAL_BATCH, device: str = "auto", dtype: str = "auto", allow_repeats: bool = False,
             prompt_draw: tuple | None = None) -> dict:
    """The eval record of `gen` (module docstring). `data`: the benchmark (prompts, reference images) — shapes,
    photos or a folder; may be None with `prompts=FILE` (then only the teacher reference). `ref`: data | teacher
    | both (default: data when `data` is given, else teacher). `features` (a feature-net folder) or `extractor`
    (any twostep.metrics.extractors spec) choose the FD features; `clip` (a CLIP folder) adds `clip_score`.
    `work`: the resumable work folder (else a temporary one); `save_images`: also write every generated image
    as work/images/NNNNNN.png. `batch_size` and `device` (auto | cpu | cuda[:N]) set where and how many images
    are generated at once; `dtype` (auto | bf16 | fp32; auto: bf16 on CUDA, fp32 on the CPU) the weights'
    dtype (module docstring; `gen` is moved and cast in place). `allow_repeats`: a prompt file whose held-out split
    holds fewer than `num` prompts reuses them instead of refusing; `prompt_draw`: draw_eval_prompts' result when
    the caller drew them already (before loading the model). Results are reproducible for a given batch size,
    device and dtype."""
    EVAL_NUM.check(num, "num")
    SEED.check(seed, "seed")
    COUNT.check(batch_size, "batch_size")
    if ref is None:
        ref = "data" if data is not None else "teacher"
    if ref not in REFS:
        raise UserError(f"--ref {ref}: use data, teacher or both")
    if data is None and prompts is None:
        raise UserError("nothing to evaluate on: pass --data (shapes, photos or a folder) or --prompts FILE")
    if data is None and ref != "teacher":
        raise UserError(f"--ref {ref} compares with data images: pass --data (a folder or benchmark), or use "
                        "--ref teacher with --prompts alone")
    if features is not None and extractor is not None:
        raise UserError("give either --features DIR or --extractor SPEC (a feature-net folder is also an --extractor)")
    if save_images and work is None:
        raise UserError("--save-images writes into the work folder: pass --work DIR")
    ih, iw = gen.image_height, gen.image_width  # plan before work (twostep/plan.py): the reference images, the
    plan.check("--num", num, f"{num:,} images of {ih}x{iw}",  # kept images, features and captions are held whole
               memory=num * (2 * 3 * ih * iw * 4 + PLAN_BYTES_PER_IMAGE), disk=num * 3 * ih * iw if save_images else 0,
               disk_at=work)
    dev, wdtype = resolve_placement(device, dtype)
    spec = extractor if extractor is not None else str(features_dir_for(data, features))  # "" is refused
    ex = load_extractor(spec, device=dev)
    early = teacher_dir or (gen.config.get("teacher") if gen.config.get("kind") == "student" else None)
    if early is not None and Path(early).exists():  # before any sampling: a mismatched teacher is bad input
        check_pair(gen.config, Path(early))

    # prompts (and the labels of a benchmark with attributes)
    ds, labels = None, None
    if data is not None:
        ds = get_dataset(data, gen.image_resolution)
        if isinstance(ex, FeatureNetExtractor):
            check_data_version(ds, ex.net, gen.config, data)
    draw = None
    if prompts is not None:
        captions, draw = prompt_draw or draw_eval_prompts(prompts, num, seed, prompt_key, allow_repeats)
    elif hasattr(ds, "captions_sample"):  # a folder dataset: the same captions as sample(), without image copies
        captions = ds.captions_sample(num, seed=seed, split="test")
    else:
        exs = ds.sample(num, seed=seed, split="test")
        captions, labels = exs.captions, exs.labels
        del exs  # its images are not needed: the reference is the `ref` split
    align_net = ex.net if (isinstance(ex, FeatureNetExtractor) and labels is not None
                           and getattr(ds, "has_attributes", False)) else None
    scorer = None
    if clip is not None:
        same = isinstance(ex, CLIPExtractor) and Path(str(clip).removeprefix("clip:")).resolve() == ex.folder.resolve()
        scorer = CLIPScorer(ex if same else str(clip), device=dev)

    # the teacher's default sample for the same noise and prompt (PSNR, and the teacher reference)
    tdir = teacher_dir or (gen.config.get("teacher") if gen.config.get("kind") == "student" else None)
    is_teacher_default = gen.config.get("kind") == "teacher" and (gen.steps, gen.guidance) == (
        int(gen.config["sampling"]["steps"]), float(gen.config["sampling"]["guidance"]))
    if gen.config.get("kind") == "teacher" and tdir is None:
        tdir = gen.teacher.folder
    has_tref = tdir is not None and Path(tdir).exists()
    if ref in ("teacher", "both") and not has_tref:
        raise UserError(f"--ref {ref}: this model names no teacher folder; pass --teacher DIR")

    # the work folder: claimed for this protocol, resumed batch by batch (the model's weights are hashed only
    # for a --work folder; the teacher's identity, hashed once, also keys the store of its samples)
    tid = teacher_identity(Path(tdir)) if has_tref else None
    temp = work is None
    identity = {"format": WORK_FORMAT, "model": None if temp else model_identity(gen, {tdir: tid}), "teacher": tid,
                "prompts": prompt_file_identity(prompts, prompt_key) if prompts is not None else {"data": data},
                "captions_sha256": sha256_text("\x00".join(captions)), "num": num, "seed": seed,
                "batch_size": batch_size, "device": dev.type, "extractor": ex.describe(),
                "clip": scorer.clip.describe() if scorer is not None else None}
    if wdtype != torch.float32:
        identity["dtype"] = dtype_name(wdtype)
    wdir = Path(tempfile.mkdtemp(prefix="twostep-eval-")) if temp else Path(work)
    if not temp:
        claim_output(wdir, "eval", identity, allow_complete=True, flag="--work",
                     inputs={"--model": getattr(gen, "folder", None) or getattr(getattr(gen, "teacher", None),
                                                                                 "folder", None),
                             "--teacher": tdir})
        wdir.mkdir(parents=True, exist_ok=True)
    slices = batch_slices(num, batch_size)

    def status(done: int, complete: bool = False):
        write_status(wdir, "eval", identity, complete, run_progress(done, len(slices), "batches"))

    status(0)
    try:
        res = _run(gen, ex, dev, wdtype, captions, labels, ds, seed, num, ref, slices, wdir,
                   tdir if has_tref else None, tid, is_teacher_default, align_net, scorer, save_images, progress,
                   status)
    except BaseException:
        if temp:
            shutil.rmtree(wdir, ignore_errors=True)
        raise
    if temp:
        shutil.rmtree(wdir, ignore_errors=True)
    else:
        status(len(slices), complete=True)
    res.update({"nfe": gen.nfe, "sec_per_image": res.pop("_spi"), "num": num, "seed": seed, "ref": ref,
                "data": data, "model": gen.describe(), "steps": gen.steps, "guidance": gen.guidance})
    if extractor is not None:
        res["extractor"] = identity["extractor"]
    if prompts is not None:
        res["prompts"] = identity["prompts"]
        res["prompt_draw"] = draw
    if batch_size != EVAL_BATCH:
        res["batch_size"] = batch_size
    if dev.type != "cpu":
        res["device"] = str(dev)
    if "dtype" in identity:
        res["dtype"] = identity["dtype"]
    if not temp:
        res["work"] = str(wdir)
    if save_images:
        res["images"] = str(wdir / "images")
    return res


def _bar(progress: bool, desc: str, total_images: int):
    if not progress:
        return None
    from tqdm.auto import tqdm  # lazy: tqdm's import is part of the CLI's start-up otherwise

    return tqdm(total=total_images, desc=desc, unit="img", leave=False, smoothing=0.1)


def _timed_generate(gen, text, noise, dev) -> tuple[torch.Tensor, float]:
    sync(dev)
    t0 = time.perf_counter()
    x0 = gen.generate(text, noise.to(dev)).x0
    sync(dev)
    return x0, time.perf_counter() - t0


def _run(gen, ex, dev, dtype, captions, labels, ds, seed, num, ref, slices, wdir, tdir, tid, is_teacher_default,
         align_net, scorer, save_images, progress, status) -> dict:
    text = _Text(gen, captions)
    noise_seed = NOISE_OFFSET + seed
    fake_rec, tfeat_rec = _Records(wdir / "fake"), _Records(wdir / "teacher")
    img_shape = (3, gen.image_height, gen.image_width)
    keep_images = _images_fit(num, img_shape)   # SWD needs the whole sets
    need_tref = tdir is not None
    tstore = _teacher_store(tid, captions, seed, slices[0].stop, dev, dtype) if need_tref else None
    if progress and tstore is not None and not tstore.folder.exists():  # never a silent GB under ~/.cache
        mb = num * 4 * gen.noise(1, 0).numel() / 2 ** 20   # fp32 samples of the generator's shape
        print(f"eval: the teacher's samples (PSNR reference) are kept in {tstore.folder} (~{mb:,.0f} MiB; reused "
              "by every eval of these prompts and noise; delete the folder to free the space)", file=sys.stderr)
    place_text(gen, dev, dtype)  # every text chunk from the encoder where and as the model runs it (CUDA / bf16)
    # a set that fits SWD_MAX_BYTES keeps its images and is embedded (and read for alignment) as one set at the
    # end, in the extractor's own batches from image 0: the bytes of the in-memory protocol whatever batch_size;
    # a larger set is embedded batch by batch
    per_batch = ["images"] if keep_images else ["features"] + (["align"] if align_net is not None else [])
    want_fake = ["seconds", *per_batch] + (["psnr"] if need_tref and not is_teacher_default else []) + \
        (["clip"] if scorer is not None else [])
    want_tfeat = ["images"] if keep_images else ["features"]
    need_tfeat = ref in ("teacher", "both") and not is_teacher_default

    def todo(k):
        return not fake_rec.has(k, want_fake) or (need_tfeat and not tfeat_rec.has(k, want_tfeat))

    # 1. the teacher's samples (a student's reference; the teacher's own eval at its defaults writes them too)
    if need_tref and not is_teacher_default:
        missing = [k for k in range(len(slices)) if todo(k) and not tstore.has(k, ("x0", "seconds"))]
        if missing:
            same = getattr(gen, "teacher", None) is not None and gen.teacher.folder is not None and \
                Path(gen.teacher.folder).resolve() == Path(tdir).resolve()   # a teacher at other settings: reuse it
            ts = place(TeacherSampler(gen.teacher if same else load_teacher(Path(tdir), dtype)), dev, dtype)
            bar = _bar(progress, "teacher reference", sum(slices[k].stop - slices[k].start for k in missing))
            for k, (sl, nz) in enumerate(noise_batches(gen, num, noise_seed, slices[0].stop)):
                if k in missing:
                    x0, sec = _timed_generate(ts, text[sl], nz, dev)
                    tstore.put(k, {"x0": x0.float(), "seconds": torch.tensor([sec], dtype=torch.float64)})
                    if bar is not None:
                        bar.update(sl.stop - sl.start)
            if bar is not None:
                bar.close()
            del ts

    # 2. the model's samples: features, per-image PSNR / CLIP score, alignment counts (and the teacher's features)
    todo_k = [k for k in range(len(slices)) if todo(k)]
    bar = _bar(progress, gen.describe(), sum(slices[k].stop - slices[k].start for k in todo_k))
    if todo_k:
        place(gen, dev, dtype)
    for k, (sl, nz) in enumerate(noise_batches(gen, num, noise_seed, slices[0].stop) if todo_k else ()):
        if k not in todo_k:
            continue
        rec = fake_rec.get(k, want_fake)
        tfeat_done = not need_tfeat or tfeat_rec.has(k, want_tfeat)
        timg = None
        if need_tref:
            if is_teacher_default:
                stored = tstore.get(k, ("x0", "seconds"))
                if stored is None:
                    x0, sec = _timed_generate(gen, text[sl], nz, dev)
                    stored = {"x0": x0.float().cpu(), "seconds": torch.tensor([sec], dtype=torch.float64)}
                    tstore.put(k, stored)
                x0, sec = stored["x0"].to(dev), float(stored["seconds"][0])
            elif rec is None or not tfeat_done:
                timg = gen.decode(tstore.need(k, ("x0",))["x0"].to(dev)).cpu()
        if rec is None:
            if not (need_tref and is_teacher_default):
                x0, sec = _timed_generate(gen, text[sl], nz, dev)
            img = gen.decode(x0).cpu()
            rec = {"seconds": torch.tensor([sec], dtype=torch.float64)}
            if keep_images:
                rec["images"] = img
            else:
                rec["features"] = ex.embed(img)
                if align_net is not None:
                    ok, objects = alignment_counts(img, {n: v[sl] for n, v in labels.items()}, align_net)
                    rec["align"] = torch.tensor([ok, objects], dtype=torch.int64)
            if timg is not None:
                rec["psnr"] = torch.tensor(psnr_values(img, timg), dtype=torch.float64)
            if scorer is not None:
                rec["clip"] = scorer.scores(img, captions[sl])
            if save_images:
                for j, a in enumerate(to_uint8(img)):
                    save_png(a, wdir / "images" / f"{sl.start + j:06d}.png")
            fake_rec.put(k, rec)
        if not tfeat_done:
            tfeat_rec.put(k, {"images": timg} if keep_images else {"features": ex.embed(timg)})
        status(k + 1)
        if bar is not None:
            bar.update(sl.stop - sl.start)
    if bar is not None:
        bar.close()

    # 3. gather: FD / KID against each reference, SWD, PSNR, alignment, CLIP score, sec/image
    fake = FeatureStats(ex.num_features)
    recs = [fake_rec.need(k, want_fake) for k in range(len(slices))]
    fake_images = torch.cat([r["images"] for r in recs]) if keep_images else None
    for f in [ex.embed(fake_images)] if keep_images else [r["features"] for r in recs]:
        fake.add(f)
    out: dict = {}
    if ref in ("data", "both"):
        draw = getattr(ds, "_draw", None)
        if draw is not None:  # a folder dataset: the indices `sample` draws, then the images chunk by chunk
            idx = draw(num, seed, "ref")
            chunk = lambda sl: ds.images(idx[sl])  # noqa: E731
        else:                 # a built-in benchmark renders its (small) images at once, as it always has
            dref = ds.sample(num, seed=seed, split="ref").images
            chunk = lambda sl: dref[sl]  # noqa: E731
        rstats, ref_images = FeatureStats(ex.num_features), None
        if keep_images:       # small: one set, embedded from image 0 (as the fake set)
            ref_images = torch.cat([chunk(sl) for sl in batch_slices(num, REF_CHUNK)])
            rstats.add(ex.embed(ref_images))
        else:                 # large: batch by batch, features kept in the work folder
            rrec = _Records(wdir / "ref")
            for k, sl in enumerate(slices):
                r = rrec.get(k, ("features",))
                if r is None:
                    r = {"features": ex.embed(chunk(sl))}
                    rrec.put(k, r)
                rstats.add(r["features"])
        m = rstats.fd_kid(fake, seed=seed)
        out.update({"fd": m["fd"], "kid": m["kid_mean"], "kid_std": m["kid_std"]})
    if ref in ("teacher", "both"):
        if is_teacher_default:
            tstats, timages = fake, fake_images
        else:
            tstats = FeatureStats(ex.num_features)
            trecs = [tfeat_rec.need(k, want_tfeat) for k in range(len(slices))]
            timages = torch.cat([r["images"] for r in trecs]) if keep_images else None
            for f in [ex.embed(timages)] if keep_images else [r["features"] for r in trecs]:
                tstats.add(f)
        m = tstats.fd_kid(fake, seed=seed)
        if ref == "teacher":
            out.update({"fd": m["fd"], "kid": m["kid_mean"], "kid_std": m["kid_std"]})
            ref_images = timages
        else:
            teacher_m = m
    out["swd"] = swd(ref_images, fake_images) if keep_images else None
    if align_net is not None:
        ok, objects = alignment_counts(fake_images, labels, align_net) if keep_images else \
            (sum(int(r["align"][i]) for r in recs) for i in (0, 1))
        out["alignment"] = ok / max(objects, 1)
    else:
        out["alignment"] = None
    if need_tref and not is_teacher_default:
        vals = [v for r in recs for v in r["psnr"].tolist()]
        out["psnr_vs_teacher"] = sum(vals) / len(vals)
    else:
        out["psnr_vs_teacher"] = None
    out["diversity"] = _diversity(gen, ex, dev, dtype, text, len(captions), seed, wdir, slices[0].stop)
    out["_spi"] = sum(float(r["seconds"][0]) for r in recs) / max(1, num)
    if ref == "both":
        out.update({"fd_teacher": teacher_m["fd"], "kid_teacher": teacher_m["kid_mean"],
                    "kid_teacher_std": teacher_m["kid_std"]})
    if scorer is not None:
        vals = torch.cat([r["clip"] for r in recs])
        out["clip_score"] = float(vals.sum()) / len(vals)
    return out


def _diversity(gen, ex, dev, dtype, text: _Text, num: int, seed: int, wdir: Path, batch_size: int) -> float:
    """Within-prompt diversity: the first DIVERSITY_PROMPTS prompts, each with DIVERSITY_SAMPLES noises (embedded
    as one set when it fits SWD_MAX_BYTES, as the fake set)."""
    k = min(DIVERSITY_PROMPTS, num)
    n = k * DIVERSITY_SAMPLES
    keep = _images_fit(n, (3, gen.image_height, gen.image_width))
    want = ("images",) if keep else ("features",)
    rec = _Records(wdir / "diversity")
    parts, dtext = [], None
    for b, (sl, nz) in enumerate(noise_batches(gen, n, NOISE_OFFSET + 500_000 + seed, batch_size)):
        r = rec.get(b, want)
        if r is None:
            if dtext is None:
                place(gen, dev, dtype)
                dtext = [t for t in text[slice(0, k)] for _ in range(DIVERSITY_SAMPLES)]
            x0, _ = _timed_generate(gen, dtext[sl], nz, dev)
            img = gen.decode(x0).cpu()
            r = {"images": img} if keep else {"features": ex.embed(img)}
            rec.put(b, r)
        parts.append(r[want[0]])
    emb = ex.embed(torch.cat(parts)) if keep else torch.cat(parts)
    return feature_diversity(emb, [i // DIVERSITY_SAMPLES for i in range(n)])


TABLE_COLUMNS = ["model", "nfe", "fd", "kid", "swd", "alignment", "psnr_vs_teacher", "diversity", "sec_per_image"]


def format_cell(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


EXTRA_COLUMNS = ["fd_teacher", "clip_score"]  # shown when a row has them (--ref both, --clip)


def format_table(rows: list[dict]) -> str:
    cols = TABLE_COLUMNS + [c for c in EXTRA_COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in cols) + " |" for r in rows]
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
    check_output_path(settings, "--teacher", own=teacher_dir)  # before the work: its settings can be rewritten
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
