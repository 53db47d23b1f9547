"""SD 1.x and 2.x: one CLIP text encoder, a noise-predicting UNet (2.x at 768 px: v-prediction,
read from its scheduler config)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prcore.method.families.base import ModelFamily


class StableDiffusion(ModelFamily):
    """SD 1.x and 2.x (one CLIP text encoder; 2.x at 768 px is v-prediction, read from its scheduler)."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    label = "SD 1.x / 2.x"

    def matches_index(self, model_index: Mapping[str, Any]) -> bool:
        return (model_index.get("_class_name") == self.pipeline_class_name
                or ("unet" in model_index and "text_encoder" in model_index and "text_encoder_2" not in model_index))

    def matches(self, pipe: Any) -> bool:
        return (getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder_2", None) is None
                and getattr(pipe, "text_encoder", None) is not None)

    def load_kwargs(self, model_index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def is_v2(self, pipe: Any) -> bool:
        """SD 2.x: the UNet cross-attends to OpenCLIP ViT-H (width 1024), where SD 1.x has CLIP ViT-L (768)."""
        from prcore.method.architectures import ARCHITECTURES

        return int(pipe.unet.config.cross_attention_dim) == ARCHITECTURES["sd21"]["unet"]["cross_attention_dim"]

    def kohya_base_metadata(self, pipe: Any) -> dict[str, str]:
        v2 = self.is_v2(pipe)
        v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
        arch = ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
        return {"ss_base_model_version": ("sd_v2" if v2 else "sd_v1") + ("_v" if v_pred else ""), "ss_v2": str(v2),
                "ss_v_parameterization": str(v_pred), "modelspec.architecture": f"{arch}/lora"}
