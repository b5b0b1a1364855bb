"""`twostep export --format comfyui`: a latent student in the key layout ComfyUI's Z-Image loader reads, plus a
ComfyUI workflow for the 2-step sampling. docs/export.md says what was checked against which ComfyUI source.

Layout of the exported folder (NAME = the --out folder's name):

    diffusion_models/NAME_step1.safetensors, NAME_step2.safetensors   full students (lora with --merge)
    diffusion_models/NAME.safetensors                                 shared students
    loras/NAME_step1_lora.safetensors, NAME_step2_lora.safetensors     lora students (base: the teacher)
    comfyui_workflow.json                                              the 2-step workflow (ComfyUI UI format)
    twostep_export.json, status.json                                   provenance; completion marker (last)

Copy diffusion_models/ and loras/ into ComfyUI's models/ folder and open the workflow.

Weights: ComfyUI's NextDiT names (comfy/ldm/lumina/model.py) without a prefix, as ComfyUI's own
z_image_turbo_bf16.safetensors: diffusers' separate attention.to_q/to_k/to_v are fused (concatenated along the
output rows, q then k then v) into attention.qkv; to_out.0 → out, norm_q/norm_k → q_norm/k_norm,
all_x_embedder.2-1 → x_embedder, all_final_layer.2-1 → final_layer; every other key keeps its name
(the inverse of ComfyUI's comfy/utils.py z_image_to_diffusers).

LoRA: one adapter per file, keys `diffusion_model.<ComfyUI module>.lora_down.weight` / `.lora_up.weight` /
`.alpha`, i.e. the names ComfyUI's LoRA key map builds from the model's own state dict (comfy/lora.py
model_lora_keys_unet, "generic lora format"). ComfyUI adds `alpha / rank · up @ down` to the module's weight, rank
= lora_down rows. A to_q/to_k/to_v adapter (rank r each) becomes one adapter on the fused qkv of rank 3r:
down = [A_q; A_k; A_v], up = block-diagonal(B_q, B_k, B_v) at the q/k/v row offsets, alpha = 3r · (peft's
alpha / r), so alpha/rank and every block's delta are peft's exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import UserError

WORKFLOW = "comfyui_workflow.json"
MODELS_DIR, LORAS_DIR = "diffusion_models", "loras"
LORA_PREFIX = "diffusion_model."
# the official template's model files (comfyui-workflow-templates-json, templates/image_z_image_turbo.json)
TEACHER_UNET, TEXT_ENCODER, VAE = "z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"

_RENAMES = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
            (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
            (".attention.norm_k.", ".attention.k_norm."))
_QKV = {".attention.to_q.": 0, ".attention.to_k.": 1, ".attention.to_v.": 2}
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.\d+\.")
_TOP = ("x_pad_token", "cap_pad_token", "cap_embedder.", "t_embedder.", "all_x_embedder.2-1.", "all_final_layer.2-1.")


def comfy_name(key: str) -> tuple[str, int | None]:
    """A diffusers ZImageTransformer2DModel key → (ComfyUI key, q/k/v slot 0/1/2 of a fused qkv or None)."""
    if not (_BLOCK.match(key) or key.startswith(_TOP)):
        raise UserError(f"transformer weight {key!r} has no place in ComfyUI's Z-Image model (patch size 2, no "
                        "SigLIP branch); export this student with --format twostep")
    for part, slot in _QKV.items():
        if part in key:
            return key.replace(part, ".attention.qkv."), slot
    for a, b in _RENAMES:
        key = key.replace(a, b)
    return key, None


def diffusers_name(key: str) -> str | tuple[str, str, str]:
    """The inverse of comfy_name: a ComfyUI key → the diffusers key, or the (q, k, v) keys of a fused qkv."""
    if ".attention.qkv." in key:
        return tuple(key.replace(".attention.qkv.", part) for part in _QKV)
    for a, b in _RENAMES:
        if b.startswith("."):
            key = key.replace(b, a)
        elif key.startswith(b):
            key = a + key[len(b):]
    return key


def to_comfy(sd: dict) -> dict:
    """diffusers-layout transformer weights → ComfyUI layout (fused qkv = cat([q, k, v]) along the rows)."""
    out, parts = {}, {}
    for k, v in sd.items():
        name, slot = comfy_name(k)
        if slot is None:
            if name in out:
                raise UserError(f"transformer weights: two keys map to ComfyUI's {name!r}")
            out[name] = v
        else:
            parts.setdefault(name, [None, None, None])[slot] = v
    for name, qkv in parts.items():
        if any(p is None for p in qkv):
            raise UserError(f"transformer weights: {name!r} lacks one of to_q/to_k/to_v")
        out[name] = torch.cat(qkv, dim=0)
    return out


def from_comfy(sd: dict, dim: int) -> dict:
    """ComfyUI layout → diffusers layout; a fused qkv splits into q (dim rows) and k, v (the rest, halved)."""
    out = {}
    for k, v in sd.items():
        name = diffusers_name(k)
        if isinstance(name, tuple):
            kv = (v.shape[0] - dim) // 2
            for n, p in zip(name, torch.split(v, [dim, kv, kv], dim=0)):
                out[n] = p
        else:
            out[name] = v
    return out


def qkv_rows(config) -> tuple[int, int]:
    """(q rows, k = v rows) of a ZImageTransformer2DModel config's fused qkv."""
    head = int(config.dim) // int(config.n_heads)
    return int(config.dim), int(config.n_kv_heads) * head


def lora_to_comfy(transformer, adapter: str, dtype: torch.dtype) -> dict:
    """One peft adapter of `transformer` → ComfyUI LoRA tensors (module docstring): per target module
    `diffusion_model.<m>.lora_down.weight` [rank, in], `.lora_up.weight` [out, rank], `.alpha` (float32 scalar)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    q_rows, kv_rows = qkv_rows(transformer.config)
    offsets = (0, q_rows, q_rows + kv_rows)
    groups = {}
    for name, mod in transformer.named_modules():
        if not (isinstance(mod, LoraLayer) and adapter in mod.lora_A):
            continue
        if not isinstance(mod, LoraLinear) or mod.use_dora.get(adapter) or mod.lora_bias.get(adapter):
            raise UserError(f"LoRA on {name}: ComfyUI export knows plain LoRA on linear layers (no DoRA, no LoRA "
                            "bias); export with --format twostep")
        target, slot = comfy_name(f"{name}.weight")
        A = mod.lora_A[adapter].weight.detach().float()
        B = mod.lora_B[adapter].weight.detach().float()
        groups.setdefault(target, []).append((slot, A, B, float(mod.scaling[adapter])))
    out = {}
    for target, parts in groups.items():
        parts.sort(key=lambda p: -1 if p[0] is None else p[0])
        scale = parts[0][3]
        down = torch.cat([A for _, A, _, _ in parts], dim=0)
        rank = down.shape[0]
        if parts[0][0] is None:
            up = parts[0][2]
        else:
            up = torch.zeros(q_rows + 2 * kv_rows, rank)
            col = 0
            for slot, A, B, s in parts:  # a block whose peft scaling differs carries the ratio in its up
                up[offsets[slot]:offsets[slot] + B.shape[0], col:col + A.shape[0]] = B if s == scale else B * (s / scale)
                col += A.shape[0]
        base = LORA_PREFIX + target[:-len(".weight")]
        out[f"{base}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{base}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{base}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    if not out:
        raise UserError(f"adapter {adapter!r}: no LoRA layers in the student's transformer")
    return out


# -- the workflow ------------------------------------------------------------------------------------------------

# widget order of each node in ComfyUI's UI format (nodes.py / comfy_extras INPUT_TYPES order; a seed widget is
# followed by its control_after_generate value), as the official template writes them
_SIZE = {"UNETLoader": [270, 82], "LoraLoaderModelOnly": [270, 82], "ModelSamplingAuraFlow": [270, 58],
         "CLIPLoader": [270, 106], "CLIPTextEncode": [400, 200], "ConditioningZeroOut": [200, 26],
         "EmptySD3LatentImage": [270, 106], "KSampler": [270, 262], "KSamplerAdvanced": [300, 334],
         "VAELoader": [270, 58], "VAEDecode": [200, 46], "SaveImage": [400, 400]}


class _Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def node(self, type_, widgets, inputs=(), outputs=()):
        """inputs: [(name, type, (source node, source slot))]; outputs: [(name, type)]."""
        nid = len(self.nodes) + 1
        n = {"id": nid, "type": type_, "pos": [0, 0], "size": list(_SIZE[type_]), "flags": {},
             "order": len(self.nodes), "mode": 0, "inputs": [],
             "outputs": [{"name": o, "type": t, "links": [], "slot_index": i} for i, (o, t) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        for slot, (name, t, (src, src_slot)) in enumerate(inputs):
            lid = len(self.links) + 1
            self.links.append([lid, src["id"], src_slot, nid, slot, t])
            src["outputs"][src_slot]["links"].append(lid)
            n["inputs"].append({"name": name, "type": t, "link": lid})
        self.nodes.append(n)
        return n

    def layout(self):
        """Columns by depth, so the graph opens readable."""
        depth = {}
        for n in self.nodes:  # nodes are created after their sources
            srcs = [l[1] for l in self.links if l[3] == n["id"]]
            depth[n["id"]] = 1 + max((depth[s] for s in srcs), default=-1)
        rows = {}
        for n in self.nodes:
            d = depth[n["id"]]
            n["pos"] = [40 + 330 * d, 60 + 260 * rows.get(d, 0)]
            rows[d] = rows.get(d, 0) + 1

    def json(self) -> dict:
        self.layout()
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def workflow(decoupling: str, mid_noise: str, sigma_mid: float, files: dict, prompt: str = "",
             width: int = 1024, height: int = 1024) -> dict:
    """The 2-step ComfyUI workflow, wired as the official Z-Image-Turbo template (UNETLoader → ModelSamplingAuraFlow
    → sampler, CLIPLoader lumina2 → CLIPTextEncode → positive, ConditioningZeroOut → negative, EmptySD3LatentImage,
    VAELoader → VAEDecode → SaveImage), sampler euler / scheduler simple / cfg 1 / 2 steps, shift σm/(1−σm): the
    simple scheduler's 2-step grid is [1, shift·½/(1 + (shift−1)·½), 0] = [1, σm, 0] (docs/export.md).

    files: {"unet": [step-1 file, step-2 file] (full) or [file] (shared) or [teacher file] (lora),
            "lora": [step-1 LoRA, step-2 LoRA] (lora only)}.
    One model and mid_noise=same: the template's single KSampler. Otherwise two KSamplerAdvanced over the same
    2-step grid, steps 0→1 then 1→2: same noise → the first returns its leftover noise and the second adds none
    (exactly the Euler re-noising x_σm = (1−σm)·x̂0₁ + σm·ε); fresh → the first denoises fully (x̂0₁) and the
    second adds new noise at σm ((1−σm)·x̂0₁ + σm·ε', ComfyUI's noise_scaling)."""
    shift = float(sigma_mid) / (1.0 - float(sigma_mid))
    g = _Graph()
    model, clip, vae = ("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")
    unets = [g.node("UNETLoader", [f, "default"], outputs=[model]) for f in files["unet"]]
    clip_n = g.node("CLIPLoader", [TEXT_ENCODER, "lumina2", "default"], outputs=[clip])
    vae_n = g.node("VAELoader", [VAE], outputs=[vae])
    pos = g.node("CLIPTextEncode", [prompt], [("clip", "CLIP", (clip_n, 0))], [("CONDITIONING", "CONDITIONING")])
    neg = g.node("ConditioningZeroOut", [], [("conditioning", "CONDITIONING", (pos, 0))],
                 [("CONDITIONING", "CONDITIONING")])
    latent = g.node("EmptySD3LatentImage", [width, height, 1], outputs=[("LATENT", "LATENT")])
    if decoupling == "lora":
        steps = [g.node("LoraLoaderModelOnly", [f, 1.0], [("model", "MODEL", (unets[0], 0))], [model])
                 for f in files["lora"]]
    else:
        steps = unets if decoupling == "full" else unets * 2
    sampled = [g.node("ModelSamplingAuraFlow", [shift], [("model", "MODEL", (m, 0))], [model])
               for m in (steps if decoupling != "shared" else steps[:1])]
    conds = [("positive", "CONDITIONING", (pos, 0)), ("negative", "CONDITIONING", (neg, 0))]
    out = [("LATENT", "LATENT")]
    if decoupling == "shared" and mid_noise == "same":
        last = g.node("KSampler", [0, "randomize", 2, 1.0, "euler", "simple", 1.0],
                      [("model", "MODEL", (sampled[0], 0)), *conds, ("latent_image", "LATENT", (latent, 0))], out)
    else:
        m1, m2 = sampled if len(sampled) == 2 else sampled * 2
        same = mid_noise == "same"
        first = g.node("KSamplerAdvanced",
                       ["enable", 0, "randomize", 2, 1.0, "euler", "simple", 0, 1, "enable" if same else "disable"],
                       [("model", "MODEL", (m1, 0)), *conds, ("latent_image", "LATENT", (latent, 0))], out)
        last = g.node("KSamplerAdvanced",
                      ["disable" if same else "enable", 1, "randomize", 2, 1.0, "euler", "simple", 1, 2, "disable"],
                      [("model", "MODEL", (m2, 0)), *conds, ("latent_image", "LATENT", (first, 0))], out)
    image = g.node("VAEDecode", [], [("samples", "LATENT", (last, 0)), ("vae", "VAE", (vae_n, 0))],
                   [("IMAGE", "IMAGE")])
    g.node("SaveImage", ["twostep"], [("images", "IMAGE", (image, 0))])
    return g.json()


# -- the export ---------------------------------------------------------------------------------------------------

def check_student(cfg: dict) -> None:
    """UserError unless the run is a latent student of a ZImagePipeline teacher (what ComfyUI's Z-Image runs)."""
    if not cfg.get("pipeline"):
        raise UserError("--format comfyui: a pixel-space student (MiniLM captions, no VAE) is not a Z-Image model "
                        "ComfyUI can run; export it with --format twostep")


def _stem(out: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", out.name).strip("._") or "twostep"
    return stem


def write(student, cfg: dict, partial: Path, out: Path, merge: bool, dtype: torch.dtype) -> dict:
    """Write the ComfyUI files of `student` into `partial` (the folder becomes `out`); returns {files} for the
    export marker."""
    from safetensors.torch import save_file

    from .io.files import all_finite  # lazy: torch-heavy, only when a ComfyUI export runs
    from .model import image_hw  # lazy: torch-heavy, only when a ComfyUI export runs
    from .pipeline import base_state_dict, merged_state_dict  # lazy: torch-heavy, only when a ComfyUI export runs
    from .student import STEP_NAMES  # lazy: torch-heavy, only when a ComfyUI export runs

    stem, d = _stem(out), student.decoupling
    transformers = [bb.transformer for bb in student.transformers().values()]
    meta = {"format": "pt", "twostep": json.dumps({"decoupling": d, "merged": bool(merge),
                                                   "sigmas": list(student.sigmas)})}
    (partial / MODELS_DIR).mkdir(parents=True, exist_ok=True)

    def finite(sd, what):
        if not all_finite(sd):
            raise UserError(f"--dtype: the student's {what} overflow {str(dtype).replace('torch.', '')} (values "
                            "beyond its range); export with --dtype fp32")
        return sd

    def save_model(sd, name):
        sd = finite({k: v.detach().to(dtype).contiguous() for k, v in to_comfy(sd).items()}, "weights")
        save_file(sd, str(partial / MODELS_DIR / name), metadata=meta)
        return name

    files = {}
    if d == "lora" and not merge:
        (partial / MODELS_DIR).rmdir()
        (partial / LORAS_DIR).mkdir()
        files["unet"] = [TEACHER_UNET]
        files["lora"] = []
        for step, name in zip(("step1", "step2"), STEP_NAMES):
            f = f"{stem}_{step}_lora.safetensors"
            save_file(finite(lora_to_comfy(transformers[0], name, dtype), "LoRA weights"), str(partial / LORAS_DIR / f),
                      metadata=meta)
            files["lora"].append(f)
    elif d == "lora":
        files["unet"] = [save_model(merged_state_dict(transformers[0], name), f"{stem}_{step}.safetensors")
                         for step, name in zip(("step1", "step2"), STEP_NAMES)]
    elif d == "full":
        files["unet"] = [save_model(base_state_dict(t), f"{stem}_{step}.safetensors")
                         for step, t in zip(("step1", "step2"), transformers)]
    else:
        files["unet"] = [save_model(base_state_dict(transformers[0]), f"{stem}.safetensors")]
    h, w = image_hw(cfg)  # the size the student was distilled at (the template's 1024² for Z-Image-Turbo's own)
    wf = workflow("full" if (d == "lora" and merge) else d, student.mid_noise, student.sigma_mid, files, width=w,
                  height=h)
    (partial / WORKFLOW).write_text(json.dumps(wf, indent=1) + "\n")
    return files
