"""Stable Diffusion 3 / 3.5 (Medium, Large): an MMDiT transformer trained by rectified flow.

============================  ===========================================================================
denoiser                      ``pipe.transformer`` (``SD3Transformer2DModel``; 3.5 Medium is MMDiT-X with
                              dual-attention blocks), patch size 2: sizes a multiple of 16 px
text encoders                 CLIP ViT-L + OpenCLIP ViT-bigG (77 tokens, concatenated, pooled outputs
                              concatenated into ``pooled_projections``) + T5-XXL (256 tokens), the CLIP
                              states zero-padded to T5's width and joined along the sequence
T5 left out                   ``text_encoder_3=None`` (a folder or single file without it): T5's 256
                              tokens are zeros. Saves 4.7 B parameters (9.5 GB bf16); long, detailed
                              prompts and typography lose quality (SD3 paper, section 5.3.2: T5 matters
                              most for text rendering)
noise process                 flow matching (:class:`prcore.method.families.noise.FlowMatching`):
                              predicts v = e - x_0; training timesteps logit-normal with the scheduler's
                              shift (3.0)
latents                       16 channels, (z - 0.0609) * 1.5305 (the VAE config's shift and scale)
micro-conditioning            none
negative prompt ""            encoded (no zeroing)
LoRA layout (diffusers)       ``transformer.<module path>.lora_A.weight`` / ``.lora_B.weight``
LoRA layout (ComfyUI)         ``lora_transformer_<module path, dots as _>.lora_down/.lora_up/.alpha``
                              (:mod:`prcore.method.families.sd3_keys`)
training memory default       gradient checkpointing on
learned identifier token      not supported (three tokenizers; T5's SentencePiece cannot take a new word
                              the way CLIP's BPE does)
============================  ===========================================================================

The guidance equations are linear in the model output, so with a velocity predictor ``e_u``,
``e_c``, ``e_p`` are the velocities of the three rows and the guided velocity steps the flow ODE
(docs/sampling.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prcore.method.families.base import ModelFamily, TextCond
from prcore.method.families.noise import FlowMatching

MAX_T5_TOKENS = 256  # diffusers' StableDiffusion3Pipeline default max_sequence_length


class StableDiffusion3(ModelFamily):
    """SD3 / SD3.5: MMDiT(-X) transformer, three text encoders (T5 optional), flow matching."""

    name = "sd3"
    label = "SD 3 / 3.5"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"
    denoiser_class_name = "SD3Transformer2DModel"
    text_encoder_attrs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
    lora_components = ("transformer", "text_encoder", "text_encoder_2")
    gradient_checkpointing = True  # a 2.5B (Medium) / 8.1B (Large) transformer at 1024 px
    supports_text_embeddings = False
    size_multiple_name = "the VAE factor x patch size"
    noise_class = FlowMatching

    def matches(self, pipe: Any) -> bool:
        return getattr(pipe, "transformer", None) is not None and type(pipe).__name__.startswith("StableDiffusion3")

    def load_kwargs(self, model_index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """T5 is optional: a folder whose index has no T5 (``[null, null]``) loads with ``text_encoder_3=None``."""
        entry = (model_index or {}).get("text_encoder_3")
        if model_index is not None and (not entry or entry[0] is None):
            return {"text_encoder_3": None, "tokenizer_3": None}
        return {}

    def single_file_kwargs(self, path: Any, entries: Mapping[str, Any], model_index: Mapping[str, Any]) -> dict[str, Any]:
        """T5 left out where the file or the configs have none: a file's T5 without a tokenizer (a single
        file carries none) is left out, and the log says so."""
        from prcore.data.model_source import CONFIG_FOLDER_SUFFIX, sd3_has_t5

        has_tokenizer = bool((model_index.get("tokenizer_3") or [None])[0])
        if sd3_has_t5(entries) and has_tokenizer:
            return self.load_kwargs(model_index)
        if sd3_has_t5(entries):
            logging.getLogger("prcore.method.single_file").warning(
                "%s: its T5-XXL encoder is left out (a single file carries no T5 tokenizer); to use it, put a config folder "
                "with tokenizer_3/ beside the file as %s%s/ or load the diffusers folder", path, Path(path).stem, CONFIG_FOLDER_SUFFIX)
        return {"text_encoder_3": None, "tokenizer_3": None}

    def finish_single_file(self, pipe: Any) -> None:
        if getattr(pipe, "text_encoder_3", None) is not None:
            pipe.text_encoder_3.tie_weights()  # loaded onto the meta device, T5's tied input embedding is left unset

    # -- the denoiser -----------------------------------------------------------------------------

    def predict(self, pipe: Any, x: Tensor, t: Any, cond: TextCond, time_ids: Tensor | None) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t
        return pipe.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.embeds,
                                pooled_projections=cond.pooled, return_dict=False)[0]

    def set_attention(self, pipe: Any, kind: str) -> None:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        if kind != "sdpa":
            raise ValueError("attention='classic' is not available for SD3 (its joint attention has only the sdpa kernel)")
        self.denoiser(pipe).set_attn_processor(JointAttnProcessor2_0())

    def set_channels_last(self, pipe: Any, on: bool) -> None:
        """A transformer has no convolutions past its patch embedding: channels-last changes nothing."""

    # -- text -------------------------------------------------------------------------------------

    def encode(self, pipe: Any, prompts: str | list[str], device: Any) -> TextCond:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, max_sequence_length=MAX_T5_TOKENS)
        return TextCond(embeds, pooled)

    # -- the noise process, latents, sizes ----------------------------------------------------------

    def resolution_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)

    def size_multiple(self, pipe: Any) -> int:
        return self.resolution_multiple(pipe)

    # -- files ------------------------------------------------------------------------------------

    def webui_lora(self, peft_state: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
        from prcore.method.families.sd3_keys import comfy_lora_state_dict

        return comfy_lora_state_dict(peft_state, alpha)

    def kohya_base_metadata(self, pipe: Any) -> dict[str, str]:
        large = int(pipe.transformer.config.num_layers) >= 38
        version = "sd3.5_large" if large else "sd3.5_medium" if pipe.transformer.config.dual_attention_layers else "sd3_medium"
        arch = {"sd3.5_large": "stable-diffusion-v3.5-large", "sd3.5_medium": "stable-diffusion-v3.5-medium",
                "sd3_medium": "stable-diffusion-v3-medium"}[version]
        return {"ss_base_model_version": version, "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.architecture": f"{arch}/lora"}
