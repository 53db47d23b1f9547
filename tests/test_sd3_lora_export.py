"""The SD3 LoRA file for ComfyUI (prcore.method.families.sd3_keys), loaded back the way ComfyUI loads it.

The loader here is written from ComfyUI's semantics, independently of the exporter: ComfyUI builds its
key map forward from the model (comfy/lora.py model_lora_keys_unet, SD3 branch, over comfy/utils.py
mmdit_to_diffusers), looks each ``lora_transformer_<path_>`` name up in the file
(``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``, comfy/weight_adapter/lora.py), and adds
``alpha / rank * up @ down`` to a row slice of the ORIGINAL MMDiT weight (fused qkv, swapped
scale/shift for the final adaLN layers). The test takes a fresh transformer into that original layout,
patches it there, comes back through diffusers' own converter
(``convert_sd3_transformer_checkpoint_to_diffusers``) and compares the transformer's output with
peft's LoRA output.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from prcore.method.families.sd3_keys import comfy_lora_state_dict, comfy_unmapped
from prcore.method.tiny import build_tiny_pipeline

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LARGE_TARGETS = DEFAULT_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                                   "ff_context.net.0.proj", "ff_context.net.2"]

# diffusers module -> original MMDiT module, per block (ComfyUI's MMDIT_MAP_BLOCK); qkv: (fused module, part)
BLOCK_QKV = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
             "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
             "attn.add_v_proj": ("context_block.attn.qkv", 2), "attn2.to_q": ("x_block.attn2.qkv", 0),
             "attn2.to_k": ("x_block.attn2.qkv", 1), "attn2.to_v": ("x_block.attn2.qkv", 2)}
BLOCK_PLAIN = {"attn.to_out.0": "x_block.attn.proj", "attn2.to_out.0": "x_block.attn2.proj",
               "attn.to_add_out": "context_block.attn.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
               "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
               "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
               "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
               "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
               "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
TOP = {"context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj", "proj_out": "final_layer.linear",
       "norm_out.linear": "final_layer.adaLN_modulation.1",
       "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
       "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
       "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
       "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}


def _swap(t: torch.Tensor) -> torch.Tensor:
    """Original (shift, scale) <-> diffusers (scale, shift) halves of an adaLN output layer."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def comfy_modules(num_layers: int, hidden: int) -> dict[str, tuple[str, int | None, bool]]:
    """ComfyUI's SD3 map: diffusers module -> (original module, first row of the patched slice or None
    for the whole weight, whether an update's halves are swapped). The slice height is ``hidden``
    (ComfyUI's ``depth * 64``, equal to it for the released models)."""
    out: dict[str, tuple[str, int | None, bool]] = {}
    for i in range(num_layers):
        for diff, (orig, part) in BLOCK_QKV.items():
            out[f"transformer_blocks.{i}.{diff}"] = (f"joint_blocks.{i}.{orig}", part * hidden, False)
        for diff, orig in BLOCK_PLAIN.items():
            swap = diff == "norm1_context.linear" and i == num_layers - 1
            out[f"transformer_blocks.{i}.{diff}"] = (f"joint_blocks.{i}.{orig}", None, swap)
    for diff, orig in TOP.items():
        out[diff] = (orig, None, diff == "norm_out.linear")
    return out


def comfy_key_map(num_layers: int, hidden: int) -> dict[str, tuple[str, int | None, bool]]:
    """The same map keyed by the LoRA names ComfyUI accepts for OneTrainer files: ``lora_transformer_<path_>``."""
    return {"lora_transformer_" + k.replace(".", "_"): v for k, v in comfy_modules(num_layers, hidden).items()}


def to_original(diffusers_sd: dict[str, torch.Tensor], num_layers: int, hidden: int) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in the original MMDiT layout (fused qkv, swapped adaLN)."""
    orig: dict[str, torch.Tensor] = {"pos_embed": diffusers_sd["pos_embed.pos_embed"].clone()}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for module, (orig_module, start, swap) in comfy_modules(num_layers, hidden).items():
        for end in ("weight", "bias"):
            value = diffusers_sd.get(f"{module}.{end}")
            if value is None:
                continue
            if start is None:
                orig[f"{orig_module}.{end}"] = _swap(value) if swap else value.clone()
            else:
                fused.setdefault(f"{orig_module}.{end}", [None, None, None])[start // hidden] = value
    orig.update({k: torch.cat(parts) for k, parts in fused.items() if all(p is not None for p in parts)})
    return orig


def comfy_load(file: dict[str, torch.Tensor], original: dict[str, torch.Tensor], num_layers: int,
               hidden: int) -> dict[str, torch.Tensor]:
    """Apply a LoRA file to the original-layout weights as ComfyUI does; every file key must be used."""
    patched = {k: v.clone() for k, v in original.items()}
    used: set[str] = set()
    for name, (orig_module, start, swap) in comfy_key_map(num_layers, hidden).items():
        if f"{name}.lora_up.weight" not in file:
            continue
        up, down = file[f"{name}.lora_up.weight"], file[f"{name}.lora_down.weight"]
        alpha = file[f"{name}.alpha"].item() if f"{name}.alpha" in file else None
        used |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        weight = patched[f"{orig_module}.weight"]
        target = weight if start is None else weight.narrow(0, start, hidden)
        diff = (up.flatten(1) @ down.flatten(1)).reshape(target.shape) * scale
        target += _swap(diff) if swap else diff
    assert not set(file) - used, f"keys ComfyUI would not load: {sorted(set(file) - used)}"
    return patched


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd3"), "sd3", with_t5=False)


def _transformer(path):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(path, subfolder="transformer").eval()


def _inputs(transformer):
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    return {"hidden_states": torch.randn(2, cfg.in_channels, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(2, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([250.0, 800.0])}


def _peft_lora(path, targets, rank: int, alpha: float):
    """A transformer with a peft LoRA of random, nonzero A and B on ``targets``; its state (peft's keys)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = _transformer(path)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return transformer, get_peft_model_state_dict(transformer)


def _comfy_output(path, file_path, num_layers: int, hidden: int, inputs):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    fresh = _transformer(path)
    original = to_original(fresh.state_dict(), num_layers, hidden)
    patched = comfy_load(load_file(str(file_path)), original, num_layers, hidden)
    fresh.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(patched), strict=True)
    with torch.no_grad():
        return fresh(**inputs, return_dict=False)[0]


def test_original_layout_round_trips_through_diffusers_converter(sd3_path):
    """The test's own diffusers -> original mapping is exact: diffusers' converter brings it back bit for bit."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = _transformer(sd3_path)
    cfg = transformer.config
    state = transformer.state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers(to_original(state, cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize(("targets", "rank", "alpha"), [
    (DEFAULT_TARGETS, 4, 4.0),
    (LARGE_TARGETS, 4, 4.0),
    # every Linear and Conv2d of the transformer, with the swapped final adaLN layers and the patch conv
    (LARGE_TARGETS + ["norm1.linear", "norm1_context.linear", "context_embedder", "pos_embed.proj", "proj_out",
                      "norm_out.linear", "linear_1", "linear_2"], 2, 2.0),
], ids=["default", "large", "every-layer"])
def test_comfy_file_reproduces_peft_output(sd3_path, tmp_path, targets, rank, alpha):
    peft_model, peft_state = _peft_lora(sd3_path, targets, rank, alpha)
    cfg = peft_model.config
    inputs = _inputs(peft_model)
    with torch.no_grad():
        expected = peft_model(**inputs, return_dict=False)[0]
        peft_model.disable_adapters()
        base = peft_model(**inputs, return_dict=False)[0]
    file_path = tmp_path / "lora_comfy.safetensors"
    save_file(comfy_lora_state_dict(peft_state, alpha), str(file_path))

    got = _comfy_output(sd3_path, file_path, cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, inputs)

    assert (expected - base).abs().max() > 1e-2  # the LoRA changes the output: the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if targets is DEFAULT_TARGETS:  # peft's default names reach both attentions of the MMDiT-X block
        assert {"lora_transformer_transformer_blocks_0_attn2_to_q.lora_down.weight",
                "lora_transformer_transformer_blocks_1_attn_to_out_0.lora_up.weight"} <= set(load_file(str(file_path)))


def test_alpha_other_than_rank_keeps_its_scale(sd3_path, tmp_path):
    """rank 4, alpha 1: ComfyUI's alpha / rank (0.25) must give peft's output; the file carries alpha."""
    peft_model, peft_state = _peft_lora(sd3_path, DEFAULT_TARGETS, 4, 1.0)
    cfg = peft_model.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    inputs = _inputs(peft_model)
    with torch.no_grad():
        expected = peft_model(**inputs, return_dict=False)[0]
    file = comfy_lora_state_dict(peft_state, 1.0)
    assert {v.item() for k, v in file.items() if k.endswith(".alpha")} == {1.0}
    save_file(file, str(tmp_path / "a.safetensors"))
    torch.testing.assert_close(_comfy_output(sd3_path, tmp_path / "a.safetensors", cfg.num_layers, hidden, inputs),
                               expected, atol=1e-5, rtol=1e-5)
    # the same file read with alpha = rank (what a file without .alpha would give) is visibly off
    save_file({k: v for k, v in file.items() if not k.endswith(".alpha")}, str(tmp_path / "no_alpha.safetensors"))
    off = _comfy_output(sd3_path, tmp_path / "no_alpha.safetensors", cfg.num_layers, hidden, inputs)
    assert (off - expected).abs().max() > 1e-3


def test_every_layer_of_the_sd3_transformer_is_one_comfyui_maps(sd3_path):
    transformer = _transformer(sd3_path)
    layers = [n for n, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert any(".attn2." in n for n in layers)  # the tiny model has the MMDiT-X block
    assert comfy_unmapped(layers) == []
    assert comfy_unmapped(["transformer_blocks.0.attn.processor.to_k_ip.0", "transformer_blocks.0.attn.to_q"]) == [
        "transformer_blocks.0.attn.processor.to_k_ip.0"]


def test_unmapped_module_is_refused_by_name():
    a, b = torch.ones(2, 16), torch.ones(16, 2)
    state = {"transformer_blocks.0.attn.to_q.lora_A.weight": a, "transformer_blocks.0.attn.to_q.lora_B.weight": b,
             "transformer_blocks.0.attn.processor.to_k_ip.0.lora_A.weight": a,
             "transformer_blocks.0.attn.processor.to_k_ip.0.lora_B.weight": b}
    with pytest.raises(ValueError, match=r"ComfyUI cannot load.*transformer_blocks\.0\.attn\.processor\.to_k_ip\.0.*train_target_modules"):
        comfy_lora_state_dict(state, 2.0)


@pytest.mark.parametrize("extra", ["transformer_blocks.0.attn.to_q.lora_B.bias",
                                   "transformer_blocks.0.attn.to_q.lora_magnitude_vector"])
def test_keys_that_are_not_lora_matrices_are_refused(extra):
    """peft's lora_bias and DoRA's magnitude have no place in the file: refused, never written as lora_up."""
    state = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 16),
             "transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(16, 2), extra: torch.ones(16)}
    with pytest.raises(ValueError, match=r"not a plain LoRA matrix"):
        comfy_lora_state_dict(state, 2.0)


def test_module_with_only_one_matrix_is_refused():
    with pytest.raises(ValueError, match=r"only one of lora_A / lora_B"):
        comfy_lora_state_dict({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 16)}, 2.0)
