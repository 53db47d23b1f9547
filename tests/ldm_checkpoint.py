"""Write a diffusers pipeline folder as one A1111 / civitai-layout ``.safetensors`` checkpoint.

A test helper: it makes the single-file checkpoints users download (original LDM key names) from the
folders the tests build, so ``--model model.safetensors`` can be tested where no checkpoint can be
downloaded. It is written from the LDM layout itself (block-by-block numbering derived from the
UNet / VAE configs), independently of the diffusers code that reads such files back, so a loader
that mis-maps a key fails the tests' equality checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix, for a UNet2DConditionModel config."""
    n = config["layers_per_block"]
    m: dict[str, str] = dict(TOP)
    k = 1
    downs = config["down_block_types"]
    for i, kind in enumerate(downs):
        for j in range(n):
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            if "CrossAttn" in kind:
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if i < len(downs) - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    m["mid_block.resnets.0"], m["mid_block.attentions.0"], m["mid_block.resnets.1"] = (f"middle_block.{i}" for i in range(3))
    k = 0
    ups = config["up_block_types"]
    for i, kind in enumerate(ups):
        for j in range(n + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            if "CrossAttn" in kind:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            if j == n and i < len(ups) - 1:
                m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if 'CrossAttn' in kind else 1}.conv"
            k += 1
    return m


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str:
    for src in sorted(prefixes, key=len, reverse=True):
        if key.startswith(src + "."):
            rest = key[len(src) + 1:]
            if "resnets" in src:
                head, _, tail = rest.partition(".")
                rest = f"{inner.get(head, head)}.{tail}"
            return f"{prefixes[src]}.{rest}"
    raise KeyError(f"no LDM name for {key}")


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = unet_prefixes(config)
    return {"model.diffusion_model." + _rename(k, prefixes, RESNET): v for k, v in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    nb = len(config["block_out_channels"])
    n = config["layers_per_block"]
    m = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"], m[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_1", f"{part}.mid.block_2"
        m[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(nb):
        for j in range(n):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        for j in range(n + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{nb - 1 - i}.block.{j}"
        if i < nb - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
            m[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{nb - 1 - i}.upsample"
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for key, value in state.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")) or key.split(".")[1] in ("conv_in", "conv_out"):
            out["first_stage_model." + key] = value
            continue
        src = next((s for s in sorted(m, key=len, reverse=True) if key.startswith(s + ".")), None)
        if src is None:
            raise KeyError(f"no LDM name for {key}")
        rest = key[len(src) + 1:]
        if src.endswith("attn_1") or "attentions" in src:
            head, _, tail = rest.partition(".")
            if head == "to_out":
                tail = tail.partition(".")[2]  # to_out.0.weight -> proj_out.weight
            rest = f"{attn[head]}.{tail}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # linear -> 1x1 conv
        else:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        out[f"first_stage_model.{m[src]}.{rest}"] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> ``prefix + text_model.*`` (the OpenAI CLIP layout of SD 1.x / SDXL's first)."""
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()
            if k != "text_projection.weight"}


def openclip_to_ldm(state: dict[str, torch.Tensor], prefix: str, *, extra_layer: bool = False) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP's layout (fused q/k/v ``in_proj``, ``resblocks``, ``ln_final``,
    ``text_projection`` as x @ P). ``extra_layer`` adds the last ViT-H layer SD 2.x checkpoints carry
    but do not use (they condition on the penultimate layer)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([state[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
    if extra_layer:
        last = max(layers)
        for key in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.{last}.")]:
            out[key.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = torch.randn_like(out[key])
        width = out[prefix + "ln_final.weight"].shape[0]
        out[prefix + "text_projection"] = torch.randn(width, width).to(out[prefix + "ln_final.weight"].dtype)
    return out


def folder_tensors(folder: Path, component: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A diffusers folder component's tensors, one at a time: its fp32 files, or its fp16 variant where
    that is all it ships."""
    files = sorted((Path(folder) / component).glob("*.safetensors"))
    for f in [p for p in files if ".fp16." not in p.name] or files:
        with safe_open(f, "pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def write_ldm_checkpoint(folder: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """One ``.safetensors`` file in the A1111 layout holding ``folder``'s UNet, VAE and text encoders
    (in ``dtype``, e.g. fp16 as most published checkpoints are; None keeps the folder's)."""
    folder, out = Path(folder), Path(out)
    index = json.loads((folder / "model_index.json").read_text())

    def weights(component: str) -> dict[str, torch.Tensor]:  # tensor by tensor: peak memory is the output's
        return {key: t if dtype is None else t.to(dtype) for key, t in folder_tensors(folder, component)}

    def config(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text())

    ckpt = {**unet_to_ldm(weights("unet"), config("unet")), **vae_to_ldm(weights("vae"), config("vae"))}
    if "text_encoder_2" in index:  # SDXL
        ckpt.update(clip_to_ldm(weights("text_encoder"), "conditioner.embedders.0.transformer."))
        ckpt.update(openclip_to_ldm(weights("text_encoder_2"), "conditioner.embedders.1.model."))
    elif config("text_encoder")["hidden_act"] == "gelu":  # OpenCLIP ViT-H: SD 2.x
        ckpt.update(openclip_to_ldm(weights("text_encoder"), "cond_stage_model.model.", extra_layer=True))
    else:
        ckpt.update(clip_to_ldm(weights("text_encoder"), "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in ckpt.items()}, out)
    return out
