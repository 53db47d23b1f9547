"""SD3 LoRA keys as ComfyUI loads them (one owner of the mapping).

ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``, the ``SD3`` branch) maps diffusers' SD3
transformer module paths onto its MMDiT weights for three prefixes: ``transformer.<path>``
(diffusers), ``base_model.model.<path>`` and ``lora_transformer_<path, dots as _>`` (OneTrainer).
prcore writes the last, with kohya's ``lora_down`` / ``lora_up`` / ``alpha`` names, so the file
carries its own alpha like the SD files.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

COMFY_PREFIX = "lora_transformer_"


def comfy_lora_state_dict(peft_state: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """peft's ``<path>.lora_A.weight`` / ``.lora_B.weight`` -> ``lora_transformer_<path_>.lora_down.weight`` /
    ``.lora_up.weight`` / ``.alpha``."""
    out: dict[str, Tensor] = {}
    alpha_t = torch.tensor(float(alpha))
    for key, value in peft_state.items():
        module, kind = key.rsplit(".lora_", 1)
        stem = COMFY_PREFIX + module.replace(".", "_")
        out[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.detach().to("cpu", torch.float32).contiguous()
        out[f"{stem}.alpha"] = alpha_t.clone()
    return out
