"""Sharded checkpoints through torch.distributed.checkpoint (DCP): each rank writes its own shards, no rank gathers,
and a checkpoint written by W processes resumes under any W′ (DCP reshards on load).

`train.checkpoint_format`: auto (the default) = dcp for a run of several processes, files for one process; files =
the full-tensor layout of twostep.train.state (rank 0 gathers everything under FSDP); dcp = this layout. A
resume reads either layout under any number of processes. A DCP checkpoint, meta.json "format": 3:
    dcp/shard-0000R-model-0000I-of-0000N.safetensors
                             rank R-1's shards of the student's trainable tensors (`student/<name>`), the EMA's
                             (`ema/<name>`), the critic's (`<module>/<name>`) and the optimizers' state
                             (`optim_<name>/<parameter name>/<key>`), written with DCP's HuggingFaceStorageWriter:
                             safetensors files whose metadata holds each shard's offsets (nothing is pickled)
    ema/<stem>.safetensors   the EMA in the run folder's model-file format, full tensors, assembled by rank 0 from
                             the shard files on disk one tensor at a time (`consolidate`, no process group, no
                             gather); the run folder's model files are hard links to them, so `twostep sample`,
                             `eval` and `export` read a DCP run as any other
    optim.json               the optimizers' parameter groups (and non-tensor state) by parameter name
    rng.safetensors, meta.json (last: complete), as in the files layout
Tensors are stored as they are (no arithmetic): a resume restores the same bytes under any number of processes.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import faults
from ..errors import UserError
from ..io.checkpoints import link_file, publish, rng_state, set_rng_state
from ..io.files import atomic_save_tensors, atomic_write_text, load_tensors, nonfinite_parts
from .distributed import is_dtensor

FORMAT = 3  # meta.json "format" of a DCP checkpoint
FILE_BYTES = 1 << 30  # the tensors of one shard-file index, in all ranks together (each rank writes ≈ 1/W of it)


@contextmanager
def _quiet():
    """DCP warns that it runs without a process group: here that is meant (one process, or rank 0 reading)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def use_dcp(cfg, num_processes: int) -> bool:
    """train.checkpoint_format resolved: auto = DCP when several processes train."""
    fmt = getattr(cfg.train, "checkpoint_format", "auto")
    return fmt == "dcp" or (fmt == "auto" and num_processes > 1)


def is_dcp(ck: Path) -> bool:
    return (Path(ck) / "dcp").is_dir()


def _local(t):
    return t.to_local() if is_dtensor(t) else t


def _param_names(mods: dict) -> dict[int, str]:
    """id(parameter) → `<module>/<name>`, the first module that holds it (saved_modules' order: student first)."""
    out: dict[int, str] = {}
    for mname, m in mods.items():
        for n, p in m.named_parameters(remove_duplicate=False):
            out.setdefault(id(p), f"{mname}/{n}")
    return out


def _optim_entries(opts: dict, names: dict[int, str]):
    """(optimizer name, position, parameter, its name) for every parameter of every optimizer."""
    for oname, opt in opts.items():
        i = 0
        for g in opt.param_groups:
            for p in g["params"]:
                yield oname, i, p, names[id(p)]
                i += 1


def module_states(method, ema, mods: dict) -> dict[str, torch.Tensor]:
    """The tensors of the modules a checkpoint holds, by DCP key (the files layout's selection: the student's and
    the EMA's trainable tensors, every other module whole); DTensors stay DTensors (each rank its shards)."""
    st = method.student
    out = {f"student/{k}": v for k, v in st.trainable_state(st.state_dict()).items()}
    out.update({f"ema/{k}": v for k, v in st.trainable_state(ema.state_dict()).items()})
    for name, m in mods.items():
        if name not in ("student", "ema"):
            out.update({f"{name}/{k}": v for k, v in m.state_dict().items()})
    return out


def optim_states(opts: dict, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizers' tensor state by DCP key, and the rest (param groups, non-tensor state) for optim.json."""
    tensors, meta = {}, {}
    for oname, opt in opts.items():
        sd = opt.state_dict()
        groups = []
        for g in sd["param_groups"]:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [None] * len(g["params"])})
        meta[oname] = {"param_groups": groups, "scalars": {}}
    for oname, i, p, pname in _optim_entries(opts, names):
        st = opts[oname].state.get(p, {})
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim_{oname}/{pname}/{k}"] = v
            else:
                meta[oname]["scalars"][f"{pname}/{k}"] = v
    for oname, opt in opts.items():  # param groups name their parameters
        for gi, g in enumerate(opt.param_groups):
            meta[oname]["param_groups"][gi]["params"] = [names[id(p)] for p in g["params"]]
    return tensors, meta


def nonfinite(method, ema, mods: dict) -> list[str]:
    """io.files.nonfinite_parts of this rank's shards of what a checkpoint holds, by module."""
    states = module_states(method, ema, mods)
    return nonfinite_parts({m: {k: _local(v) for k, v in states.items() if k.startswith(m + "/")} for m in mods})


def _file_index(tensors: dict) -> dict[str, int]:
    """DCP key → shard-file index (1, 2, ...): keys in order, FILE_BYTES of (global) tensors per index. DCP's
    safetensors writer builds each file in memory before writing it, so this bounds a rank's save memory at ≈
    FILE_BYTES / W (+ a copy of shards that are views) whatever the model size."""
    out, i, size = {}, 1, 0
    for k in sorted(tensors):
        v = tensors[k]
        n = v.numel() * v.element_size()
        if size and size + n > FILE_BYTES:
            i, size = i + 1, 0
        out[k], size = i, size + n
    return out


def save(acc, folder: Path, update: int, method, ema, opts: dict, mods: dict, meta: dict, keep: int, stems) -> Path:
    """Every rank writes its shards of step-XXXXXXXX (module docstring) into a `.partial` folder; rank 0 then adds
    the consolidated EMA files (`stems`: export_state's file stems that are trained), optim.json, rng and meta.json
    (last), renames the folder and prunes to the newest `keep`. Returns the checkpoint folder (every rank returns
    once it is complete)."""
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    folder = Path(folder)
    name = f"step-{int(update):08d}"
    tmp, final = folder / (name + ".partial"), folder / name
    states = module_states(method, ema, mods)
    otensors, ometa = optim_states(opts, _param_names(mods))
    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    acc.wait_for_everyone()
    several = acc.num_processes > 1
    every = {**states, **otensors}
    with _quiet():
        dist_cp.save(every, storage_writer=HuggingFaceStorageWriter(str(tmp / "dcp"), _file_index(every),
                                                                    save_distributed=True), no_dist=not several)
    acc.wait_for_everyone()  # every rank's shards are on disk
    if acc.is_main_process:
        faults.point("ckpt.mid")
        consolidate(tmp / "dcp", tmp / "ema", method.student, stems, {"updates": update})
        atomic_save_tensors(rng_state(), tmp / "rng.safetensors")
        atomic_write_text(tmp / "optim.json", json.dumps(ometa))
        atomic_write_text(tmp / "meta.json", json.dumps({**meta, "format": FORMAT,
                                                         "num_processes": acc.num_processes}, indent=1))
        publish(tmp, final, keep)
    acc.wait_for_everyone()
    return final


def load(ck: Path, method, ema, opts: dict, mods: dict) -> dict:
    """A DCP checkpoint into this run's modules and optimizers, under any number of processes (each rank reads the
    parts of the shard files its own shards need); RNG state; returns meta.json."""
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    ck = Path(ck)
    meta = json.loads((ck / "meta.json").read_text())
    reader = HuggingFaceStorageReader(str(ck / "dcp"))
    saved = reader.read_metadata().state_dict_metadata
    names = _param_names(mods)
    states = module_states(method, ema, mods)
    missing = sorted(set(states) - set(saved))
    extra = sorted(k for k in saved if not k.startswith("optim_") and k not in states)
    if missing or extra:
        raise UserError(f"{ck}: holds {len(set(states) & set(saved))} of the {len(states)} tensors of this run's "
                        f"modules ({(missing or extra)[0]!r} {'missing' if missing else 'unknown'}); the checkpoint "
                        "is of another configuration (resume with the run's config.yaml)")
    ometa = json.loads((ck / "optim.json").read_text())
    # the optimizers' state, allocated like each parameter (its shards under FSDP) and filled by DCP
    ostate: dict[str, dict] = {o: {} for o in opts}
    otensors = {}
    for oname, i, p, pname in _optim_entries(opts, names):
        pre = f"optim_{oname}/{pname}/"
        for key, md in saved.items():
            if key.startswith(pre):
                k = key[len(pre):]
                t = (torch.zeros_like(p.detach(), dtype=md.properties.dtype) if tuple(md.size) == tuple(p.shape)
                     else torch.zeros(md.size, dtype=md.properties.dtype))
                ostate[oname].setdefault(i, {})[k] = otensors[key] = t
        for sk, v in ometa.get(oname, {}).get("scalars", {}).items():
            if sk.rsplit("/", 1)[0] == pname:
                ostate[oname].setdefault(i, {})[sk.rsplit("/", 1)[1]] = v
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    with _quiet():
        dist_cp.load({**states, **otensors}, storage_reader=reader, no_dist=not several)
    for mname, m in mods.items():  # DCP filled the state dicts' tensors in place; loaded again through the module
        pre = f"{mname}/"
        m.load_state_dict({k[len(pre):]: v for k, v in states.items() if k.startswith(pre)},
                          strict=mname not in ("student", "ema"))
    for oname, opt in opts.items():
        groups = ometa[oname]["param_groups"]
        if [g["params"] for g in groups] != [[names[id(p)] for p in g["params"]] for g in opt.param_groups]:
            raise UserError(f"{ck}: its {oname} optimizer has other parameter groups than this run's; resume with "
                            "the run's config.yaml")
        pos, gs = 0, []
        for g in groups:
            gs.append({**g, "params": list(range(pos, pos + len(g["params"])))})
            pos += len(g["params"])
        opt.load_state_dict({"state": ostate[oname], "param_groups": gs})
    set_rng_state(load_tensors(ck / "rng.safetensors"))
    return meta


# -- reading a DCP checkpoint without a process group --------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def read_full(dcp_dir: Path, keys=None, budget: int = 1 << 28):
    """Yield (key, full tensor) of a DCP shard folder, in key order, stitched from every rank's shards; no process
    group. At most `budget` bytes (or one tensor) are assembled at a time. `keys`: those keys only."""
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    md = HuggingFaceStorageReader(str(dcp_dir)).read_metadata().state_dict_metadata
    keys = sorted(md) if keys is None else list(keys)
    batch, size = [], 0
    for i, k in enumerate(keys):
        n = md[k].size.numel() * md[k].properties.dtype.itemsize
        batch.append(k)
        size += n
        if size >= budget or i == len(keys) - 1:
            sd = {b: torch.empty(md[b].size, dtype=md[b].properties.dtype) for b in batch}
            with _quiet():
                dist_cp.load(sd, storage_reader=HuggingFaceStorageReader(str(dcp_dir)), no_dist=True)
            yield from sd.items()
            batch, size = [], 0


def stream_safetensors(path: Path, shapes: dict[str, tuple], tensors, metadata: dict | None = None) -> None:
    """Write a safetensors file from `tensors`, an iterable of (name, tensor) in the order of `shapes`
    ({name: (dtype, shape)}), holding one tensor at a time: the header first (it only needs shapes), then each
    tensor's bytes. Readable by safetensors.safe_open / load_file like a save_file of the same tensors."""
    header, off = {}, 0
    for k, (dt, shape) in shapes.items():
        n = int(torch.Size(shape).numel()) * dt.itemsize
        header[k] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for (k, t), want in zip(tensors, shapes):
            if k != want:
                raise RuntimeError(f"stream_safetensors: got {k!r}, expected {want!r}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.replace(path)


def consolidate(dcp_dir: Path, out: Path, student, stems, metadata: dict) -> list[Path]:
    """The EMA of a DCP shard folder as the run folder's model files (export_state's `stems`, full tensors), into
    `out`; one tensor in memory at a time, no process group."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    md = HuggingFaceStorageReader(str(dcp_dir)).read_metadata().state_dict_metadata
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem in stems:
        pre = student.stem_prefix(stem)
        keys = sorted(k for k in md if k.startswith("ema/" + pre) and
                      (student.decoupling != "lora" or f".{stem}." in k))
        shapes = {k[len("ema/" + pre):]: (md[k].properties.dtype, tuple(md[k].size)) for k in keys}
        order = sorted(shapes)  # the file's names in key order, as read_full yields them
        shapes = {k: shapes[k] for k in order}
        stream_safetensors(out / f"{stem}.safetensors", shapes,
                           ((k[len("ema/" + pre):], t) for k, t in read_full(dcp_dir, keys)), metadata)
        written.append(out / f"{stem}.safetensors")
    return written


# -- the checkpoint's host memory, modelled (docs/sizing.md; measured by benchmarks/checkpoint_memory.py) ------

def host_peaks(cfg, world: int, transformer_config: dict | None = None) -> dict[str, dict[str, int]]:
    """Peak host RAM (bytes) per process while one checkpoint of a `cfg` run is saved and loaded, above what the run
    holds anyway, in each layout, for `world` processes (a transformer of `transformer_config`; None: Z-Image-Turbo's
    6.15 B one). From state.checkpoint_bytes (the checkpoint's tensors) and the largest tensor:
      files, save: with several processes rank 0 holds every full tensor of the checkpoint at once (each module's and
        optimizer's full state gathered before the files are written; on GPUs copied to the host), the other ranks
        one gathered tensor at a time; one process: the host copy of its largest file;
      files, load: each rank one full tensor at a time (sharded as it is read; io.files.load_tensors);
      dcp, save: each rank builds one shard file in memory before writing it (DCP's safetensors writer), its shards'
        part of at most FILE_BYTES, plus a copy of shards that are views; rank 0 then assembles the EMA's files
        (read_full: 256 MiB at a time, or the largest tensor);
      dcp, load: each rank reads the slices its shards need, one shard file tensor at a time."""
    from ..backbones.zimage import ZImageBackbone  # lazy: only the size estimate builds a model
    from .state import checkpoint_bytes  # lazy: state imports dcp (a cycle at the top)

    b = checkpoint_bytes(cfg, transformer_config)
    total = sum(v for k, v in b.items() if k not in ("total", "run_folder_once", "previous_layout_total"))
    with torch.device("meta"):
        bb = ZImageBackbone.from_config(transformer_config or {})
    largest = max(p.numel() for p in bb.parameters()) * 4  # fp32 (trainable weights, EMA, AdamW moments)
    per_file = min(FILE_BYTES, total)
    dcp_save = max(2 * -(-per_file // world), 256 << 20, largest)
    files = [v for k, v in b.items() if k not in ("total", "run_folder_once", "previous_layout_total")]
    return {"files": {"save_rank0": total if world > 1 else max(files), "save_other": largest if world > 1 else 0,
                      "load": largest},
            "dcp": {"save_rank0": dcp_save, "save_other": 2 * -(-per_file // world),
                    "load": -(-largest // world)},
            "checkpoint_total": {"bytes": total}}
