"""Model folders on disk: a twostep model folder (`config.json` + safetensors weights) or a diffusers
ZImagePipeline folder (twostep.io.pipeline_format), the identity of a teacher folder, and the update stamps
that keep a run folder's weight files and config.json from different saves apart.

Ownership of folders (who may write where, and whether what is there is finished):

- `status.json` (STATUS) in every folder a command writes file by file: {"format": "twostep-status", "kind":
  teacher | student | features | export | eval, "identity": {...}, "complete": bool, "progress": {"done": n,
  "total": m, "unit": "updates"}, "resume": "<the command that finishes it>"}. It is written first
  (complete: false) and rewritten LAST with complete: true; a teacher cache's `manifest.json` plays the same
  role for a cache (format twostep-teacher-cache, "complete", the teacher's identity, one entry per shard).
- `claim_output(out, kind, identity, inputs=...)`: a command writes only into a folder that is missing, empty,
  or holds an unfinished (or, where the command may continue it, a complete) folder of the same kind and
  identity; never into a file, never into (or around, or inside) one of its input folders, never into a
  folder of another kind. `resume=True` refuses a missing or empty folder ("nothing to resume").
- `require_complete(folder)`: every reader of a twostep folder (read_config, the student and feature-net
  loaders, the cache loader through its manifest) refuses an unfinished one with "unfinished (updates 4/12):
  resume with `...`" instead of using it.
- Folders written before markers existed (the committed models/ folders, older runs, caches and exports) have
  no status.json: `inspect_folder` recognises them by their files and they are accepted as complete (legacy).
- `check_output_path`: an output file or folder is checked (not a folder where a file is expected, parent
  creatable and writable, outside the input folders) BEFORE the computation starts; `path_inside`: a path
  read from a manifest or record must stay inside its folder (absolute and `../` paths are refused).
- Ownership of output paths (`check_output_path`, every output flag goes through it): a path inside a twostep
  folder (`enclosing_folder`: the nearest parent that is a model, run, cache, feature net, export, eval work or
  ZImagePipeline folder) is refused, except a NEW file of a student run folder whose name the run does not
  write itself (RUN_NAMES, *.safetensors: e.g. `eval --json RUN/eval.json`); the folder a command writes itself
  (`own`) is exempt. An existing output FILE is replaced only when it is what the command writes (`writes`, an
  OutputKind: a `twostep eval` record, a `twostep speed` record, a PNG, a converted Inception file), recognised
  by its content; any other existing file is refused with one line. One writer per folder: twostep.io.lock.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from typing import Callable, NamedTuple
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from .files import atomic_save_tensors, atomic_write_text, unreadable, weights_sha256
from .pipeline_format import is_pipeline_folder, pipeline_config, save_sidecar, transformer_weights_sha256

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
IDENTITY_KEYS = ("weights_sha256", "transformer", "resolution", "height", "width", "text_encoder", "sampling")
SIZE_IDENTITY = ("height", "width")  # a non-square teacher's sample size (a square one has only `resolution`)


def read_config(folder: Path) -> dict:
    """A model folder's config; for a diffusers ZImagePipeline folder (model_index.json), the teacher config
    twostep derives from its component configs (twostep.io.pipeline_format). An unfinished twostep folder (its
    status.json says so) is refused with the command that finishes it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass a model folder written by `twostep teacher train` or `distill`"
                        " (or a ZImagePipeline folder)")
    if is_pipeline_folder(folder):
        return pipeline_config(folder)
    require_complete(folder)
    p = folder / CONFIG
    if not p.exists():
        raise UserError(f"{p}: missing; the model folder is incomplete (train it again or copy the whole folder)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e.msg} at line {e.lineno}); restore the file")
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{p}: unreadable ({type(e).__name__}); restore the file")
    if not isinstance(cfg, dict):  # a list or a bare value: every reader needs its fields (kind, transformer, ...)
        raise UserError(f"{p}: expected a JSON object with the model's fields, got a {type(cfg).__name__}; restore "
                        "the folder's original config.json")
    return cfg


def save_model_folder(weights: dict[str, torch.Tensor], config: dict, folder: Path):
    """Write model.safetensors + config.json (each atomically; config.json last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(weights, folder / WEIGHTS)
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1))


def save_teacher_settings(folder: Path, config: dict):
    """Write back a teacher's edited settings (e.g. tuned guidance): config.json of a twostep folder, twostep.json
    of a ZImagePipeline folder (whose own files stay untouched)."""
    if config.get("pipeline"):
        save_sidecar(Path(folder), config)
    else:
        atomic_write_text(Path(folder) / CONFIG, json.dumps(config, indent=1))


def teacher_identity(folder: Path, config: dict | None = None) -> dict:
    """What makes two teachers' samples the same: their weights (sha256), transformer config, resolution,
    text encoder and default sampling (plus, for a ZImagePipeline teacher, its VAE: not part of a cache's
    identity, which holds latents, but of the decoded eval references)."""
    folder = Path(folder)
    cfg = config if config is not None else read_config(folder)
    if cfg.get("pipeline"):  # a ZImagePipeline folder: its transformer's weight files; the VAE is recorded too
        return {"weights_sha256": transformer_weights_sha256(folder), "transformer": cfg["transformer"],
                "resolution": cfg.get("resolution"), "text_encoder": cfg.get("text_encoder"),
                "sampling": cfg.get("sampling"), "vae": cfg.get("vae"),
                **{k: cfg[k] for k in SIZE_IDENTITY if k in cfg}}
    w = folder / WEIGHTS
    if not w.is_file():
        raise UserError(f"{w}: missing; the teacher folder is incomplete (train it again or copy the whole folder)")
    if "transformer" not in cfg:
        raise UserError(f"{folder / CONFIG}: has no 'transformer' section; not a twostep teacher folder")
    return {"weights_sha256": weights_sha256(w), "transformer": cfg["transformer"],
            "resolution": cfg.get("resolution"), "text_encoder": cfg.get("text_encoder"),
            "sampling": cfg.get("sampling"), **{k: cfg[k] for k in SIZE_IDENTITY if k in cfg}}


def identity_diff(a: dict, b: dict) -> list[str]:
    """The parts (weights, transformer, ...) in which two teacher identities differ."""
    names = {"weights_sha256": "weights"}
    return [names.get(k, k) for k in IDENTITY_KEYS
            if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def save_stamped(files: dict[str, dict[str, torch.Tensor]], config: dict, folder: Path, on_file=None):
    """Write `{stem}.safetensors` for each entry, stamped with config["updates"], then config.json last; loading
    refuses a folder whose files carry different stamps (a write interrupted between files, see check_stamps).
    `on_file()` runs after each weight file (a fault-injection point of the tests)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = {"updates": config.get("updates", 0)}
    for stem, sd in files.items():
        atomic_save_tensors(sd, folder / f"{stem}.safetensors", metadata=stamp)
        if on_file is not None:
            on_file()
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1))


def check_stamps(folder: Path, stems, config: dict):
    """All weight files must come from the update that config.json names (see save_stamped)."""
    want = str(config.get("updates", 0))
    for stem in stems:
        p = folder / f"{stem}.safetensors"
        if not p.exists():
            raise UserError(f"{p}: missing; the run folder is incomplete (finish it with `twostep distill --resume`)")
        try:
            with safe_open(str(p), "pt") as f:
                got = (f.metadata() or {}).get("updates", want)
        except Exception as e:
            raise unreadable(p, e, "re-create it") from None
        if got != want:
            raise UserError(f"{folder}: {p.name} is from update {got} but config.json from update {want} (a save was "
                            "interrupted); run `twostep distill --resume` on it to rewrite the model files")


# ---- ownership: who may write into a folder, and whether what is in it is finished (module docstring) ---------

STATUS = "status.json"
LOCK_FILE = ".twostep.lock"  # one writer per folder (twostep.io.lock); never counted as a folder's content
PROBE_PREFIX = ".twostep-probe-"  # _can_create_in's temporary file: several ranks probe one --out at once
STATUS_FORMAT = "twostep-status"
CACHE_FORMAT = "twostep-teacher-cache"   # a teacher cache's manifest.json (twostep.teacher.cache) is its status
FEATURES_FORMAT = "twostep-features-v1"  # config.json of a feature net (twostep.metrics.features)
EXPORT_CLASS = "TwoStepZImagePipeline"   # model_index.json of an export (twostep.export)
# the kinds a command writes, and (after them) what else a folder may hold
KINDS = {"teacher": "teacher", "student": "student run", "cache": "teacher cache", "features": "feature net",
         "export": "exported pipeline", "eval": "eval work folder"}
NAMES = {**KINDS, "pipeline": "ZImagePipeline folder", "file": "file"}
WHAT_DIFFERS = {"teacher": "teacher run", "student": "student run", "cache": "teacher cache",
                "features": "feature net", "export": "export", "eval": "eval (model, prompts, seed or extractor)"}


@dataclass
class FolderState:
    """What a folder holds: `kind` None (missing or empty), one of KINDS, "pipeline" (a ZImagePipeline folder),
    "file" (not a folder) or "other" (files of nobody we know; `first` names one). `legacy`: no status.json
    (written before markers existed, or a cache, whose manifest is its status)."""

    path: Path
    kind: str | None
    complete: bool = False
    identity: dict | None = None
    progress: dict | None = None
    resume: str | None = None
    legacy: bool = False
    first: str | None = None


def twostep_command(*argv) -> str:
    """`twostep ARGV...` quoted for a shell: the `resume` of a status."""
    return "twostep " + shlex.join(str(a) for a in argv)


def _json_or_none(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def read_status(folder: Path) -> dict | None:
    """A folder's status.json (None when it has none); a malformed one is a UserError."""
    p = Path(folder) / STATUS
    if not p.is_file():
        return None
    s = _json_or_none(p)
    if not isinstance(s, dict) or s.get("format") != STATUS_FORMAT or s.get("kind") not in KINDS \
            or not isinstance(s.get("complete"), bool):
        raise UserError(f"{p}: not a valid twostep status file; the folder was altered: restore it or write the "
                        "folder again")
    return s


def write_status(folder: Path, kind: str, identity: dict | None, complete: bool, progress: dict | None = None,
                 resume: str | None = None, **extra) -> dict:
    """Write `folder/status.json` atomically (see the module docstring); returns what was written. `extra`: more
    fields of the folder's kind (a run's trained config and its hash, train/state.py)."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    s = {"format": STATUS_FORMAT, "kind": kind, "identity": identity, "complete": bool(complete),
         "progress": progress, "resume": resume, **extra}
    atomic_write_text(Path(folder) / STATUS, json.dumps(s, indent=1, sort_keys=True))
    return s


def progress(done, total, unit: str = "updates") -> dict:
    return {"done": done, "total": total, "unit": unit}


def _progress_text(p: dict | None) -> str:
    if not isinstance(p, dict):
        return "interrupted, failed or still running"
    return f"{p.get('unit', 'steps')} {p.get('done')}/{p.get('total')}: interrupted, failed or still running"


def inspect_folder(folder: Path) -> FolderState:
    """What `folder` holds (FolderState): from its status.json, else from its files (legacy folders)."""
    p = Path(folder)
    if not p.exists():
        return FolderState(p, None)
    if not p.is_dir():
        return FolderState(p, "file")
    # a writer's lock file and another process's free-space probe (_can_create_in) are no content
    names = sorted(x.name for x in p.iterdir() if x.name != LOCK_FILE and not x.name.startswith(PROBE_PREFIX))
    if not names:
        return FolderState(p, None)
    s = read_status(p)
    if s is not None:
        return FolderState(p, s["kind"], s["complete"], s.get("identity"), s.get("progress"), s.get("resume"))
    if "manifest.json" in names or all(n.startswith(("shard-", "manifest")) for n in names):
        m = _json_or_none(p / "manifest.json")
        if isinstance(m, dict) and m.get("format") == CACHE_FORMAT:
            done = len(m.get("shards") or []) if isinstance(m.get("shards"), list) else 0
            return FolderState(p, "cache", bool(m.get("complete")), progress=progress(done, m.get("num_shards"),
                               "shards"), legacy=True)
        if all(n.startswith(("shard-", "manifest")) for n in names):  # a cache whose manifest is unreadable
            return FolderState(p, "cache", False, legacy=True)
    if "model_index.json" in names:
        idx = _json_or_none(p / "model_index.json")
        if isinstance(idx, dict) and idx.get("_class_name") == EXPORT_CLASS:
            return FolderState(p, "export", "twostep_export.json" in names, legacy=True)
        return FolderState(p, "pipeline", True, legacy=True)
    if "config.json" in names:
        c = _json_or_none(p / CONFIG)
        if isinstance(c, dict) and c.get("kind") in ("teacher", "student"):
            return FolderState(p, c["kind"], True, legacy=True)
        if isinstance(c, dict) and c.get("format") == FEATURES_FORMAT:
            return FolderState(p, "features", True, legacy=True)
    if "train_config.json" in names:  # a teacher run that never exported its model
        return FolderState(p, "teacher", False, legacy=True)
    if "config.yaml" in names or "checkpoints" in names:  # a distillation run that never saved its model
        return FolderState(p, "student", False, legacy=True)
    return FolderState(p, "other", first=names[0])


def unfinished_error(st: FolderState, what: str | None = None) -> UserError:
    hint = f"resume with `{st.resume}`" if st.resume else "write it again (or let the command writing it finish)"
    return UserError(f"{st.path}: unfinished {what or NAMES.get(st.kind, 'folder')} ({_progress_text(st.progress)}); "
                     f"{hint}")


def require_complete(folder: Path, what: str | None = None) -> FolderState:
    """Refuse a folder whose status.json says it is unfinished (a legacy folder, without one, is accepted)."""
    st = inspect_folder(folder)
    if st.kind in KINDS and not st.complete and not st.legacy:
        raise unfinished_error(st, what)
    return st


def _resolved(p) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


def _can_create_in(folder: Path) -> bool:
    """True when a file can really be created in `folder` (os.access says yes to root, also on /proc)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=PROBE_PREFIX):
            return True
    except OSError:
        return False


class OutputKind(NamedTuple):
    """What an output-file flag writes: `what` (in messages) and `recognise(path)`, True for a file it wrote (an
    existing file is replaced only then)."""
    what: str
    recognise: Callable[[Path], bool]


def _small_json(p: Path, limit: int = 1 << 24):
    try:
        return _json_or_none(p) if p.stat().st_size <= limit else None
    except OSError:
        return None


def _is_eval_record(p: Path) -> bool:
    j = _small_json(p)  # evaluate.evaluate's record: these fields always
    return isinstance(j, dict) and {"nfe", "sec_per_image", "num", "seed", "model"} <= set(j)


def _is_speed_record(p: Path) -> bool:
    j = _small_json(p)
    return isinstance(j, dict) and isinstance(j.get("cmd"), str) and j["cmd"].startswith("twostep speed")


def _is_png(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


EVAL_RECORD = OutputKind("a `twostep eval` record", _is_eval_record)
SPEED_RECORD = OutputKind("a `twostep speed` record", _is_speed_record)
PNG_IMAGE = OutputKind("a PNG image", _is_png)
# what a student run folder writes itself (train/loop.py, train/state.py, sampling.save_student): never an output
# of another command; any *.safetensors too
RUN_NAMES = frozenset({STATUS, CONFIG, "config.yaml", "log.jsonl", "loss_curves.png", "checkpoints", "grids",
                       "tensorboard", "ema", LOCK_FILE})


def marked_kind(folder: Path) -> str | None:
    """The twostep folder kind `folder` is by its marker files (status.json, a cache manifest, model_index.json, a
    model's config.json, a legacy run's config.yaml + checkpoints/), else None. Reads a few small files only."""
    d = Path(folder)
    s = _small_json(d / STATUS)
    if isinstance(s, dict) and s.get("format") == STATUS_FORMAT and s.get("kind") in KINDS:
        return s["kind"]
    m = _small_json(d / "manifest.json")
    if isinstance(m, dict) and m.get("format") == CACHE_FORMAT:
        return "cache"
    if (d / "model_index.json").is_file():
        idx = _small_json(d / "model_index.json")
        return "export" if isinstance(idx, dict) and idx.get("_class_name") == EXPORT_CLASS else "pipeline"
    c = _small_json(d / CONFIG)
    if isinstance(c, dict) and c.get("kind") in ("teacher", "student"):
        return c["kind"]
    if isinstance(c, dict) and c.get("format") == FEATURES_FORMAT:
        return "features"
    if (d / "train_config.json").is_file():
        return "teacher"
    if (d / "config.yaml").is_file() and (d / "checkpoints").is_dir():
        return "student"
    return None


def enclosing_folder(path: Path) -> tuple[Path, str] | tuple[None, None]:
    """(folder, kind) of the nearest parent of `path` (resolved) that is a twostep folder (marked_kind)."""
    for d in _resolved(path).parents:
        k = marked_kind(d)
        if k is not None:
            return d, k
    return None, None


def _check_owner(p: Path, rp: Path, flag: str, folder: bool, writes: OutputKind | None, own) -> None:
    """The ownership rules of the module docstring for the output `p` (resolved `rp`)."""
    enc, kind = enclosing_folder(rp)
    if enc is not None and not (own is not None and _resolved(own) == enc):
        if kind != "student" or folder:  # in a run folder: new files only (an eval record, a sample grid)
            raise UserError(f"{flag} {p}: is inside {_a(NAMES[kind])} ({enc}), whose files belong to the command "
                            f"that wrote it; choose a {flag} outside it")
        first = rp.relative_to(enc).parts[0]
        if first in RUN_NAMES or first.endswith((".safetensors", ".tmp")):
            raise UserError(f"{flag} {p}: {first!r} belongs to the run folder {enc} (the run writes it); choose "
                            "another name (a new file in a run folder is fine)")
        if not folder and rp.exists() and (writes is None or not writes.recognise(rp)):
            what = writes.what if writes else "an earlier output of this command"
            raise UserError(f"{flag} {p}: exists in the run folder {enc} and is not {what}; choose a new {flag}")
    if folder or not os.path.lexists(p):
        return
    if not rp.is_file():
        raise UserError(f"{flag} {p}: exists and is not a regular file; choose a new {flag}")
    if writes is not None and not writes.recognise(rp):
        raise UserError(f"{flag} {p}: exists and is not {writes.what} (not an earlier output of this command, so "
                        f"it is left as it is); choose a new {flag} or delete that file")


def check_output_path(path: Path, flag: str = "--out", inputs: dict | None = None, folder: bool = False,
                      writes: OutputKind | None = None, own: Path | None = None) -> Path:
    """Before any work: `path` can be written (a file, or with `folder` a folder): not a folder where a file is
    expected (nor a file where a folder is), the nearest existing parent a writable folder, and neither equal to,
    inside nor around one of `inputs` ({flag: folder}; None values are skipped; a file may go inside an input run
    folder under the ownership rules), and owned (module docstring: not inside another twostep folder, except a
    new name in a run folder; an existing file only when `writes` recognises it as this command's; `own`: the
    folder this command writes itself). Leaves nothing behind (a probe file is created and removed)."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: exists and is not a folder; choose another {flag}")
    if not folder and p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; give a file path (e.g. {p / ('out.json' if 'json' in flag else 'out.png')})")
    rp = _resolved(p)
    for iflag, inp in (inputs or {}).items():
        if inp is None or str(inp) == "":
            continue
        ri = _resolved(inp)
        if rp == ri:
            raise UserError(f"{flag} {p}: is the {iflag} folder; writing there would overwrite it: choose a new {flag}")
        if ri in rp.parents and (folder or marked_kind(ri) != "student"):  # a run: the ownership rules decide
            raise UserError(f"{flag} {p}: is inside the {iflag} folder {inp}; choose a {flag} outside it")
        if rp in ri.parents:
            raise UserError(f"{flag} {p}: contains the {iflag} folder {inp}; choose a {flag} that does not hold it")
    _check_owner(p, rp, flag, folder, writes, own)
    anc = rp if folder and rp.exists() else rp.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{flag} {p}: {anc} is a file, not a folder; choose another {flag}")
    if not os.access(anc, os.W_OK | os.X_OK) or not _can_create_in(anc):
        raise UserError(f"{flag} {p}: {anc} is not writable; choose another {flag} or fix its permissions")
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {p}: exists and is not writable; choose another {flag} or fix its permissions")
    return p


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True):
            continue
        name = {"weights_sha256": "weights"}.get(k, k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{name}.")
        elif isinstance(a, (dict, list)) or isinstance(b, (dict, list)) or (isinstance(a, str) and len(a) > 40):
            out.append(f"{prefix}{name}")
        else:
            out.append(f"{prefix}{name} {a} → {b}")
    return out


def claim_output(out: Path, kind: str, identity: dict | None = None, *, inputs: dict | None = None,
                 resume: bool = False, allow_complete: bool = False, flag: str = "--out") -> FolderState:
    """May a command that writes a `kind` folder of `identity` write into `out`? Returns what `out` holds
    (FolderState; kind None: start afresh), or raises a UserError naming the problem and the fix:
    `out` is a file, an input folder or around/inside one (`inputs`, {flag: folder}), holds another kind of
    folder or foreign files, a folder of another identity, or (unless `allow_complete`: the command continues
    or replaces it) a complete one; with `resume`, a missing or empty folder is "nothing to resume"."""
    out = Path(out)
    check_output_path(out, flag, inputs, folder=True)
    st = inspect_folder(out)
    want = "previous export" if kind == "export" else KINDS[kind]
    if st.kind is None:
        if resume:
            raise UserError(f"{out}: nothing to resume ({'no such folder' if not out.exists() else 'empty folder'}); "
                            "run without --resume to start")
        return st
    if st.kind == "other":
        raise UserError(f"{out}: folder exists, is not empty and is not {_a(want)} (holds {st.first!r}); choose an "
                        f"empty or new {flag}")
    if st.kind != kind:
        raise UserError(f"{out}: holds {_a(NAMES[st.kind])}, not {_a(want)}; choose an empty or new {flag} (that "
                        "folder is left as it is)")
    if identity is not None and st.identity is not None:
        diff = _diff(st.identity, identity)
        if diff:
            raise UserError(f"{out}: holds a different {WHAT_DIFFERS[kind]} (differs in: {', '.join(diff[:4])}); "
                            f"choose another {flag}" + (" or the same settings to resume" if allow_complete else ""))
    if st.complete and not allow_complete:
        raise UserError(f"{out}: already holds a complete {KINDS[kind]}; choose another {flag} (or delete that "
                        "folder)")
    return st


def _a(name: str) -> str:
    return ("an " if name[:1] in "aeiou" else "a ") + name


def path_inside(folder: Path, rel, what: str = "path", fix: str = "") -> Path:
    """`folder / rel` for a relative `rel` that stays inside `folder` once resolved; an absolute path or one that
    leaves the folder (`../x`, a link out) is a UserError."""
    folder, r = Path(folder), str(rel)
    rp = Path(r)
    full = _resolved(folder / rp)
    root = _resolved(folder)
    if not r or rp.is_absolute() or (full != root and root not in full.parents):
        raise UserError(f"{folder}: {what} {r!r} is not a path inside the folder (absolute or leaving it); "
                        f"{fix or 'restore the folder'}")
    return folder / rp
