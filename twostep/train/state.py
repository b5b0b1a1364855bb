"""What a run keeps between processes: the run folder (refusals, its config.yaml), the optimizers and their
hyper-parameters on resume, checkpoints (write, load, roll back after non-finite updates) and the usable model.

Checkpoints of one process hold full tensors (the files layout below); with several processes they are DCP shards
by default (train.checkpoint_format; dcp.py: each rank writes its own, resumable under any process count). The
files layout is the same with or without FSDP (distributed.py gathers and shards its tensors). Small checkpoints (meta.json "format": 2), each trainable tensor once:
    student.safetensors     the student's trainable tensors (lora: the adapters only; the frozen base is the
                            teacher, which meta.json's `frozen_base` names by its weights hash)
    ema/<stem>.safetensors  the EMA, in the run folder's model-file format (lora: adapters only); the run folder's
                            model files are hard links to the newest checkpoint's (io.checkpoints.link_file), and a
                            lora run folder's base.safetensors is written once per run (sampling.save_student)
    critic.safetensors, optim_<name>.safetensors + optim.json, rng.safetensors, meta.json (last)
A checkpoint without "format" (every module's whole state dict, `ema.safetensors`) still resumes.
`checkpoint_bytes` computes what one costs, from the same selection, at any model size (the 6B in docs/sizing.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ..backbones.zimage import ZImageBackbone
from ..config import dump_config, to_dict, trained_diff, trained_sha256
from ..errors import NonFiniteWeights, UserError
from ..io.checkpoints import latest_checkpoint, read_checkpoint, rng_state, write_checkpoint
from ..io.files import atomic_write_text, nonfinite_parts, sha256_text
from ..io.folders import CONFIG, IDENTITY_KEYS, claim_output, progress, read_status, twostep_command, write_status
from ..methods import build_method
from ..sampling import save_student
from ..student import deepcopy_sharing_frozen
from . import dcp, launched
from .distributed import all_ranks, full_optim_state, full_state, load_module, optim_transform

CKPT_FORMAT = 2  # meta.json "format" of the small checkpoints (module docstring)


def run_identity(cache) -> dict:
    """What a run is of (status.json's identity): its teacher, as the cache recorded it (load_cache checked that
    it is the given teacher: weights, transformer, resolution, text encoder, default sampling), and the cache's
    contents (a sha256 over its shards' checksums, so a moved or rebuilt-identical cache is the same)."""
    m = cache.manifest
    return {"teacher": {k: (m.get("teacher") or {}).get(k) for k in IDENTITY_KEYS},
            "cache": sha256_text("\n".join(str(e["sha256"]) for e in sorted(m["shards"], key=lambda e: int(e["index"]))))}


def check_run_folder(out: Path, cfg, resume: bool, identity: dict | None = None, inputs: dict | None = None,
                     teacher_config: dict | None = None) -> tuple[Path | None, dict | None]:
    """(newest complete checkpoint, the run's previous config as a dict) of the run folder `out`, after
    io.folders.claim_output: never an input folder (`inputs`), a file or a folder of another kind or identity.
    Refuses a folder that holds a run (a checkpoint, or a trained student) unless `resume`, a `resume` with
    nothing to resume from, and a resume that changes what was trained: any field outside config.RESUMABLE that
    differs from the config recorded in the run's status.json (checked against its hash there; the editable
    config.yaml is never the reference). A run from before status.json recorded its config: its config.yaml,
    outside `train`."""
    st = claim_output(out, "student", identity, inputs=inputs, resume=resume, allow_complete=True)
    ck = latest_checkpoint(out / "checkpoints")
    if ck is not None and not resume:
        raise UserError(f"{out}: already holds a run (checkpoint {ck.name}); pass --resume to continue it or "
                        "choose another --out")
    if ck is None and st.kind is not None and st.complete and not resume:
        raise UserError(f"{out}: already holds a run (a trained student, no checkpoint to continue from); choose "
                        "another --out")
    if resume and ck is None:
        raise UserError(f"{out}: nothing to resume (no complete checkpoint in {out / 'checkpoints'}); run without "
                        "--resume to start it afresh")
    if st.legacy and teacher_config is not None and (out / CONFIG).is_file():  # no recorded identity: the model's
        try:                                                                  # architecture at least
            old = json.loads((out / CONFIG).read_text())
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and old.get("transformer") not in (None, teacher_config.get("transformer")):
            raise UserError(f"{out}: holds a run of another teacher (its transformer config differs); choose "
                            "another --out")
    prev = None
    recorded = _recorded_config(out) if resume else None
    if recorded is not None:
        now = to_dict(cfg)
        diff = trained_diff(recorded, now, to_dict(type(cfg)()))
        if diff:
            k, was, _ = diff[0]
            changes = ", ".join(f"{f} {_shown(a)} → {_shown(b)}" for f, a, b in diff[:4])
            raise UserError(f"{out}: --resume would change what the run was trained with ({changes}); resume "
                            f"with the values it was trained with (e.g. --set {k}={_shown(was)}) or start a new "
                            "--out (a resume may change the updates, minutes, learning rates and the logging, eval "
                            "and checkpoint cadence)")
        return ck, recorded
    if resume and (out / "config.yaml").exists():
        prev = yaml.safe_load((out / "config.yaml").read_text())
        now = to_dict(cfg)
        # a key the recorded config lacks (a run from before that option existed) counts as its default
        defaults = {s: to_dict(type(getattr(cfg, s))()) for s in now if isinstance(now[s], dict)}
        diff = [f"{s}.{k}" for s in now if isinstance(now[s], dict) for k in now[s]
                if s != "train" and (prev.get(s) or {}).get(k, defaults[s][k]) != now[s][k]]
        if diff:
            raise UserError(f"{out}: --resume with a different config ({', '.join(diff[:3])}); resume with the "
                            "run's settings or another --out")
    return ck, prev


def _shown(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _recorded_config(out: Path) -> dict | None:
    """The config a run was started with, as its status.json recorded it (None for a run from before), after
    checking it against the trained-fields hash recorded beside it."""
    s = read_status(out)
    if s is None or s.get("config") is None:
        return None
    rec = s["config"]
    if not isinstance(rec, dict) or trained_sha256(rec) != s.get("config_sha256"):
        raise UserError(f"{out / 'status.json'}: its recorded config does not match its hash (the file was "
                        "edited); restore it, or start a new --out")
    return rec


def resume_command(teacher_dir: Path, cache_dir: Path, out: Path) -> str:
    """The command that continues the run in `out` (status.json's `resume`), with its launcher and the flags a
    resume keeps (train/launched.py)."""
    return launched.resume_command(teacher_dir, cache_dir, out)


def start_run_folder(acc, out: Path, cfg, identity: dict | None = None, resume: str | None = None,
                     update: int = 0) -> None:
    """The run folder with status.json (unfinished; it records the resolved config and the hash of its trained
    fields, the reference of a resume), the resolved config.yaml (a copy to read; written by the main process)
    and grids/."""
    out.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        launched.record(out, acc.num_processes, resume, acc.print)  # launch.json: launcher, processes, flags
        c = to_dict(cfg)
        write_status(out, "student", identity, False, progress(update, cfg.train.updates), resume, config=c,
                     config_sha256=trained_sha256(c))
        atomic_write_text(out / "config.yaml", dump_config(cfg))
        (out / "grids").mkdir(exist_ok=True)


def mark_run(acc, out: Path, total: int, complete: bool = False, stopped: str | None = None) -> None:
    """Rewrite the run's status.json: progress = the update of the newest complete checkpoint (where a resume
    restarts), `complete` only when the run's model files hold that update. The completion marker is the last
    thing a run writes."""
    if not acc.is_main_process:
        return
    s = read_status(out)
    if s is None:
        return
    ck = latest_checkpoint(out / "checkpoints")
    done = json.loads((ck / "meta.json").read_text())["step"] if ck is not None else 0
    try:
        saved = json.loads((out / CONFIG).read_text()).get("updates")
    except (OSError, ValueError, AttributeError):
        saved = None
    p = progress(done, total)
    if stopped:
        p["stopped"] = stopped
    write_status(out, "student", s.get("identity"), bool(complete) and saved == done, p, s.get("resume"),
                 **{k: s[k] for k in ("config", "config_sha256") if k in s})


def student_lr(train: dict, decoupling: str) -> float:
    """The student's learning rate: `train.lr_lora` for per-step LoRA adapters, `train.lr_student` otherwise
    (a config written before lr_lora existed trained its adapters at lr_student)."""
    if decoupling == "lora":
        return train.get("lr_lora", train["lr_student"])
    return train["lr_student"]


def fused_adamw(setting: str, device_type: str) -> bool:
    """train.adamw resolved on a device type: auto = fused on CUDA (no step temporaries), foreach elsewhere."""
    return setting == "fused" or (setting == "auto" and device_type == "cuda")


def optimizers(cfg, s_params, c_params) -> dict[str, torch.optim.Optimizer]:
    """AdamW of the student ("student") and, when it has parameters, of the critic ("critic")."""
    t = cfg.train
    lr_s = student_lr(to_dict(cfg)["train"], cfg.student.decoupling)
    impl = {"fused": True} if fused_adamw(t.adamw, s_params[0].device.type) else {}
    opt_s = torch.optim.AdamW(s_params, lr=lr_s, betas=tuple(t.betas), weight_decay=t.weight_decay, **impl)
    opt_c = (torch.optim.AdamW(c_params, lr=t.lr_disc, betas=tuple(t.betas), weight_decay=t.weight_decay_disc,
                               **impl) if c_params else None)
    return {"student": opt_s, **({"critic": opt_c} if opt_c else {})}


def apply_resumed_hparams(acc, opts, prev: dict | None, cfg) -> None:
    """A checkpoint's optimizer state carries its learning rates, so loading it would silently undo a changed
    `--set train.lr_student=...` on --resume. Apply the current config: the learning rate scaled by what the run
    did to it (the NaN rollback's halvings survive), betas and weight decay as configured."""
    t, dec = cfg.train, cfg.student.decoupling
    now_t = to_dict(cfg)["train"]
    prev_t = (prev or {}).get("train") or now_t
    lrs = {"student": (student_lr(prev_t, dec), student_lr(now_t, dec), "lr_lora" if dec == "lora" else "lr_student"),
           "critic": (prev_t["lr_disc"], now_t["lr_disc"], "lr_disc")}
    for name, (was, now, key) in lrs.items():
        if name not in opts:
            continue
        for g in opts[name].param_groups:
            g["lr"] = g["lr"] * now / was
            g["betas"] = tuple(t.betas)
            g["weight_decay"] = t.weight_decay if name == "student" else t.weight_decay_disc
        if now != was:
            acc.print(f"resumed with train.{key}={now:g} (the run had {was:g})")


def saved_modules(method, ema) -> dict[str, torch.nn.Module]:
    """The modules a checkpoint holds, by file name: the student, its EMA, then the method's other trainable ones."""
    mods = method.modules()
    return {"student": mods["student"], "ema": ema, **{k: m for k, m in mods.items() if k != "student"}}


def checkpoint_files(method, ema, states: dict, update: int) -> tuple[dict, dict]:
    """(files, metadata) of a checkpoint: {name: state dict} as write_checkpoint takes them, from the modules'
    (full) state dicts `states` (saved_modules' names). The one selection of what a checkpoint holds (module
    docstring), used by `checkpoint` and by `checkpoint_bytes`."""
    st = method.student
    files = {"student": st.trainable_state(states["student"])}
    meta = {}
    for stem, sd in ema.export_state(states["ema"]).items():
        if stem not in st.FROZEN_STEMS[st.decoupling]:
            files[f"ema/{stem}"] = sd
            meta[f"ema/{stem}"] = {"updates": update}  # the run folder's stamp: its files are links to these
    files.update({k: v for k, v in states.items() if k not in ("student", "ema")})
    return files, meta


def load_state(ck: Path, method, ema, opts, fsdp: bool, base_sha256: str | None = None) -> dict:
    """Modules and optimizer state from a checkpoint (full tensors; sharded on load under FSDP); returns its meta.
    `base_sha256`: the hash of this run's frozen teacher, which a small lora checkpoint's adapters were trained on
    (refused when it names another)."""
    meta = json.loads((ck / "meta.json").read_text())
    mods = saved_modules(method, ema)
    if meta.get("format", 1) < CKPT_FORMAT:  # whole state dicts, ema.safetensors
        for name, m in mods.items():
            load_module(m, ck / f"{name}.safetensors", fsdp)
    else:
        base = (meta.get("frozen_base") or {}).get("sha256")
        if base and base_sha256 and base != base_sha256:
            raise UserError(f"{ck}: its lora adapters were trained on a frozen base (teacher weights sha256 "
                            f"{base[:12]}…) that is not this run's teacher ({base_sha256[:12]}…, in its "
                            "train.frozen_dtype); resume with the run's --teacher and train.frozen_dtype")
        st = method.student
        if dcp.is_dcp(ck):  # sharded (twostep/train/dcp.py): under any number of processes
            return dcp.load(ck, method, ema, opts, mods)
        want = set(st.trainable_state(st.state_dict()))
        got = set(load_module(st, ck / "student.safetensors", fsdp, strict=False))
        got_ema = set()
        for f in sorted((ck / "ema").glob("*.safetensors")):
            got_ema |= set(load_module(ema, f, fsdp, prefix=ema.stem_prefix(f.stem), strict=False))
        for what, have in (("student.safetensors", got), ("ema/", got_ema)):
            if have != want:
                raise UserError(f"{ck / what}: holds {len(have & want)} of the {len(want)} trainable tensors of "
                                "this run's student; the checkpoint is incomplete or of another configuration "
                                "(resume with the settings its status.json records, or remove this checkpoint)")
        for name, m in mods.items():
            if name not in ("student", "ema"):
                load_module(m, ck / f"{name}.safetensors", fsdp)
    tfs = {k: optim_transform(o) for k, o in opts.items()} if fsdp else None  # a sharded critic's too (DMD2)
    return read_checkpoint(ck, opts, tfs)


def rollback(acc, out: Path, method, ema, opts, fsdp: bool = False, reason: str = "repeated non-finite losses",
             rollbacks: int = 1, max_rollbacks: int | None = None) -> tuple[int, list]:
    """Too many non-finite updates in a row (or weights that cannot be saved, `reason`): reload the newest complete
    checkpoint and halve the learning rates. Returns the checkpoint's (update, log). This is the run's rollback
    number `rollbacks`; past `max_rollbacks` (train.max_nonfinite), or with no checkpoint to go back to, the run
    gives up with a one-line UserError (it stays unfinished and resumable from its newest checkpoint)."""
    ck = latest_checkpoint(out / "checkpoints")
    lrs = {k: [g["lr"] * 0.5 for g in o.param_groups] for k, o in opts.items()}
    now = ", ".join(f"{k}={o.param_groups[0]['lr']:.3g}" for k, o in opts.items())
    if ck is None:
        raise UserError(f"{out}: {reason} and no checkpoint to roll back to (learning rates {now}); lower "
                        "train.lr_student / train.lr_disc (or check train.ema)")
    if max_rollbacks is not None and rollbacks > max_rollbacks:
        raise UserError(f"{out}: {reason} after {max_rollbacks} rollbacks with halved learning rates ({now}); "
                        f"gave up, the run stays unfinished at {ck.name}: lower train.lr_student / train.lr_disc "
                        "and resume it with --resume")
    meta = load_state(ck, method, ema, opts, fsdp)
    for k, o in opts.items():
        for g, lr in zip(o.param_groups, lrs[k]):
            g["lr"] = lr
    acc.print(f"rolled back to {ck.name} (update {meta['step']}) after {reason}; learning "
              f"rates halved to {', '.join(f'{k}={v[0]:.3g}' for k, v in lrs.items())}")
    return meta["step"], meta.get("log", [])


def checkpoint(acc, out: Path, method, ema, opts, update: int, log: list, keep: int, scfg: dict, fsdp: bool = False,
               sharded: bool = False):
    """Rank 0 writes a checkpoint and the run folder's model files, always full tensors (under FSDP every rank
    takes part in gathering them first), in the same format with or without FSDP (module docstring: each
    trainable tensor once; the run folder's model files linked to the checkpoint's EMA; a lora run's base by the
    hash `scfg["base_sha256"]`). Everything saved must be finite (student, EMA, critic: each state dict that is
    written, io.files.nonfinite_parts); otherwise nothing is written and every rank raises NonFiniteWeights.
    `sharded`: DCP instead (train.checkpoint_format, twostep/train/dcp.py): each rank writes its shards."""
    acc.wait_for_everyone()
    if sharded:
        mods = saved_modules(method, ema)
        bad = dcp.nonfinite(method, ema, mods)
        if not all_ranks(acc, not bad):
            raise _nonfinite(out, update, bad)
        st = method.student
        stems = [s for s in ema.export_state() if s not in st.FROZEN_STEMS[st.decoupling]]
        meta = {"step": update, "log": log,
                **({"frozen_base": {"sha256": scfg["base_sha256"]}} if scfg.get("base_sha256") else {})}
        ck = dcp.save(acc, out / "checkpoints", update, method, ema, opts, mods, meta, keep, stems)
        if acc.is_main_process:  # the usable model: links to the checkpoint's consolidated EMA files
            save_student(ema, {**scfg, "updates": update}, out, linked=ck / "ema")
        return
    main = acc.is_main_process
    mods = saved_modules(method, ema)
    if fsdp:
        states = {k: full_state(m, main) for k, m in mods.items()}
        opt_state = {k: full_optim_state(o, main) for k, o in opts.items()}  # a sharded critic's too (DMD2)
    elif main:
        states, opt_state = {k: m.state_dict() for k, m in mods.items()}, opts
    if main:
        files, file_meta = checkpoint_files(method, ema, states, update)
    bad = nonfinite_parts({k: v for k, v in files.items() if not k.startswith("ema/")} |
                          {"ema": {f"{k}/{n}": t for k, sd in files.items() if k.startswith("ema/")
                                   for n, t in sd.items()}}) if main else []
    if not all_ranks(acc, not bad):  # every rank takes the same branch (no rank left waiting in a collective)
        raise _nonfinite(out, update, bad)
    if not main:
        return
    meta = {"step": update, "log": log, "format": CKPT_FORMAT,
            **({"frozen_base": {"sha256": scfg["base_sha256"]}} if scfg.get("base_sha256") else {})}
    ck = write_checkpoint(out / "checkpoints", files, meta, keep=keep, optimizers=opt_state, metadata=file_meta)
    # the usable model: the EMA (linked to the checkpoint's files) + config
    save_student(ema, {**scfg, "updates": update}, out, state=states["ema"], linked=ck / "ema")


def _nonfinite(out: Path, update: int, bad: list) -> NonFiniteWeights:
    return NonFiniteWeights(f"{out}: update {update}: NaN/inf weights in {', '.join(bad) or 'a module'}; not "
                            "saved (the run stays unfinished): lower train.lr_student / train.lr_disc or check "
                            "train.ema, then resume with --resume", bad)


def checkpoint_bytes(cfg, transformer_config: dict | None = None) -> dict[str, int]:
    """Bytes of the tensors one checkpoint of a `cfg` run writes, by file (safetensors headers add a few kB), for
    a teacher transformer of `transformer_config` (None: diffusers' ZImageTransformer2DModel defaults, which are
    Z-Image-Turbo's 6.15 B transformer). Computed on the meta device (no memory) with the selection `checkpoint`
    uses (checkpoint_files) and AdamW's state (exp_avg and exp_avg_sq like each parameter, a float32 `step`).
    Also: `total`; `run_folder_once`, what the run folder adds once per run (a lora student's frozen base, in
    train.frozen_dtype on CUDA); `previous_layout_total`, what a checkpoint plus its model files cost in
    the previous layout (every module whole, the run folder's EMA copy rewritten each time)."""
    def nbytes(sd):
        return sum(v.numel() * v.element_size() for v in sd.values())

    with torch.device("meta"):
        teacher = ZImageBackbone.from_config(transformer_config or {}).requires_grad_(False)
        method = build_method(cfg, teacher)
        ema = deepcopy_sharing_frozen(method.student).requires_grad_(False)
    mods = saved_modules(method, ema)
    states = {k: m.state_dict() for k, m in mods.items()}
    files, _ = checkpoint_files(method, ema, states, 0)
    out = {k: nbytes(sd) for k, sd in files.items()}
    sets = {"student": method.student_parameters(), "critic": method.critic_parameters()}
    for name, params in sets.items():
        if params:
            out[f"optim_{name}"] = sum(2 * p.numel() * p.element_size() + 4 for p in params)
    out["rng"] = nbytes(rng_state())
    out["total"] = sum(out.values())
    frozen = method.student.FROZEN_STEMS[method.student.decoupling]
    export = ema.export_state(states["ema"])
    half = 2 if cfg.train.frozen_dtype != "fp32" else 4  # the frozen base's bytes per weight (bf16 on CUDA)
    out["run_folder_once"] = sum(sum(v.numel() for v in export[s].values()) * half for s in frozen)
    out["previous_layout_total"] = (sum(nbytes(sd) for sd in states.values()) + nbytes(
        {f"{s}/{k}": v for s, sd in export.items() for k, v in sd.items()}) +
        sum(v for k, v in out.items() if k.startswith("optim_") or k == "rng"))
    return out
