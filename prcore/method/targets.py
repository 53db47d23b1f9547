"""Which layers a LoRA can target in a base model's denoiser, read without loading any weights.

``train_target_modules`` names are matched by peft: a name selects every layer whose dotted module
name equals it or ends with ``.<name>`` (``to_q``, ``to_out.0``, ``ff.net.0.proj``). Validation
(:mod:`prcore.data.validate`, which cannot import torch) asks for the layer names through a
function the CLI and the pipeline pass in; this module answers it: the model's family and its
denoiser's config are read (a diffusers folder's ``model_index.json`` and ``<denoiser>/config.json``,
a single-file checkpoint's architecture from its header, a hub repo's configs from the local cache)
and the family builds the denoiser on the ``meta`` device (no memory, ~0.1 s for SDXL), listing its
``Linear`` and ``Conv2d`` layers: the layer types prcore trains.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from prcore.data.model_source import SINGLE_FILE_SUFFIX, check_single_file
from prcore.data.schema import ModelRules
from prcore.method.families import ModelFamily, family_for_index, family_named


def denoiser_config(source: str | Path) -> tuple[ModelFamily, dict[str, Any]] | None:
    """The family and denoiser config of a base model: a diffusers folder (its ``model_index.json``
    names the family), a single-file ``.safetensors`` checkpoint (its architecture's published
    config), or a hub id (its cached configs, never a download). None when it cannot be read here
    (the run's model loading reports that)."""
    from prcore.method.architectures import architecture

    text = str(source).removeprefix("file://")
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            index = path / "model_index.json"
            family = family_for_index(json.loads(index.read_text())) if index.is_file() else None
            config = path / family.denoiser_attr / "config.json" if family else None
            return (family, json.loads(config.read_text())) if config is not None and config.is_file() else None
        if path.is_file() and path.suffix.lower() == SINGLE_FILE_SUFFIX:
            arch = architecture(check_single_file(path))
            family = family_for_index({"_class_name": arch["pipeline"]})
            return family, arch[family.denoiser_attr]
        if path.exists():
            return None
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(text, "model_index.json")
        family = family_for_index(json.loads(Path(index).read_text())) if isinstance(index, str) else None
        cached = try_to_load_from_cache(text, f"{family.denoiser_attr}/config.json") if family else None
        return (family, json.loads(Path(cached).read_text())) if isinstance(cached, str) else None
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=16)
def _layer_names(family_name: str, config_json: str) -> tuple[str, ...]:
    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    return family_named(family_name).layer_names(config)


def lora_layer_names(source: str | Path) -> tuple[str, ...] | None:
    """The dotted names of the denoiser layers a LoRA can adapt in ``source``; None when its config is unknown."""
    found = denoiser_config(source)
    if found is None:
        return None
    family, config = found
    try:
        return _layer_names(family.name, json.dumps(config, sort_keys=True))
    except (TypeError, ValueError):  # a config this diffusers cannot build: the load reports it
        return None


def model_rules(source: str | Path) -> ModelRules | None:
    """What the family of ``source`` accepts (schedulers, learned embeddings, min-SNR), read without
    weights like :func:`lora_layer_names`; None when the model is unknown here."""
    found = denoiser_config(source)
    if found is None:
        return None
    family = found[0]
    return ModelRules(label=family.label, schedulers=tuple(family.noise_class.scheduler_names),
                      text_embeddings=family.supports_text_embeddings, snr_weighting=family.noise_class.supports_min_snr)
