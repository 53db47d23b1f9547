"""What a ``--model`` / ``base_model`` value names, read without loading any weights.

A base model is one of:

- a hub id (``stabilityai/stable-diffusion-xl-base-1.0``), resolved when the run loads it;
- a local diffusers folder (``save_pretrained`` layout, with ``model_index.json``);
- a local single-file checkpoint in the A1111 / civitai layout (``model.safetensors``: the LDM key
  names ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*`` /
  ``conditioner.embedders.*``).

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
LORA_KEY_PREFIXES = ("lora_unet_", "lora_te", "unet.", "lora.", "transformer.")

ARCHITECTURE_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}


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


def single_file_architecture(keys) -> str:
    """``"sd15"``, ``"sd21"`` or ``"sdxl"`` for an LDM-layout checkpoint's key names.

    The text encoders decide: SD 1.x carries ``cond_stage_model.transformer.*`` (CLIP ViT-L),
    SD 2.x ``cond_stage_model.model.*`` (OpenCLIP ViT-H), SDXL base both ``conditioner.embedders.0``
    (CLIP ViT-L) and ``conditioner.embedders.1`` (OpenCLIP bigG). Anything else is refused, saying
    what it looks like (a LoRA, a refiner, a diffusers-layout file, an inpainting UNet)."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(LDM_UNET_PREFIX):
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
    """The UNet's input channels (4 for text-to-image; 9 for an inpainting checkpoint)."""
    conv_in = entries.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight")
    return int(conv_in["shape"][1]) if conv_in and len(conv_in.get("shape", ())) == 4 else None


def check_single_file(path: str | Path) -> str:
    """The architecture (``"sd15"``, ``"sd21"``, ``"sdxl"``) of a local single-file checkpoint that
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
    if channels not in (None, 4):
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
