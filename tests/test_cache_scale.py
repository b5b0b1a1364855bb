"""The teacher cache at scale (issue 16 §2, §3): byte-identical shards from 1 or 2 processes (twostep launch,
gloo) with a per-shard resume; the lean format (noise as its seed, chosen states, bf16 storage, per-sample noise
of a ZImagePipeline teacher); the lazy loader (rows of a shard are read only when asked for); the compute and
storage flags; cheap vs full (sha256) checks; format-1 caches still load."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_tiny_teacher
from twostep.cli import main
from twostep.errors import UserError
from twostep.model import load_teacher
from twostep.teacher import cache as C

NUM, SHARD = 6, 2


def build(teacher, out, **kw):
    args = dict(data="shapes", num=NUM, shard_size=SHARD, progress=False)
    return C.build_cache(teacher, out=out, **{**args, **kw})


def shas(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    teacher = make_tiny_teacher(root / "teacher")
    return root, teacher, build(teacher, root / "ref")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny ZImagePipeline teacher at 4 steps (σ grid 1, 0.9, 0.75, 0.5, 0): the lean defaults."""
    from test_pipeline_teacher import build_tiny_pipeline

    root = tmp_path_factory.mktemp("scale_pipe")
    p = build_tiny_pipeline(root / "pipe")
    (p / "twostep.json").write_text(json.dumps({"sampling": {"steps": 4}}))
    return root, p


def test_two_processes_resume_one_and_give_the_same_bytes(world, tmp_path, monkeypatch):
    """A 1-process build stopped after its first shard, resumed by 2 processes (rank r builds shards k ≡ r mod 2):
    every shard is byte-identical to the uninterrupted 1-process build, and one complete manifest is merged."""
    root, teacher, ref = world
    out = tmp_path / "c"

    class Killed(Exception):
        pass

    def boom(k, p):
        raise Killed
    monkeypatch.setattr(C, "_on_shard_written", boom)
    with pytest.raises(Killed):
        build(teacher, out)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.json", "shard-00000.safetensors"]
    argv = ["teacher", "cache", "--teacher", str(teacher), "--data", "shapes", "--num", str(NUM),
            "--shard-size", str(SHARD), "--out", str(out), "--device", "cpu", "--no-progress"]  # 1 thread: the env
    # the launcher the README prints (twostep launch; torchrun's parser would take --num for --numa-binding)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "twostep"), "launch", "--processes", "2", *argv]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert shas(out) == shas(ref) and len(shas(ref)) == 3
    m, mref = (json.loads((f / C.MANIFEST).read_text()) for f in (out, ref))
    assert m["complete"] and m["shards"] == mref["shards"] and not list(out.glob("shard-*.json"))
    assert len(C.load_cache(out, verify=True)) == NUM


def test_lean_pipeline_cache(pipe, tmp_path):
    """A ZImagePipeline teacher: no noise tensor (row i's noise is teacher.noise(1, sample_noise_seed(seed, i))),
    only the final sample and the chosen σ states, samples and text features in bf16."""
    root, pdir = pipe
    out = C.build_cache(pdir, "shapes", 3, tmp_path / "c", shard_size=2, states="final,0.75", progress=False)
    m = json.loads((out / C.MANIFEST).read_text())
    assert (m["noise"], m["store_dtype"], m["states"], m["compute"]) == ("sample", "bf16", [0.75], "cpu/fp32")
    with safe_open(str(out / C.shard_name(0)), "pt") as f:
        assert sorted(f.keys()) == ["final", "sigmas", "state_02", "text", "text_len"]
        assert f.get_slice("final").get_dtype() == "BF16" and f.get_slice("text").get_dtype() == "BF16"
    cache = C.load_cache(out, expect_teacher=pdir)
    teacher = load_teacher(pdir)
    assert cache.has_state(0.75) and not cache.has_state(0.5) and cache.sample_shape == (16, 16, 16)
    noise = torch.cat([teacher.noise(1, C.sample_noise_seed(0, i)) for i in range(3)])
    rows = cache.rows([0, 1, 2], ("noise", "final", 0.75))
    assert torch.equal(rows["noise"], noise)
    text = teacher.encode(cache.captions)
    for idx in ([0, 1], [2]):  # the builder's batches (one per shard here): CPU kernels may round by batch size
        r = teacher.sample([text[i] for i in idx], noise[idx], return_trajectory=True)
        assert torch.equal(rows["final"][idx], r.x0.bfloat16().float())
        assert torch.equal(rows[0.75][idx], r.trajectory[2].bfloat16().float())
    for got, want in zip(cache.text_rows([0, 1, 2]), teacher.encode(cache.captions)):
        assert got.dtype == torch.float32 and torch.equal(got, want.bfloat16().float())
    with pytest.raises(ValueError, match="not stored"):
        cache.rows([0], (0.5,))

    # the teacher in bf16 (the CUDA default) on fp32 states: close to fp32, recorded, never mixed into this cache
    lo = C.build_cache(pdir, "shapes", 3, tmp_path / "lo", shard_size=2, states="final,0.75", dtype="bf16",
                       store_dtype="fp32", progress=False)
    c_lo = C.load_cache(lo)
    assert c_lo.manifest["compute"] == "cpu/bf16" and c_lo.manifest["store_dtype"] == "fp32"
    assert (c_lo.final[:] - rows["final"]).abs().max() < 0.1 and torch.equal(c_lo.noise[:], noise)
    with pytest.raises(UserError, match="differs in: compute"):
        C.build_cache(pdir, "shapes", 3, out, shard_size=2, states="final,0.75", dtype="bf16", progress=False)

    # step1_loss=traj on a cache without σm: one line naming the --states that gives it
    from twostep.train import BatchSource
    plain = C.build_cache(pdir, "shapes", 2, tmp_path / "plain", shard_size=2, progress=False)
    with pytest.raises(UserError, match=r"holds no teacher state at σm = 0.75 .stored: final.*--states final,0.75"):
        BatchSource(C.load_cache(plain), {"noise", "text", "teacher_mid"}, 0.75, 0, None)
    with pytest.raises(UserError, match="not on the teacher's σ grid"):
        BatchSource(C.load_cache(plain), {"noise", "text", "teacher_mid"}, 0.7, 0, None)
    b = BatchSource(cache, {"noise", "text", "teacher_final", "teacher_mid"}, 0.75, 0, None).get(0, 0, 2)
    i = b["index"].tolist()
    assert torch.equal(b["teacher_mid"], rows[0.75][i]) and torch.equal(b["noise"], noise[i])


@pytest.mark.parametrize("flags,match", [
    (["--states", "final,0.7"], "σ = 0.7 is not on the teacher's grid"),
    (["--states", "1.5"], "strictly between 0 and 1"),
    (["--states", "mid"], "'mid' is not 'final' or a σ"),
    (["--device", "meta"], "only cpu and cuda"),
    (["--device", "tpu0"], "not a device"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "CUDA device"),
])
def test_bad_flags_are_one_line_errors(world, tmp_path, capsys, flags, match):
    root, teacher, ref = world
    out = tmp_path / "c"
    rc = main(["teacher", "cache", "--teacher", str(teacher), "--data", "shapes", "--num", "2", "--out", str(out),
               "--no-progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and match in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_rows_are_read_lazily(world, tmp_path):
    """Reading rows of shards 0 and 1 never touches shard 2's samples (here: overwritten with garbage of the same
    size, which the cheap check cannot see and the sha256 check does)."""
    root, teacher, ref = world
    c = tmp_path / "c"
    shutil.copytree(ref, c)
    p = c / C.shard_name(2)
    b = bytearray(p.read_bytes())
    n = int.from_bytes(b[:8], "little")
    for name, t in json.loads(b[8:8 + n]).items():
        if name == "final" or name.startswith("state_"):
            lo, hi = t["data_offsets"]
            b[8 + n + lo:8 + n + hi] = bytes([0x7F]) * (hi - lo)
    p.write_bytes(bytes(b))
    lazy, full = C.load_cache(c), C.load_cache(ref)
    for key in ("noise", "final", 0.75):
        assert torch.equal(lazy.rows([0, 1, 3], (key,))[key], full.rows([0, 1, 3], (key,))[key])
    assert all(torch.equal(a, b) for a, b in zip(lazy.text_rows([1, 2]), full.text_rows([1, 2])))
    assert not torch.equal(lazy.final[4], full.final[4])
    with pytest.raises(UserError, match="shard-00002.safetensors: checksum mismatch"):
        C.load_cache(c, verify=True)


def _as_format_1(src, dst):
    """A format-1 cache (the whole fp32 trajectory per shard, noise at σ = 1 included) of the same contents."""
    cache = C.load_cache(src)
    m = json.loads((src / C.MANIFEST).read_text())
    dst.mkdir()
    entries = []
    for sh in cache.shards:
        idx = list(range(sh.start, sh.start + sh.count))
        r = cache.rows(idx, ["noise", *cache.stored_sigmas, "final"])
        traj = torch.stack([r["noise"], *[r[s] for s in cache.stored_sigmas], r["final"]], 1)
        text = cache.text_rows(idx)
        info = {"format": C.FORMAT, "version": 1, "index": sh.index, "start": sh.start, "count": sh.count,
                "noise_seed": sh.noise_seed, "captions": cache.captions[sh.start:sh.start + sh.count]}
        path = dst / C.shard_name(sh.index)
        save_file({"trajectory": traj, "text": torch.cat(text), "text_len": torch.tensor([len(t) for t in text]),
                   "sigmas": cache.sigmas}, str(path), metadata={C.META_KEY: json.dumps(info, sort_keys=True)})
        entries.append({"index": sh.index, "file": path.name, "start": sh.start, "count": sh.count,
                        "noise_seed": sh.noise_seed, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    keep = ("format", "teacher", "teacher_folder", "data", "num", "seed", "shard_size", "data_version",
            "prompts_sha256", "batch_size", "num_shards", "sigmas")
    (dst / C.MANIFEST).write_text(json.dumps({**{k: m[k] for k in keep}, "version": 1, "complete": True,
                                              "shards": entries}))
    return dst


def test_format_1_caches_still_load(world, tmp_path):
    root, teacher, ref = world
    old = _as_format_1(ref, tmp_path / "v1")
    a, b = C.load_cache(old, expect_teacher=teacher, verify=True), C.load_cache(ref)
    assert len(a) == NUM and a.sample_shape == b.sample_shape and a.captions == b.captions
    idx = [0, 3, 5]
    for s in ("noise", "final", *b.stored_sigmas):
        assert torch.equal(a.rows(idx, (s,))[s], b.rows(idx, (s,))[s]), s
    assert all(torch.equal(x, y) for x, y in zip(a.text_rows(idx), b.text_rows(idx)))
    with pytest.raises(UserError, match="format version 1 .* still loads .* another --out"):
        build(teacher, old)


def test_verify_flags(world, tmp_path, capsys, monkeypatch):
    """`teacher cache --verify` reads the cache back with every sha256; `distill --verify-cache` refuses a cache with
    a flipped byte that the default (cheap) check lets through."""
    root, teacher, ref = world
    c = tmp_path / "c"
    shutil.copytree(ref, c)
    calls = []
    real = C.sha256_file
    monkeypatch.setattr(C, "sha256_file", lambda p: calls.append(p) or real(p))
    argv = ["teacher", "cache", "--teacher", str(teacher), "--data", "shapes", "--num", str(NUM), "--shard-size",
            str(SHARD), "--out", str(c), "--no-progress"]
    assert main(argv) == 0 and len(calls) == 3  # the resume check only
    calls.clear()
    assert main(argv + ["--verify"]) == 0 and len(calls) == 6 and "sha256 verified" in capsys.readouterr().out
    p = c / C.shard_name(1)
    b = bytearray(p.read_bytes())
    b[-10] ^= 0xFF
    p.write_bytes(bytes(b))
    assert len(C.load_cache(c)) == NUM
    rc = main(["distill", "--teacher", str(teacher), "--cache", str(c), "--out", str(tmp_path / "run"),
               "--verify-cache", "--no-progress", "--set", "disc.blocks=[0]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "shard-00001.safetensors: checksum mismatch" in err[0]
    assert not (tmp_path / "run").exists()


def test_prompt_file_cache(world, tmp_path):
    """--prompts: the prompt file's identity is the cache's; a method that reads real images is refused."""
    root, teacher, ref = world
    f = tmp_path / "p.txt"
    f.write_text("".join(f"prompt number {i}\n" for i in range(10)))
    out = C.build_cache(teacher, num=4, out=tmp_path / "c", prompts=f, seeds_per_prompt=2, shard_size=4,
                        progress=False)
    cache = C.load_cache(out)
    m = cache.manifest
    assert m["data"] is None and m["prompts"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert m["seeds_per_prompt"] == 2 and cache.captions[0] == cache.captions[1] != cache.captions[2]
    assert not torch.equal(cache.noise[0], cache.noise[1])
    from twostep.train import real_images
    with pytest.raises(UserError, match="built from a prompt file"):
        real_images(cache, {"data_real"}, 0)
    f.write_text("".join(f"another prompt {i}\n" for i in range(10)))
    with pytest.raises(UserError, match="differs in: prompts"):
        C.build_cache(teacher, num=4, out=out, prompts=f, seeds_per_prompt=2, shard_size=4, progress=False)
