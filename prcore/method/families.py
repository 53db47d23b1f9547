"""Model families: every difference between SD 1.x/2.x and SDXL in one place.

Sampling (``prcore.method.sampler``), training (``prcore.method.dco``), LoRA I/O and loading
(``prcore.method.models``) ask a pipeline's :class:`ModelFamily` instead of testing for a second
text encoder themselves. What differs:

============================  =======================================  ==========================================
                              SD 1.x / 2.x (:class:`StableDiffusion`)  SDXL (:class:`StableDiffusionXL`)
============================  =======================================  ==========================================
diffusers pipeline            ``StableDiffusionPipeline``              ``StableDiffusionXLPipeline``
text encoders                 one (CLIP ViT-L / OpenCLIP ViT-H)        two (CLIP ViT-L + OpenCLIP ViT-bigG), concatenated
pooled text embedding         none                                     from the second encoder (``text_embeds``)
micro-conditioning            none                                     ``time_ids`` = (orig h, w, crop top, left, target h, w)
empty negative prompt         encoded ""                               zeros when ``force_zeros_for_empty_prompt``
learned-embedding layout      ``{token: (1, d)}``                      ``{"clip_l": (1, d1), "clip_g": (1, d2)}``
ComfyUI / A1111 embedding     ``{"emb_params": (1, d)}``               ``{"clip_l": ..., "clip_g": ...}``
kohya LoRA base version       ``sd_v1`` / ``sd_v2`` (+ ``_v``)         ``sdxl_base_v1-0``
training memory default       no gradient checkpointing                gradient checkpointing on
============================  =======================================  ==========================================

Default resolution and the noise target (epsilon / v-prediction) are read from the model's own
config, the same way for both. A new family (SD3, FLUX) is one subclass registered in
:data:`FAMILIES`, plus its tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class UnsupportedModelError(ValueError):
    """A model this family cannot run (e.g. an SDXL refiner's aesthetic-score conditioning)."""


@dataclass
class TextCond:
    """Text conditioning of ``n`` rows: the encoder hidden states, and SDXL's pooled embedding."""

    embeds: Tensor  # (n, seq, dim)
    pooled: Tensor | None = None  # (n, dim2)

    def rows(self, index: Tensor) -> TextCond:
        index = index.to(self.embeds.device)
        return TextCond(self.embeds[index], None if self.pooled is None else self.pooled[index])

    def repeat(self, n: int) -> TextCond:
        return TextCond(self.embeds.repeat(n, 1, 1), None if self.pooled is None else self.pooled.repeat(n, 1))

    def zeros_like(self) -> TextCond:
        return TextCond(torch.zeros_like(self.embeds), None if self.pooled is None else torch.zeros_like(self.pooled))

    @staticmethod
    def cat(conds: Sequence[TextCond]) -> TextCond:
        pooled = [c.pooled for c in conds]
        return TextCond(torch.cat([c.embeds for c in conds]), None if pooled[0] is None else torch.cat(pooled))  # type: ignore[arg-type]

    def slice(self, start: int, stop: int) -> TextCond:
        return TextCond(self.embeds[start:stop], None if self.pooled is None else self.pooled[start:stop])


class ModelFamily:
    """What a model family does differently. Subclasses override; the base holds what is shared."""

    name: str = ""
    pipeline_class_name: str = ""
    text_encoder_attrs: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)
    gradient_checkpointing: bool = False  # training default when TrainConfig leaves it None

    # -- recognising and loading ------------------------------------------------------------------

    def matches_index(self, model_index: Mapping[str, Any]) -> bool:
        """Whether a diffusers ``model_index.json`` describes a pipeline of this family."""
        return model_index.get("_class_name") == self.pipeline_class_name

    def matches(self, pipe: Any) -> bool:
        return all(getattr(pipe, enc, None) is not None for _, enc in self.text_encoder_attrs)

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``from_pretrained``."""
        return {}

    # -- text -------------------------------------------------------------------------------------

    def text_pairs(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs, in the order the pipeline concatenates them."""
        return [(getattr(pipe, tok), getattr(pipe, enc)) for tok, enc in self.text_encoder_attrs]

    def text_encoders(self, pipe: Any) -> list[Any]:
        return [enc for _, enc in self.text_pairs(pipe)]

    def encode(self, pipe: Any, prompts: str | list[str], device: Any) -> TextCond:
        """Text conditioning exactly as the pipeline computes it for sampling (no CFG batch)."""
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return TextCond(embeds)

    def zero_negative(self, pipe: Any, negative_prompt: str) -> bool:
        """Whether the negative prompt is all-zero conditioning instead of encoded text."""
        return False

    # -- UNet conditioning ------------------------------------------------------------------------

    def time_ids(self, pipe: Any, sizes: Sequence[Sequence[int]], *, dtype: torch.dtype, device: Any) -> Tensor | None:
        """Per-row micro-conditioning from ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``; None here."""
        return None

    def added_cond(self, cond: TextCond, time_ids: Tensor | None) -> dict[str, Tensor] | None:
        """The UNet's ``added_cond_kwargs`` for rows with conditioning ``cond``."""
        return None

    def unet_pred(self, pipe: Any, x: Tensor, t: Any, cond: TextCond, time_ids: Tensor | None) -> Tensor:
        """One UNet forward: the noise (or v) prediction for rows ``x`` at timestep(s) ``t``."""
        return pipe.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=self.added_cond(cond, time_ids), return_dict=False)[0]

    # -- sizes and targets ------------------------------------------------------------------------

    def default_resolution(self, pipe: Any) -> int:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    def resolution_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)

    def training_target(self, scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction)."""
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        raise UnsupportedModelError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction)")

    # -- learned token embeddings -----------------------------------------------------------------

    def embedding_layout(self, rows: Sequence[Tensor], token: str) -> tuple[str, dict[str, Tensor]]:
        """(layout name, tensors) of a learned token's embedding rows, one per text encoder."""
        return self.name, {token: rows[0]}

    def embedding_rows(self, state: Mapping[str, Tensor], token: str) -> list[Tensor]:
        """The inverse of :meth:`embedding_layout`: one row per text encoder."""
        return [state[token]]

    def webui_embedding(self, rows: Sequence[Tensor]) -> dict[str, Tensor]:
        """The learned token as ComfyUI / A1111 embeddings files hold it (SD: ``emb_params``)."""
        return {"emb_params": rows[0]}

    # -- LoRA metadata for the web UIs -------------------------------------------------------------

    def kohya_base_metadata(self, pipe: Any) -> dict[str, str]:
        """The base-model fields of a kohya-layout LoRA's metadata, as kohya's sd-scripts write them
        and A1111's Lora extension reads them (``ss_base_model_version`` starting ``sdxl_``: SDXL;
        else ``ss_v2 == "True"``: SD 2.x; else SD 1.x), plus the SAI model spec architecture."""
        raise NotImplementedError


class StableDiffusion(ModelFamily):
    """SD 1.x and 2.x (one CLIP text encoder; 2.x at 768 px is v-prediction, read from its scheduler)."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    def matches_index(self, model_index: Mapping[str, Any]) -> bool:
        return "unet" in model_index and "text_encoder" in model_index and "text_encoder_2" not in model_index

    def matches(self, pipe: Any) -> bool:
        return getattr(pipe, "text_encoder_2", None) is None and getattr(pipe, "text_encoder", None) is not None

    def load_kwargs(self) -> dict[str, Any]:
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


class StableDiffusionXL(ModelFamily):
    """SDXL base (two text encoders, pooled embedding, size micro-conditioning)."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_attrs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    gradient_checkpointing = True  # a 2.6B-parameter UNet at 1024 px: activations dominate memory

    def matches_index(self, model_index: Mapping[str, Any]) -> bool:
        return model_index.get("_class_name") == self.pipeline_class_name or "text_encoder_2" in model_index

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


FAMILIES: tuple[ModelFamily, ...] = (StableDiffusionXL(), StableDiffusion())
"""Every supported family, most specific first (a pipeline is matched against them in order)."""


def family_of(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family
    raise UnsupportedModelError(f"{type(pipe).__name__} is not a supported model family ({', '.join(f.name for f in FAMILIES)})")


def family_for_index(model_index: Mapping[str, Any]) -> ModelFamily:
    """The family a diffusers ``model_index.json`` describes."""
    for family in FAMILIES:
        if family.matches_index(model_index):
            return family
    raise UnsupportedModelError(
        f"pipeline class {model_index.get('_class_name')!r} is not supported; prcore runs "
        + ", ".join(f.pipeline_class_name for f in FAMILIES)
    )


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
