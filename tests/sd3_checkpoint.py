"""Write an SD 3 / 3.5 diffusers folder as one single file in Stability's / ComfyUI's layout.

A test helper, like ``ldm_checkpoint`` for SD: it makes the single files SD3 users have
(``model.diffusion_model.joint_blocks.*`` for the MMDiT, ``first_stage_model.*`` for the VAE,
``text_encoders.clip_l|clip_g|t5xxl.transformer.*`` for the text encoders) from the folders the tests
build. It is written from the original MMDiT layout (fused ``qkv`` projections, ``x_block`` /
``context_block``, ``adaLN_modulation`` in (shift, scale) order where diffusers keeps (scale, shift)),
not by calling the diffusers code that reads such files back, so a loader that mis-maps a key fails the
tests' equality checks. Every diffusers key must be mapped: an unknown one is an error here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ldm_checkpoint import folder_tensors, vae_to_ldm
from safetensors.torch import save_file

TOP = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
       "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
       "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
       "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
       "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
       "context_embedder": "context_embedder", "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
         "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
         "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
         "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
         "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
         "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
         "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
QKV = (("attn", ("to_q", "to_k", "to_v"), "x_block.attn.qkv"),  # fused in the original: one (3 * width, width) weight
       ("attn", ("add_q_proj", "add_k_proj", "add_v_proj"), "context_block.attn.qkv"),
       ("attn2", ("to_q", "to_k", "to_v"), "x_block.attn2.qkv"))
PREFIX = "model.diffusion_model."
TEXT_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
                 "text_encoder_3": "text_encoders.t5xxl.transformer."}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): the final AdaLayerNormContinuous layers' two layouts."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def transformer_to_sd3(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """diffusers ``SD3Transformer2DModel`` state -> the original MMDiT key names (under ``model.diffusion_model.``)."""
    state, out = dict(state), {}
    for src, dst in TOP.items():
        for suffix in ("", ".weight", ".bias"):
            if src + suffix in state:
                value = state.pop(src + suffix)
                out[dst + suffix] = swap_halves(value) if src == "norm_out.linear" else value
    for i in range(num_layers):
        b = f"transformer_blocks.{i}."
        for module, projections, dst in QKV:
            for p in ("weight", "bias"):
                names = [f"{b}{module}.{x}.{p}" for x in projections]
                if all(n in state for n in names):
                    out[f"joint_blocks.{i}.{dst}.{p}"] = torch.cat([state.pop(n) for n in names])
        for src, dst in BLOCK.items():
            for p in ("weight", "bias"):
                if b + f"{src}.{p}" in state:
                    value = state.pop(b + f"{src}.{p}")
                    last_context_norm = src == "norm1_context.linear" and i == num_layers - 1
                    out[f"joint_blocks.{i}.{dst}.{p}"] = swap_halves(value) if last_context_norm else value
    if state:
        raise KeyError(f"no SD3 name for {sorted(state)[:5]}")
    return {PREFIX + k: v for k, v in out.items()}


def write_sd3_checkpoint(folder: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                         t5: bool = True, clip: tuple[str, ...] = ("text_encoder", "text_encoder_2")) -> Path:
    """One ``.safetensors`` file in the SD3 single-file layout holding ``folder``'s transformer, VAE and
    the text encoders in ``clip`` (and T5 where the folder has it and ``t5``), in ``dtype`` (None: the folder's)."""
    folder, out = Path(folder), Path(out)

    def weights(component: str) -> dict[str, torch.Tensor]:
        return {key: t if dtype is None else t.to(dtype) for key, t in folder_tensors(folder, component)}

    def config(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text())

    ckpt = transformer_to_sd3(weights("transformer"), config("transformer")["num_layers"])
    ckpt.update(vae_to_ldm(weights("vae"), config("vae")))
    encoders = [*clip, *(["text_encoder_3"] if t5 and (folder / "text_encoder_3").is_dir() else [])]
    for component in encoders:
        ckpt.update({TEXT_PREFIXES[component] + k: v for k, v in weights(component).items()})
    save_file({k: v.contiguous() for k, v in ckpt.items()}, out)
    return out


def tiny_sd3_with_distinct_clips(path: str | Path, *, with_t5: bool = True, seed: int = 0) -> Path:
    """The tiny SD3 pipeline (``prcore.method.tiny``) with CLIP-L and CLIP-G of different widths (24 and
    40: together T5's 64, as 768 + 1280 fit T5-XXL's 4096) and CLIP-L's projection the identity, as in
    the real models. A single-file loader tells the two CLIP encoders apart by their width (diffusers'
    ``create_diffusers_clip_model_from_ldm``), so the tiny's two 32-wide encoders would both load CLIP-L."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from prcore.method.tiny import build_tiny_pipeline

    path = Path(path)
    build_tiny_pipeline(path, "sd3", seed=seed, with_t5=with_t5)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **({} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    for i, (component, width) in enumerate((("text_encoder", 24), ("text_encoder_2", 40))):
        config = CLIPTextConfig(**{**getattr(pipe, component).config.to_dict(), "hidden_size": width, "intermediate_size": 2 * width,
                                   "projection_dim": width})
        torch.manual_seed(seed + 10 + i)
        encoder = CLIPTextModelWithProjection(config)
        if component == "text_encoder":
            with torch.no_grad():
                encoder.text_projection.weight.copy_(torch.eye(width))
        setattr(pipe, component, encoder)
        pipe.register_modules(**{component: encoder})
    pipe.save_pretrained(path, safe_serialization=True)
    return path
