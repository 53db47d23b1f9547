"""What a ``--model`` / ``base_model`` value names, read without loading any weights.

A base model is one of:

- a hub id (``stabilityai/stable-diffusion-xl-base-1.0``), resolved when the run loads it;
- a local diffusers folder (``save_pretrained`` layout, with ``model_index.json``);
- a local single-file checkpoint in the A1111 / civitai layout (``model.safetensors``: the LDM key
  names ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` /
  ``conditioner.embedders.*``);
- a local SD 3 / 3.5 single file in Stability's / ComfyUI's layout: the MMDiT as
  ``model.diffusion_model.joint_blocks.*`` (and its embedders), the VAE as ``first_stage_model.*``, the
  text encoders as ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` and,
  optionally, ``text_encoders.t5xxl.transformer.*`` (the prefixes diffusers' ``single_file_utils`` reads).
  Stability's own ``sd3.5_*.safetensors`` carry no text encoders (they ship beside it): those are
  refused with what to use instead; a file without T5 is fine (the pipeline runs without it).

Only safetensors are read: a pickled ``.ckpt`` / ``.pt`` / ``.bin`` can run code when it is
loaded and is refused with a message that says how to convert it. The architecture of a
single file is read from its key names (the safetensors header only: a few hundred kB however large
the file), so it works for any size of network and never from the file's name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

SINGLE_FILE_SUFFIX = ".safetensors"
CONFIG_FOLDER_SUFFIX = ".config"  # <stem>.config/ beside a single file: its diffusers configs and tokenizers
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER_BYTES = 100 * 2**20  # a real SDXL checkpoint's header is ~0.2 MB

# the LDM layout's prefixes (one owner): which text encoders a checkpoint carries says its family
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_L_SD1 = "cond_stage_model.transformer."          # SD 1.x: OpenAI CLIP ViT-L/14
LDM_OPENCLIP_SD2 = "cond_stage_model.model."              # SD 2.x: OpenCLIP ViT-H/14
LDM_CLIP_L_SDXL = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L/14 ...
LDM_OPENCLIP_SDXL = "conditioner.embedders.1.model."      # ... and OpenCLIP ViT-bigG/14
LDM_SDXL_REFINER = "conditioner.embedders.0.model."       # the SDXL refiner: bigG only
LORA_KEY_PREFIXES = ("lora_unet_", "lora_te", "unet.", "lora.", "transformer.", "lora_transformer_")

# SD 3 / 3.5 (Stability / ComfyUI layout; the VAE is first_stage_model.* as in the LDM layout)
SD3_BLOCKS = "joint_blocks."                                  # MMDiT blocks, under LDM_UNET_PREFIX
SD3_CLIP_L = "text_encoders.clip_l.transformer."              # CLIP ViT-L, transformers' own key names
SD3_CLIP_G = "text_encoders.clip_g.transformer."              # OpenCLIP ViT-bigG, transformers' key names
SD3_T5 = "text_encoders.t5xxl.transformer."                   # T5-XXL encoder (optional)
SD3_T5_MARKER = SD3_T5 + "shared.weight"                      # the key diffusers takes as "T5 is in the file"
SD3_DUAL_ATTENTION = ".x_block.attn2."                        # MMDiT-X (SD 3.5 Medium)
SD3_QK_NORM = ".attn.ln_q."                                   # RMS q/k norm (SD 3.5)
SD3_PATCH_EMBED = LDM_UNET_PREFIX + "x_embedder.proj.weight"  # (width, latent channels, 2, 2)
SD3_CLIP_NAMES = {SD3_CLIP_L: "CLIP-L (text_encoders.clip_l.*)", SD3_CLIP_G: "CLIP-G (text_encoders.clip_g.*)"}
SD3_HUB_IDS = {"sd3m": "stabilityai/stable-diffusion-3-medium-diffusers", "sd35m": "stabilityai/stable-diffusion-3.5-medium",
               "sd35l": "stabilityai/stable-diffusion-3.5-large"}

ARCHITECTURE_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL", "sd3m": "SD 3 Medium", "sd35m": "SD 3.5 Medium",
                      "sd35l": "SD 3.5 Large"}


class ModelSourceError(ValueError):
    """A base model value that cannot be loaded, with what to do about it."""


def safetensors_keys(path: str | Path) -> dict[str, dict]:
    """The tensor entries (name -> dtype, shape, offsets) of a safetensors file, from its header only.

    Raises :class:`ModelSourceError` for a file that is not safetensors (bounded read: a corrupt
    length never makes this read more than 100 MB)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelSourceError(f"{path}: not a safetensors file (only {len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > _MAX_HEADER_BYTES or n > os.path.getsize(path) - 8:
            raise ModelSourceError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelSourceError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ModelSourceError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


def sd3_depth(keys) -> int:
    """The number of MMDiT blocks (``joint_blocks.<i>``) of an SD 3 / 3.5 single file; 0 for any other file."""
    start = LDM_UNET_PREFIX + SD3_BLOCKS
    return len({k[len(start):].split(".", 1)[0] for k in keys if k.startswith(start)})


def sd3_has_t5(keys) -> bool:
    """Whether an SD 3 / 3.5 single file carries the T5-XXL encoder."""
    return SD3_T5_MARKER in set(keys)


def sd3_architecture(keys) -> str:
    """``"sd35m"`` (dual-attention MMDiT-X blocks), ``"sd35l"`` (q/k norm, no dual attention; 38 blocks
    published) or ``"sd3m"`` (neither: SD 3 Medium) for an SD 3 / 3.5 single file's key names; a
    :class:`ModelSourceError` naming what is missing when it has no VAE or lacks a CLIP encoder (T5 may be
    missing)."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    blocks = [k for k in keys if k.startswith(LDM_UNET_PREFIX + SD3_BLOCKS)]
    if any(SD3_DUAL_ATTENTION in k for k in blocks):
        arch = "sd35m"
    elif any(SD3_QK_NORM in k for k in blocks):
        arch = "sd35l"
    else:
        arch = "sd3m"
    name = ARCHITECTURE_NAMES[arch]
    missing = [label for prefix, label in SD3_CLIP_NAMES.items() if not has(prefix)]
    if missing:
        raise ModelSourceError(
            f"an {name} checkpoint without its {' and '.join(missing)} text encoder{'s' * (len(missing) > 1)} "
            "(Stability's own file ships them separately): use a single file that includes the CLIP encoders "
            f"(ComfyUI's *_incl_clips*.safetensors; T5 may be left out) or the diffusers folder / hub id {SD3_HUB_IDS[arch]}")
    if not has(LDM_VAE_PREFIX):
        raise ModelSourceError(f"an {name} checkpoint without a VAE (no {LDM_VAE_PREFIX}* keys): "
                               f"use a complete single file or the diffusers folder / hub id {SD3_HUB_IDS[arch]}")
    return arch


def single_file_architecture(keys) -> str:
    """``"sd15"``, ``"sd21"``, ``"sdxl"`` (LDM layout) or ``"sd3m"``, ``"sd35m"``, ``"sd35l"`` (SD 3 / 3.5
    layout, :func:`sd3_architecture`) for a single file's key names.

    The text encoders decide: SD 1.x carries ``cond_stage_model.transformer.*`` (CLIP ViT-L),
    SD 2.x ``cond_stage_model.model.*`` (OpenCLIP ViT-H), SDXL base both ``conditioner.embedders.0``
    (CLIP ViT-L) and ``conditioner.embedders.1`` (OpenCLIP bigG). Anything else is refused, saying
    what it looks like (a LoRA, a refiner, a diffusers-layout file, an inpainting UNet)."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has(LDM_UNET_PREFIX + SD3_BLOCKS):
        return sd3_architecture(keys)
    if not has(LDM_UNET_PREFIX):
        if has(SD3_BLOCKS):
            raise ModelSourceError("it holds an SD 3 / 3.5 transformer alone (joint_blocks.* without the VAE and text "
                                   "encoders); give a complete single file or the model's diffusers folder / hub id")
        if any(k.startswith(LORA_KEY_PREFIXES) for k in keys) or any(".lora_" in k or "lora_down" in k for k in keys):
            raise ModelSourceError("it is a LoRA, not a base checkpoint: pass it as a subject's LoRA, and --model the base it was trained on")
        if any(k.startswith(("down_blocks.", "conv_in.", "time_embedding.")) for k in keys):
            raise ModelSourceError("it holds a diffusers-layout UNet alone; give the whole pipeline folder (model_index.json) instead")
        raise ModelSourceError(f"no {LDM_UNET_PREFIX}* keys: not a Stable Diffusion checkpoint in the A1111 / civitai layout")
    if not has(LDM_VAE_PREFIX):
        raise ModelSourceError(f"no {LDM_VAE_PREFIX}* keys: the checkpoint has no VAE (prcore loads complete checkpoints)")
    if has(LDM_CLIP_L_SDXL) and has(LDM_OPENCLIP_SDXL):
        return "sdxl"
    if has(LDM_SDXL_REFINER):
        raise ModelSourceError("it is an SDXL refiner checkpoint (one OpenCLIP bigG text encoder); prcore personalizes base models")
    if has(LDM_OPENCLIP_SD2):
        return "sd21"
    if has(LDM_CLIP_L_SD1):
        return "sd15"
    raise ModelSourceError("no text encoder keys (cond_stage_model.* or conditioner.embedders.*): "
                           "not a complete SD 1.x / 2.x / SDXL checkpoint")


def checkpoint_in_channels(entries: dict[str, dict]) -> int | None:
    """The denoiser's input channels: the UNet's (4 for text-to-image; 9 for an inpainting checkpoint) or
    the SD 3 transformer's patch embedding's (16)."""
    conv_in = entries.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight") or entries.get(SD3_PATCH_EMBED)
    return int(conv_in["shape"][1]) if conv_in and len(conv_in.get("shape", ())) == 4 else None


def check_single_file(path: str | Path) -> str:
    """The architecture (``"sd15"``, ``"sd21"``, ``"sdxl"``, ``"sd3m"``, ``"sd35m"``, ``"sd35l"``) of a local single-file checkpoint that
    prcore can load, from one bounded header read; :class:`ModelSourceError` saying what is wrong otherwise."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelSourceError(
            f"{path.name} is a pickled checkpoint, which can run code when loaded; prcore loads safetensors only. "
            "Convert it once where you trust it (e.g. load with torch and save with safetensors.torch.save_file) "
            "or use the model's .safetensors release")
    if path.suffix.lower() != SINGLE_FILE_SUFFIX:
        raise ModelSourceError(f"{path.name}: a single-file model must be a {SINGLE_FILE_SUFFIX} checkpoint")
    try:
        entries = safetensors_keys(path)
        architecture = single_file_architecture(entries)
    except ModelSourceError as exc:
        raise ModelSourceError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ModelSourceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    channels = checkpoint_in_channels(entries)
    if architecture.startswith("sd3"):
        if channels not in (None, 16):
            raise ModelSourceError(f"{path}: its transformer takes {channels} latent channels; SD 3 / 3.5 text-to-image takes 16 "
                                   "(a ControlNet / inpainting variant?)")
    elif channels not in (None, 4):
        raise ModelSourceError(f"{path}: its UNet takes {channels} input channels (an inpainting / instruct checkpoint); "
                               "prcore needs a text-to-image model (4)")
    return architecture


def single_file_problem(path: str | Path) -> str | None:
    """What is wrong with a local single-file checkpoint, or None when prcore can load it."""
    try:
        check_single_file(path)
    except ModelSourceError as exc:
        return str(exc)
    return None


def local_model_problem(value: str | Path) -> str | None:
    """What is wrong with a base model that names an existing or intended local path, or None.

    A folder must hold ``model_index.json``; a file must be a loadable single-file checkpoint."""
    path = Path(os.path.expanduser(str(value)))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            return (f"{value!s} has no model_index.json: give a diffusers pipeline folder (save_pretrained), "
                    f"a single-file {SINGLE_FILE_SUFFIX} checkpoint, or a hub id")
        return None
    if path.is_file():
        return single_file_problem(path)
    return (f"{value!s} does not exist; give a diffusers pipeline folder (with model_index.json), "
            f"a single-file {SINGLE_FILE_SUFFIX} checkpoint, or a hub id")


def looks_local(value: str) -> bool:
    """Whether a model value is meant as a local path rather than a hub id (``org/name``)."""
    text = value.strip()
    if text.startswith("file://"):
        return True
    if text.startswith(("/", "./", "../", "~")) or (os.sep == "\\" and text[1:3] == ":\\"):
        return True
    if text.lower().endswith((SINGLE_FILE_SUFFIX, *PICKLE_SUFFIXES)):
        return True
    return os.path.exists(os.path.expanduser(text))
