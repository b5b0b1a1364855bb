"""Per-device memory of `twostep distill`, estimated before any weight is loaded (`distill --dry-run`).

`estimate(cfg, teacher_config, world_size)` counts the parameters of the teacher's transformer on the meta device
(exact), then adds what one Turbo++ update holds at its peak, part by part, in bytes per device:

- weights: the frozen teacher in `train.frozen_dtype`; the student's trainable weights (fp32 master; `full` = two
  transformers, `shared` = one, `lora` = two adapters on the teacher's own frozen weights, shared, never copied);
  the EMA of the trainable weights; AdamW m and v (fp32); the discriminator heads with their gradients and AdamW
  state. Under FSDP (`train.fsdp`, 2+ processes, full/shared) the student's weights, gradients, moments and EMA are
  sharded over the processes, plus the gathered units (2 blocks in bf16 + 1 block's gradients in fp32);
- gradients of the trainable weights (fp32), alive from the student's backward until the next student update frees
  them before its forward (train/steps.py), so through the critic update;
- autocast's bf16 copies of fp32 weights (`train.mixed_precision=bf16` without FSDP: cached for the trainable
  weights; saved for backward for frozen fp32 weights on a gradient path when blocks are not checkpointed);
- activations kept for backward by the student's two end-to-end passes and every discriminator pass with a
  gradient (one on x̂0₂; one more on x̂0₁ when `loss.step1_loss=adv`, the default; the perceptual distances add
  theirs), for the per-device micro-batch `batch_size / world_size` (`train.grad_accum` micro-batches per update,
  each back-propagated before the next: the gradients of the earlier ones stay while the next one runs);
- the optimizer step's temporaries (`train.adamw=foreach` on CUDA: torch's foreach AdamW allocates sqrt(v) for all
  parameters at once; the default there, fused, none).

The update has phases (critic update, student forward, backward, AdamW step); the peak is the largest of them
(`phases`). Activation sizes use bytes per token per unit of model width per transformer block measured with
autograd's saved-tensor hooks on diffusers' ZImageTransformerBlock (`ACT_BLOCK`, `benchmarks/memory_model.py
--probe`); the whole estimate is checked against measured peaks at several model sizes and decouplings in
`benchmarks/results/memory_model.json` (docs/sizing.md). Only what torch allocates is estimated; on CUDA the fit test
adds `RESERVE` for the CUDA context and the caching allocator's fragmentation (an assumption, not measured here).
"""

from __future__ import annotations

import math

import torch

from ..backbones.zimage import ZImageBackbone
from ..discriminator import GridHead, PooledHead
from ..errors import UserError
from ..methods import build_method
from ..teacher.cache import load_cache
from .state import fused_adamw

GiB = 2 ** 30
SEQ_MULTI_OF = 32            # diffusers' Z-Image pads image and caption token sequences to a multiple of 32
MAX_CAPTION_TOKENS = 512     # ZImagePipeline's max_sequence_length (a pipeline teacher's captions)
MINILM_CAPTION_TOKENS = 77   # twostep.text's MiniLM max_length (a pixel teacher's captions)

# Bytes kept for backward per token, per unit of model width, by one Z-Image transformer block (diffusers 0.42.1,
# torch SDPA with O(T) memory), measured with torch.autograd.graph.saved_tensors_hooks (benchmarks/memory_model.py
# --probe; the slope between 4 and 8 blocks, identical at width 256 and 512). Keys: (what the block's weights are,
# how it computes): "trainable" weights need their inputs for the weight gradients; "lora" = frozen weights with
# LoRA adapters on the 7 default targets; "frozen" = frozen weights on a gradient path (the teacher's
# discriminator pass). Compute: "fp32" (no autocast), "autocast" (bf16 autocast over fp32 weights; the weight casts
# are counted apart, see _casts), "bf16" (bf16 weights: a bf16 frozen teacher, FSDP's bf16 all-gathered params).
ACT_BLOCK = {
    ("trainable", "fp32"): 130.8, ("trainable", "autocast"): 113.5, ("trainable", "bf16"): 89.5,
    ("lora", "fp32"): 92.6, ("lora", "autocast"): 69.3, ("lora", "bf16"): 70.4,
    ("frozen", "fp32"): 72.2, ("frozen", "autocast"): 49.0, ("frozen", "bf16"): 60.2,
}
ACT_CKPT = {"fp32": 4.0, "autocast": 4.0, "bf16": 2.0}   # checkpointed block: its input (the residual stream)
ACT_PASS = 17.0   # per token per unit of width per pass outside the blocks (embedders, final layer, sequences)
RESERVE = (1 * GiB, 0.10)  # CUDA only: context + allocator fragmentation = 1 GiB + 10 % of the estimated peak


def resolved_dtypes(cfg, device: str = "cuda") -> dict:
    """The dtypes the loop uses: frozen weights (train.frozen_dtype; auto = bf16 on CUDA, fp32 on CPU), trainable
    weights (fp32 master weights), compute (bf16 under mixed_precision=bf16)."""
    t = cfg.train
    frozen = getattr(t, "frozen_dtype", "auto")
    if frozen == "auto":
        frozen = "bf16" if device == "cuda" else "fp32"
    return {"frozen": frozen, "trainable": "fp32", "compute": "bf16" if t.mixed_precision == "bf16" else "fp32"}


def _nbytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def transformer_counts(tcfg: dict, lora_rank: int = 16, lora_targets=(), disc_blocks=(1, 2, 3)) -> dict:
    """Exact parameter counts of a ZImageTransformer2DModel config (built on the meta device: no memory)."""
    from diffusers import ZImageTransformer2DModel  # heavy: only when an estimate is asked for

    with torch.device("meta"):
        m = ZImageTransformer2DModel(**tcfg)
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    P = count(m)
    lora = sum(lora_rank * (mod.in_features + mod.out_features) for n, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in lora_targets))
    last = max(disc_blocks) if disc_blocks else len(m.layers) - 1
    # features() stops after the last discriminator block: its gradient path is everything before, not the rest
    grad_path = P - sum(count(b) for b in m.layers[last + 1:]) - count(m.all_final_layer)
    return {"P": P, "block": count(m.layers[0]), "n_layers": len(m.layers), "n_refiner": len(m.noise_refiner),
            "lora_per_adapter": lora, "teacher_grad_path": grad_path, "dim": int(tcfg["dim"])}


def _pad(n: int) -> int:
    return -(-n // SEQ_MULTI_OF) * SEQ_MULTI_OF


def sample_tokens(teacher_config: dict) -> int:
    """Image tokens of one sample: (height / patch) × (width / patch) of the sample grid, padded to 32."""
    tr = teacher_config["transformer"]
    p = int(tr.get("all_patch_size", [2])[0])
    h = int(teacher_config.get("height", teacher_config["resolution"]))
    w = int(teacher_config.get("width", teacher_config["resolution"]))
    return _pad((h // p) * (w // p))


def default_caption_tokens(teacher_config: dict) -> int:
    """The longest caption a teacher's text encoder gives (the estimate assumes every caption is that long)."""
    if teacher_config.get("pipeline"):
        return int((teacher_config.get("text_encoder") or {}).get("max_sequence_length", MAX_CAPTION_TOKENS))
    return MINILM_CAPTION_TOKENS


def _disc_passes(cfg) -> int:
    """Discriminator passes of the student update that carry a gradient (each keeps the teacher's activations up to
    the last disc block): x̂0₂'s adversarial loss, x̂0₁'s (step1_loss=adv), and a perceptual distance's first
    argument (traj_distance / paired_distance = perceptual)."""
    loss = getattr(cfg, "loss", None)
    if loss is None:
        return 1
    n = 1 + (loss.step1_loss == "adv")
    n += loss.step1_loss == "traj" and loss.traj_distance == "perceptual"
    n += loss.paired_weight > 0 and loss.paired_distance == "perceptual"
    return n


def heads_params(cfg, dim: int, text_dim: int) -> int:
    """Parameters of the discriminator heads (twostep.discriminator.GridHead / PooledHead), counted on meta."""
    d = cfg.disc
    Head = GridHead if d.head == "grid" else PooledHead
    with torch.device("meta"):
        h = Head(dim, d.hidden, text_dim, d.text_cond)
    return len(d.blocks) * sum(p.numel() for p in h.parameters())


def estimate(cfg, teacher_config: dict, world_size: int = 1, *, device: str = "cuda",
             caption_tokens: int | None = None, counts: dict | None = None) -> dict:
    """Peak bytes per device of one `twostep distill` update for the resolved config `cfg`, the teacher folder's
    config (`read_config`) and `world_size` processes. Returns {"parts": {name: bytes} (what the peak phase holds),
    "peak": bytes, "peak_phase": name, "phases": {name: bytes}, "reserve": bytes (CUDA), "settings": {...},
    "counts": {...}}. Modelled for method turbopp (the other methods: UserError)."""
    if cfg.method != "turbopp":
        raise UserError(f"the memory estimate models method turbopp only, not {cfg.method!r}; run a short "
                        "--set train.updates=2 job on the target GPU to measure it")
    t, s = cfg.train, cfg.student
    n = max(1, int(world_size))
    accum = int(getattr(t, "grad_accum", 1))
    micro = max(1, math.ceil(t.batch_size / n))   # train.batch_size rows per micro-batch (× grad_accum per update)
    dt = resolved_dtypes(cfg, device)
    fsdp = bool(t.fsdp) and n > 1 and s.decoupling != "lora"
    ckpt = bool(t.grad_checkpointing)
    tcfg = {k: v for k, v in teacher_config["transformer"].items() if not k.startswith("_")}
    c = counts or transformer_counts(tcfg, s.lora_rank, s.lora_targets, cfg.disc.blocks)
    P, d = c["P"], c["dim"]
    img = sample_tokens(teacher_config)
    cap = _pad(caption_tokens or default_caption_tokens(teacher_config))
    uni, L, R = img + cap, c["n_layers"], c["n_refiner"]
    student_tb = L * uni + R * img + R * cap                       # token·blocks of one student pass
    disc_last = max(cfg.disc.blocks)
    teacher_tb = (disc_last + 1) * uni + R * img + R * cap          # the discriminator pass stops at its last block
    n_disc = _disc_passes(cfg)

    # -- weights and optimizer state ---------------------------------------------------------------------------
    fb, shard = _nbytes(dt["frozen"]), (n if fsdp else 1)
    trainable = {"full": 2 * P, "shared": P, "lora": 2 * c["lora_per_adapter"]}[s.decoupling]
    local = trainable / shard
    text_dim = int(tcfg.get("cap_feat_dim", 2560))
    Pc = heads_params(cfg, d, text_dim)
    parts = {
        f"teacher weights (frozen, {dt['frozen']})": P * fb,
        "student trainable weights (fp32" + (f", sharded /{n})" if fsdp else ")"): 4 * local,
        "student EMA (fp32)": 4 * local,
        "student AdamW m + v (fp32)": 8 * local,
        "discriminator heads (weights, grads, AdamW)": 16 * Pc,
    }
    static = sum(parts.values())
    grads = 4 * local

    # -- autocast casts: fp32 weights computed in bf16 (no FSDP: FSDP gathers bf16 params itself) ---------------
    autocast = dt["compute"] == "bf16"
    mode_student = "bf16" if (fsdp and autocast) else ("autocast" if autocast else "fp32")
    base_dtype = dt["frozen"]     # the lora student's base is the teacher's own weights
    if s.decoupling == "lora":
        mode_student = "bf16" if base_dtype == "bf16" else ("autocast" if autocast else "fp32")
    mode_teacher = "bf16" if dt["frozen"] == "bf16" else ("autocast" if autocast else "fp32")
    casts = 0.0
    if autocast and not fsdp:
        if s.decoupling != "lora":
            casts += 2 * trainable                                # cached for the autocast region, saved for bwd
        elif base_dtype == "fp32" and not ckpt:
            casts += 2 * 2 * P                                    # the fp32 base cast per step, saved for bwd
        if dt["frozen"] == "fp32" and not ckpt:
            casts += 2 * n_disc * c["teacher_grad_path"]          # the teacher's grad path, per pass
    fsdp_buf = c["block"] * (2 * 2 + 4) if fsdp else 0            # 2 gathered blocks (bf16) + 1 block grads (fp32)

    # -- activations per device (micro-batch) -----------------------------------------------------------------
    kind = "lora" if s.decoupling == "lora" else "trainable"
    blk_s = ACT_CKPT[mode_student] if ckpt else ACT_BLOCK[(kind, mode_student)]
    blk_t = ACT_CKPT[mode_teacher] if ckpt else ACT_BLOCK[("frozen", mode_teacher)]
    one_pass = micro * d * (student_tb * blk_s + uni * ACT_PASS)
    disc_pass = micro * d * (teacher_tb * blk_t + img * ACT_PASS + len(cfg.disc.blocks) * img * 4)
    a_student, a_disc = 2 * one_pass, n_disc * disc_pass
    # backward's working set: one block's full activations (recomputed under checkpointing) and their gradients
    work = 2 * micro * d * uni * ACT_BLOCK[(kind, mode_student)]
    # the critic update runs the student and the teacher without a graph: one block's intermediates of 3·b samples
    critic_work = 3 * micro * d * uni * ACT_BLOCK[("trainable", mode_student)] / 2

    g_step = grads / (2 if s.decoupling == "full" else 1)         # step 2's gradients (full: its own copy)
    # gradients alive during the student's forward: none with grad_accum = 1 (train/steps.py student_step frees
    # the previous update's first); grad_accum > 1: the earlier micro-batches' (the later ones run on top of them)
    g_before = grads if accum > 1 else 0
    # torch's foreach AdamW on CUDA: sqrt(v) of all params at once (train.adamw; auto = fused there, none)
    foreach = 4 * local if device == "cuda" and not fused_adamw(t.adamw, device) else 0
    casts_bwd = 0 if ckpt else casts   # checkpointing: the casts are not saved, only cached until autocast exits
    phases = {
        "critic update": static + grads + fsdp_buf + critic_work,
        "student forward end": static + g_before + casts + fsdp_buf + a_student + a_disc,
        "student backward": static + max(g_before, g_step if s.decoupling != "lora" else 0) + casts_bwd + fsdp_buf
        + one_pass + work,
        "optimizer step": static + grads + foreach,
    }
    phases["student backward"] = max(phases["student backward"], static + grads + fsdp_buf + work)
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    parts["student gradients (fp32)"] = grads if peak_phase != "student forward end" else g_before
    if casts:
        parts["autocast bf16 weight casts"] = {"student forward end": casts, "student backward": casts_bwd}.get(
            peak_phase, 0)
    if fsdp_buf:
        parts["FSDP gathered units"] = fsdp_buf if peak_phase != "optimizer step" else 0
    if peak_phase == "student forward end":
        parts[f"activations: 2 student passes ({micro}/device)"] = a_student
        parts[f"activations: {n_disc} discriminator pass{'es' * (n_disc > 1)}"] = a_disc
    elif peak_phase == "student backward":
        parts["activations: step 1 pass + backward working set"] = peak - sum(parts.values())
    elif peak_phase == "critic update":
        parts["critic update working set"] = critic_work
    else:
        parts["AdamW foreach temporaries"] = foreach
    reserve = RESERVE[0] + RESERVE[1] * peak if device == "cuda" else 0
    return {"parts": {k: int(v) for k, v in parts.items()}, "peak": int(peak), "peak_phase": peak_phase,
            "phases": {k: int(v) for k, v in phases.items()}, "reserve": int(reserve), "total": int(peak + reserve),
            "settings": {"world_size": n, "micro_batch": micro, "grad_accum": accum, "fsdp": fsdp,
                         "grad_checkpointing": ckpt, "device": device, **{f"{k}_dtype": v for k, v in dt.items()},
                         "image_tokens": img, "caption_tokens": cap, "discriminator_passes": n_disc},
            "counts": {"teacher": P, "student_trainable": int(trainable), "critic": int(Pc)}}


def fits(est: dict, gpu_memory_gb: float) -> bool:
    """The estimate (peak + reserve) fits a device with `gpu_memory_gb` GiB (2^30 bytes) of memory. A GPU sold as
    "80 GB" has about 79.6 GiB (nvidia-smi: 81559 MiB), so `--gpu-memory 80` leaves no slack beyond the reserve."""
    return est["total"] <= gpu_memory_gb * GiB


def format_estimate(est: dict, gpu_memory_gb: float | None = None) -> str:
    """The dry-run's table: one line per part, the phases, the total and (given a GPU size) whether it fits."""
    g = lambda b: f"{b / GiB:9.2f} GiB"
    s = est["settings"]
    lines = [f"# memory per device (estimate; twostep.train.memory): {s['world_size']} process(es), micro-batch "
             f"{s['micro_batch']} x grad_accum {s['grad_accum']}, fsdp {s['fsdp']}, checkpointing "
             f"{s['grad_checkpointing']}, frozen {s['frozen_dtype']}, compute {s['compute_dtype']}, "
             f"{s['image_tokens']} image + {s['caption_tokens']} caption tokens, {s['discriminator_passes']} "
             f"discriminator pass(es) with gradient"]
    for k, v in est["parts"].items():
        if v:
            lines.append(f"#   {k:52s} {g(v)}")
    lines.append(f"#   {'peak (' + est['peak_phase'] + ')':52s} {g(est['peak'])}")
    if est["reserve"]:
        lines.append(f"#   {'+ CUDA context and allocator reserve':52s} {g(est['reserve'])}")
    lines.append(f"#   {'total':52s} {g(est['total'])}")
    lines.append("#   phases: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in est["phases"].items()) + " GiB")
    if gpu_memory_gb is not None:
        ok = fits(est, gpu_memory_gb)
        lines.append(f"# fits {gpu_memory_gb:g} GB: {'yes' if ok else 'NO'} ({est['total'] / GiB:.1f} of "
                     f"{gpu_memory_gb:g} GiB)")
    return "\n".join(lines)


def method_counts(cfg, teacher_config: dict) -> dict[str, int]:
    """`twostep distill --dry-run`'s parameter counts without loading a weight: the teacher's transformer and the
    method (student, critic) built on the meta device, with the method's own checks of the config (disc.blocks
    against the teacher's blocks, ...). Same numbers as twostep.train.parameter_counts."""
    tcfg = {k: v for k, v in teacher_config["transformer"].items() if not k.startswith("_")}
    with torch.device("meta"):
        bb = ZImageBackbone.from_config(tcfg).requires_grad_(False)
        m = build_method(cfg, bb)
    count = lambda ps: sum(p.numel() for p in ps)
    return {"teacher": count(bb.parameters()), "student": count(m.student_parameters()),
            "critic": count(m.critic_parameters())}


def cache_caption_tokens(cache_dir) -> int | None:
    """The longest caption (text-feature rows) of a teacher cache, from its in-memory text lengths. A `--cache` that
    is not a readable teacher cache (a file, a missing folder) is a UserError: the estimate never silently assumes
    the text encoder's maximum for a cache it was given (it does so only without --cache)."""
    try:
        cache = load_cache(cache_dir)
    except UserError as e:
        raise UserError(f"--cache: {e}") from None
    except OSError as e:
        raise UserError(f"--cache {cache_dir}: unreadable ({e.strerror or type(e).__name__})") from None
    lens = [n for sh in getattr(cache, "shards", []) for n in getattr(sh, "text_len", [])]
    if not lens and len(cache):
        lens = [int(t.shape[0]) for t in cache.text_rows(list(range(len(cache))))]
    return max(lens) if lens else None


def check_fits(est: dict, gpu_memory_gb: float | None) -> None:
    """`--gpu-memory GB`: a one-line UserError (exit 2) when the estimate does not fit, naming what to change."""
    if gpu_memory_gb is None or fits(est, gpu_memory_gb):
        return
    s = est["settings"]
    fixes = []
    if not s["grad_checkpointing"]:
        fixes.append("--set train.grad_checkpointing=true")
    if s["micro_batch"] > 1:
        fixes.append("a smaller train.batch_size with train.grad_accum (same global batch)")
    if s["compute_dtype"] != "bf16":
        fixes.append("--set train.mixed_precision=bf16")
    if not s["fsdp"] and est["counts"]["student_trainable"] > est["counts"]["teacher"] // 2:
        fixes.append("train.fsdp=true on more GPUs or student.decoupling=lora")
    fixes.append("a preset (configs/zimage-turbo-lora-1gpu.yaml, configs/zimage-turbo-full-fsdp8.yaml)")
    raise UserError(f"the estimated peak of {est['total'] / GiB:.1f} GiB per device ({est['peak_phase']}) does not "
                    f"fit --gpu-memory {gpu_memory_gb:g}; use " + ", or ".join(fixes))


# -- host memory, disk and wall time (the dry-run's other lines) ------------------------------------------------

HOST_BASE = 3 * GiB        # per process: Python, torch, the CUDA runtime, tokenizers (assumed, not measured)
GPU_BF16_FLOPS = 989e12    # dense bf16 peak of an H100 SXM (the wall-time estimate's device)
ASSUMED_MFU = 0.35         # fraction of that peak the update reaches (assumed until a GPU run calibrates it)


def host_and_disk(cfg, teacher_config: dict, world_size: int = 1, device: str = "cuda") -> dict:
    """Host RAM per process and disk per run folder of `twostep distill`, from the configs alone (bytes).

    Host: every process reads the frozen teacher on the host in train.frozen_dtype before moving it to its device
    (the trainable copies are built without storage: trainable_copies_on_meta), plus HOST_BASE; the process that
    writes a checkpoint also gathers its full tensors on the host (state.checkpoint_bytes; with sharded DCP
    checkpoints, 2+ processes, each holds its 1/N). Disk: train.keep_checkpoints checkpoints plus what the run
    folder adds once (a lora student's frozen base); the run folder's model files are hard links into the newest
    checkpoint, and a train.keep_best best/ folder adds one EMA (counted)."""
    from .dcp import use_dcp  # lazy: the estimate alone needs no training state
    from .state import checkpoint_bytes  # lazy: the estimate alone needs no training state

    t = cfg.train
    n = max(1, int(world_size))
    tcfg = {k: v for k, v in teacher_config["transformer"].items() if not k.startswith("_")}
    fb = _nbytes(resolved_dtypes(cfg, device)["frozen"])
    teacher = transformer_counts(tcfg, cfg.student.lora_rank, cfg.student.lora_targets, cfg.disc.blocks)["P"] * fb
    ck = checkpoint_bytes(cfg, tcfg)
    gathered = ck["total"] / (n if use_dcp(cfg, n) else 1)
    ema = sum(v for k, v in ck.items() if k.startswith("ema"))
    best = ema if getattr(t, "keep_best", False) and getattr(t, "eval_every", 0) else 0
    return {"host_process": HOST_BASE + teacher, "host_writer": HOST_BASE + teacher + gathered,
            "checkpoint": ck["total"], "disk_run": int(t.keep_checkpoints) * ck["total"] + ck["run_folder_once"] + best,
            "teacher_host": teacher, "keep_checkpoints": int(t.keep_checkpoints)}


def update_flops(cfg, teacher_config: dict, caption_tokens: int | None = None) -> float:
    """FLOPs of one update of the global batch (matmuls: 2 per multiply-add; attention's T² terms included).
    Student: two passes (σ = 1, σm), forward + backward = 3 forward costs each (lora: the frozen base's weight
    gradients are not computed, 2 forward costs); the discriminator passes through the frozen teacher's first
    max(disc.blocks) + 1 blocks, each with a gradient to its input (2 forward costs) in the student update and
    once more without (real and fake) in the critic update."""
    tcfg = {k: v for k, v in teacher_config["transformer"].items() if not k.startswith("_")}
    c = transformer_counts(tcfg, cfg.student.lora_rank, cfg.student.lora_targets, cfg.disc.blocks)
    L, d = c["n_layers"], c["dim"]
    img = sample_tokens(teacher_config)
    cap = _pad(caption_tokens or default_caption_tokens(teacher_config))
    T = img + cap
    R, B = c["n_refiner"], c["block"]

    def fwd(tokens: int) -> float:   # one block's forward on one sample of `tokens` tokens
        return 2 * B * tokens + 4 * tokens * tokens * d

    refiners = R * (fwd(img) + fwd(cap))                      # noise refiner on image, context refiner on caption
    student_fwd = L * fwd(T) + refiners
    disc_fwd = (max(cfg.disc.blocks) + 1) * fwd(T) + refiners
    passes = _disc_passes(cfg)
    s_mult = (2 if cfg.student.decoupling == "lora" else 3) + bool(cfg.train.grad_checkpointing)   # + recompute
    per_sample = 2 * s_mult * student_fwd + passes * 2 * disc_fwd + 2 * disc_fwd
    return float(per_sample * cfg.train.batch_size)


def wall_time(cfg, teacher_config: dict, world_size: int = 1, caption_tokens: int | None = None) -> dict:
    """An ESTIMATE of the seconds per update and the hours of train.updates on `world_size` H100s: update_flops /
    (GPU_BF16_FLOPS x ASSUMED_MFU x world_size). Uncalibrated: no GPU run has measured it."""
    f = update_flops(cfg, teacher_config, caption_tokens)
    s = f / (GPU_BF16_FLOPS * ASSUMED_MFU * max(1, int(world_size)))
    return {"flops": f, "seconds_per_update": s, "hours": s * int(cfg.train.updates) / 3600}


def format_host_disk_time(hd: dict, wt: dict, world_size: int) -> str:
    g = lambda b: f"{b / GiB:,.1f} GiB"
    return "\n".join([
        f"# host RAM per process (estimate): {g(hd['host_process'])} (the frozen teacher read on the host, "
        f"{g(hd['teacher_host'])}, + {g(HOST_BASE)} runtime); the checkpoint writer {g(hd['host_writer'])}",
        f"# disk per run folder (estimate): {g(hd['disk_run'])} ({hd['keep_checkpoints']} checkpoint(s) of "
        f"{g(hd['checkpoint'])} + the model files)",
        f"# wall time (ESTIMATE from FLOPs, uncalibrated): {wt['flops'] / 1e12:,.0f} TFLOP per update = "
        f"{wt['seconds_per_update']:.2f} s on {world_size} H100(s) at an assumed {ASSUMED_MFU:.0%} of bf16 peak; "
        f"{wt['hours']:.1f} h for train.updates"])
