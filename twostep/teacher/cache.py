"""The teacher cache: (prompt, noise) → the teacher's samples, computed once, reused by every distillation run.
These are the "saved triples" of Diffusion2GAN and the *real* samples of Turbo++ (the discriminator's real
images are teacher samples); a stored σm state (e.g. 0.75) is the target of a step-1 trajectory loss.

Layout of a cache folder (format version 2):

    manifest.json                 what was built, from what, and per shard its sha256 and size; rewritten
                                  atomically as shards finish; "complete": true once all are there
    shard-00000.safetensors       samples [0, shard_size)
    shard-00000.json              (only while a build runs) the shard's manifest entry, written by the process
                                  that built or verified it; merged into manifest.json at the end

Each shard holds, for its `count` samples, only what training reads:
    final       [count, C, H, W]   the teacher's final sample (σ = 0)
    state_II    [count, C, H, W]   the state at sigmas[II] for each σ chosen with `states` (none by default
                                   for a ZImagePipeline teacher; every σ of the grid for a pixel teacher)
    text        [sum L_i, D]       the caption features at their true length, concatenated over samples
    text_len    int64 [count]      L_i per sample
    sigmas      float64 [S+1]      the teacher's grid (1 → 0)
in the storage dtype (`store_dtype`: bf16 by default for a ZImagePipeline teacher, fp32 for the embedded
pixel teachers, so their committed results stay bit-identical); the captions, shard index, start, count and
noise seed in its safetensors metadata. The noise is not stored: it is its seed, regenerated bitwise.
  noise "shard"  (pixel teachers, as in format 1): shard k's noise is `teacher.noise(count, shard_noise_seed(seed,
                 k))`, so a shard regenerates alone;
  noise "sample" (ZImagePipeline teachers): row i's noise is `teacher.noise(1, sample_noise_seed(seed, i))`, so
                 one row regenerates alone (a training batch reads a few rows of many shards).
Bytes per sample at 1024² (128×128×16 latents, ~80 Qwen3 tokens of 2560-d): format 1 stored 9 fp32 states and
fp32 text (≈10.2 MB); format 2 stores the bf16 final and bf16 text (≈0.93 MB, 0.09×; 1.45 MB with a σm state):
benchmarks/scale_data.py measures it.

Building: the teacher, the text encoder (never the VAE: no state is decoded) run on `device` (auto: the
accelerator's) in `dtype` (auto: bf16 on CUDA, fp32 on CPU); the transformer in that dtype on fp32 states, as
ZImagePipeline runs it. Under `twostep launch` / `accelerate launch` (WORLD_SIZE > 1), rank r builds the shards
k ≡ r (mod W), with the same batches as one process would, so the shards are byte-identical whatever the
number of processes (tests/test_cache_scale.py). The captions are drawn from `--data` (a dataset's train split,
images never decoded) or `--prompts FILE` (twostep.data.prompts), each repeated `seeds_per_prompt` times.

Checks: a shard's sha256 is taken of its serialised bytes and checked against the file once written; a
resumed build checks the sha256 of every recorded shard (each process its own) and regenerates the missing,
truncated or corrupt ones; a shard is written (tmp + rename) before its entry, so an interruption never leaves
a half shard under its final name, and shards are keyed by index, so nothing is ever duplicated. Loading
checks cheaply (sizes, headers, counts against the manifest) unless `verify=True` (`--verify-cache`), which
also checks every sha256.

Loading is lazy: `load_cache` keeps the captions and the text lengths in memory and memory-maps the shards
(safetensors.safe_open); `rows(idx, states)` and `text_rows(idx)` read only the requested rows, so each
training process touches only its own rows, and a 10× larger cache costs no more memory to start from.
Format-1 caches (the full fp32 trajectory) load the same way.

Ownership (twostep.io.folders): the manifest is the cache's status (its "complete" is written last; loading
refuses an incomplete cache). Its identity is the teacher's, the arguments (prompt source, num, seed, shard
size, states, storage dtype, compute device type and dtype) and `prompts_sha256`, a hash of the captions
used: a rebuild whose prompts changed is refused unless it goes to a new folder. A shard's `file` must be a
name inside the folder (an absolute or `../` path is refused).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from .. import flow, plan
from ..config import COUNT, SEED
from ..data import get_captions, prompt_file_identity, repeat_prompts, shapes
from ..data.prompts import describe_draw, draw_prompts
from ..errors import UserError
from ..io.files import (atomic_write_bytes, atomic_write_text, cause, nonfinite_parts, one_line, sha256_file,
                        sha256_text, verify_hashes)
from ..io.lock import holds_lock
from ..io.folders import CACHE_FORMAT, claim_output, identity_diff, path_inside, teacher_identity, twostep_command
from ..model import COMPUTE_DTYPES, compute_dtype, dtype_name, load_teacher, place_weights

FORMAT = CACHE_FORMAT  # "twostep-teacher-cache"
VERSION = 2
READS = (1, 2)         # the format versions load_cache reads
MANIFEST = "manifest.json"
META_KEY = "twostep_cache"
SIGMA_TOL = 1e-6
DTYPES = COMPUTE_DTYPES                                                           # --dtype (compute)
STORE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}                   # --store-dtype
NOISE_MEMO_BYTES = 256 << 20  # regenerated per-shard noise kept (LRU) by a loaded cache

# Called as `_on_shard_written(index, path)` after a shard and its entry are on disk (test hook to simulate an
# interruption).
_on_shard_written = None


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def entry_name(k: int) -> str:
    return f"shard-{k:05d}.json"


def state_key(i: int) -> str:
    """The tensor name of the state at grid index i."""
    return f"state_{i:02d}"


def shard_noise_seed(seed: int, k: int) -> int:
    """The seed of shard k's noise (noise "shard"): a hash of (seed, k), so shards are independent and regenerable."""
    h = hashlib.sha256(f"{FORMAT}:{int(seed)}:{int(k)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_noise_seed(seed: int, i: int) -> int:
    """The seed of row i's noise (noise "sample"): a hash of (seed, i), independent of the shard size."""
    h = hashlib.sha256(f"{FORMAT}:sample:{int(seed)}:{int(i)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def regen_noise(shape: Sequence[int], n: int, seed: int) -> torch.Tensor:
    """SampleSpace.noise without the model: [n, *shape] standard normal from a generator seeded by `seed`
    (build_cache checks the two agree bitwise, shard by shard)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, *shape, generator=g)


def prompts_sha256(captions: list[str]) -> str:
    """The identity of a cache's prompt source: a sha256 of the captions used, in order."""
    return sha256_text(json.dumps(list(captions)))


def _data_key(data: str) -> str:
    """Builtin dataset names as is; a folder as its absolute path (so `./d` and `d` are the same cache)."""
    p = Path(data)
    return str(p.resolve()) if data not in ("shapes", "photos") and p.is_dir() else str(data)


def _rebuild_hint(m: dict, folder: Path) -> str:
    if isinstance(m.get("command"), str):
        return f"re-run `{m['command']}`"
    t = m.get("teacher_folder", "<teacher>")
    return (f"re-run `twostep teacher cache --teacher {t} --data {m.get('data')} --num {m.get('num')} "
            f"--seed {m.get('seed')} --shard-size {m.get('shard_size')} --out {folder}`")


def sigma_index(sigmas: torch.Tensor, sigma: float) -> int | None:
    """The grid index of σ (within SIGMA_TOL), or None when σ is not on the grid."""
    d = (sigmas.double() - float(sigma)).abs()
    i = int(d.argmin())
    return i if float(d[i]) <= SIGMA_TOL else None


def _grid_text(sigmas) -> str:
    return ", ".join(f"{float(s):.6g}" for s in sigmas)


def parse_states(spec: str, sigmas: torch.Tensor, pixel: bool) -> list[int]:
    """`--states` → the grid indices of the intermediate states to store (the final sample is always stored and
    the noise never: it is its seed). "auto": every intermediate σ for a pixel teacher (tiny, and what today's
    pixel benchmarks read), none for a ZImagePipeline teacher (only loss.step1_loss=traj reads one); "all":
    every intermediate σ; else a comma list of "final" and σ values on the teacher's grid, e.g. "final,0.75"."""
    spec = str(spec).strip()
    inner = list(range(1, len(sigmas) - 1))
    if spec == "auto":
        return inner if pixel else []
    if spec == "all":
        return inner
    keep = set()
    for part in (p.strip() for p in spec.split(",")):
        if part in ("final", "noise"):
            continue
        try:
            s = float(part)
        except ValueError:
            raise UserError(f"--states {spec!r}: {part!r} is not 'final' or a σ; give e.g. --states final,0.75 "
                            "(or auto, all)")
        if not (0 < s < 1):
            raise UserError(f"--states {spec!r}: σ = {part} must lie strictly between 0 and 1 (the final sample is "
                            "always stored, the noise is regenerated from its seed); give e.g. --states final,0.75")
        i = sigma_index(sigmas, s)
        if i is None:
            raise UserError(f"--states {spec!r}: σ = {part} is not on the teacher's grid ({_grid_text(sigmas)}); "
                            "pick σ values of that grid")
        keep.add(i)
    return sorted(keep)


# ---- processes and devices ---------------------------------------------------------------------------------

class _Processes:
    """This process's rank among WORLD_SIZE (torchrun / accelerate launch), with a barrier; one process: 0 of 1."""

    def __init__(self, device: str):
        self.state = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState  # heavy: only under a multi-process launcher

            self.state = PartialState(cpu=str(device) == "cpu" or not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    def barrier(self):
        if self.state is not None:
            self.state.wait_for_everyone()

    def device(self) -> torch.device:
        return self.state.device if self.state is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_device(device: str, procs: _Processes) -> torch.device:
    if device == "auto":
        return torch.device(procs.device())
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N")
    if d.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu (or auto)")
        if d.index is None:  # each process its own GPU (LOCAL_RANK) under torchrun
            d = torch.device(procs.device()) if procs.state is not None else torch.device("cuda", 0)
        elif d.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices; pick "
                            "another index (or auto)")
    return d


def _choice(value: str, allowed, flag: str) -> str:
    if value not in allowed:
        raise UserError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
    return value


def _trajectory(teacher, text, noise, sigmas, device) -> list[torch.Tensor]:
    """The teacher's states on its default grid (Teacher.sample's settings) for one batch, on `device`; in fp32
    it is exactly Teacher.sample (the embedded benchmarks' bytes)."""
    s = teacher.sampling
    guidance = float(s["guidance"])
    text = [t.to(device) for t in text]
    neg = [t.to(device) for t in teacher.null_text(noise.shape[0])] if guidance != 0 else None
    # a bf16 teacher as ZImagePipeline runs it: fp32 states and Euler update, inputs cast to the weights' dtype,
    # t in fp32 (ZImageBackbone.raw_output)
    den = teacher.backbone.denoise
    teacher.backbone.eval()
    with torch.no_grad():
        r = flow.sample_euler(den, noise.to(device), text, sigmas, guidance=guidance, neg_text=neg,
                              return_trajectory=True)
    if not torch.equal(r.sigmas.double(), sigmas):
        raise RuntimeError("teacher sampled on another σ grid than its config's")
    return r.trajectory


PLAN_TOKENS = 64            # caption tokens per row assumed by the disk estimate (MiniLM keeps at most 77)
PLAN_CAPTION_BYTES = 256    # memory per row while its caption is held (the captions are built before the shards)

# ---- build ------------------------------------------------------------------------------------------------

def _read_manifest(path: Path, versions=(VERSION,)) -> dict:
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({one_line(e)}); delete the cache folder and build it again")
    except RecursionError:  # thousands of nested [ or {: no manifest twostep wrote
        raise UserError(f"{path}: JSON nested too deeply, not a twostep manifest; delete the cache folder and build "
                        "it again") from None
    except OSError as e:
        raise UserError(f"{path}: unreadable ({one_line(e)}); check its permissions")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a twostep teacher-cache manifest; choose another folder")
    if m.get("version") not in versions:
        if m.get("version") in READS:
            raise UserError(f"{path}: a cache of format version {m.get('version')} (this twostep builds version "
                            f"{VERSION}); it still loads for `twostep distill` as it is: build a new one into "
                            "another --out")
        raise UserError(f"{path}: cache format version {m.get('version')} (this twostep reads "
                        f"{', '.join(map(str, READS))}); build the cache again into a new folder")
    return m


def _entry(e, k: int | None = None) -> dict | None:
    """A well-formed manifest entry (index, file, start, count, sha256, bytes), else None."""
    try:
        e = {**e, "index": int(e["index"]), "start": int(e["start"]), "count": int(e["count"]),
             "file": str(e["file"]), "sha256": str(e["sha256"])}
    except (KeyError, TypeError, ValueError):
        return None
    return e if k is None or e["index"] == k else None


def _shard_ok(folder: Path, entry: dict | None) -> bool:
    """The shard of `entry` is there, named for its index, of the recorded size, with the recorded sha256."""
    try:
        p = path_inside(folder, entry["file"], "shard file")  # never read outside the cache folder
        if p.name != shard_name(int(entry["index"])) or not p.is_file():
            return False
        if "bytes" in entry and p.stat().st_size != int(entry["bytes"]):
            return False
        return sha256_file(p) == entry["sha256"]
    except (KeyError, TypeError, ValueError, OSError, UserError):
        return False


def _shard_captions(path: Path):
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])["captions"]
    except Exception:  # unreadable: not these prompts
        return None


def _recorded(out: Path, old: dict | None) -> dict[int, dict]:
    """The entries of an earlier build: the manifest's, overridden by the per-shard entry files of an
    interrupted one."""
    entries = {}
    for e in (old or {}).get("shards", []) if isinstance((old or {}).get("shards"), list) else []:
        e = _entry(e)
        if e is not None:
            entries[e["index"]] = e
    for p in sorted(out.glob("shard-*.json")):
        try:
            k = int(p.stem.split("-")[1])
            e = _entry(json.loads(p.read_text()), k)
        except (OSError, ValueError, IndexError, UnicodeDecodeError, RecursionError):
            e = None
        if e is not None:
            entries[k] = e
    return entries


def _write_shard(out: Path, k: int, tensors: dict, info: dict) -> dict:
    """Serialise shard k, take the sha256 of those bytes, write them (tmp + fsync + rename) and check the file's
    sha256 against them. Returns its manifest entry."""
    # One metadata key: safetensors writes several keys in a random (hash-map) order, which would make a
    # regenerated shard differ in bytes (and checksum) from the first one.
    data = serialize({n: t.contiguous() for n, t in tensors.items()},
                     metadata={META_KEY: json.dumps(info, sort_keys=True)})
    digest = hashlib.sha256(data).hexdigest()
    path = out / shard_name(k)
    atomic_write_bytes(path, data)
    if sha256_file(path) != digest:
        path.unlink(missing_ok=True)
        raise UserError(f"{path}: the file read back differs from what was written (disk or filesystem error); "
                        "check the disk and re-run the same command to resume")
    e = {"index": k, "file": path.name, "start": info["start"], "count": info["count"], "sha256": digest,
         "bytes": len(data)}
    if info.get("noise_seed") is not None:
        e["noise_seed"] = info["noise_seed"]
    return e


def _command(teacher_folder, data, prompts, prompt_key, num, seed, shard_size, spp, states, store, device,
             dtype, out, allow_repeats=False) -> str:
    argv = ["teacher", "cache", "--teacher", teacher_folder]
    argv += ["--data", data] if data is not None else ["--prompts", prompts]
    if prompt_key is not None:
        argv += ["--prompt-key", prompt_key]
    argv += ["--num", num, "--seed", seed, "--shard-size", shard_size]
    for flag, v, dflt in (("--seeds-per-prompt", spp, 1), ("--states", states, "auto"),
                          ("--store-dtype", store, "auto"), ("--device", device, "auto"), ("--dtype", dtype, "auto")):
        if v != dflt:
            argv += [flag, v]
    return twostep_command(*argv, *(["--allow-repeats"] if allow_repeats else []), "--out", out)


@holds_lock("out", "--out", "cache")  # one writer per cache (rank 0 holds it for all)
def build_cache(teacher_folder: Path, data: str | None = None, num: int | None = None, out: Path | None = None,
                seed: int = 0, shard_size: int = 256, batch_size: int = 64, progress: bool = True,
                skip_bad: bool = False, prompts: Path | None = None, prompt_key: str | None = None,
                seeds_per_prompt: int = 1, device: str = "auto", dtype: str = "auto", states: str = "auto",
                store_dtype: str = "auto", verify: bool = False, allow_repeats: bool = False) -> Path:
    """Sample the teacher for `num` (caption, noise) pairs into sharded safetensors under `out`; resumable; one
    process or many (torchrun: each builds its shards, see the module docstring). The captions come from `data`
    (shapes | photos | a folder) or from a prompt file `prompts` (with `prompt_key`), each repeated
    `seeds_per_prompt` times. `device` auto | cpu | cuda[:N]; `dtype` (compute) auto | bf16 | fp16 | fp32;
    `states` which σ states to store (parse_states); `store_dtype` auto | bf16 | fp32; `verify`: at the end,
    load the cache checking every shard's sha256; `allow_repeats`: a prompt file whose training split holds
    fewer prompts than the draw needs reuses them (counted in the manifest's `prompt_draw`) instead of refusing.

    Returns `out`. Raises UserError if `out` holds a different cache (other teacher, prompts, num, seed, shard
    size, states, dtypes), is a non-empty folder that is not a cache, or is (or holds, or is inside) an input.
    """
    if num is None or out is None:
        raise TypeError("build_cache needs num and out")
    if (data is None) == (prompts is None):
        raise UserError("give the prompts as --data DATA (shapes | photos | a folder) or as --prompts FILE, one of "
                        "the two")
    out, teacher_folder = Path(out), Path(teacher_folder)
    for name, v in (("num", num), ("shard_size", shard_size), ("batch_size", batch_size),
                    ("seeds_per_prompt", seeds_per_prompt)):
        COUNT.check(v, name)
    SEED.check(seed, "seed")
    num, seed, shard_size, batch_size, spp = int(num), int(seed), int(shard_size), int(batch_size), int(seeds_per_prompt)
    _choice(dtype, ("auto", *DTYPES), "--dtype")
    _choice(store_dtype, ("auto", *STORE_DTYPES), "--store-dtype")
    procs = _Processes(device)
    dev = _resolve_device(device, procs)
    # before any work: `out` is new, empty or a teacher cache; never a file, the teacher or a prompt source
    claim_output(out, "cache", inputs={"--teacher": teacher_folder, "--prompts": prompts,
                                       "--data": data if data is not None and Path(data).is_dir() else None},
                 allow_complete=True)
    draw = None
    if prompts is not None:  # before any weight is read: the draw needs only the file
        captions, draw = draw_prompts(prompts, num, seed=seed, split="train", key=prompt_key, seeds_per_prompt=spp,
                                      skip_bad=skip_bad, allow_repeats=allow_repeats)
        if procs.rank == 0:
            print(describe_draw(draw), flush=True)
    cdtype = compute_dtype(dtype, dev)
    # read in the compute dtype (no fp32 copy of a bf16 teacher); fp32 as always (bitwise the caches built before)
    teacher = load_teacher(teacher_folder, None if cdtype == torch.float32 else cdtype)
    with verify_hashes(verify):  # the weights' hash is reused (io.files.weights_sha256); --verify reads them again
        ident = teacher_identity(teacher_folder, teacher.config)
    pipeline = bool(teacher.config.get("pipeline"))
    store = store_dtype if store_dtype != "auto" else ("bf16" if pipeline else "fp32")
    sdtype = STORE_DTYPES[store]
    s = teacher.sampling
    sigmas = flow.sigma_grid(int(s["steps"]), float(s.get("shift", flow.DEFAULT_SHIFT)))
    keep = parse_states(states, sigmas, pixel=not pipeline)
    shape = tuple(teacher.noise(1, 0).shape[1:])
    noise_mode = "sample" if pipeline else "shard"
    compute = f"{dev.type}/{dtype_name(cdtype)}"
    params = {"data": _data_key(data) if data is not None else None, "num": num, "seed": seed,
              "shard_size": shard_size, "states": [float(sigmas[i]) for i in keep], "store_dtype": store,
              "noise": noise_mode, "sample_shape": list(shape), "compute": compute}
    if data == "shapes":  # the scenes (and captions) drawn for a seed depend on the benchmark's version
        params["data_version"] = shapes.VERSION
    if prompts is not None:
        params["prompts"] = prompt_file_identity(prompts, prompt_key)
    if spp != 1:
        params["seeds_per_prompt"] = spp
    n_shards = math.ceil(num / shard_size)
    # plan before work: what --num implies on disk and in memory, refused before a caption is built
    sample_bytes = math.prod(shape) * sdtype.itemsize * (1 + len(keep))
    text_bytes = PLAN_TOKENS * int(teacher.config.get("transformer", {}).get("cap_feat_dim", 0)) * sdtype.itemsize
    plan_line = plan.check("--num", num, f"{num:,} rows in {n_shards:,} shards", memory=num * PLAN_CAPTION_BYTES,
                           disk=num * (sample_bytes + text_bytes), disk_at=out)
    if progress and procs.rank == 0:
        print(f"plan: {plan_line}", file=sys.stderr)
    if prompts is None:
        captions = repeat_prompts(get_captions(data, math.ceil(num / spp), seed=seed, split="train",
                                               resolution=teacher.height, skip_bad=skip_bad), num, spp)
    if len(captions) != num:
        raise UserError(f"--{'data' if data is not None else 'prompts'} {data or prompts}: gave {len(captions)} "
                        f"captions, expected {num}")
    prompts_hash = prompts_sha256(captions)

    # The folder: new, or a cache of exactly this (teacher, prompts, arguments), or refuse.
    mpath = out / MANIFEST
    old = None
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if mpath.exists():
        old = _read_manifest(mpath)
        diff = identity_diff(old.get("teacher", {}), ident)
        diff += [k for k in params if old.get(k) != params[k]]
        if "prompts_sha256" in old and old["prompts_sha256"] != prompts_hash:
            diff.append("prompts")
        if diff:
            raise UserError(f"{out}: holds a different teacher cache (differs in: {', '.join(diff)}); "
                            "choose another --out (or delete that folder)")
    recorded = _recorded(out, old) if out.is_dir() else {}
    if old is not None and "prompts_sha256" not in old:  # a manifest from before the prompt hash: the shards'
        for k, e in recorded.items():                   # own captions decide
            if k < n_shards and _shard_ok(out, e) and \
                    _shard_captions(out / e["file"]) != captions[k * shard_size:(k + 1) * shard_size]:
                raise UserError(f"{out}: holds a different teacher cache (differs in: prompts); choose another "
                                "--out (or delete that folder)")
    cmd = _command(teacher_folder, data, prompts, prompt_key, num, seed, shard_size, spp, states, store_dtype,
                   device, dtype, out, allow_repeats and bool(draw and draw["repeats"]))
    manifest = {"format": FORMAT, "version": VERSION, "teacher": ident,
                "teacher_folder": str(teacher_folder.resolve()), **params, "prompts_sha256": prompts_hash,
                "batch_size": batch_size, "num_shards": n_shards, "sigmas": [float(x) for x in sigmas],
                "text_dtype": store, "command": cmd, "complete": False, "shards": []}
    if draw is not None:
        manifest["prompt_draw"] = draw

    def write_manifest(final: bool = False):
        """Rank 0: the manifest from the entry files of this build (+ the earlier build's entries until then)."""
        now = _recorded(out, None)
        entries = now if final else {**{k: e for k, e in recorded.items() if k < n_shards}, **now}
        manifest["shards"] = [entries[k] for k in sorted(entries)]
        manifest["complete"] = final and sorted(entries) == list(range(n_shards))
        atomic_write_text(mpath, json.dumps(manifest, indent=1))
        return manifest["complete"]

    if procs.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob("*.tmp"):
            tmp.unlink()
        write_manifest()
    procs.barrier()

    # This process's shards: the recorded ones it verifies (sha256), the others it builds.
    todo = []
    for k in range(procs.rank, n_shards, procs.world):
        e = recorded.get(k)
        if e is not None and _shard_ok(out, e):
            atomic_write_text(out / entry_name(k), json.dumps(e))
        else:
            todo.append(k)
    if todo:
        place_weights(teacher.backbone, teacher.parts, dev, cdtype)  # with the text encoder; never the VAE
    bar = None
    if progress and procs.rank == 0 and todo:
        from tqdm.auto import tqdm  # heavy: only with a bar

        who = f" (rank 0 of {procs.world}; all ranks ≈ {procs.world}× this rate)" if procs.world > 1 else ""
        bar = tqdm(total=sum(min(shard_size, num - k * shard_size) for k in todo), desc=f"teacher cache "
                   f"{out.name}{who}", unit="sample", smoothing=0.1)
    try:
        for k in todo:
            start = k * shard_size
            caps = captions[start:start + shard_size]
            n = len(caps)
            if noise_mode == "shard":
                nseed = shard_noise_seed(seed, k)
                noise = teacher.noise(n, nseed)
                same = torch.equal(noise, regen_noise(shape, n, nseed))
            else:
                nseed = None
                noise = torch.cat([teacher.noise(1, sample_noise_seed(seed, start + j)) for j in range(n)])
                same = torch.equal(noise[:1], regen_noise(shape, 1, sample_noise_seed(seed, start)))
            if not same:  # the loader regenerates the noise with regen_noise: it must be the teacher's own
                raise RuntimeError("SampleSpace.noise and cache.regen_noise disagree; keep them the same generator")
            text = teacher.encode(caps)
            finals, kept = [], {i: [] for i in keep}
            for i in range(0, n, batch_size):
                traj = _trajectory(teacher, text[i:i + batch_size], noise[i:i + batch_size], sigmas, dev)
                finals.append(traj[-1].to("cpu", sdtype))
                for g in keep:
                    kept[g].append(traj[g].to("cpu", sdtype))
                if bar is not None:
                    bar.update(traj[-1].shape[0])
            tensors = {"final": torch.cat(finals), **{state_key(g): torch.cat(v) for g, v in kept.items()},
                       "text": torch.cat([t.to("cpu", sdtype) for t in text]),
                       "text_len": torch.tensor([t.shape[0] for t in text], dtype=torch.int64),
                       "sigmas": sigmas.clone()}
            bad = nonfinite_parts({name: {name: v} for name, v in tensors.items()})
            if bad:  # a NaN never becomes a cache sample: nothing of this shard is written, the cache stays unfinished
                raise UserError(f"{out / shard_name(k)}: the teacher gave NaN/inf values ({', '.join(bad)}) for "
                                f"rows {start}..{start + n - 1} (first caption {caps[0][:60]!r}); nothing was "
                                "written for it; check the teacher and the text-feature cache ($TWOSTEP_CACHE)")
            info = {"format": FORMAT, "version": VERSION, "index": k, "start": start, "count": n,
                    "noise": noise_mode, "noise_seed": nseed, "captions": caps}
            entry = _write_shard(out, k, tensors, info)
            atomic_write_text(out / entry_name(k), json.dumps(entry))
            if procs.rank == 0:
                write_manifest()
            if _on_shard_written is not None:
                _on_shard_written(k, out / shard_name(k))
    finally:
        if bar is not None:
            bar.close()
    procs.barrier()
    if procs.rank == 0:
        if write_manifest(final=True):
            for p in out.glob("shard-*.json"):
                p.unlink()
    procs.barrier()
    if verify and procs.rank == 0:
        load_cache(out, verify=True)
    procs.barrier()
    return out


# ---- load -------------------------------------------------------------------------------------------------

class _Shard:
    """One shard: its rows [start, start + count), memory-mapped at first use (safetensors.safe_open); `names`
    maps a grid index to the tensor holding that state (format 2), or every index to "trajectory" (format 1)."""

    def __init__(self, index: int, start: int, count: int, path: Path | None, version: int, names: dict,
                 text_len: torch.Tensor, noise_seed=None, tensors: dict | None = None):
        self.index, self.start, self.count, self.path, self.version = index, start, count, path, version
        self.names, self.noise_seed, self.tensors = names, noise_seed, tensors
        self.text_len = text_len.tolist()
        self.text_off = [0]
        for n in self.text_len:
            self.text_off.append(self.text_off[-1] + n)
        self._f = None

    def _slice(self, name: str):
        if self.tensors is not None:  # in memory (TeacherCache.from_tensors)
            return self.tensors[name]
        if self._f is None:
            self._f = safe_open(str(self.path), "pt")
        return self._f.get_slice(name)

    def state(self, g: int, j: int) -> torch.Tensor:
        """Row j's state at grid index g ([C, H, W], stored dtype)."""
        if self.version == 1:
            return self._slice("trajectory")[j:j + 1, g:g + 1][0, 0]
        return self._slice(self.names[g])[j:j + 1][0]

    def text(self, j: int) -> torch.Tensor:
        return self._slice("text")[self.text_off[j]:self.text_off[j + 1]]


class TeacherCache:
    """A loaded teacher cache: captions and text lengths in memory, the shards memory-mapped, rows read on
    demand. `rows(idx, states)` → {"noise" | "final" | σ: float32 [len(idx), C, H, W]}; `text_rows(idx)` →
    float32 [L_i, D] per row. `noise`, `final`, `state_at(σ)` and `text` are lazy views of the same rows
    (`cache.final[idx]` reads only those rows)."""

    def __init__(self, shards: list[_Shard], sigmas: torch.Tensor, captions: list[str], sample_shape,
                 stored: set[int], noise_mode: str, seed: int = 0, manifest: dict | None = None,
                 folder: Path | None = None):
        self.shards, self.sigmas, self.captions = shards, sigmas, captions
        self.sample_shape = tuple(int(x) for x in sample_shape)
        self.stored, self.noise_mode, self.seed = set(stored), noise_mode, int(seed)
        self.manifest, self.folder = manifest if manifest is not None else {}, folder
        self._starts = [s.start for s in shards]
        self._n = sum(s.count for s in shards)
        self._noise_memo: OrderedDict[int, torch.Tensor] = OrderedDict()

    @classmethod
    def from_tensors(cls, noise: torch.Tensor, final: torch.Tensor, text: list[torch.Tensor], captions: list[str],
                     sigmas: torch.Tensor, states: dict | None = None) -> "TeacherCache":
        """An in-memory cache (tests, benchmarks): noise and final [N, C, H, W], text per row, `states` {σ: [N, ...]}."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        S = len(sigmas) - 1
        t = {"noise": noise, "final": final, "text": torch.cat(list(text))}
        names = {0: "noise", S: "final"}
        for s, x in (states or {}).items():
            g = sigma_index(sigmas, s)
            if g is None:
                raise ValueError(f"σ = {s} is not on the grid {_grid_text(sigmas)}")
            names[g] = state_key(g)
            t[state_key(g)] = x
        sh = _Shard(0, 0, noise.shape[0], None, 2, names, torch.tensor([x.shape[0] for x in text]), tensors=t)
        return cls([sh], sigmas, list(captions), noise.shape[1:], set(names) - {0, S}, "stored")

    def __len__(self) -> int:
        return self._n

    # -- states ---------------------------------------------------------------------------------------------
    def sigma_index(self, sigma: float) -> int:
        i = sigma_index(self.sigmas, sigma)
        if i is None:
            raise ValueError(f"σ = {sigma} is not on the teacher cache's grid; available σ: {_grid_text(self.sigmas)}")
        return i

    def has_state(self, sigma: float) -> bool:
        """Whether `rows` can give the state at σ: the noise (σ = 1), the final sample (σ = 0), a stored σ."""
        i = sigma_index(self.sigmas, sigma)
        return i is not None and (i in (0, len(self.sigmas) - 1) or i in self.stored)

    @property
    def stored_sigmas(self) -> list[float]:
        """The σ of the stored intermediate states (besides noise and final)."""
        return [float(self.sigmas[i]) for i in sorted(self.stored)]

    def _grid(self, state) -> int:
        S = len(self.sigmas) - 1
        if state == "noise":
            return 0
        if state == "final":
            return S
        g = self.sigma_index(float(state))
        if g not in (0, S) and g not in self.stored:
            kept = ", ".join(["final"] + [f"{s:g}" for s in self.stored_sigmas])
            raise ValueError(f"σ = {float(state):g} is on the grid but not stored in this cache (stored: {kept})")
        return g

    def _shard(self, i: int) -> tuple[_Shard, int]:
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} of a teacher cache of {self._n}")
        sh = self.shards[bisect.bisect_right(self._starts, i) - 1]
        return sh, i - sh.start

    def _noise(self, sh: _Shard, j: int) -> torch.Tensor:
        if self.noise_mode == "sample":
            return regen_noise(self.sample_shape, 1, sample_noise_seed(self.seed, sh.start + j))[0]
        if self.noise_mode == "stored" or sh.version == 1:
            return sh.state(0, j)
        x = self._noise_memo.get(sh.index)
        if x is None:  # the whole shard's noise comes from one generator: regenerate it once, keep a few
            x = regen_noise(self.sample_shape, sh.count, sh.noise_seed)
            self._noise_memo[sh.index] = x
            while len(self._noise_memo) > 1 and \
                    sum(v.numel() * v.element_size() for v in self._noise_memo.values()) > NOISE_MEMO_BYTES:
                self._noise_memo.popitem(last=False)
        else:
            self._noise_memo.move_to_end(sh.index)
        return x[j]

    def rows(self, idx, states: Sequence = ("noise", "final")) -> dict:
        """{state: float32 [len(idx), C, H, W]} for each of `states` ("noise", "final" or a stored σ; σ = 1 is the
        noise, σ = 0 the final sample), reading only rows `idx` (the noise regenerated from its seed)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).tolist()
        where = [self._shard(i) for i in idx]
        out = {}
        for st in states:
            g = self._grid(st)
            key = st if isinstance(st, str) else float(st)
            x = torch.empty((len(idx), *self.sample_shape), dtype=torch.float32)
            for p, (sh, j) in enumerate(where):
                x[p] = self._noise(sh, j) if g == 0 else sh.state(g, j)
            if not bool(torch.isfinite(x).all()):  # a trust boundary: a NaN row never reaches a loss
                p = next(p for p in range(len(idx)) if not bool(torch.isfinite(x[p]).all()))
                self._bad_row(where[p][0], where[p][1], f"its {key} state")
            out[key] = x
        return out

    def _bad_row(self, sh: "_Shard", j: int, what: str):
        where = sh.path if sh.path is not None else "an in-memory cache"
        raise UserError(f"{where}: row {j} (cache row {sh.start + j}) holds NaN/inf in {what}; the cache was built "
                        f"from bad values: delete {self.folder or 'the cache'} and build it again")

    def text_rows(self, idx) -> list[torch.Tensor]:
        """The caption features of rows `idx`: float32 [L_i, D] each."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).tolist()
        out = []
        for sh, j in (self._shard(i) for i in idx):
            t = sh.text(j).float()
            if not bool(torch.isfinite(t).all()):
                self._bad_row(sh, j, "its caption features")
            out.append(t)
        return out

    # -- lazy views (cache.final[idx], cache.text[i], cache.state_at(σ, idx)) -------------------------------------
    @property
    def noise(self) -> "_StateView":
        return _StateView(self, "noise")

    @property
    def final(self) -> "_StateView":
        return _StateView(self, "final")

    @property
    def text(self) -> "_TextView":
        return _TextView(self)

    def state_at(self, sigma: float, idx=None):
        """The teacher's state x_σ at a σ of its grid: a lazy view, or the rows `idx` [len(idx), C, H, W]."""
        self._grid(float(sigma))
        v = _StateView(self, float(sigma))
        return v if idx is None else v[idx]

    def batch(self, idx, at: Sequence[float] = ()) -> dict:
        """noise, final, text (list), captions (list), index and `states[σ]` for each σ in `at`."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        r = self.rows(idx, ("noise", "final", *[float(s) for s in at]))
        return {"index": idx, "noise": r["noise"], "final": r["final"], "text": self.text_rows(idx),
                "captions": [self.captions[i] for i in idx.tolist()], "states": {float(s): r[float(s)] for s in at}}


def _positions(n: int, key) -> tuple[list[int], bool]:
    """(row indices, is a single row) of an index into n rows: int, slice, list or tensor."""
    if isinstance(key, slice):
        return list(range(n))[key], False
    if isinstance(key, int) or (torch.is_tensor(key) and key.ndim == 0):
        i = int(key)
        return [i + n if i < 0 else i], True
    return [int(i) + n if int(i) < 0 else int(i) for i in torch.as_tensor(key).reshape(-1).tolist()], False


class _StateView:
    """`cache.final[idx]`: the rows of one state, read when indexed. `shape` is [N, C, H, W]."""

    def __init__(self, cache: TeacherCache, state):
        self.cache, self.state = cache, state

    @property
    def shape(self):
        return torch.Size((len(self.cache), *self.cache.sample_shape))

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, key):
        idx, one = _positions(len(self.cache), key)
        x = self.cache.rows(idx, (self.state,))[self.state]
        return x[0] if one else x


class _TextView:
    """`cache.text[i]` / `cache.text[:n]`: caption features read when indexed."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def __len__(self):
        return len(self.cache)

    def __getitem__(self, key):
        idx, one = _positions(len(self.cache), key)
        t = self.cache.text_rows(idx)
        return t[0] if one else t

    def __iter__(self):
        return (self[i] for i in range(len(self.cache)))


def _check_finite_shard(p: Path, hint: str):
    """Every float tensor of shard `p` is finite (read one tensor at a time): `verify`'s content check."""
    try:
        with safe_open(str(p), "pt") as f:
            bad = [k for k in f.keys() if (t := f.get_tensor(k)).is_floating_point() and not bool(torch.isfinite(t).all())]
    except Exception as ex:
        raise UserError(f"{p}: unreadable shard ({type(ex).__name__}); {hint} to regenerate it") from None
    if bad:
        raise UserError(f"{p}: holds NaN/inf values ({', '.join(bad)}); the cache was built from bad values: delete "
                        f"{p.parent} and build it again")


def load_cache(folder: Path, expect_teacher: Path | None = None, verify: bool = False) -> TeacherCache:
    """Open a complete cache lazily (module docstring). Checks the manifest, each shard's presence, size, header,
    captions and counts; with `verify`, every shard's sha256 too (reads every byte once). With `expect_teacher`,
    refuse a cache built by another teacher (weights, config or default sampling differ)."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not folder.is_dir() or not mpath.is_file():
        raise UserError(f"{folder}: not a teacher cache (no {MANIFEST}); build one with `twostep teacher cache "
                        f"--teacher <folder> --data <data> --num <n> --out {folder}`")
    m = _read_manifest(mpath, READS)
    version = int(m["version"])
    hint = _rebuild_hint(m, folder)
    try:
        n_shards = int(m["num_shards"])
        entries = sorted(m.get("shards", []), key=lambda e: int(e["index"]))
        for e in entries:
            str(e["file"]), str(e["sha256"]), int(e["count"]), int(e.get("bytes", 0))
            path_inside(folder, e["file"], "shard file", "delete the cache folder and build it again")
        sigmas = torch.tensor(m["sigmas"], dtype=torch.float64)
        int(m["num"])
        if version == 2:
            shape = [int(x) for x in m["sample_shape"]]
            stored = [sigma_index(sigmas, float(s)) for s in m["states"]]
            if None in stored or m["noise"] not in ("shard", "sample"):
                raise ValueError("states or noise mode not of this grid")
    except (KeyError, TypeError, ValueError) as ex:
        raise UserError(f"{mpath}: malformed manifest ({type(ex).__name__}: {one_line(ex)}); delete the cache "
                        "folder and build it again")
    if not m.get("complete") or [int(e["index"]) for e in entries] != list(range(n_shards)):
        raise UserError(f"{folder}: incomplete teacher cache ({len(entries)} of {n_shards} shards); {hint} "
                        "to finish it")
    if expect_teacher is not None:
        with verify_hashes(verify):  # --verify-cache reads the teacher's weights again too
            ident = teacher_identity(expect_teacher)
        diff = identity_diff(m.get("teacher", {}), ident)
        if diff:
            raise UserError(f"{folder}: built for a different teacher than {expect_teacher} (differs in: "
                            f"{', '.join(diff)}); build a cache for this teacher with `twostep teacher cache "
                            f"--teacher {expect_teacher} ... --out <new folder>`")
    S = len(sigmas) - 1
    names = {S: "final", **{g: state_key(g) for g in stored}} if version == 2 else {}
    shards, caps, start = [], [], 0
    for e in entries:
        p = folder / e["file"]
        if not p.is_file():
            raise UserError(f"{p}: missing shard of the teacher cache; {hint} to regenerate it")
        if "bytes" in e and p.stat().st_size != int(e["bytes"]):
            raise UserError(f"{p}: {p.stat().st_size} bytes, the manifest says {e['bytes']} (a truncated or altered "
                            f"shard); {hint} to regenerate it")
        if verify and sha256_file(p) != e["sha256"]:
            raise UserError(f"{p}: checksum mismatch (truncated or corrupt shard); {hint} to regenerate it")
        if verify:  # the checksum proves the bytes are those written, not that they are numbers: every value too
            _check_finite_shard(p, hint)
        n = int(e["count"])
        try:
            with safe_open(str(p), "pt") as f:
                info = json.loads((f.metadata() or {})[META_KEY])
                shard_caps = info["captions"]
                text_len = f.get_tensor("text_len")
                ok = (int(info["index"]) == int(e["index"]) and all(isinstance(c, str) for c in shard_caps)
                      and len(shard_caps) == n and text_len.shape == (n,) and torch.equal(f.get_tensor("sigmas"), sigmas)
                      and int(text_len.sum()) == f.get_slice("text").get_shape()[0])
                if version == 1:
                    tshape = f.get_slice("trajectory").get_shape()
                    ok = ok and tshape[:2] == [n, S + 1]
                    shape = tshape[2:] if not shards else shape
                    ok = ok and tshape[2:] == list(shape)
                else:
                    ok = ok and int(info["start"]) == start and all(
                        f.get_slice(nm).get_shape() == [n, *shape] for nm in names.values())
        except Exception as ex:  # a shard that is not what we wrote (header, metadata or tensors); memory, permissions:
            if cause(ex) is not None:  # said as what they are
                raise UserError(f"{p}: cannot be read: {cause(ex)}") from None
            raise UserError(f"{p}: unreadable shard ({type(ex).__name__}); {hint} to regenerate it")
        if not ok or int(e.get("start", start)) != start:
            raise UserError(f"{p}: shard contents disagree with {MANIFEST}; {hint} to regenerate it")
        shards.append(_Shard(int(e["index"]), start, n, p, version, names, text_len, info.get("noise_seed")))
        caps.extend(shard_caps)
        start += n
    if start != int(m["num"]):
        raise UserError(f"{folder}: holds {start} samples, manifest says {m['num']}; {hint}")
    if version == 1:
        return TeacherCache(shards, sigmas, caps, shape, set(range(1, S)), "stored", int(m.get("seed", 0)), m, folder)
    return TeacherCache(shards, sigmas, caps, shape, set(stored), m["noise"], int(m["seed"]), m, folder)
