"""Checks the memory estimate of `twostep distill --dry-run` (twostep.train.memory) against measured peaks.

    .venv/bin/python benchmarks/memory_model.py [--only NAME ...] [--docs]     # measure, write results (+ docs)
    .venv/bin/python benchmarks/memory_model.py --probe                       # re-measure the ACT_BLOCK constants
    .venv/bin/python benchmarks/memory_model.py --docs-only                   # docs/sizing.md from the results
    .venv/bin/python benchmarks/memory_model.py --reestimate [--docs]         # new estimates, same measurements

Each configuration runs the real loop (`twostep.train.distill`, 2 updates, no warm-up, grid or eval) on a randomly
initialised Z-Image teacher of its size and a 4-row teacher cache, in its own fresh process, after a 1-update
warm-up run of a tiny model in the same process (so library start-up is not counted). Measured on the CPU:

    measured = peak RSS during training − RSS before `distill` was called

the peak being the kernel's high-water mark (VmHWM), reset after the teacher is read from disk (so the file read's
transient copy is not counted; on a GPU the read happens in host memory) and taken when the loop reaches its final
checkpoint (so the checkpoint's host copies are not counted either; on a GPU they are host memory). glibc is told
to return freed blocks (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), so RSS follows live tensors. The estimate
is `estimate(cfg, teacher_config, 1, device="cpu")`: the same function the dry-run prints, for the CPU (fp32
frozen weights unless the config says bf16; no CUDA reserve, no foreach AdamW temporaries).

Writes benchmarks/results/memory_model.json: per configuration the measured and estimated bytes, their ratio, the
estimate's parts and phases. Target: every ratio within 1 ± 0.2. `--docs` (or `--docs-only`) regenerates the
generated sections of docs/sizing.md (between the `<!-- memory_model:... -->` markers) from the results and from
the estimate at the real 6B configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory_model.json"
DOCS = ROOT / "docs" / "sizing.md"
MiB = 2 ** 20
GiB = 2 ** 30

# model sizes: Z-Image block structure (2 refiner blocks per stream, as the 6B model), smaller widths
SIZES = {
    "S": dict(dim=256, n_layers=4, n_heads=2),
    "M": dict(dim=512, n_layers=8, n_heads=4),
    "L": dict(dim=768, n_layers=8, n_heads=6),
}
BASE = ["train.updates=2", "train.d_warmup=0", "train.grid_every=0", "train.checkpoint_every=0",
        "train.log_every=1", "disc.blocks=[1, 2, 3]"]
# name: (size, sample side, config overrides)
CONFIGS = {
    "S-full": ("S", 32, ["student.decoupling=full"]),
    "S-lora": ("S", 32, ["student.decoupling=lora"]),
    "M-full": ("M", 32, ["student.decoupling=full"]),
    "M-lora": ("M", 32, ["student.decoupling=lora"]),
    "L-full": ("L", 32, ["student.decoupling=full"]),
    "L-lora": ("L", 32, ["student.decoupling=lora"]),
    "S-full-1024tok": ("S", 64, ["student.decoupling=full"]),
    "S-lora-1024tok": ("S", 64, ["student.decoupling=lora"]),
    "M-shared": ("M", 32, ["student.decoupling=shared"]),
    "M-full-ckpt": ("M", 32, ["student.decoupling=full", "train.grad_checkpointing=true"]),
    "M-lora-ckpt": ("M", 32, ["student.decoupling=lora", "train.grad_checkpointing=true"]),
    "M-full-bf16": ("M", 32, ["student.decoupling=full", "train.mixed_precision=bf16"]),
    "M-lora-bf16-frozenbf16": ("M", 32, ["student.decoupling=lora", "train.mixed_precision=bf16",
                                         "train.frozen_dtype=bf16"]),
    "M-full-accum2": ("M", 32, ["student.decoupling=full", "train.grad_accum=2"]),
    # 2 CPU processes (torchrun, gloo), FSDP2: each rank's own peak against estimate(..., world_size=2)
    "M-full-fsdp2": ("M", 32, ["student.decoupling=full", "train.fsdp=true"]),
}
PROCESSES = {"M-full-fsdp2": 2}
BATCH = 2


def teacher_config(size: str, side: int) -> dict:
    from twostep import flow
    from twostep.backbones.zimage import tiny_zimage_config

    tcfg = tiny_zimage_config(in_channels=3, patch_size=2, n_refiner_layers=2, cap_feat_dim=384, **SIZES[size])
    return {"kind": "teacher", "backbone": "zimage", "transformer": tcfg, "resolution": side,
            "text_encoder": "all-MiniLM-L6-v2", "data": "shapes", "data_version": None,
            "sampling": {"steps": 2, "shift": flow.DEFAULT_SHIFT, "guidance": 0.0}}


def make_inputs(root: Path, size: str, side: int) -> tuple[Path, Path]:
    """A random teacher folder of `size` at `side` and a 4-row teacher cache of shapes captions."""
    from twostep.backbones.zimage import ZImageBackbone
    from twostep.data.shapes import VERSION
    from twostep.io.folders import save_model_folder
    from twostep.teacher.cache import build_cache

    teacher, cache = root / f"teacher-{size}-{side}", root / f"cache-{size}-{side}"
    if not (teacher / "config.json").exists():
        cfg = {**teacher_config(size, side), "data_version": VERSION}
        save_model_folder(ZImageBackbone.from_config(cfg["transformer"]).transformer.state_dict(), cfg, teacher)
    if not (cache / "manifest.json").exists():
        build_cache(teacher, "shapes", 4, cache, shard_size=4, batch_size=4, progress=False)
    return teacher, cache


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:   # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def caption_tokens(cache_dir: Path) -> int:
    from twostep.teacher.cache import load_cache

    c = load_cache(cache_dir)
    return max(int(t.shape[0]) for t in c.text_rows(list(range(len(c)))))


def measure(name: str, root: Path) -> dict:
    """One configuration in this (fresh) process: warm-up run, then the measured run."""
    import torch

    torch.set_num_threads(1)
    import twostep.train.loop as loop
    from twostep.io.folders import read_config
    from twostep.methods import load_config
    from twostep.train import distill
    from twostep.train.memory import estimate

    size, side, sets = CONFIGS[name]
    world = PROCESSES.get(name, 1)
    rank = int(os.environ.get("RANK", "0"))
    wt, wc = make_inputs(root, "S", 16)      # warm-up: every library and kernel the loop touches, once
    warm = [x for x in sets[1:] if not x.startswith("train.fsdp")]
    distill(load_config(None, BASE + ["train.updates=1", "student.decoupling=lora"] + warm), wt, wc,
            root / f"warm-{name}", progress=False)
    teacher, cache = make_inputs(root, size, side)
    cfg = load_config(None, BASE + [f"train.batch_size={BATCH}"] + sets)
    marks: dict = {}
    orig_load, orig_ck = loop.load_inputs, loop.checkpoint

    def load_inputs(*a, **k):
        out = orig_load(*a, **k)
        gc.collect()
        _reset_peak()
        marks["after_load"] = _status("VmRSS")
        return out

    def checkpoint(*a, **k):
        if "peak" not in marks:
            marks["peak"] = _status("VmHWM")
        return orig_ck(*a, **k)

    loop.load_inputs, loop.checkpoint = load_inputs, checkpoint
    gc.collect()
    base = _status("VmRSS")
    t0 = time.time()
    distill(cfg, teacher, cache, root / f"run-{name}", progress=False)
    secs = time.time() - t0
    est = estimate(cfg, read_config(teacher), world, device="cpu", caption_tokens=caption_tokens(cache))
    measured = marks["peak"] - base
    return {"name": name, "size": size, "model": SIZES[size], "sample_side": side, "batch": BATCH, "sets": sets,
            "measured_bytes": measured, "estimated_bytes": est["peak"], "ratio": round(measured / est["peak"], 3),
            "rss_before_mb": round(base / MiB, 1), "rss_after_teacher_load_mb": round(marks["after_load"] / MiB, 1),
            "peak_rss_mb": round(marks["peak"] / MiB, 1), "seconds": round(secs, 1), "processes": world,
            "rank": rank, "estimate": est}


def reestimate(r: dict) -> None:
    """A record's estimate and ratio recomputed (same configuration, same caption length), in place."""
    from twostep.methods import load_config
    from twostep.train.memory import estimate

    cfg = load_config(None, BASE + [f"train.batch_size={r['batch']}"] + r["sets"])
    est = estimate(cfg, teacher_config(r["size"], r["sample_side"]), r.get("processes", 1), device="cpu",
                   caption_tokens=r["estimate"]["settings"]["caption_tokens"])
    r.update(estimate=est, estimated_bytes=est["peak"], ratio=round(r["measured_bytes"] / est["peak"], 3))


def run_all(names: list[str]) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="memory_model-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}
    recs = []
    for name in names:
        t0 = time.time()
        n = PROCESSES.get(name, 1)
        if n > 1:  # the inputs first (the ranks would race to build them), then torchrun
            size, side, _ = CONFIGS[name]
            subprocess.run([sys.executable, __file__, "--prepare", size, str(side), "--root", str(root)], cwd=ROOT,
                           env=env, check=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, "--one", name, "--root", str(root)]
            env_n = {**env, "ACCELERATE_USE_CPU": "1"}
        else:
            cmd, env_n = [sys.executable, __file__, "--one", name, "--root", str(root)], env
        p = subprocess.run(cmd, cwd=ROOT, env=env_n, capture_output=True, text=True)
        lines = [json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or len(lines) != n:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-5000:])
            raise SystemExit(f"{name} failed (exit {p.returncode})")
        r = max(lines, key=lambda x: x["measured_bytes"])   # the rank with the higher peak
        r["measured_bytes_per_rank"] = [x["measured_bytes"] for x in sorted(lines, key=lambda x: x["rank"])]
        r["wall_s"] = round(time.time() - t0, 1)
        recs.append(r)
        print(f"{name:24s} measured {r['measured_bytes'] / MiB:8.1f} MiB  estimated {r['estimated_bytes'] / MiB:8.1f}"
              f" MiB  ratio {r['ratio']:.2f}  ({r['estimate']['peak_phase']}; {r['wall_s']} s)", flush=True)
    return recs


# -- the probe: bytes per token per unit of width kept by one block ----------------------------------------------

def probe() -> dict:
    """ACT_BLOCK / ACT_CKPT re-measured: saved-tensor bytes of one transformer pass at 4 and 8 blocks (same tokens),
    per added block, per token, per unit of width; weight casts (autocast over fp32 weights) are subtracted."""
    import torch

    from twostep.backbones.zimage import ZImageBackbone, tiny_zimage_config
    from twostep.student import TwoStepStudent

    torch.set_num_threads(1)

    def saved(kind, mode, layers, ckpt, dim=256, heads=2, side=32):
        cfg = tiny_zimage_config(in_channels=16, dim=dim, n_layers=layers, n_heads=heads, n_refiner_layers=1,
                                 cap_feat_dim=64, patch_size=2)
        bb = ZImageBackbone.from_config(cfg).to(torch.bfloat16 if mode == "bf16" else torch.float32)
        bb.requires_grad_(kind == "trainable")
        net = bb
        if kind == "lora":
            net = TwoStepStudent(bb, "lora", lora_targets=["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
                                 ).step_backbone(1)
        if ckpt:
            net.transformer.enable_gradient_checkpointing()
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        seen: dict = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t
        x = torch.randn(1, 16, side, side, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            net.denoise(x, torch.ones(1), [torch.randn(32, 64)])
        block = sum(p.numel() for p in bb.transformer.layers[0].parameters())
        return sum(seen.values()), block

    out = {}
    tokens, dim = (32 // 2) ** 2 + 32, 256
    for kind in ("trainable", "lora", "frozen"):
        for mode in ("fp32", "autocast", "bf16"):
            for ckpt in (False, True):
                a, blk = saved(kind, mode, 4, ckpt)
                b, _ = saved(kind, mode, 8, ckpt)
                per = (b - a) / 4
                if mode == "autocast" and not ckpt and kind != "lora" or (mode == "autocast" and kind == "lora"
                                                                          and not ckpt):
                    per -= 2 * blk     # the block's bf16 weight casts, counted apart by the estimate
                out[f"{kind}/{mode}/{'ckpt' if ckpt else 'full'}"] = round(per / tokens / dim, 1)
    return out


# -- docs/sizing.md ------------------------------------------------------------------------------------------------

ZIMAGE_TURBO = {  # Z-Image-Turbo's transformer/config.json (= diffusers' defaults but axes_lens) at 1024²
    "transformer": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                        n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                        rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
    "resolution": 128, "image_resolution": 1024, "pipeline": "Z-Image-Turbo",
    "text_encoder": {"max_sequence_length": 512}}
PRESETS = [("configs/zimage-turbo-lora-1gpu.yaml", 1), ("configs/zimage-turbo-full-fsdp8.yaml", 8)]


def _g(b) -> str:
    return f"{b / GiB:,.1f}"


def six_b_table() -> str:
    from twostep.methods import load_config
    from twostep.train.memory import estimate, host_and_disk, transformer_counts

    rows = [("lora, 1 GPU, checkpointing, bf16, 4/GPU", "student.decoupling=lora", 1, 4, True),
            ("lora, 1 GPU, checkpointing, bf16, 1/GPU", "student.decoupling=lora", 1, 1, True),
            ("lora, 1 GPU, no checkpointing, bf16, 1/GPU", "student.decoupling=lora", 1, 1, False),
            ("full, FSDP×8, checkpointing, bf16, 1/GPU", "student.decoupling=full", 8, 8, True),
            ("full, FSDP×8, checkpointing, bf16, 2/GPU", "student.decoupling=full", 8, 16, True),
            ("shared, FSDP×8, checkpointing, bf16, 2/GPU", "student.decoupling=shared", 8, 16, True),
            ("full, 1 GPU (no FSDP), checkpointing, bf16, 1/GPU", "student.decoupling=full", 1, 1, True)]
    counts = {}
    L = ["| configuration (1024², 512 caption tokens, Turbo++ defaults otherwise) | weights + optimizer + EMA | "
         "peak phase | peak | + reserve | total | fits 80 GB | host RAM / process (checkpoint writer) | "
         "disk / run folder |", "|---|---:|---|---:|---:|---:|---|---:|---:|"]
    for label, dec, ws, batch, ck in rows:
        sets = [dec, "train.mixed_precision=bf16", f"train.batch_size={batch}",
                f"train.grad_checkpointing={'true' if ck else 'false'}", f"train.fsdp={'true' if ws > 1 else 'false'}"]
        cfg = load_config(None, sets)
        key = (cfg.student.lora_rank, tuple(cfg.student.lora_targets))
        if key not in counts:
            counts[key] = transformer_counts(ZIMAGE_TURBO["transformer"], cfg.student.lora_rank,
                                             cfg.student.lora_targets, cfg.disc.blocks)
        e = estimate(cfg, ZIMAGE_TURBO, ws, counts=counts[key])
        static = sum(v for k, v in e["parts"].items() if not k.startswith(("activations", "student gradients",
                                                                            "autocast", "FSDP", "AdamW foreach",
                                                                            "critic update")))
        hd = host_and_disk(cfg, ZIMAGE_TURBO, ws)
        L.append(f"| {label} | {_g(static)} | {e['peak_phase']} | {_g(e['peak'])} | {_g(e['reserve'])} | "
                 f"**{_g(e['total'])}** | {'yes' if e['total'] <= 80 * GiB else 'no'} | {_g(hd['host_process'])} "
                 f"({_g(hd['host_writer'])}) | {_g(hd['disk_run'])} |")
    return "\n".join(L)


def preset_blocks() -> str:
    from twostep.methods import load_config
    from twostep.train.memory import estimate, format_estimate

    out = []
    for path, ws in PRESETS:
        if not (ROOT / path).exists():
            continue
        cfg = load_config(ROOT / path, [])
        e = estimate(cfg, ZIMAGE_TURBO, ws)
        out += [f"`twostep distill --dry-run --config {path} --world-size {ws} --gpu-memory 80` (teacher: a "
                "Z-Image-Turbo folder):", "", "```", format_estimate(e, 80), "```", ""]
    return "\n".join(out)


def checkpoint_block() -> str:
    """Checkpoint sizes per decoupling at 6B, from the code that writes them (twostep.train.state)."""
    try:
        from twostep.train.state import checkpoint_bytes
    except ImportError:
        return "(twostep.train.state.checkpoint_bytes is not there: no checkpoint sizes.)"
    from twostep.methods import load_config

    L = ["| decoupling | one checkpoint (GiB) | once per run folder (GiB) | previous layout: checkpoint + model files (GiB) |",
         "|---|---:|---:|---:|"]
    for dec in ("full", "shared", "lora"):
        b = checkpoint_bytes(load_config(None, [f"student.decoupling={dec}", "train.frozen_dtype=bf16"]),
                             ZIMAGE_TURBO["transformer"])
        L.append(f"| {dec} | {_g(b['total'])} | {_g(b.get('run_folder_once', 0))} | "
                 f"{_g(b.get('previous_layout_total', 0))} |")
    return "\n".join(L)


def results_table(recs: list[dict]) -> str:
    L = ["| configuration | model (width × blocks) | tokens | settings | measured MiB | estimated MiB | "
         "measured / estimated | peak phase |", "|---|---|---:|---|---:|---:|---:|---|"]
    for r in recs:
        m = r["model"]
        s = r["estimate"]["settings"]
        L.append(f"| {r['name']} | {m['dim']} × {m['n_layers']}+2+2 | {s['image_tokens']}+{s['caption_tokens']} | "
                 f"{', '.join(x.split('=', 1)[0].split('.')[-1] + '=' + x.split('=', 1)[1] for x in r['sets'])} | "
                 f"{r['measured_bytes'] / MiB:,.0f} | {r['estimated_bytes'] / MiB:,.0f} | **{r['ratio']:.2f}** | "
                 f"{r['estimate']['peak_phase']} |")
    ratios = [r["ratio"] for r in recs]
    L += ["", f"Ratios {min(ratios):.2f} – {max(ratios):.2f} over {len(recs)} configurations "
              f"({'all' if all(0.8 <= x <= 1.2 for x in ratios) else 'NOT all'} within the ±20 % target)."]
    return "\n".join(L)


def write_docs(recs: list[dict], note: str):
    text = DOCS.read_text()
    blocks = {"measured": results_table(recs) + "\n\n" + note, "six_b": six_b_table(), "presets": preset_blocks(),
              "checkpoints": checkpoint_block()}
    for key, body in blocks.items():
        a, b = f"<!-- memory_model:{key} -->", f"<!-- /memory_model:{key} -->"
        if a not in text:
            continue
        head, rest = text.split(a, 1)
        _, tail = rest.split(b, 1)
        text = f"{head}{a}\n{body}\n{b}{tail}"
    DOCS.write_text(text)
    print(f"wrote {DOCS}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), help="measure these configurations only (merged "
                    "into the existing results)")
    ap.add_argument("--docs", action="store_true", help="also regenerate docs/sizing.md's generated sections")
    ap.add_argument("--docs-only", action="store_true", help="regenerate docs/sizing.md from the committed results")
    ap.add_argument("--probe", action="store_true", help="re-measure the per-block activation constants")
    ap.add_argument("--reestimate", action="store_true", help="recompute the committed records' estimates with "
                    "the current twostep.train.memory (the measurements are kept)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(measure(a.one, a.root)), flush=True)
        return 0
    if a.prepare:
        make_inputs(a.root, a.prepare[0], int(a.prepare[1]))
        make_inputs(a.root, "S", 16)
        return 0
    if a.probe:
        from twostep.train.memory import ACT_BLOCK, ACT_CKPT

        got = probe()
        for k, v in got.items():
            kind, mode, ck = k.split("/")
            have = ACT_CKPT[mode] if ck == "ckpt" else ACT_BLOCK[(kind, mode)]
            print(f"{k:28s} measured {v:6.1f}  in twostep.train.memory {have:6.1f}")
        return 0
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"records": [], "note": ""}
    if a.reestimate:
        for r in data["records"]:
            reestimate(r)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print("\n".join(f"{r['name']:24s} ratio {r['ratio']:.2f} ({r['estimate']['peak_phase']})"
                        for r in data["records"]))
    if not a.docs_only and not a.reestimate:
        recs = run_all(a.only or list(CONFIGS))
        keep = {r["name"]: r for r in data["records"]} if a.only else {}
        keep.update({r["name"]: r for r in recs})
        import torch

        load = os.getloadavg()[0]
        data = {"records": [keep[n] for n in CONFIGS if n in keep],
                "note": f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}, "
                        f"torch {torch.__version__}), OMP_NUM_THREADS=1, batch {BATCH}, 1-min load average {load:.1f} "
                        "(other jobs shared the machine: seconds are not comparable; RSS peaks are per process)."}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {RESULTS}")
    if a.docs or a.docs_only:
        write_docs(data["records"], data["note"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
