"""The teacher cache: (prompt, noise) → the teacher's whole sampling trajectory, computed once, reused by every
distillation run. These are the "saved triples" of Diffusion2GAN and the *real* samples of Turbo++ (the
discriminator's real images are teacher samples), and the σ = 0.75 state is the target of a step-1
trajectory loss.

Layout of a cache folder:

    manifest.json                 what was built, from what, and a sha256 per shard (rewritten atomically
                                  after every finished shard; "complete": true once all are done)
    shard-00000.safetensors       samples [0, shard_size)
    shard-00001.safetensors       ...

Each shard holds, for its `count` samples:
    trajectory  float32 [count, S+1, C, H, W]   the teacher's state at every σ of its grid (sigmas[0] = 1:
                                                trajectory[:, 0] IS the initial noise ε, bitwise; sigmas[-1]
                                                = 0: trajectory[:, -1] IS the final sample, bitwise; noise and
                                                final are not stored twice)
    text        float32 [sum L_i, D]            the caption features, concatenated over samples
    text_len    int64   [count]                 L_i per sample
    sigmas      float64 [S+1]
and in its safetensors metadata the captions (JSON), the shard index, start and count, and the noise seed.

Determinism: the noise of shard k is `teacher.noise(count, shard_noise_seed(seed, k))`, so any shard can be
regenerated alone, identically. The captions are `get_dataset(data).sample(num, seed, "train").captions`.
The teacher samples at its configured default (steps, shift, guidance).

Resuming: re-running `build_cache` with the same arguments verifies every recorded shard's sha256, keeps the
good ones, and (re)generates the missing, truncated or corrupt ones; a shard is written (tmp + rename) before
its manifest entry, so an interruption never leaves a half shard under its final name, and shards are keyed
by index, so nothing is ever duplicated.

Ownership (twostep.io.folders): the manifest is the cache's status (its "complete" is written last; loading
refuses an incomplete cache). Its identity is the teacher's, the arguments and `prompts_sha256`, a hash of the
captions used: a rebuild whose prompt source changed (another captions.jsonl, another shapes version) is
refused unless it goes to a new folder (a manifest from before the hash: the kept shards' own captions are
compared). A shard's `file` must be a name inside the folder (an absolute or `../` path is refused).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from .. import flow
from ..config import COUNT, SEED
from ..data import get_dataset, shapes
from ..errors import UserError
from ..io.files import atomic_save_tensors, atomic_write_text, one_line, sha256_file, sha256_text
from ..io.folders import CACHE_FORMAT, claim_output, identity_diff, path_inside, teacher_identity
from ..model import load_teacher

FORMAT = CACHE_FORMAT  # "twostep-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
META_KEY = "twostep_cache"
SIGMA_TOL = 1e-6

# Called as `_on_shard_written(index, path)` after a shard and its manifest entry are on disk (test hook to
# simulate an interruption).
_on_shard_written = None


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_noise_seed(seed: int, k: int) -> int:
    """The seed of shard k's noise: a hash of (seed, k), so shards are independent and regenerable."""
    h = hashlib.sha256(f"{FORMAT}:{int(seed)}:{int(k)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _data_key(data: str) -> str:
    """Builtin dataset names as is; a folder as its absolute path (so `./d` and `d` are the same cache)."""
    p = Path(data)
    return str(p.resolve()) if data not in ("shapes", "photos") and p.is_dir() else str(data)


def _rebuild_hint(m: dict, folder: Path) -> str:
    t = m.get("teacher_folder", "<teacher>")
    return (f"re-run `twostep teacher cache --teacher {t} --data {m.get('data')} --num {m.get('num')} "
            f"--seed {m.get('seed')} --shard-size {m.get('shard_size')} --out {folder}`")


# ---- build ------------------------------------------------------------------------------------------------

def _read_manifest(path: Path) -> dict:
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({one_line(e)}); delete the cache folder and build it again")
    except OSError as e:
        raise UserError(f"{path}: unreadable ({one_line(e)}); check its permissions")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a twostep teacher-cache manifest; choose another folder")
    if m.get("version") != VERSION:
        raise UserError(f"{path}: cache format version {m.get('version')} (this twostep reads {VERSION}); "
                        "build the cache again into a new folder")
    return m


def _shard_ok(folder: Path, entry: dict | None) -> bool:
    try:
        p = path_inside(folder, entry["file"], "shard file")  # never read outside the cache folder
        return p.name == shard_name(int(entry["index"])) and p.is_file() and sha256_file(p) == entry["sha256"]
    except (KeyError, TypeError, ValueError, UserError):
        return False


def prompts_sha256(captions: list[str]) -> str:
    """The identity of a cache's prompt source: a sha256 of the captions used, in order."""
    return sha256_text(json.dumps(list(captions)))


def _shard_captions(path: Path):
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])["captions"]
    except Exception:  # unreadable: not these prompts
        return None


def build_cache(teacher_folder: Path, data: str, num: int, out: Path, seed: int = 0, shard_size: int = 256,
                batch_size: int = 64, progress: bool = True, skip_bad: bool = False) -> Path:
    """Sample the teacher for `num` (caption, noise) pairs into sharded safetensors under `out`; resumable.

    Returns `out`. Raises UserError if `out` holds a different cache (other teacher, data, num, seed, shard
    size or prompts), is a non-empty folder that is not a cache, or is (or holds, or is inside) an input.
    """
    out = Path(out)
    teacher_folder = Path(teacher_folder)
    for name, v in (("num", num), ("shard_size", shard_size), ("batch_size", batch_size)):
        COUNT.check(v, name)
    SEED.check(seed, "seed")
    num, seed, shard_size, batch_size = int(num), int(seed), int(shard_size), int(batch_size)
    # before any work: `out` is new, empty or a teacher cache; never a file, the teacher or the data folder
    claim_output(out, "cache", inputs={"--teacher": teacher_folder, "--data": data if Path(data).is_dir() else None},
                 allow_complete=True)
    teacher = load_teacher(teacher_folder)
    ident = teacher_identity(teacher_folder, teacher.config)
    s = teacher.sampling
    sigmas = flow.sigma_grid(int(s["steps"]), float(s.get("shift", flow.DEFAULT_SHIFT)))
    params = {"data": _data_key(data), "num": num, "seed": seed, "shard_size": shard_size}
    if data == "shapes":  # the scenes (and captions) drawn for a seed depend on the benchmark's version
        params["data_version"] = shapes.VERSION
    n_shards = math.ceil(num / shard_size)
    ds = get_dataset(data, resolution=teacher.resolution, skip_bad=skip_bad)
    captions = ds.sample(num, seed=seed, split="train").captions
    if len(captions) != num:
        raise UserError(f"--data {data}: gave {len(captions)} captions, expected {num}")
    prompts = prompts_sha256(captions)

    # The folder: new, or a cache of exactly this (teacher, data, num, seed, shard_size, prompts), or refuse.
    mpath = out / MANIFEST
    entries: dict[int, dict] = {}
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if mpath.exists():
        old = _read_manifest(mpath)
        diff = identity_diff(old.get("teacher", {}), ident)
        diff += [k for k in params if old.get(k) != params[k]]
        if "prompts_sha256" in old and old["prompts_sha256"] != prompts:
            diff.append("prompts")
        if diff:
            raise UserError(f"{out}: holds a different teacher cache (differs in: {', '.join(diff)}); "
                            "choose another --out (or delete that folder)")
        try:
            entries = {int(e["index"]): e for e in old.get("shards", [])}
        except (KeyError, TypeError, ValueError):  # malformed entries: regenerate their shards
            entries = {}
        if "prompts_sha256" not in old:  # a manifest from before the prompt hash: the kept shards' own captions
            for k, e in entries.items():
                if k < n_shards and _shard_ok(out, e) and \
                        _shard_captions(out / e["file"]) != captions[k * shard_size:(k + 1) * shard_size]:
                    raise UserError(f"{out}: holds a different teacher cache (differs in: prompts); choose another "
                                    "--out (or delete that folder)")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()

    manifest = {"format": FORMAT, "version": VERSION, "teacher": ident,
                "teacher_folder": str(teacher_folder.resolve()), **params, "prompts_sha256": prompts,
                "batch_size": batch_size,
                "num_shards": n_shards, "sigmas": [float(x) for x in sigmas], "complete": False, "shards": []}

    def write_manifest():
        manifest["shards"] = [entries[k] for k in sorted(entries)]
        manifest["complete"] = len(entries) == n_shards
        atomic_write_text(mpath, json.dumps(manifest, indent=1))

    # Verify what is there; drop entries whose shard is missing, truncated or altered.
    entries = {k: e for k, e in entries.items() if k < n_shards and _shard_ok(out, e)}
    todo = [k for k in range(n_shards) if k not in entries]
    write_manifest()
    if not todo:
        return out

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_shards, initial=n_shards - len(todo), desc=f"teacher cache {out.name}", unit="shard")
    try:
        for k in todo:
            start = k * shard_size
            caps = captions[start:start + shard_size]
            n = len(caps)
            nseed = shard_noise_seed(seed, k)
            noise = teacher.noise(n, nseed)
            text = teacher.encode(caps)
            trajs = []
            for i in range(0, n, batch_size):
                r = teacher.sample(text[i:i + batch_size], noise[i:i + batch_size], return_trajectory=True)
                if not torch.equal(r.sigmas.double(), sigmas):
                    raise RuntimeError("teacher sampled on another σ grid than its config's")
                trajs.append(torch.stack(r.trajectory, 1).float())
            traj = torch.cat(trajs)
            tensors = {"trajectory": traj, "text": torch.cat([t.float() for t in text]),
                       "text_len": torch.tensor([t.shape[0] for t in text], dtype=torch.int64),
                       "sigmas": sigmas.clone()}
            info = {"format": FORMAT, "version": VERSION, "index": k, "start": start, "count": n,
                    "noise_seed": nseed, "captions": caps}
            path = out / shard_name(k)
            # One metadata key: safetensors writes several keys in a random (hash-map) order, which would make
            # a regenerated shard differ in bytes (and checksum) from the first one.
            atomic_save_tensors(tensors, path, metadata={META_KEY: json.dumps(info, sort_keys=True)})
            entries[k] = {"index": k, "file": path.name, "start": start, "count": n, "noise_seed": nseed,
                          "sha256": sha256_file(path)}
            write_manifest()
            if bar is not None:
                bar.update(1)
            if _on_shard_written is not None:
                _on_shard_written(k, path)
    finally:
        if bar is not None:
            bar.close()
    return out


# ---- load -------------------------------------------------------------------------------------------------

@dataclass
class TeacherCache:
    """A teacher cache in memory. `noise` and `final` are views of `trajectory` (σ = 1 and σ = 0 states)."""

    trajectory: torch.Tensor          # [N, S+1, C, H, W] float32, state at sigmas[i]
    sigmas: torch.Tensor              # [S+1] float64, from 1 to 0
    text: list[torch.Tensor]          # N × [L_i, D]
    captions: list[str]
    manifest: dict = field(default_factory=dict)
    folder: Path | None = None

    @property
    def noise(self) -> torch.Tensor:
        return self.trajectory[:, 0]

    @property
    def final(self) -> torch.Tensor:
        return self.trajectory[:, -1]

    def __len__(self) -> int:
        return self.trajectory.shape[0]

    def sigma_index(self, sigma: float) -> int:
        d = (self.sigmas - float(sigma)).abs()
        i = int(d.argmin())
        if float(d[i]) > SIGMA_TOL:
            avail = ", ".join(f"{float(s):.6g}" for s in self.sigmas)
            raise ValueError(f"σ = {sigma} is not on the teacher cache's grid; available σ: {avail}")
        return i

    def state_at(self, sigma: float, idx=None) -> torch.Tensor:
        """The teacher's state x_σ [N, C, H, W] (or [len(idx), ...]) at a σ of its grid (exact within 1e-6)."""
        x = self.trajectory[:, self.sigma_index(sigma)]
        return x if idx is None else x[torch.as_tensor(idx, dtype=torch.long)]

    def batch(self, idx, at: Sequence[float] = ()) -> dict:
        """A training batch: noise, final, trajectory [B, S+1, ...], text (list), captions (list), index, and
        `states[σ]` for each σ in `at`."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        traj = self.trajectory[idx]
        ids = idx.tolist()
        return {"index": idx, "noise": traj[:, 0], "final": traj[:, -1], "trajectory": traj,
                "text": [self.text[i] for i in ids], "captions": [self.captions[i] for i in ids],
                "states": {float(s): traj[:, self.sigma_index(s)] for s in at}}


def load_cache(folder: Path, expect_teacher: Path | None = None) -> TeacherCache:
    """Load and verify a complete cache (every shard's sha256). With `expect_teacher`, refuse a cache built
    by another teacher (weights, config or default sampling differ)."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not folder.is_dir() or not mpath.is_file():
        raise UserError(f"{folder}: not a teacher cache (no {MANIFEST}); build one with `twostep teacher cache "
                        f"--teacher <folder> --data <data> --num <n> --out {folder}`")
    m = _read_manifest(mpath)
    hint = _rebuild_hint(m, folder)
    try:
        n_shards = int(m["num_shards"])
        entries = sorted(m.get("shards", []), key=lambda e: int(e["index"]))
        for e in entries:
            str(e["file"]), str(e["sha256"]), int(e["count"])
            path_inside(folder, e["file"], "shard file", "delete the cache folder and build it again")
        sigmas = torch.tensor(m["sigmas"], dtype=torch.float64)
        int(m["num"])
    except (KeyError, TypeError, ValueError) as ex:
        raise UserError(f"{mpath}: malformed manifest ({type(ex).__name__}: {one_line(ex)}); delete the cache "
                        "folder and build it again")
    if not m.get("complete") or [int(e["index"]) for e in entries] != list(range(n_shards)):
        raise UserError(f"{folder}: incomplete teacher cache ({len(entries)} of {n_shards} shards); {hint} "
                        "to finish it")
    if expect_teacher is not None:
        ident = teacher_identity(expect_teacher)
        diff = identity_diff(m.get("teacher", {}), ident)
        if diff:
            raise UserError(f"{folder}: built for a different teacher than {expect_teacher} (differs in: "
                            f"{', '.join(diff)}); build a cache for this teacher with `twostep teacher cache "
                            f"--teacher {expect_teacher} ... --out <new folder>`")
    trajs, texts, caps = [], [], []
    for e in entries:
        p = folder / e["file"]
        if not p.is_file():
            raise UserError(f"{p}: missing shard of the teacher cache; {hint} to regenerate it")
        if sha256_file(p) != e["sha256"]:
            raise UserError(f"{p}: checksum mismatch (truncated or corrupt shard); {hint} to regenerate it")
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
            info = json.loads(meta[META_KEY])
            shard_caps = info["captions"]
            if int(info["index"]) != int(e["index"]) or not all(isinstance(c, str) for c in shard_caps):
                raise ValueError("shard index/captions disagree with the manifest")
        except Exception as ex:  # a shard that matches its checksum but is not what we wrote
            raise UserError(f"{p}: unreadable shard ({type(ex).__name__}); {hint} to regenerate it")
        n = int(e["count"])
        if (t["trajectory"].shape[0] != n or t["text_len"].shape[0] != n or len(shard_caps) != n
                or not torch.equal(t["sigmas"], sigmas)):
            raise UserError(f"{p}: shard contents disagree with {MANIFEST}; {hint} to regenerate it")
        trajs.append(t["trajectory"])
        texts.extend(torch.split(t["text"], t["text_len"].tolist()))
        caps.extend(shard_caps)
    traj = torch.cat(trajs)
    if traj.shape[0] != int(m["num"]):
        raise UserError(f"{folder}: holds {traj.shape[0]} samples, manifest says {m['num']}; {hint}")
    return TeacherCache(trajectory=traj, sigmas=sigmas, text=list(texts), captions=caps,
                        manifest=m, folder=folder)
