"""`twostep export --format comfyui` against ComfyUI's public loader code, pinned here as facts (no ComfyUI runs
offline: its core is not on the package index). Each pinned function below re-implements the cited ComfyUI source;
docs/export.md lists them.

Sources (repository Comfy-Org/ComfyUI, formerly comfyanonymous/ComfyUI; file @ commit):
- comfy/utils.py @ b3be02d6e766a8d3743dcf99cc967118f3ec8e3e: z_image_to_diffusers (diffusers key → ComfyUI key,
  to_q/to_k/to_v → attention.qkv at row offsets 0, dim, 2·dim)
- comfy/ldm/lumina/model.py @ dcbf1c1db50a2968e4a10d7963f45b0f617315b6: NextDiT / JointTransformerBlock /
  JointAttention / FinalLayer module tree (z_image_modulation=True; norm_final commented out, so no such key)
- comfy/model_detection.py @ a9fc7512309a2e357f65f48fa770945c56bc0d50: the Lumina 2 / Z-Image branch of
  detect_unet_config (keys cap_embedder.1.weight + noise_refiner.0.attention.k_norm.weight; dim 3840 → Z-Image;
  n_layers = count_blocks("layers.{}."); cap_pad_token → pad_tokens_multiple)
- comfy/lora.py @ ec93dcacb96b922f7cb1417b3ba22bccb082df32: model_lora_keys_unet (generic keys and the Lumina2
  branch), load_lora ("lora key not loaded" for every file key no adapter consumed)
- comfy/weight_adapter/lora.py @ 6f98b150e065f1ffc788558574a887835068bd40: LoRAAdapter.load (key names) and
  calculate_weight (W += strength · alpha / lora_down rows · lora_up @ lora_down)
- comfy/lora_convert.py @ 2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5: convert_lora (which files it rewrites)
- comfy/sd.py, comfy/model_detection.py unet_prefix_from_state_dict, comfy/samplers.py (simple_scheduler,
  KSampler.sample step slicing, KSAMPLER.sample), comfy/k_diffusion/sampling.py sample_euler,
  comfy/model_sampling.py (ModelSamplingDiscreteFlow, CONST), nodes.py (NODE_CLASS_MAPPINGS, KSamplerAdvanced,
  common_ksampler) @ a125cd84b054a57729b5eecab930ca9408719832; CONST also @ 38a99a826e14dd509ef32cfb68aa981ba782ec41.
The workflow template: PyPI comfyui-workflow-templates-json 0.1.123 (MIT), templates/image_z_image_turbo.json.
"""

import json
import re
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_export import main, make_run  # noqa: E402
from test_pipeline_teacher import build_tiny_pipeline  # noqa: E402

from twostep.export_comfyui import from_comfy, to_comfy  # noqa: E402

SM = 0.75


# -- pinned ComfyUI facts ------------------------------------------------------------------------------------------

def z_image_to_diffusers(n_layers, dim, n_refiner, output_prefix=""):
    """comfy/utils.py z_image_to_diffusers, as written there (n_refiner_layers defaults to 2 in ComfyUI; passed
    here for the tiny model): diffusers key → ComfyUI key or (qkv key, (dim 0, offset, size))."""
    key_map = {}

    def add_block_keys(prefix_from, prefix_to, has_adaln=True):
        for end in ("weight", "bias"):
            k = "{}.attention.".format(prefix_from)
            qkv = "{}.attention.qkv.{}".format(prefix_to, end)
            key_map["{}to_q.{}".format(k, end)] = (qkv, (0, 0, dim))
            key_map["{}to_k.{}".format(k, end)] = (qkv, (0, dim, dim))
            key_map["{}to_v.{}".format(k, end)] = (qkv, (0, dim * 2, dim))
        block_map = {"attention.norm_q.weight": "attention.q_norm.weight",
                     "attention.norm_k.weight": "attention.k_norm.weight",
                     "attention.to_out.0.weight": "attention.out.weight",
                     "attention.to_out.0.bias": "attention.out.bias",
                     "attention_norm1.weight": "attention_norm1.weight",
                     "attention_norm2.weight": "attention_norm2.weight",
                     "feed_forward.w1.weight": "feed_forward.w1.weight",
                     "feed_forward.w2.weight": "feed_forward.w2.weight",
                     "feed_forward.w3.weight": "feed_forward.w3.weight",
                     "ffn_norm1.weight": "ffn_norm1.weight", "ffn_norm2.weight": "ffn_norm2.weight"}
        if has_adaln:
            block_map["adaLN_modulation.0.weight"] = "adaLN_modulation.0.weight"
            block_map["adaLN_modulation.0.bias"] = "adaLN_modulation.0.bias"
        for k, v in block_map.items():
            key_map["{}.{}".format(prefix_from, k)] = "{}.{}".format(prefix_to, v)

    for i in range(n_layers):
        add_block_keys("layers.{}".format(i), "{}layers.{}".format(output_prefix, i))
    for i in range(n_refiner):
        add_block_keys("context_refiner.{}".format(i), "{}context_refiner.{}".format(output_prefix, i))
    for i in range(n_refiner):
        add_block_keys("noise_refiner.{}".format(i), "{}noise_refiner.{}".format(output_prefix, i))
    for c, d in [("final_layer.linear.weight", "all_final_layer.2-1.linear.weight"),
                 ("final_layer.linear.bias", "all_final_layer.2-1.linear.bias"),
                 ("final_layer.adaLN_modulation.1.weight", "all_final_layer.2-1.adaLN_modulation.1.weight"),
                 ("final_layer.adaLN_modulation.1.bias", "all_final_layer.2-1.adaLN_modulation.1.bias"),
                 ("x_embedder.weight", "all_x_embedder.2-1.weight"), ("x_embedder.bias", "all_x_embedder.2-1.bias"),
                 ("x_pad_token", "x_pad_token"), ("cap_embedder.0.weight", "cap_embedder.0.weight"),
                 ("cap_embedder.1.weight", "cap_embedder.1.weight"), ("cap_embedder.1.bias", "cap_embedder.1.bias"),
                 ("cap_pad_token", "cap_pad_token"), ("t_embedder.mlp.0.weight", "t_embedder.mlp.0.weight"),
                 ("t_embedder.mlp.0.bias", "t_embedder.mlp.0.bias"), ("t_embedder.mlp.2.weight", "t_embedder.mlp.2.weight"),
                 ("t_embedder.mlp.2.bias", "t_embedder.mlp.2.bias")]:
        key_map[d] = "{}{}".format(output_prefix, c)
    return key_map


def nextdit_state_keys(n_layers, n_refiner):
    """The state-dict keys of comfy/ldm/lumina/model.py NextDiT for ComfyUI's Z-Image config (z_image_modulation,
    pad_tokens_multiple set, qk_norm, no SigLIP / clip_text branch): JointAttention has qkv and out without bias,
    FeedForward w1/w2/w3 without bias, the context refiner has no modulation, FinalLayer's LayerNorm has no weight,
    and NextDiT's own norm_final is commented out."""
    def block(p, modulation):
        ks = [f"{p}.attention.{m}.weight" for m in ("qkv", "out", "q_norm", "k_norm")]
        ks += [f"{p}.feed_forward.w{i}.weight" for i in (1, 2, 3)]
        ks += [f"{p}.{n}.weight" for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2")]
        return ks + ([f"{p}.adaLN_modulation.0.weight", f"{p}.adaLN_modulation.0.bias"] if modulation else [])
    keys = ["x_embedder.weight", "x_embedder.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
            "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "cap_embedder.0.weight", "cap_embedder.1.weight",
            "cap_embedder.1.bias", "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias", "x_pad_token",
            "cap_pad_token"]
    for i in range(n_refiner):
        keys += block(f"noise_refiner.{i}", True) + block(f"context_refiner.{i}", False)
    for i in range(n_layers):
        keys += block(f"layers.{i}", True)
    return set(keys)


def count_blocks(keys, prefix):  # comfy/model_detection.py count_blocks
    n = 0
    while any(k.startswith(prefix.format(n)) for k in keys):
        n += 1
    return n


def detect(sd):
    """comfy/model_detection.py: the UNETLoader path strips no prefix here (unet_prefix_from_state_dict finds none of
    model.diffusion_model., model.model., net. and falls back to "model.", which filters every key away, so the
    file is read as is); then the Lumina 2 branch."""
    keys = set(sd)
    assert not any(k.startswith(("model.", "net.")) for k in keys)
    if not ("cap_embedder.1.weight" in keys and "noise_refiner.0.attention.k_norm.weight" in keys):
        return None
    w = sd["cap_embedder.1.weight"]
    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": w.shape[0], "cap_feat_dim": w.shape[1],
           "n_layers": count_blocks(keys, "layers.{}."), "qk_norm": True}
    if cfg["dim"] == 3840:  # Z image
        cfg.update(n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], z_image_modulation=True, time_scale=1000.0)
        if "cap_pad_token" in keys:
            cfg["pad_tokens_multiple"] = 32
    return cfg


def lora_key_map(comfy_keys, n_layers, dim, n_refiner):
    """comfy/lora.py model_lora_keys_unet for a Lumina2-class model: the generic keys of the model's own state dict
    (under diffusion_model.) and the Lumina2 branch over z_image_to_diffusers."""
    key_map = {}
    for k in ("diffusion_model." + c for c in comfy_keys):
        if k.endswith(".weight"):
            key_map["lora_unet_{}".format(k[len("diffusion_model."):-len(".weight")].replace(".", "_"))] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k
    for k, to in z_image_to_diffusers(n_layers, dim, n_refiner, output_prefix="diffusion_model.").items():
        if k.endswith(".weight"):
            key_lora = k[:-len(".weight")]
            for name in (f"diffusion_model.{key_lora}", f"transformer.{key_lora}",
                         "lycoris_{}".format(key_lora.replace(".", "_")), key_lora):
                key_map[name] = to
    return key_map


def load_lora(lora, key_map):
    """comfy/lora.py load_lora with weight_adapter LoRAAdapter.load (kohya names): the patches, and the keys no
    adapter consumed (each would log "lora key not loaded")."""
    patches, loaded = {}, set()
    for x, to in key_map.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if f"{x}.alpha" in lora:
            loaded.add(f"{x}.alpha")
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up in lora:
            patches[to] = (lora[up], lora[down], alpha)
            loaded |= {up, down}
    return patches, set(lora) - loaded


def comfy_patch(weights, patches, strength=1.0):
    """comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight (float32 intermediate) on a weight, or on its
    narrow(dim, offset, size) for a (key, offset) target (comfy/lora.py calculate_weight)."""
    out = {k: v.clone() for k, v in weights.items()}
    for to, (mat1, mat2, alpha) in patches.items():
        key, offset = (to, None) if isinstance(to, str) else to
        w = out[key[len("diffusion_model."):]]
        view = w.narrow(*offset) if offset else w
        a = alpha / mat2.shape[0] if alpha is not None else 1.0
        diff = torch.mm(mat1.float().flatten(start_dim=1), mat2.float().flatten(start_dim=1)).reshape(view.shape)
        view += ((strength * a) * diff).type(view.dtype)
    return out


def lora_convert_passes_through(sd):
    """comfy/lora_convert.py convert_lora leaves a file alone unless it is a BFL control, Wan Fun, USO or Krea2
    fused to_qkv LoRA (detected by these keys)."""
    fused = re.compile(r"(.*attn[._]to_)qkv(?=\.|$)")
    return not ("img_in.lora_A.weight" in sd or "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in sd
                or "single_blocks.37.processor.qkv_lora.up.weight" in sd
                or any(fused.search(k) and ("text_fusion" in k or "transformer_blocks" in k) for k in sd))


# nodes.py NODE_CLASS_MAPPINGS (stock) that the workflow adds to the template's node types
STOCK_EXTRA = {"KSamplerAdvanced", "LoraLoaderModelOnly"}


def simple_grid(shift, steps=2):
    """comfy/model_sampling.py ModelSamplingDiscreteFlow (ModelSamplingAuraFlow: multiplier 1.0) and
    comfy/samplers.py simple_scheduler, in float32 as there."""
    t = torch.arange(1, 1001, 1) / 1000 * 1.0
    sig = shift * t / (1 + (shift - 1) * t) if shift != 1.0 else t
    ss = len(sig) / steps
    return [float(sig[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


# -- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    from twostep.model import load_teacher

    root = tmp_path_factory.mktemp("comfy")
    t = load_teacher(build_tiny_pipeline(root / "zpipe"))
    bb, c = t.backbone, t.config
    runs = {"full": make_run(root / "full", bb, c, "full", sigma_mid=SM),
            "lora": make_run(root / "lora", bb, c, "lora", sigma_mid=SM),
            "shared": make_run(root / "shared", bb, c, "shared", sigma_mid=0.6),
            "shared-fresh": make_run(root / "shared-fresh", bb, c, "shared", mid_noise="fresh", sigma_mid=SM)}
    outs = {}
    for case, flags in [("full", []), ("lora", []), ("lora-merge", ["--merge"]), ("shared", []),
                        ("shared-fresh", [])]:
        out = root / f"exp-{case}"
        assert main(["export", "--model", str(runs[case.split("-merge")[0]]), "--out", str(out), "--format",
                     "comfyui", "--dtype", "fp32", *flags]) == 0
        outs[case] = out
    return root, t, runs, outs


def tiny_sd(seed=0, n_layers=2, n_refiner=1):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                  n_layers=n_layers, n_refiner_layers=n_refiner, n_heads=2, n_kv_heads=2,
                                  cap_feat_dim=64, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
    return {k: torch.randn_like(v) for k, v in tr.state_dict().items()}


# -- the key layout -------------------------------------------------------------------------------------------------

def test_every_tensor_maps_to_one_comfyui_key_and_back_bit_exactly():
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    sd = tiny_sd()
    comfy = to_comfy(sd)
    pinned = z_image_to_diffusers(2, 32, 1)
    assert set(sd) <= set(pinned)  # every diffusers tensor has exactly one place in ComfyUI's map; the map's
    extra = set(pinned) - set(sd)   # other entries name parameters this model has not (bias-free attention,
    assert all(re.search(r"\.attention\.(to_[qkv]|to_out\.0)\.bias$", k)  # no modulation in the context refiner)
               or re.match(r"context_refiner\.\d+\.adaLN_modulation\.0\.", k) for k in extra)
    pinned = {k: v for k, v in pinned.items() if k in sd}
    for k, v in sd.items():  # ...and it is where ComfyUI's map puts it (qkv: its row offset)
        to = pinned[k]
        got = comfy[to] if isinstance(to, str) else comfy[to[0]].narrow(*to[1])
        assert torch.equal(got, v), k
    targets = [t if isinstance(t, str) else t[0] for t in pinned.values()]
    n_qkv = sum(".attention.to_q." in k for k in sd)
    assert set(comfy) == set(targets) and len(comfy) == len(sd) - 2 * n_qkv and n_qkv == 2 + 2 * 1
    back = from_comfy(comfy, dim=32)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    again = to_comfy(back)
    assert again.keys() == comfy.keys() and all(torch.equal(again[k], comfy[k]) for k in comfy)
    # a second reader: diffusers' own single-file converter reads our layout back to the same tensors
    ckpt = {f"model.diffusion_model.{k}": v.clone() for k, v in comfy.items()}
    conv = convert_z_image_transformer_checkpoint_to_diffusers(ckpt)
    assert conv.keys() == sd.keys() and all(torch.equal(conv[k], sd[k]) for k in sd)


def test_real_zimage_shapes_are_what_comfyui_builds():
    """The 6B Z-Image-Turbo config (diffusers' defaults, on the meta device): ComfyUI detects Z-Image from our file's
    keys and NextDiT's parameters at that config have exactly our keys and shapes."""
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    with init_empty_weights():
        tr = ZImageTransformer2DModel()
    c = to_comfy(tr.state_dict())
    cfg = detect(c)
    assert cfg["dim"] == 3840 and cfg["n_layers"] == 30 and cfg["pad_tokens_multiple"] == 32
    assert set(c) == nextdit_state_keys(30, 2)  # NextDiT's n_refiner_layers default (not set by detection) is 2
    dim, hidden = 3840, 256 * ((int(8.0 / 3.0 * 3840) + 255) // 256)  # FeedForward: multiple_of 256, 8/3
    head = dim // cfg["n_heads"]
    expect = {"attention.qkv.weight": ((cfg["n_heads"] + 2 * cfg["n_kv_heads"]) * head, dim),
              "attention.out.weight": (dim, dim), "feed_forward.w1.weight": (hidden, dim),
              "feed_forward.w2.weight": (dim, hidden), "adaLN_modulation.0.weight": (4 * dim, min(dim, 256))}
    for k, shape in expect.items():
        assert tuple(c[f"layers.0.{k}"].shape) == shape, k
    assert tuple(c["x_embedder.weight"].shape) == (dim, 2 * 2 * 16)
    assert tuple(c["final_layer.linear.weight"].shape) == (2 * 2 * 16, dim)
    assert tuple(c["final_layer.adaLN_modulation.1.weight"].shape) == (dim, 256)
    assert tuple(c["cap_embedder.1.weight"].shape) == (dim, cfg["cap_feat_dim"])
    assert tuple(c["x_pad_token"].shape) == tuple(c["cap_pad_token"].shape) == (1, dim)


def test_full_and_shared_exports_have_comfyuis_key_set(latent):
    root, t, runs, outs = latent
    n_layers = t.backbone.transformer.config.n_layers
    n_ref = t.backbone.transformer.config.n_refiner_layers
    files = {"full": ["diffusion_models/exp-full_step1.safetensors", "diffusion_models/exp-full_step2.safetensors"],
             "lora-merge": ["diffusion_models/exp-lora-merge_step1.safetensors",
                            "diffusion_models/exp-lora-merge_step2.safetensors"],
             "shared": ["diffusion_models/exp-shared.safetensors"]}
    for case, names in files.items():
        got = sorted(str(p.relative_to(outs[case])) for p in outs[case].rglob("*.safetensors"))
        assert got == sorted(names), case
        for n in names:
            sd = load_file(str(outs[case] / n))
            assert set(sd) == nextdit_state_keys(n_layers, n_ref), n
            cfg = detect(sd)
            assert cfg["image_model"] == "lumina2" and cfg["n_layers"] == n_layers
    # the full student's step files are its two transformers, ComfyUI layout, bit-exact in fp32
    from twostep.sampling import load_student_generator

    st = load_student_generator(runs["full"]).student
    for name, bb in st.transformers().items():
        sd = load_file(str(outs["full"] / f"diffusion_models/exp-full_{name}.safetensors"))
        ref = to_comfy(bb.transformer.state_dict())
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_lora_files_load_in_comfyui_without_leftover_keys_and_patch_to_the_merged_weights(latent):
    root, t, runs, outs = latent
    cfg = t.backbone.transformer.config
    base = to_comfy({k: v.detach() for k, v in t.backbone.transformer.state_dict().items()})
    key_map = lora_key_map(base, cfg.n_layers, cfg.dim, cfg.n_refiner_layers)
    out = outs["lora"]
    assert sorted(p.name for p in (out / "loras").iterdir()) == ["exp-lora_step1_lora.safetensors",
                                                                 "exp-lora_step2_lora.safetensors"]
    assert not (out / "diffusion_models").exists()
    for step in ("step1", "step2"):
        lora = load_file(str(out / f"loras/exp-lora_{step}_lora.safetensors"))
        assert lora_convert_passes_through(lora)
        assert any(".attention.qkv." in k for k in lora) and all(".to_q." not in k for k in lora)
        patches, leftover = load_lora(lora, key_map)
        assert leftover == set()  # no "lora key not loaded"
        assert {k for k in lora if k.endswith(".alpha")} and len(patches) * 3 == len(lora)
        merged = load_file(str(outs["lora-merge"] / f"diffusion_models/exp-lora-merge_{step}.safetensors"))
        patched = comfy_patch(base, patches)
        assert merged.keys() == patched.keys()
        delta = max((patched[k] - base[k]).abs().max().item() for k in base)
        err = max((patched[k] - merged[k]).abs().max().item() for k in base)
        assert delta > 1e-3 and err <= 1e-6, (delta, err)
    # ComfyUI's other route, to_q/to_k/to_v keys landing on the fused qkv at their offsets, patches the same rows
    lora = load_file(str(out / "loras/exp-lora_step1_lora.safetensors"))
    k = "diffusion_model.layers.0.attention.qkv"
    up, down, a = lora[f"{k}.lora_up.weight"], lora[f"{k}.lora_down.weight"], lora[f"{k}.alpha"].item()
    r = down.shape[0] // 3
    split = {}
    for i, proj in enumerate("qkv"):
        x = f"layers.0.attention.to_{proj}"
        split[f"{x}.lora_up.weight"] = up[i * cfg.dim:(i + 1) * cfg.dim, i * r:(i + 1) * r]
        split[f"{x}.lora_down.weight"] = down[i * r:(i + 1) * r]
        split[f"{x}.alpha"] = torch.tensor(a / 3)
        assert not up[i * cfg.dim:(i + 1) * cfg.dim, :i * r].any() and not up[i * cfg.dim:(i + 1) * cfg.dim, (i + 1) * r:].any()
    p1, left = load_lora(split, key_map)
    p2, _ = load_lora({n: lora[n] for n in lora if n.startswith(k + ".")}, key_map)
    assert not left
    w1, w2 = comfy_patch(base, p1), comfy_patch(base, p2)
    assert (w1["layers.0.attention.qkv.weight"] - w2["layers.0.attention.qkv.weight"]).abs().max() <= 1e-6


# -- the workflow ---------------------------------------------------------------------------------------------------

def template():
    import comfyui_workflow_templates_json as pkg

    return json.loads((resources.files(pkg) / "templates" / "image_z_image_turbo.json").read_text())


def _edges(nodes, links):
    """{(source type, output name, target type, input name)} of a UI-format graph (links as lists or dicts)."""
    by_id = {n["id"]: n for n in nodes}
    out = set()
    for link in links:
        if isinstance(link, dict):
            src, ss, dst, ds = link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"]
        else:
            _, src, ss, dst, ds, _ = link
        if src in by_id and dst in by_id:
            out.add((by_id[src]["type"], by_id[src]["outputs"][ss]["name"], by_id[dst]["type"],
                     by_id[dst]["inputs"][ds]["name"]))
    return out


def template_graph():
    """The official template flattened: its subgraph's nodes and inner links (the subgraph's own widget inputs
    left out), plus its output to SaveImage."""
    t = template()
    (sg,) = t["definitions"]["subgraphs"]
    edges = _edges(sg["nodes"], sg["links"])
    (out,) = sg["outputs"]
    (link,) = [l for l in sg["links"] if l["id"] in out["linkIds"]]
    src = next(n for n in sg["nodes"] if n["id"] == link["origin_id"])
    edges.add((src["type"], src["outputs"][link["origin_slot"]]["name"], "SaveImage", "images"))
    nodes = sg["nodes"] + [n for n in t["nodes"] if n["type"] == "SaveImage"]
    return nodes, edges


def normalised_edges(wf):
    """Our edges as the template's: KSamplerAdvanced plays KSampler, a LoraLoaderModelOnly between UNETLoader and
    ModelSamplingAuraFlow is spliced out, and the first sampler → second sampler latent link is the chain itself."""
    edges = set()
    for s, so, d, di in _edges(wf["nodes"], wf["links"]):
        s, d = (x.replace("KSamplerAdvanced", "KSampler") for x in (s, d))
        if (s, d) == ("KSampler", "KSampler"):
            continue
        if d == "LoraLoaderModelOnly":
            continue
        if s == "LoraLoaderModelOnly":
            s = "UNETLoader"
        edges.add((s, so, d, di))
    return edges


def widgets(wf, type_):
    return [n["widgets_values"] for n in wf["nodes"] if n["type"] == type_]


@pytest.mark.parametrize("case", ["full", "lora", "lora-merge", "shared", "shared-fresh"])
def test_workflow_is_the_template_wired_for_two_steps(case, latent):
    root, t, runs, outs = latent
    wf = json.loads((outs[case] / "comfyui_workflow.json").read_text())
    tnodes, tedges = template_graph()
    ttypes = {n["type"] for n in tnodes}
    types = {n["type"] for n in wf["nodes"]}
    assert types <= ttypes | STOCK_EXTRA
    assert normalised_edges(wf) == tedges
    for link in wf["links"]:  # consistent link table: each link sits in its source's outputs and target's inputs
        lid, src, ss, dst, ds, typ = link
        n_src = next(n for n in wf["nodes"] if n["id"] == src)
        n_dst = next(n for n in wf["nodes"] if n["id"] == dst)
        assert lid in n_src["outputs"][ss]["links"] and n_dst["inputs"][ds]["link"] == lid
        assert n_src["outputs"][ss]["type"] == n_dst["inputs"][ds]["type"] == typ
    tw = {n["type"]: n["widgets_values"] for n in tnodes}
    assert widgets(wf, "CLIPLoader") == [tw["CLIPLoader"]] and widgets(wf, "VAELoader") == [tw["VAELoader"]]
    from twostep.io.folders import read_config
    from twostep.model import image_hw

    h, w = image_hw(read_config(runs[case.split("-merge")[0]]))  # the student's image size, else the template's
    assert tw["EmptySD3LatentImage"] == [1024, 1024, 1] and widgets(wf, "EmptySD3LatentImage") == [[w, h, 1]]
    export = json.loads((outs[case] / "twostep_export.json").read_text())
    sm = export["sigmas"][1]
    (shift,) = {w[0] for w in widgets(wf, "ModelSamplingAuraFlow")}
    assert tw["ModelSamplingAuraFlow"] == [3] and (sm != SM or shift == 3.0)
    grid = simple_grid(shift)
    assert abs(grid[0] - 1) < 1e-6 and abs(grid[1] - sm) < 1e-6 and grid[2] == 0.0
    unets = [w[0] for w in widgets(wf, "UNETLoader")]
    loras = [w[0] for w in widgets(wf, "LoraLoaderModelOnly")]
    if case == "lora":
        assert unets == ["z_image_turbo_bf16.safetensors"] == [tw["UNETLoader"][0]]
        assert loras == ["exp-lora_step1_lora.safetensors", "exp-lora_step2_lora.safetensors"]
    else:
        names = sorted(p.name for p in (outs[case] / "diffusion_models").iterdir())
        assert sorted(unets) == names and not loras
    ks, ksa = widgets(wf, "KSampler"), widgets(wf, "KSamplerAdvanced")
    if case == "shared":  # one model, same noise: the template's single KSampler at 2 steps, euler
        assert ks == [[0, "randomize", 2, 1.0, "euler", "simple", 1.0]] and not ksa
        return
    assert not ks and len(ksa) == 2
    (first,) = [w for w in ksa if w[7] == 0]
    (second,) = [w for w in ksa if w[7] == 1]
    fresh = case == "shared-fresh"
    assert first[:1] == ["enable"] and first[3:9] == [2, 1.0, "euler", "simple", 0, 1]
    assert second[3:10] == [2, 1.0, "euler", "simple", 1, 2, "disable"]
    assert first[9] == ("disable" if fresh else "enable") and second[0] == ("enable" if fresh else "disable")
    # each step runs its own model: step 1's sampler is fed from the step-1 file (or LoRA), step 2's from step 2's
    if case in ("full", "lora", "lora-merge"):
        by_id = {n["id"]: n for n in wf["nodes"]}

        def feeding(sampler):
            node = sampler
            while node["type"] not in ("UNETLoader", "LoraLoaderModelOnly"):
                lid = node["inputs"][0]["link"]
                node = by_id[next(l[1] for l in wf["links"] if l[0] == lid)]
            return node["widgets_values"][0]
        samplers = sorted((n for n in wf["nodes"] if n["type"] == "KSamplerAdvanced"), key=lambda n: n["widgets_values"][7])
        assert [feeding(s) for s in samplers] == (loras or unets)


def test_comfyui_export_refusals(tmp_path):
    from twostep.errors import UserError
    from twostep.export import resolve_format

    with pytest.raises(UserError, match="pixel-space"):
        resolve_format("comfyui", {"decoupling": "full"}, False)
    from twostep.export_comfyui import comfy_name

    with pytest.raises(UserError, match="--format twostep"):
        comfy_name("siglip_embedder.1.weight")


def comfy_ksampler(denoise, latent, noise, sigmas, add_noise, start, last, leftover):
    """What one ComfyUI KSampler(Advanced) does with a flow model (euler): comfy/samplers.py KSampler.sample slices
    the scheduler's sigmas (sigmas[:last + 1], the last set to 0 unless it returns leftover noise, then
    sigmas[start:]); nodes.py common_ksampler passes zero noise when add_noise is disabled; KSAMPLER.sample starts
    from CONST.noise_scaling(σ0, noise, latent) = σ0·noise + (1 − σ0)·latent, runs comfy/k_diffusion/sampling.py
    sample_euler (x += (x − x̂0)/σ · (σ_next − σ)) and returns CONST.inverse_noise_scaling(σ_last, x) =
    x / (1 − σ_last)."""
    s = torch.tensor(sigmas, dtype=torch.float32)
    if last < len(s) - 1:
        s = s[:last + 1]
        if leftover == "disable":
            s[-1] = 0
    s = s[start:]
    n = noise if add_noise == "enable" else torch.zeros_like(noise)
    x = s[0] * n + (1 - s[0]) * latent
    for i in range(len(s) - 1):
        x0 = denoise(x, float(s[i]))
        x = x + (x - x0) / s[i] * (s[i + 1] - s[i])
    return x / (1 - s[-1])


@pytest.mark.parametrize("case", ["full", "shared-fresh"])
def test_workflow_sampler_chain_is_the_student_rollout(case, latent):
    """The two KSamplerAdvanced nodes as written (their widgets), run the way ComfyUI's sampling code runs them with
    the student's denoisers, give the student's own 2-step rollout (ComfyUI itself not run: its model is its own
    port of the transformer; the denoiser here is twostep's)."""
    from twostep.sampling import load_student_generator

    root, t, runs, outs = latent
    wf = json.loads((outs[case] / "comfyui_workflow.json").read_text())
    (shift,) = {w[0] for w in widgets(wf, "ModelSamplingAuraFlow")}
    grid = simple_grid(shift)
    gen = load_student_generator(runs[case])
    st = gen.student
    text = gen.encode(["a red circle"] * 2)
    eps = gen.noise(2, 3)

    def denoiser(step):
        bb = st.step_backbone(step)
        return lambda x, s: bb.denoise(x, torch.full((x.shape[0],), s), text)

    first, second = sorted(widgets(wf, "KSamplerAdvanced"), key=lambda w: w[7])
    eps2 = torch.randn(eps.shape, generator=torch.Generator().manual_seed(5))  # the second sampler's own seed
    with torch.no_grad():
        lat = comfy_ksampler(denoiser(1), torch.zeros_like(eps), eps, grid, first[0], first[7], first[8], first[9])
        out = comfy_ksampler(denoiser(2), lat, eps2, grid, second[0], second[7], second[8], second[9])
        if case == "full":
            ref = st.generate(eps, text)["x0_2"]
        else:  # the student's rule with ComfyUI's ε' in place of twostep's
            x0_1 = denoiser(1)(eps, 1.0)
            ref = denoiser(2)(st.mid_state(x0_1, eps, eps2), st.sigma_mid)
    assert ref.abs().mean() > 1e-2 and (out - ref).abs().max().item() <= 1e-4


def test_comfyui_export_replaces_a_previous_one(latent):
    from twostep.export import _is_previous_export

    root, t, runs, outs = latent
    out = root / "exp-again"
    for flags in (["--format", "comfyui"], ["--format", "comfyui", "--merge"]):  # bf16 (auto), then merged
        assert main(["export", "--model", str(runs["lora"]), "--out", str(out), *flags]) == 0
    assert _is_previous_export(out) and not (out / "loras").exists() and not out.with_name("exp-again.partial").exists()
    sd = load_file(str(out / "diffusion_models/exp-again_step1.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert json.loads((out / "twostep_export.json").read_text())["files"]["unet"] == [
        "exp-again_step1.safetensors", "exp-again_step2.safetensors"]
