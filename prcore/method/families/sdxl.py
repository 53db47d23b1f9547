"""SDXL base: two CLIP text encoders (concatenated), a pooled embedding, size micro-conditioning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from prcore.method.families.base import ModelFamily, TextCond, UnsupportedModelError


class StableDiffusionXL(ModelFamily):
    """SDXL base (two text encoders, pooled embedding, size micro-conditioning)."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_attrs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    label = "SDXL"
    gradient_checkpointing = True  # a 2.6B-parameter UNet at 1024 px: activations dominate memory

    def matches(self, pipe: Any) -> bool:
        return getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder_2", None) is not None

    def matches_index(self, model_index: Mapping[str, Any]) -> bool:
        return model_index.get("_class_name") == self.pipeline_class_name or (
            "unet" in model_index and "text_encoder_2" in model_index)

    def encode(self, pipe: Any, prompts: str | list[str], device: Any) -> TextCond:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return TextCond(embeds, pooled)

    def zero_negative(self, pipe: Any, negative_prompt: str) -> bool:
        return negative_prompt == "" and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))

    def time_ids(self, pipe: Any, sizes: Sequence[Sequence[int]], *, dtype: torch.dtype, device: Any) -> Tensor:
        ids = torch.tensor([list(s) for s in sizes], dtype=dtype, device=device)
        expected = pipe.unet.add_embedding.linear_1.in_features
        proj = pipe.text_encoder_2.config.projection_dim
        if pipe.unet.config.addition_time_embed_dim * ids.shape[1] + proj != expected:
            raise UnsupportedModelError(
                "this SDXL UNet expects different micro-conditioning (e.g. an aesthetic-score refiner); only base SDXL models are supported"
            )
        return ids

    def added_cond(self, cond: TextCond, time_ids: Tensor | None) -> dict[str, Tensor]:
        assert cond.pooled is not None and time_ids is not None
        return {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.pooled.dtype)}

    def embedding_layout(self, rows: Sequence[Tensor], token: str) -> tuple[str, dict[str, Tensor]]:
        return self.name, {"clip_l": rows[0], "clip_g": rows[1]}

    def embedding_rows(self, state: Mapping[str, Tensor], token: str) -> list[Tensor]:
        return [state["clip_l"], state["clip_g"]]

    def webui_embedding(self, rows: Sequence[Tensor]) -> dict[str, Tensor]:
        return {"clip_l": rows[0], "clip_g": rows[1]}

    def kohya_base_metadata(self, pipe: Any) -> dict[str, str]:
        v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": str(v_pred),
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
