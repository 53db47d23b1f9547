"""A subject's LoRA folder: save, load, unload (training and sampling share this module).

The folder (file names: ``prcore.store.keys``) holds the UNet adapter in diffusers' key layout
(``pytorch_lora_weights.safetensors``, with the peft LoRA config in its metadata so alpha != rank
reloads exactly), the same LoRA in kohya's key layout (``lora_kohya.safetensors``: the
``lora_unet_<module path>.lora_down/lora_up/alpha`` keys ComfyUI and A1111 load), an optional
learned identifier embedding in the family's textual-inversion layout (``learned_embeds.safetensors``)
and in the web UIs' embedding layout (``embedding_webui.safetensors``), and ``training.json``
(the record, written last).
Weights load from safetensors only; nothing is read from outside the folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prcore.method.families import ModelFamily, family_named, family_of
from prcore.store.keys import (
    LORA_EMBEDDINGS_FILE,
    LORA_KOHYA_FILE,
    LORA_RECORD_FILE,
    LORA_WEBUI_EMBEDDING_FILE,
    LORA_WEIGHTS_FILE,
)


def read_training_record(lora_dir: str | Path) -> dict[str, Any] | None:
    """The folder's ``training.json``, or None when there is none."""
    path = Path(lora_dir) / LORA_RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def lora_state_dict(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key layout (fp32, CPU, contiguous)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def kohya_state_dict(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter in kohya's layout: ``lora_unet_<diffusers module path, dots as _>`` with
    ``.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha`` (the LoRA's own alpha, so
    alpha != rank keeps its scale; diffusers' converter would write the rank). ComfyUI maps these
    names onto every UNet family it loads; A1111 converts them for SD 1.x/2.x."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
    alpha = torch.tensor(float(unet.peft_config[adapter_name].lora_alpha))
    out = {}
    for key, value in convert_state_dict_to_kohya(peft_state).items():
        out[key] = alpha.clone() if key.endswith(".alpha") else value.detach().to("cpu", torch.float32).contiguous()
    return out


def save_lora(pipe, folder: str | Path, adapter_name: str) -> None:
    """Write the UNet adapter as ``pytorch_lora_weights.safetensors`` (diffusers layout, its LoRA
    config as metadata) and as ``lora_kohya.safetensors`` (kohya layout, for ComfyUI / A1111)."""
    from safetensors.torch import save_file

    config = pipe.unet.peft_config[adapter_name]
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata.get("target_modules") or [])
    type(pipe).save_lora_weights(
        folder,
        unet_lora_layers=lora_state_dict(pipe.unet, adapter_name),
        unet_lora_adapter_metadata=metadata,
        weight_name=LORA_WEIGHTS_FILE,
        safe_serialization=True,
    )
    family = family_of(pipe)
    save_file(kohya_state_dict(pipe.unet, adapter_name), str(Path(folder) / LORA_KOHYA_FILE),
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                        "ss_network_alpha": str(config.lora_alpha), "ss_base_model_version": family.name,
                        "modelspec.architecture": family.name})


def save_embeddings(family: ModelFamily, folder: Path, rows: Sequence[torch.Tensor], token: str) -> dict[str, Any]:
    """A learned token's embedding rows (one per text encoder) in the family's textual-inversion
    layout (SD: ``{token: (1, d)}``, loadable by ``pipe.load_textual_inversion(file)``; SDXL:
    ``{"clip_l": (1, d1), "clip_g": (1, d2)}``); returns the record's ``learned_embeddings`` entry."""
    from safetensors.torch import save_file

    rows = [r.detach().to("cpu", torch.float32).reshape(1, -1).contiguous() for r in rows]
    layout, tensors = family.embedding_layout(rows, token)
    save_file(tensors, str(folder / LORA_EMBEDDINGS_FILE), metadata={"token": token})
    save_file(family.webui_embedding(rows), str(folder / LORA_WEBUI_EMBEDDING_FILE), metadata={"token": token})
    return {"file": LORA_EMBEDDINGS_FILE, "webui_file": LORA_WEBUI_EMBEDDING_FILE, "tokens": [token], "layout": layout}


def _loaded_tokens(pipe) -> dict[str, list[str]]:
    registry = getattr(pipe, "_prcore_lora_tokens", None)
    if registry is None:
        registry = {}
        pipe._prcore_lora_tokens = registry
    return registry


def load_subject_lora(pipe, lora_dir: str | Path, adapter_name: str) -> None:
    """Load a trained subject LoRA (and its learned token embedding, if any) as ``adapter_name``.

    Does nothing if an adapter of that name is already loaded. Weights load from safetensors only.
    """
    lora_dir = Path(lora_dir)
    unet = pipe.unet
    if getattr(unet, "_hf_peft_config_loaded", False) and adapter_name in unet.peft_config:
        return
    weights = lora_dir / LORA_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no LoRA at {lora_dir}: {LORA_WEIGHTS_FILE} is missing (train the subject first)")
    record = read_training_record(lora_dir) or {}
    learned = record.get("learned_embeddings")
    if learned and learned.get("file") != LORA_EMBEDDINGS_FILE:
        raise ValueError(f"{lora_dir / LORA_RECORD_FILE} names embedding file {learned.get('file')!r}; only {LORA_EMBEDDINGS_FILE} inside the folder is read")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence "no LoRA keys for the text encoder": we train the UNet only
    try:
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS_FILE, adapter_name=adapter_name, use_safetensors=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if learned:
        from safetensors.torch import load_file

        tokens = list(learned["tokens"])
        family = family_named(learned.get("layout", family_of(pipe).name))
        rows = family.embedding_rows(load_file(str(lora_dir / LORA_EMBEDDINGS_FILE)), tokens[0])
        try:
            for (tok, enc), row in zip(family.text_pairs(pipe), rows, strict=True):
                pipe.load_textual_inversion(row, token=tokens[0], text_encoder=enc, tokenizer=tok)
        except ValueError:
            pipe.delete_adapters(adapter_name)
            raise
        _loaded_tokens(pipe)[adapter_name] = tokens


def unload_subject_lora(pipe, adapter_name: str) -> None:
    """Remove a subject's adapter and its added tokens, leaving the base pipeline as before loading."""
    unet = pipe.unet
    if getattr(unet, "_hf_peft_config_loaded", False) and adapter_name in unet.peft_config:
        pipe.delete_adapters(adapter_name)
    tokens = _loaded_tokens(pipe).pop(adapter_name, [])
    for tok, te in family_of(pipe).text_pairs(pipe):
        if tokens:
            pipe.unload_textual_inversion(tokens=tokens, tokenizer=tok, text_encoder=te)
