"""Teacher cache: contents equal the teacher's own samples; resumable, checksummed, identity-checked; caches of
format 1 (the whole fp32 trajectory) still load."""

import json
import shutil

import pytest
import torch

from conftest import make_tiny_teacher
from twostep import flow
from twostep.data import get_dataset
from twostep.errors import UserError
from twostep.io.files import sha256_file
from twostep.model import load_teacher
from twostep.teacher import cache as C

NUM, SHARD, BATCH = 10, 4, 3  # 3 shards: 4, 4, 2 samples; batches that straddle nothing in particular


def build(teacher, out, **kw):
    args = dict(data="shapes", num=NUM, seed=0, shard_size=SHARD, batch_size=BATCH, progress=False)
    args.update(kw)
    return C.build_cache(teacher, out=out, **args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    teacher = make_tiny_teacher(root / "teacher")
    out = build(teacher, root / "ref")
    return teacher, out


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def counting(monkeypatch):
    written = []
    monkeypatch.setattr(C, "_on_shard_written", lambda k, p: written.append(k))
    return written


def test_contents_match_teacher(built):
    teacher_dir, out = built
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json"] + [C.shard_name(k) for k in range(3)]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["num"] == NUM and m["num_shards"] == 3 and m["shard_size"] == SHARD
    assert [e["count"] for e in m["shards"]] == [4, 4, 2]
    assert all(sha256_file(out / e["file"]) == e["sha256"] for e in m["shards"])
    assert m["teacher"]["weights_sha256"] == sha256_file(teacher_dir / "model.safetensors")

    cache = C.load_cache(out, expect_teacher=teacher_dir)
    teacher = load_teacher(teacher_dir)
    assert len(cache) == NUM
    assert cache.sample_shape == (3, 32, 32) and cache.final.shape == (NUM, 3, 32, 32)
    assert m["version"] == 2 and m["noise"] == "shard" and m["store_dtype"] == "fp32" and m["compute"] == "cpu/fp32"
    assert len(m["states"]) == 7 and all(e["bytes"] == (out / e["file"]).stat().st_size for e in m["shards"])
    assert torch.equal(cache.sigmas, flow.sigma_grid(8, 3.0))
    assert cache.captions == get_dataset("shapes").sample(NUM, seed=0, split="train").captions
    for got, want in zip(cache.text, teacher.encode(cache.captions)):
        assert torch.equal(got, want)
    # the noise is regenerable shard by shard
    assert torch.equal(cache.noise[4:8], teacher.noise(4, C.shard_noise_seed(0, 1)))
    # final and every state equal (bitwise: fp32 on the CPU) a fresh teacher.sample from the same noise and prompt
    # (the rows of one of the builder's batches, in its order: CPU kernels may round differently for another
    # batch composition, e.g. on AMD EPYC, so bitwise equality is asked of the same batch)
    idx = [4, 5, 6]
    r = teacher.sample([cache.text[i] for i in idx], cache.noise[idx], return_trajectory=True)
    assert torch.equal(cache.final[idx], r.x0)
    for i, s in enumerate(cache.sigmas.tolist()):
        assert torch.equal(cache.state_at(s, idx), r.trajectory[i])
    b = cache.batch(idx, at=(0.75,))
    assert torch.equal(b["final"], cache.final[idx]) and b["captions"] == [cache.captions[i] for i in idx]
    assert torch.equal(b["states"][0.75], r.trajectory[4]) and len(b["text"]) == 3
    rows = cache.rows(idx, ("noise", "final", 0.75, 1.0, 0.0))
    assert torch.equal(rows[1.0], rows["noise"]) and torch.equal(rows[0.0], rows["final"])


def test_state_at_075_is_fifth_state_of_8_step_shift3_grid(built):
    cache = C.load_cache(built[1])
    assert cache.sigma_index(0.75) == 4 and cache.sigma_index(0.75 + 5e-7) == 4
    assert cache.has_state(0.75) and cache.has_state(1.0) and cache.has_state(0.0) and not cache.has_state(0.7)
    assert torch.equal(cache.state_at(1.0)[:], cache.noise[:]) and torch.equal(cache.state_at(0.0)[:], cache.final[:])
    with pytest.raises(ValueError, match="0.75"):
        cache.state_at(0.7)


def test_interrupted_build_resumes_identically(built, tmp_path, monkeypatch):
    teacher, ref = built
    out = tmp_path / "c"

    class Killed(Exception):
        pass

    def boom(k, p):
        if k == 1:
            raise Killed  # as if killed after the second shard
    monkeypatch.setattr(C, "_on_shard_written", boom)
    with pytest.raises(Killed):
        build(teacher, out)
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and [e["index"] for e in m["shards"]] == [0, 1]
    with pytest.raises(UserError, match="incomplete teacher cache .2 of 3 shards.*twostep teacher cache"):
        C.load_cache(out)

    written = []
    monkeypatch.setattr(C, "_on_shard_written", lambda k, p: written.append(k))
    build(teacher, out)
    assert written == [2]  # only the missing shard
    assert shard_bytes(out) == shard_bytes(ref) and not list(out.glob("*.tmp"))
    assert len(C.load_cache(out)) == NUM

    # a deleted shard (and its manifest entry) is regenerated, bit for bit
    (out / C.shard_name(1)).unlink()
    m = json.loads((out / "manifest.json").read_text())
    m["shards"] = [e for e in m["shards"] if e["index"] != 1]
    (out / "manifest.json").write_text(json.dumps(m))
    written.clear()
    build(teacher, out)
    assert written == [1] and shard_bytes(out) == shard_bytes(ref)
    written.clear()
    build(teacher, out)  # complete: nothing to do
    assert written == []


def test_truncated_and_bitflipped_shards(built, tmp_path, counting):
    teacher, ref = built
    out = copy(ref, tmp_path / "c")
    s0, s2 = out / C.shard_name(0), out / C.shard_name(2)
    s0.write_bytes(s0.read_bytes()[:1000])  # truncated
    b = bytearray(s2.read_bytes())
    b[-7] ^= 0x10  # one bit flipped in the tensor data
    s2.write_bytes(bytes(b))
    with pytest.raises(UserError) as e:
        C.load_cache(out)  # the cheap check (sizes) catches the truncation
    msg = str(e.value)
    assert "\n" not in msg and "shard-00000.safetensors: 1000 bytes, the manifest says" in msg and \
        "twostep teacher cache" in msg
    s0.write_bytes((ref / C.shard_name(0)).read_bytes())
    assert len(C.load_cache(out)) == NUM  # a flipped byte: only the sha256 sees it (verify, distill --verify-cache)
    with pytest.raises(UserError, match="shard-00002.safetensors: checksum mismatch"):
        C.load_cache(out, verify=True)
    s0.write_bytes(s0.read_bytes()[:1000])
    build(teacher, out)
    assert sorted(counting) == [0, 2] and shard_bytes(out) == shard_bytes(ref)
    assert len(C.load_cache(out, expect_teacher=teacher)) == NUM


def test_wrong_teacher_or_args_refused(built, tmp_path):
    teacher, ref = built
    other = make_tiny_teacher(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="different teacher.*weights"):
        C.load_cache(ref, expect_teacher=other)
    out = copy(ref, tmp_path / "c")
    with pytest.raises(UserError, match="holds a different teacher cache .differs in: weights.*choose another --out"):
        build(other, out)
    with pytest.raises(UserError, match="differs in: num"):
        build(teacher, out, num=12)
    with pytest.raises(UserError, match="differs in: seed"):
        build(teacher, out, seed=1)
    # same weights, other default sampling: its samples differ, so it is another teacher
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["sampling"]["guidance"] = 0.0
    retuned = copy(teacher, tmp_path / "retuned")
    (retuned / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="differs in: sampling"):
        C.load_cache(ref, expect_teacher=retuned)
    # a folder that is not a cache
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(UserError, match="not a teacher cache"):
        build(teacher, tmp_path / "notes")
    with pytest.raises(UserError, match="not a teacher cache"):
        C.load_cache(tmp_path / "notes")
