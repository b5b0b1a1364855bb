"""`twostep eval` at scale (issue 16 §4, the eval loop): batched sampling streamed to per-batch records on disk,
resumable work folders, prompt files, pluggable extractors + CLIP score, FD against the teacher's own samples,
and the same numbers as the in-memory protocol for the same generated images."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_teacher
from twostep import evaluate as E
from twostep.cli import main
from twostep.data import get_dataset
from twostep.errors import UserError
from twostep.metrics import DistributionMetrics, alignment, diversity, load_feature_net, psnr, swd
from twostep.model import SampleSpace, load_teacher
from twostep.sampling import TeacherSampler

ROOT = Path(__file__).resolve().parents[1]
NUM, BS = 10, 4      # 3 batches (4, 4, 2): a partition the in-memory protocol never used


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "cache"))   # the teacher store, per test


class _Space(SampleSpace):
    def __init__(self, c, h, w):
        self.config = {"resolution": h, "transformer": {"in_channels": c}} if h == w else \
            {"height": h, "width": w, "transformer": {"in_channels": c}}
        self.parts = None


@pytest.mark.parametrize("chw", [(3, 32, 32), (16, 4, 4), (3, 5, 5)])  # streamed, streamed, 75 values: sliced
def test_noise_batches_are_slices_of_the_one_noise(chw):
    sp = _Space(*chw)
    full = sp.noise(23, 777)
    parts = list(E.noise_batches(sp, 23, 777, 7))
    assert [p[0] for p in parts] == E.batch_slices(23, 7)
    assert torch.equal(torch.cat([p[1] for p in parts]), full)


def _teacher_2step(tmp_path):
    """A tiny teacher whose default is 3 steps without CFG (cheap), sampled at 2 steps (PSNR vs its default)."""
    folder = make_tiny_teacher(tmp_path / "teacher", guidance=0.0)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sampling"]["steps"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, TeacherSampler(load_teacher(folder), steps=2, guidance=0.0)


def _in_memory(gen, folder, num, seed, bs):
    """The pre-streaming protocol on the same generated batches: every set in RAM, metrics over whole sets."""
    net = load_feature_net(ROOT / "models" / "features-shapes")
    ds = get_dataset("shapes", 32)
    ex = ds.sample(num, seed=seed, split="test")
    text = gen.encode(ex.captions)
    noise = gen.noise(num, E.NOISE_OFFSET + seed)
    ts = TeacherSampler(load_teacher(folder))
    fake = torch.cat([gen.generate(text[s], noise[s]).x0 for s in E.batch_slices(num, bs)])
    tref = torch.cat([ts.generate(text[s], noise[s]).x0 for s in E.batch_slices(num, bs)])
    data = ds.sample(num, seed=seed, split="ref").images
    d, t = DistributionMetrics(net, data, seed=seed)(fake), DistributionMetrics(net, tref, seed=seed)(fake)
    k = min(E.DIVERSITY_PROMPTS, num)
    dtext = [x for x in text[:k] for _ in range(E.DIVERSITY_SAMPLES)]
    dnoise = gen.noise(len(dtext), E.NOISE_OFFSET + 500_000 + seed)
    dx = torch.cat([gen.generate(dtext[s], dnoise[s]).x0 for s in E.batch_slices(len(dtext), bs)])
    return {"fd": d["fd"], "kid": d["kid_mean"], "kid_std": d["kid_std"], "swd": swd(data, fake),
            "alignment": alignment(fake, ex.labels, net), "psnr_vs_teacher": psnr(fake, tref),
            "diversity": diversity(dx, [i // E.DIVERSITY_SAMPLES for i in range(len(dx))], net),
            "fd_teacher": t["fd"], "kid_teacher": t["kid_mean"], "kid_teacher_std": t["kid_std"]}


class _Counting:
    """Counts generate() calls of a generator (and can fail at the n-th, as an interrupted run)."""

    def __init__(self, gen, fail_at=None):
        self.gen, self.calls, self.fail_at = gen, 0, fail_at
        self._orig = gen.generate
        gen.generate = self

    def __call__(self, text, noise, return_trajectory=False):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self._orig(text, noise, return_trajectory)


def test_streamed_eval_is_the_in_memory_protocol_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "DIVERSITY_PROMPTS", 2)   # 8 diversity images instead of 40 (time)
    folder, gen = _teacher_2step(tmp_path)
    want = _in_memory(gen, folder, NUM, 3, BS)
    work = tmp_path / "work"
    counter = _Counting(gen, fail_at=2)   # interrupted in the second batch of the model's samples
    with pytest.raises(KeyboardInterrupt):
        E.evaluate(gen, "shapes", num=NUM, seed=3, ref="both", work=work, batch_size=BS, device="cpu",
                   progress=False)
    st = json.loads((work / "status.json").read_text())
    assert (st["kind"], st["complete"], st["progress"]["done"]) == ("eval", False, 1)
    assert len(list((E.default_cache_dir().parent / "eval").glob("teacher-*/*.safetensors"))) == 3  # all stored

    counter.calls, counter.fail_at = 0, None
    got = E.evaluate(gen, "shapes", num=NUM, seed=3, ref="both", work=work, batch_size=BS, device="cpu",
                     progress=False)
    assert counter.calls == 2 + math.ceil(E.DIVERSITY_SAMPLES * 2 / BS)   # batches 2-3, then the diversity set
    for k, v in want.items():   # bit for bit: the same reductions of the same images
        assert got[k] == v, k
    assert (got["ref"], got["batch_size"], got["work"]) == ("both", BS, str(work))
    assert sorted(p.name for p in (work / "fake").iterdir()) == ["00000.safetensors", "00001.safetensors",
                                                                 "00002.safetensors"]
    assert json.loads((work / "status.json").read_text())["complete"] is True

    # a finished work folder is reused whole (no sampling); --ref changes nothing that was computed
    counter.calls = 0
    again = E.evaluate(gen, "shapes", num=NUM, seed=3, ref="teacher", work=work, batch_size=BS, device="cpu",
                       progress=False)
    assert counter.calls == 0 and again["fd"] == want["fd_teacher"] and "fd_teacher" not in again
    with pytest.raises(UserError, match="holds a different eval .*seed"):
        E.evaluate(gen, "shapes", num=NUM, seed=4, work=work, batch_size=BS, device="cpu", progress=False)
    with pytest.raises(UserError, match="is the --model folder"):
        E.evaluate(gen, "shapes", num=NUM, seed=3, work=folder, batch_size=BS, device="cpu", progress=False)

    # sets larger than SWD_MAX_BYTES: embedded batch by batch, no images kept, SWD not reported
    monkeypatch.setattr(E, "SWD_MAX_BYTES", 0)
    big = E.evaluate(gen, "shapes", num=NUM, seed=3, ref="teacher", work=tmp_path / "w2", batch_size=BS,
                     device="cpu", progress=False)
    rec = E._Records(tmp_path / "w2" / "fake").get(0)
    assert "images" not in rec and rec["features"].shape == (BS, 256) and big["swd"] is None
    assert big["fd"] == pytest.approx(want["fd_teacher"], rel=1e-6, abs=1e-9)
    for k in ("psnr_vs_teacher", "alignment", "diversity"):
        assert big[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k


def _code(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_prompt_file_latent_pipeline_extractor_clip_images(tmp_path, capsys):
    """A ZImagePipeline teacher at 2 steps on a prompt file, through the CLI: the teacher reference is stored as
    latents, images go to --work/images, FD in CLIP space and the CLIP score come back in the JSON."""
    from test_extractors import _clip_folder
    from test_pipeline_teacher import IMAGE, build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    clip = _clip_folder(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {c} circle number {i}\n" for i, c in enumerate(["red", "blue", "green"] * 10)))
    out, work = tmp_path / "e.json", tmp_path / "work"
    argv = ["--threads", "1", "eval", "--model", str(pipe), "--steps", "2", "--prompts", str(prompts),
            "--extractor", f"clip:{clip}", "--clip", str(clip), "--work", str(work), "--save-images",
            "--batch-size", "4", "--device", "cpu", "--num", "10", "--no-progress", "--json", str(out)]
    rc, err = _code(argv, capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["ref"] == "teacher" and r["data"] is None and r["alignment"] is None
    assert 0 <= r["clip_score"] <= 100 and math.isfinite(r["fd"]) and math.isfinite(r["psnr_vs_teacher"])
    assert r["extractor"]["kind"] == "clip" and r["prompts"]["format"] == "txt" and r["batch_size"] == 4
    pngs = sorted((work / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    from PIL import Image
    assert Image.open(pngs[0]).size == (IMAGE, IMAGE)
    stored = list((E.default_cache_dir().parent / "eval").glob("teacher-*/00000.safetensors"))
    from safetensors.torch import load_file
    assert load_file(str(stored[0]))["x0"].shape == (4, 16, IMAGE // 2, IMAGE // 2)   # latents, decoded at use

    rc, err = _code(argv[:-2] + ["--json", str(tmp_path / "again.json")], capsys)   # resumed whole: same record
    assert rc == 0 and {k: v for k, v in json.loads((tmp_path / "again.json").read_text()).items() if "sec" not in k} \
        == {k: v for k, v in r.items() if "sec" not in k}


@pytest.mark.parametrize("change, msg", [
    ({"--device": "tpu"}, "--device 'tpu': use auto"),
    ({"--save-images": True}, "--save-images writes into the work folder: pass --work DIR"),
    ({"--data": None, "--prompts": "P"}, "--prompts without a built-in --data"),
    ({"--data": None, "--prompts": "P", "--extractor": "F", "--ref": "data"}, "--ref data compares with data"),
    ({"--prompt-key": "text"}, "--prompt-key goes with --prompts FILE"),
    ({"--features": "F", "--extractor": "F"}, "give either --features DIR or --extractor SPEC"),
    ({"--work": "T"}, "--work"),
])
def test_eval_flags_bad_input(tmp_path, capsys, change, msg):
    teacher = make_tiny_teacher(tmp_path / "t")
    # enough prompts for a held-out split that covers --num 10 (the split check would speak first otherwise)
    (tmp_path / "p.txt").write_text("".join(f"a red circle number {i}\n" for i in range(1000)))
    subs = {"P": str(tmp_path / "p.txt"), "F": str(ROOT / "models" / "features-shapes"), "T": str(teacher)}
    args = {"--model": str(teacher), "--data": "shapes", "--num": "10", **change}
    argv = ["eval", "--no-progress"]
    for f, v in args.items():
        argv += [f] if v is True else [] if v is None else [f, subs.get(v, v)]
    rc, err = _code(argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_auto_is_cpu_here_and_cuda_is_refused():
    assert E.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device is available here"):
        E.resolve_device("cuda:0")


def test_folder_dataset_prompts_and_reference(tmp_path, monkeypatch):
    """--data FOLDER: captions drawn without copying images, the ref split embedded from the folder's own images
    (the numbers of the in-memory protocol on the same images)."""
    import numpy as np
    from PIL import Image

    monkeypatch.setattr(E, "DIVERSITY_PROMPTS", 1)
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(14):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo number {i}"}))
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    folder, gen = _teacher_2step(tmp_path)
    feats = ROOT / "models" / "features-shapes"
    got = E.evaluate(gen, str(d), num=NUM, seed=1, extractor=str(feats), batch_size=BS, device="cpu",
                     progress=False)
    ds = get_dataset(str(d), 32)
    ex = ds.sample(NUM, seed=1, split="test")
    text, noise = gen.encode(ex.captions), gen.noise(NUM, E.NOISE_OFFSET + 1)
    fake = torch.cat([gen.generate(text[s], noise[s]).x0 for s in E.batch_slices(NUM, BS)])
    want = DistributionMetrics(load_feature_net(feats), ds.sample(NUM, seed=1, split="ref").images, seed=1)(fake)
    assert (got["fd"], got["kid"], got["alignment"], got["data"]) == (want["fd"], want["kid_mean"], None, str(d))
    assert got["extractor"]["kind"] == "feature-net"
