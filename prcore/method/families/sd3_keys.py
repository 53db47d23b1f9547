"""SD3 / SD3.5 LoRA keys as ComfyUI loads them (one owner of the mapping).

The file prcore writes (OneTrainer's layout, one of the four SD3 layouts ComfyUI reads), one entry
per adapted module, the module named by its diffusers path with dots as ``_``::

    lora_transformer_<path>.lora_down.weight   peft's lora_A, [rank, in] (a Conv2d: [rank, in, kh, kw])
    lora_transformer_<path>.lora_up.weight     peft's lora_B, [out, rank]
    lora_transformer_<path>.alpha              the LoRA's alpha (a scalar)

How ComfyUI reads it (its source as of late 2025):

* ``comfy/lora.py: model_lora_keys_unet``, its ``SD3`` branch, asks ``comfy/utils.py:
  mmdit_to_diffusers`` for every diffusers SD3 parameter and the original MMDiT weight it lives in,
  and accepts four names for each ``.weight`` entry: ``transformer.<path>`` (diffusers),
  ``base_model.model.<path>``, ``lora_transformer_<path_>`` (OneTrainer) and ``lycoris_<path_>``.
* ``comfy/lora.py: load_lora`` reads ``<name>.alpha``; ``comfy/weight_adapter/lora.py:
  LoRAAdapter.load`` takes ``.lora_up.weight`` / ``.lora_down.weight`` (kohya), ``.lora_B.weight`` /
  ``.lora_A.weight`` (peft), ``_lora.up.weight``, ``.lora.up.weight``, ``.lora_B``,
  ``.lora_linear_layer.up.weight`` and ``.lora_B.default.weight``; ``LoRAAdapter.calculate_weight``
  adds ``strength * alpha / rank * up @ down`` (rank: ``lora_down``'s rows; no ``.alpha`` key:
  scale 1, which is why prcore writes the kohya names with ``.alpha`` rather than peft's keys, whose
  alpha lives in metadata ComfyUI does not read). A file key ComfyUI cannot map is logged ("lora key
  not loaded") and dropped.
* ``comfy/lora.py: calculate_weight`` patches a slice ``weight.narrow(0, start, length)`` where the
  map gives an offset, and applies the map's function (``swap_scale_shift``) to the update.

What ``mmdit_to_diffusers`` maps, per block ``i`` (``transformer_blocks.i`` -> ``joint_blocks.i``;
``h`` = ComfyUI's ``depth * 64``, its depth being the hidden size / 64 (``comfy/model_detection.py:
detect_unet_config``), so ``h`` is the hidden size of every released SD3 / 3.5 model, whose hidden
size is 64 x its block count; ComfyUI maps blocks ``0 .. depth - 1`` only, so a model breaking that
rule, like prcore's tiny test model, has no SD3 LoRA map there at all):

* ``attn.to_q`` / ``to_k`` / ``to_v``: rows ``[0, h)``, ``[h, 2h)``, ``[2h, 3h)`` of ``x_block.attn.qkv``
* ``attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``: the same rows of ``context_block.attn.qkv``
* ``attn2.to_q`` / ``to_k`` / ``to_v``: the same rows of ``x_block.attn2.qkv`` (MMDiT-X, SD3.5 Medium)
* ``attn.to_out.0``, ``attn2.to_out.0``, ``attn.to_add_out``: ``x_block.attn.proj``,
  ``x_block.attn2.proj``, ``context_block.attn.proj``
* ``ff.net.0.proj``, ``ff.net.2``, ``ff_context.net.0.proj``, ``ff_context.net.2``:
  ``x_block.mlp.fc1`` / ``fc2``, ``context_block.mlp.fc1`` / ``fc2``
* ``norm1.linear``, ``norm1_context.linear``: ``x_block`` / ``context_block.adaLN_modulation.1`` (the
  last block's ``norm1_context``: scale and shift swapped)
* ``attn.norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``, ``attn2.norm_q`` / ``norm_k``:
  the ``ln_q`` / ``ln_k`` weights (RMSNorm scales: no LoRA targets them)

and outside the blocks ``context_embedder``, ``pos_embed.proj`` (``x_embedder.proj``, a Conv2d),
``time_text_embed.timestep_embedder.linear_1/2`` and ``.text_embedder.linear_1/2`` (``t_embedder`` /
``y_embedder.mlp.0/2``), ``proj_out`` (``final_layer.linear``) and ``norm_out.linear``
(``final_layer.adaLN_modulation.1``, swapped). That is every ``Linear`` and ``Conv2d`` of diffusers'
``SD3Transformer2DModel`` (SD3 Medium, SD3.5 Medium and Large): whatever ``train_target_modules`` a
user picks, the ComfyUI file holds all of it. A module outside this list (an adapter's own layers,
e.g. IP-Adapter's ``attn.processor.to_k_ip``, or a layer a later diffusers adds) would be dropped by
ComfyUI with only a log line, so its image would differ from prcore's without a word:
:func:`comfy_lora_state_dict` refuses it instead, naming the module, and so does any key that is
not a plain LoRA matrix (peft's ``lora_bias``, DoRA's magnitude), which the layout cannot carry.
:func:`comfy_unmapped` answers the same question for a list of module paths before any training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

COMFY_PREFIX = "lora_transformer_"

_BLOCK_MODULES = (
    r"attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)",
    r"attn2\.(to_q|to_k|to_v|to_out\.0)",
    r"ff\.net\.(0\.proj|2)",
    r"ff_context\.net\.(0\.proj|2)",
    r"norm1\.linear",
    r"norm1_context\.linear",
)
_TOP_MODULES = (
    r"context_embedder",
    r"pos_embed\.proj",
    r"time_text_embed\.(timestep|text)_embedder\.linear_[12]",
    r"proj_out",
    r"norm_out\.linear",
)
COMFY_SD3_MODULE = re.compile(r"transformer_blocks\.\d+\.(" + "|".join(_BLOCK_MODULES) + r")|" + "|".join(_TOP_MODULES))
"""The diffusers SD3 transformer module paths ComfyUI's ``mmdit_to_diffusers`` maps (module docstring)."""

_PEFT_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def comfy_unmapped(module_paths: Iterable[str]) -> list[str]:
    """The diffusers SD3 transformer module paths among ``module_paths`` that ComfyUI cannot map,
    sorted (empty: a LoRA on these modules loads whole in ComfyUI)."""
    return sorted({m for m in module_paths if not COMFY_SD3_MODULE.fullmatch(m)})


def _split_peft_key(key: str) -> tuple[str, str]:
    """``<module path>.lora_A.weight`` -> (module path, kohya suffix); ValueError for any other key."""
    for peft_suffix, kohya_suffix in _PEFT_SUFFIX.items():
        if key.endswith("." + peft_suffix):
            return key[: -len(peft_suffix) - 1], kohya_suffix
    raise ValueError(
        f"SD3 LoRA key {key!r} is not a plain LoRA matrix (<module>.lora_A.weight / .lora_B.weight): "
        "ComfyUI's LoRA layout has no place for it (peft's lora_bias, DoRA and embedding adapters are not "
        "exported); train without that option")


def comfy_lora_state_dict(peft_state: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """The SD3 transformer's LoRA (peft's keys, ``<module path>.lora_A.weight`` / ``.lora_B.weight``)
    in the layout ComfyUI loads: ``lora_transformer_<path, dots as _>.lora_down.weight`` (A),
    ``.lora_up.weight`` (B) and ``.alpha`` (``alpha``, so alpha != rank keeps its scale); fp32, CPU.

    Raises ValueError, naming them, for modules ComfyUI cannot map (:func:`comfy_unmapped`), keys that
    are not LoRA matrices, and modules missing one of A and B."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in peft_state.items():
        module, suffix = _split_peft_key(key)
        parts.setdefault(module, {})[suffix] = value
    if unmapped := comfy_unmapped(parts):
        raise ValueError(
            f"ComfyUI cannot load a LoRA on SD3 module(s) {unmapped}: its SD3 key map (comfy/utils.py "
            "mmdit_to_diffusers) has no such layer, so ComfyUI would drop them; leave them out of "
            "train_target_modules")
    if incomplete := sorted(m for m, p in parts.items() if len(p) != 2):
        raise ValueError(f"SD3 LoRA module(s) {incomplete} have only one of lora_A / lora_B")
    alpha_t = torch.tensor(float(alpha))
    out: dict[str, Tensor] = {}
    for module, matrices in parts.items():
        stem = COMFY_PREFIX + module.replace(".", "_")
        for suffix, value in matrices.items():
            out[f"{stem}.{suffix}"] = value.detach().to("cpu", torch.float32).contiguous()
        out[f"{stem}.alpha"] = alpha_t.clone()
    return out
