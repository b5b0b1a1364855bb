"""Memory estimate of Turbo++ distillation of the real 6B Z-Image transformer at 1024² (docs/sizing.md).

    .venv/bin/python benchmarks/sizing.py [--caption-tokens 512] [--gpus 8] [--per-gpu-batch 1 4] [--measure]

Parameter counts are exact (diffusers' ZImageTransformer2DModel with its default config, instantiated on the meta
device; the defaults equal Z-Image-Turbo's transformer/config.json except axes_lens, which has no parameters).
Activation sizes use one measured constant (`--measure` re-measures it on this CPU): the bytes one
ZImageTransformerBlock keeps for backward per token and per unit of model width under bf16 autocast. Everything
else is arithmetic, printed as markdown.
"""

from __future__ import annotations

import argparse

GiB = 2**30
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]  # student.lora_targets default
ACT_BYTES_PER_TOKEN_DIM = 114.0   # measured (see measure_block_activation); fp32 without autocast: 135.5
CKPT_BYTES_PER_TOKEN_DIM = 4.0    # checkpointed block input: the fp32 residual stream (measured dtype under autocast)
CKPT_BYTES_PER_TOKEN = 520.0      # + RoPE freqs (complex64, head_dim/2 = 64 → 512 B) + mask (1 B) + slack


def count_params(rank: int = 16) -> dict:
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        m = ZImageTransformer2DModel()
    cfg = {k: v for k, v in m.config.items() if not k.startswith("_")}
    P = sum(p.numel() for p in m.parameters())
    lora = sum(rank * (mod.in_features + mod.out_features) for n, mod in m.named_modules()
               if isinstance(mod, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in TARGETS))
    block = sum(p.numel() for p in m.layers[0].parameters())
    # the discriminator's teacher pass (disc.blocks [1, 2, 3]) back-propagates through embedders, both refiners and
    # main blocks 0..3 (features() stops after the last requested block)
    teacher_grad = P - sum(p.numel() for p in m.layers[4:].parameters()) - sum(
        p.numel() for p in m.all_final_layer.parameters())
    return {"config": cfg, "P": P, "lora_per_adapter": lora, "block": block, "teacher_grad_path": teacher_grad}


def measure_block_activation(d: int = 512, heads: int = 4) -> float:
    """Bytes saved for backward by one ZImageTransformerBlock per token per unit of width, bf16 autocast on CPU,
    fp32 weights (as twostep trains): the slope between 256 and 768 tokens (weights and their casts cancel)."""
    import torch
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    def saved(T):
        blk = ZImageTransformerBlock(0, d, heads, heads, 1e-5, True, modulation=True)
        params = {p.data_ptr() for p in blk.parameters()}
        x = torch.randn(1, T, d, requires_grad=True)
        freqs = torch.polar(torch.ones(1, T, d // heads // 2), torch.randn(1, T, d // heads // 2))
        seen = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            blk(x, torch.ones(1, T, dtype=torch.bool), freqs, torch.randn(1, min(d, 256)))
        return sum(seen.values())

    return (saved(768) - saved(256)) / 512 / d


def estimate(c: dict, caption_tokens: int, gpus: int, act: float) -> dict:
    d, n_layers, n_ref = c["config"]["dim"], c["config"]["n_layers"], c["config"]["n_refiner_layers"]
    P, PL, Pt = c["P"], 2 * c["lora_per_adapter"], c["teacher_grad_path"]
    img = (128 // 2) * (128 // 2)                       # 1024² → 8× VAE → 128×128×16 latent → patch 2
    cap = -(-caption_tokens // 32) * 32                 # diffusers pads captions to a multiple of 32 (SEQ_MULTI_OF)
    uni = img + cap
    student_tb = n_layers * uni + n_ref * img + n_ref * cap    # token·blocks of one student pass
    teacher_tb = 4 * uni + n_ref * img + n_ref * cap            # up to main block 3 (disc.blocks [1, 2, 3])
    per_tb_full = act * d
    per_tb_ckpt = CKPT_BYTES_PER_TOKEN_DIM * d + CKPT_BYTES_PER_TOKEN
    act_none = (2 * student_tb + teacher_tb) * per_tb_full
    act_ckpt = (2 * student_tb + teacher_tb) * per_tb_ckpt + uni * per_tb_full   # + one block recomputed
    # standard mixed precision (what the table assumes): frozen weights bf16; trainable: bf16 working copy,
    # fp32 master, fp32 gradient, fp32 AdamW m and v; fp32 EMA of the trainable parameters
    rows = {}
    for dec in ("full", "lora"):
        trainable = 2 * P if dec == "full" else PL
        frozen_student = 0 if dec == "full" else P
        r = {
            "teacher (frozen, bf16)": 2 * P,
            "student frozen base (bf16)": 2 * frozen_student,
            "student trainable, bf16 working copy": 2 * trainable,
            "fp32 master weights": 4 * trainable,
            "fp32 gradients": 4 * trainable,
            "AdamW m + v (fp32)": 8 * trainable,
            "EMA of trainable params (fp32)": 4 * trainable,
        }
        rows[(dec, "ddp")] = r
        shard = {k: (v if k.startswith("teacher") else v / gpus) for k, v in r.items()}
        shard["FSDP gather/reduce buffers (2 blocks bf16 + 1 fp32)"] = c["block"] * (2 * 2 + 4)
        rows[(dec, "fsdp")] = shard
    return {"img": img, "cap": cap, "uni": uni, "student_tb": student_tb, "teacher_tb": teacher_tb,
            "act_none": act_none, "act_ckpt": act_ckpt, "rows": rows, "P": P, "PL": PL, "Pt": Pt, "d": d}


def as_implemented(c: dict, e: dict) -> dict:
    """Static memory of the loop as it is today: every module fp32 (from_config / load_backbone), bf16 autocast
    casting weights on the fly; frozen weights shared, not copied (`deepcopy_sharing_frozen`: the lora student's
    base is the teacher's parameters and the EMA holds copies of the trainable parameters only). Autocast keeps bf16 casts of trainable weights (cached for the autocast region) and, without
    checkpointing, of every frozen weight a grad-carrying input passes through (saved for the input gradient)."""
    P, PL, Pt = e["P"], e["PL"], e["Pt"]
    out = {}
    for dec in ("full", "lora"):
        if dec == "full":
            static = 4 * P + 2 * P * (4 + 4 + 8) + 4 * 2 * P
            casts_ckpt = 2 * 2 * P
            casts_none = casts_ckpt + 2 * Pt
        else:
            static = 4 * P + PL * 16 + 4 * PL   # one fp32 frozen transformer; LoRA: weights+grad+AdamW; EMA
            casts_ckpt = 2 * PL
            casts_none = casts_ckpt + 2 * 2 * P + 2 * Pt   # base cast once per step (2 steps) + teacher grad path
        out[dec] = {"static": static, "casts_ckpt": casts_ckpt, "casts_none": casts_none}
    return out


def markdown(c: dict, e: dict, gpus: int, batches: list[int]) -> str:
    g = lambda b: f"{b / GiB:,.1f}"
    L = ["| per GPU, GiB | full, DDP | full, FSDP×%d | lora, DDP | lora, FSDP×%d |" % (gpus, gpus),
         "|---|---:|---:|---:|---:|"]
    keys = list(e["rows"][("full", "fsdp")].keys())
    for k in keys:
        L.append(f"| {k} | " + " | ".join(g(e["rows"][(dec, par)].get(k, 0)) for dec in ("full", "lora")
                                          for par in ("ddp", "fsdp")) + " |")
    static = {kk: sum(v.values()) for kk, v in e["rows"].items()}
    L.append("| **weights + optimizer state** | " + " | ".join(
        f"**{g(static[(dec, par)])}**" for dec in ("full", "lora") for par in ("ddp", "fsdp")) + " |")
    for b in batches:
        for name, a in (("no checkpointing", e["act_none"]), ("checkpointing", e["act_ckpt"])):
            L.append(f"| activations, {name}, {b}/GPU | " + " | ".join(g(b * a) for _ in range(4)) + " |")
            L.append(f"| **total, {name}, {b}/GPU** | " + " | ".join(
                f"**{g(static[(dec, par)] + b * a)}**" for dec in ("full", "lora") for par in ("ddp", "fsdp")) + " |")
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caption-tokens", type=int, default=512, help="valid caption tokens (pipeline max 512)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--per-gpu-batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--measure", action="store_true", help="re-measure the activation constant on this CPU")
    a = ap.parse_args(argv)
    act = measure_block_activation() if a.measure else ACT_BYTES_PER_TOKEN_DIM
    c = count_params()
    e = estimate(c, a.caption_tokens, a.gpus, act)
    print(f"config {c['config']}\nparameters {c['P']:,} (one main block {c['block']:,}); LoRA r16 per adapter "
          f"{c['lora_per_adapter']:,}; teacher grad path (disc pass) {c['teacher_grad_path']:,}")
    print(f"tokens: {e['img']} image + {e['cap']} caption = {e['uni']}; token·blocks per student pass "
          f"{e['student_tb']:,}, teacher disc pass {e['teacher_tb']:,}; activation constant {act:.1f} B/token/dim")
    print(f"activations per sample: no checkpointing {e['act_none'] / GiB:.1f} GiB, checkpointing "
          f"{e['act_ckpt'] / GiB:.1f} GiB\n")
    print(markdown(c, e, a.gpus, a.per_gpu_batch))
    imp = as_implemented(c, e)
    print("\nas implemented (fp32 modules + autocast), per GPU, DDP, GiB:")
    for dec, r in imp.items():
        print(f"  {dec}: weights+optimizer+EMA {r['static'] / GiB:.1f}; autocast bf16 casts held: checkpointing "
              f"{r['casts_ckpt'] / GiB:.1f}, none {r['casts_none'] / GiB:.1f}")
        for b in a.per_gpu_batch:
            print(f"    {b}/GPU total: checkpointing {(r['static'] + r['casts_ckpt'] + b * e['act_ckpt']) / GiB:.1f}, "
                  f"none {(r['static'] + r['casts_none'] + b * e['act_none']) / GiB:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
