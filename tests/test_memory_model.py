"""twostep.train.memory: the per-device estimate behind `distill --dry-run` / `--gpu-memory` (docs/sizing.md)."""

import json
import sys
from pathlib import Path

import pytest

from twostep.cli import main
from twostep.methods import load_config
from twostep.train.memory import GiB, check_fits, estimate, method_counts
from twostep.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from memory_model import ZIMAGE_TURBO  # noqa: E402

PRESETS = [("configs/zimage-turbo-lora-1gpu.yaml", 1), ("configs/zimage-turbo-full-fsdp8.yaml", 8)]


@pytest.fixture(scope="module")
def counts():
    from twostep.train.memory import transformer_counts

    cfg = load_config(None, [])
    return transformer_counts(ZIMAGE_TURBO["transformer"], cfg.student.lora_rank, cfg.student.lora_targets,
                              cfg.disc.blocks)


def test_six_b_counts_are_exact(counts):
    assert counts["P"] == 6_154_908_736 and counts["block"] == 180_910_336
    assert counts["lora_per_adapter"] == 39_690_240


@pytest.mark.parametrize("path,world", PRESETS)
def test_presets_fit_80gb(path, world, counts):
    cfg = load_config(ROOT / path, [])
    e = estimate(cfg, ZIMAGE_TURBO, world, counts=counts)
    assert e["total"] <= 80 * GiB, e
    check_fits(e, 80)  # no error
    assert cfg.train.grad_checkpointing and cfg.train.mixed_precision == "bf16" and cfg.train.frozen_dtype == "bf16"


def test_defaults_do_not_fit_and_the_error_names_the_fix(counts):
    e = estimate(load_config(None, []), ZIMAGE_TURBO, 1, counts=counts)
    with pytest.raises(UserError, match="does not fit --gpu-memory 80; use --set train.grad_checkpointing=true"):
        check_fits(e, 80)


def test_what_each_setting_changes(counts):
    def est(*sets, world=1, **kw):
        return estimate(load_config(None, list(sets)), ZIMAGE_TURBO, world, counts=counts, **kw)
    P = counts["P"]
    lora = est("student.decoupling=lora", "train.mixed_precision=bf16", "train.grad_checkpointing=true",
               "train.batch_size=1")
    assert lora["parts"]["teacher weights (frozen, bf16)"] == 2 * P           # the lora base IS the teacher
    assert lora["counts"]["student_trainable"] == 2 * counts["lora_per_adapter"]
    fp32 = est("student.decoupling=lora", "train.frozen_dtype=fp32", "train.batch_size=1",
               "train.grad_checkpointing=true")
    assert fp32["parts"]["teacher weights (frozen, fp32)"] == 4 * P
    cpu = est("student.decoupling=lora", "train.batch_size=1", device="cpu")       # auto = fp32 on the CPU
    assert "teacher weights (frozen, fp32)" in cpu["parts"] and cpu["reserve"] == 0
    full1 = est("train.fsdp=true", "train.mixed_precision=bf16", "train.grad_checkpointing=true",
                "train.batch_size=8", world=1)
    full8 = est("train.fsdp=true", "train.mixed_precision=bf16", "train.grad_checkpointing=true",
                "train.batch_size=8", world=8)
    assert full8["settings"]["fsdp"] and not full1["settings"]["fsdp"] and full8["settings"]["micro_batch"] == 1
    assert full8["parts"]["student AdamW m + v (fp32)"] == pytest.approx(8 * 2 * P / 8, rel=1e-6)
    ck = est("student.decoupling=lora", "train.batch_size=1", "train.mixed_precision=bf16")
    assert ck["peak"] > 2 * lora["peak"]                                       # checkpointing matters at 1024²
    # gradient accumulation: the same micro-batch; grad_accum = 1 frees the previous update's gradients before the
    # forward, > 1 keeps the earlier micro-batches' through the later forwards (shared: 4 bytes × P of them)
    a1 = est("train.batch_size=4", "train.grad_checkpointing=true", "train.mixed_precision=bf16",
             "student.decoupling=shared")
    a4 = est("train.batch_size=4", "train.grad_accum=4", "train.grad_checkpointing=true",
             "train.mixed_precision=bf16", "student.decoupling=shared")
    assert a4["settings"]["micro_batch"] == a1["settings"]["micro_batch"] == 4
    fwd = "student forward end"
    assert a4["phases"][fwd] - a1["phases"][fwd] == pytest.approx(4 * P, rel=1e-6)
    assert {k: v for k, v in a4["phases"].items() if k != fwd} == {k: v for k, v in a1["phases"].items() if k != fwd}
    b8 = est("train.batch_size=8", "train.grad_checkpointing=true", "train.mixed_precision=bf16",
             "student.decoupling=shared")
    assert b8["peak"] > a4["peak"]                  # the same global batch in one micro-batch costs more
    # step1_loss=adv (the default) runs a second discriminator pass with a gradient
    traj = est("loss.step1_loss=traj", "train.batch_size=1")
    assert traj["settings"]["discriminator_passes"] == 1 and lora["settings"]["discriminator_passes"] == 2


def test_measured_ratios_committed_within_target():
    data = json.loads((ROOT / "benchmarks" / "results" / "memory_model.json").read_text())
    recs = data["records"]
    sizes = {r["size"] for r in recs}
    decs = {s.split("=")[1] for r in recs for s in r["sets"] if s.startswith("student.decoupling")}
    assert len(sizes) >= 3 and {"full", "lora"} <= decs
    assert all(0.8 <= r["ratio"] <= 1.2 for r in recs), [(r["name"], r["ratio"]) for r in recs]


def _pipeline_folder_of_configs(root):
    """A ZImagePipeline folder at the real 6B config with placeholder weight files: the dry-run reads JSON only."""
    import json as j

    for sub in ("transformer", "text_encoder", "vae", "tokenizer", "scheduler"):
        (root / sub).mkdir(parents=True)
    for sub in ("transformer", "text_encoder", "vae"):
        (root / sub / "model.safetensors").write_bytes(b"")
    (root / "model_index.json").write_text(j.dumps({
        "_class_name": "ZImagePipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    (root / "transformer" / "config.json").write_text(j.dumps(ZIMAGE_TURBO["transformer"]))
    (root / "text_encoder" / "config.json").write_text(j.dumps({"hidden_size": 2560}))
    (root / "vae" / "config.json").write_text(j.dumps({"block_out_channels": [128, 256, 512, 512],
                                                       "latent_channels": 16, "sample_size": 1024}))
    (root / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (root / "scheduler" / "scheduler_config.json").write_text(j.dumps({"shift": 3.0}))
    return root


def test_dry_run_of_the_presets_on_a_6b_folder_without_weights(tmp_path, capsys):
    folder = _pipeline_folder_of_configs(tmp_path / "Z-Image-Turbo")
    for path, world in PRESETS:
        rc = main(["distill", "--dry-run", "--teacher", str(folder), "--config", str(ROOT / path),
                   "--world-size", str(world), "--gpu-memory", "80"])
        out = capsys.readouterr().out
        assert rc == 0 and "# fits 80 GB: yes" in out and "# parameters: teacher 6,154,908,736 (frozen)" in out
    rc = main(["distill", "--dry-run", "--teacher", str(folder), "--gpu-memory", "80"])
    cap = capsys.readouterr()
    assert rc == 2 and "# fits 80 GB: NO" in cap.out
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the estimated peak of") and "grad_checkpointing" in err[0]


def test_gpu_memory_refuses_a_run_before_any_work(tmp_path, capsys):
    folder = _pipeline_folder_of_configs(tmp_path / "Z-Image-Turbo")
    out = tmp_path / "run"
    rc = main(["distill", "--teacher", str(folder), "--cache", str(tmp_path / "no-cache"), "--out", str(out),
               "--gpu-memory", "80"])  # the estimate reads the cache's caption lengths: a missing cache is named
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--cache" in err and "not a teacher cache" in err and not out.exists()
    rc = main(["distill", "--dry-run", "--teacher", str(folder), "--gpu-memory", "80"])
    assert rc == 2 and "does not fit --gpu-memory 80" in capsys.readouterr().err and not out.exists()
    rc = main(["distill", "--teacher", str(folder), "--out", str(out)])
    assert rc == 2 and "distill needs --cache CACHE and --out RUN" in capsys.readouterr().err


def test_method_counts_match_the_loaded_model(tiny_teacher):
    from twostep.io.folders import read_config
    from twostep.train import parameter_counts

    cfg = load_config(None, ["disc.blocks=[0]", "student.decoupling=lora"])
    assert method_counts(cfg, read_config(tiny_teacher)) == parameter_counts(cfg, tiny_teacher)


def test_dry_run_from_the_config_files_alone(tmp_path, capsys):
    """`distill --dry-run` on a ZImagePipeline folder holding only its JSON files (no weights downloaded yet):
    GPU memory, host RAM per process, disk per run folder and a FLOP-based wall time marked as an estimate. Without
    --dry-run the missing weights are one line that names them (not a .bin conversion that does not apply)."""
    folder = _pipeline_folder_of_configs(tmp_path / "Z-Image-Turbo")
    for f in folder.glob("*/model.safetensors"):
        f.unlink()
    rc = main(["distill", "--dry-run", "--teacher", str(folder), "--config", str(ROOT / PRESETS[0][0]),
               "--world-size", str(PRESETS[0][1])])
    out = capsys.readouterr().out
    assert rc == 0 and "# parameters: teacher 6,154,908,736 (frozen)" in out
    host = next(ln for ln in out.splitlines() if ln.startswith("# host RAM per process (estimate):"))
    assert "11.5 GiB" in host   # the frozen bf16 teacher read on the host
    assert any(ln.startswith("# disk per run folder (estimate):") for ln in out.splitlines())
    assert any(ln.startswith("# wall time (ESTIMATE from FLOPs, uncalibrated):") for ln in out.splitlines())
    rc = main(["distill", "--teacher", str(folder), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no weight files (*.safetensors)" in err[0] and ".bin" not in err[0], err
    for d in (p for p in folder.iterdir() if p.is_dir()):  # every component holds only a .bin (pickle) file
        (d / "pytorch_model.bin").write_bytes(b"")
    rc = main(["distill", "--teacher", str(folder), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r")])
    assert rc == 2 and "only .bin (pickle) files" in capsys.readouterr().err


def test_host_disk_and_wall_time_scale_as_documented():
    from twostep.methods import load_config
    from twostep.train import memory

    lora = load_config(None, ["student.decoupling=lora", "train.mixed_precision=bf16"])
    full = load_config(None, ["student.decoupling=full", "train.mixed_precision=bf16", "train.fsdp=true"])
    a, b = memory.host_and_disk(lora, ZIMAGE_TURBO, 1), memory.host_and_disk(full, ZIMAGE_TURBO, 8)
    assert a["teacher_host"] == b["teacher_host"] == 6_154_908_736 * 2   # bf16 on the host, every process
    assert b["checkpoint"] > 20 * a["checkpoint"]     # full students: fp32 masters, EMA and AdamW moments
    assert b["host_writer"] - b["host_process"] == pytest.approx(b["checkpoint"] / 8)   # DCP: each rank its shard
    t1, t8 = memory.wall_time(full, ZIMAGE_TURBO, 1), memory.wall_time(full, ZIMAGE_TURBO, 8)
    assert t1["seconds_per_update"] == pytest.approx(8 * t8["seconds_per_update"])
    assert memory.update_flops(lora, ZIMAGE_TURBO) < memory.update_flops(full, ZIMAGE_TURBO)
