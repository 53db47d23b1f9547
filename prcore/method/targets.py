"""Which layers a LoRA can target in a base model's UNet, read without loading any weights.

``train_target_modules`` names are matched by peft: a name selects every layer whose dotted module
name equals it or ends with ``.<name>`` (``to_q``, ``to_out.0``, ``ff.net.0.proj``). Validation
(:mod:`prcore.data.validate`, which cannot import torch) asks for the layer names through a
function the CLI and the pipeline pass in; this module answers it: the UNet's config is read (a
diffusers folder's ``unet/config.json``, a single-file checkpoint's architecture from its header,
a hub repo's config from the local cache) and the UNet is built on the ``meta`` device (no memory,
~0.1 s for SDXL), listing its ``Linear`` and ``Conv2d`` layers: the layer types prcore trains.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from prcore.data.model_source import SINGLE_FILE_SUFFIX, check_single_file


def unet_config(source: str | Path) -> dict[str, Any] | None:
    """The UNet config of a base model: a diffusers folder, a single-file ``.safetensors`` checkpoint
    (its architecture's published config), or a hub id (its cached ``unet/config.json``, never a
    download). None when it cannot be read here (the run's model loading reports that)."""
    from prcore.method.architectures import architecture

    text = str(source).removeprefix("file://")
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            config = path / "unet" / "config.json"
            return json.loads(config.read_text()) if config.is_file() else None
        if path.is_file() and path.suffix.lower() == SINGLE_FILE_SUFFIX:
            return architecture(check_single_file(path))["unet"]
        if path.exists():
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(text, "unet/config.json")
        return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=16)
def _layer_names(config_json: str) -> tuple[str, ...]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from torch import nn

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return tuple(name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d)))


def lora_layer_names(source: str | Path) -> tuple[str, ...] | None:
    """The dotted names of the UNet layers a LoRA can adapt in ``source``; None when its config is unknown."""
    config = unet_config(source)
    if config is None:
        return None
    try:
        return _layer_names(json.dumps(config, sort_keys=True))
    except (TypeError, ValueError):  # a config this diffusers cannot build: the load reports it
        return None
