"""What every model family answers: the base class the family modules (``sd``, ``sdxl``, ``sd3``)
subclass, and the text conditioning they hand the sampler and the trainer.

Sampling (``prcore.method.sampler``), DCO training (``prcore.method.dco``), LoRA I/O and export
(``prcore.method.lora_io``), loading (``prcore.method.models``), speed options (``accel``) and the
CLI ask a pipeline's :class:`ModelFamily`; none of them names a UNet, a transformer or a scheduler.
What a family owns:

- **the denoiser** (:meth:`ModelFamily.denoiser`: ``pipe.unet`` or ``pipe.transformer``), one
  forward of it (:meth:`ModelFamily.predict`), the layers a LoRA can target
  (:meth:`ModelFamily.layer_names`), its attention kernels and memory format;
- **text encoding** (:meth:`ModelFamily.encode` -> :class:`TextCond`: hidden states and the pooled
  embedding where the model takes one), the empty negative prompt;
- **the noise process** (:meth:`ModelFamily.noise_process`, :mod:`.noise`): noising, the target, the
  training timesteps and weights, the sampler's scheduler;
- **latents**: decoding with the VAE's scale and shift (:meth:`ModelFamily.from_latents`), channels,
  the size multiples;
- **micro-conditioning** (:meth:`ModelFamily.time_ids`);
- **files**: the LoRA layout diffusers saves, the layout ComfyUI / A1111 load, kohya metadata,
  learned-embedding layouts.

A new family is one module here that subclasses :class:`ModelFamily`, registered in
``families/__init__.py``, plus its tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prcore.method.families.errors import UnsupportedModelError
from prcore.method.families.noise import Diffusion, NoiseProcess

__all__ = ["ModelFamily", "TextCond", "UnsupportedModelError"]


@dataclass
class TextCond:
    """Text conditioning of ``n`` rows: the encoder hidden states, and the pooled embedding (SDXL, SD3)."""

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
    """What a model family does differently. Subclasses override; the base holds what is shared
    (the UNet families' behaviour where two of them agree)."""

    name: str = ""
    pipeline_class_name: str = ""
    denoiser_attr: str = "unet"  # the pipeline component (and folder) of the denoiser
    denoiser_class_name: str = "UNet2DConditionModel"
    text_encoder_attrs: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)
    lora_components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")  # what a LoRA file may adapt
    gradient_checkpointing: bool = False  # training default when TrainConfig leaves it None
    supports_text_embeddings: bool = True  # train_text_embeddings (a learned identifier token)
    label: str = ""  # what the README's model table and errors call it
    size_multiple_name: str = "the VAE factor"  # what :meth:`size_multiple` is, in errors
    noise_class: type[NoiseProcess] = Diffusion  # the noise process (:meth:`noise_process`)

    # -- recognising and loading ------------------------------------------------------------------

    def matches_index(self, model_index: Mapping[str, Any]) -> bool:
        """Whether a diffusers ``model_index.json`` describes a pipeline of this family."""
        return model_index.get("_class_name") == self.pipeline_class_name

    def matches(self, pipe: Any) -> bool:
        return all(getattr(pipe, enc, None) is not None for _, enc in self.text_encoder_attrs)

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_kwargs(self, model_index: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Extra keyword arguments for ``from_pretrained`` / ``from_single_file`` of a pipeline whose
        ``model_index.json`` is ``model_index`` (None: not known)."""
        return {}

    def single_file_kwargs(self, path: Any, entries: Mapping[str, Any], model_index: Mapping[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments of ``from_single_file`` for a checkpoint whose safetensors header is
        ``entries``, with the config folder's ``model_index`` (:mod:`prcore.method.single_file`)."""
        return self.load_kwargs(model_index)

    def finish_single_file(self, pipe: Any) -> None:
        """Whatever a pipeline loaded from a single file still needs (nothing for the UNet families)."""

    # -- the denoiser -----------------------------------------------------------------------------

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        """The network that denoises (and carries the subject LoRAs)."""
        return getattr(pipe, self.denoiser_attr)

    def denoiser_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    def layer_names(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        """The dotted names of the layers a LoRA can adapt in a denoiser built from ``config``, built on
        the ``meta`` device (no memory, no weights)."""
        from torch import nn

        with torch.device("meta"):
            model = self.denoiser_class().from_config(dict(config))
        return tuple(name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d)))

    def predict(self, pipe: Any, x: Tensor, t: Any, cond: TextCond, time_ids: Tensor | None) -> Tensor:
        """One denoiser forward: the noise (or v) prediction for rows ``x`` at timestep(s) ``t``."""
        return pipe.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=self.added_cond(cond, time_ids), return_dict=False)[0]

    def set_attention(self, pipe: Any, kind: str) -> None:
        """Attention kernel of the denoiser: "sdpa" (torch's fused kernel) or "classic" (plain matmuls)."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        self.denoiser(pipe).set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())

    def set_channels_last(self, pipe: Any, on: bool) -> None:
        """NHWC weights and activations (tensor cores' native layout for convolutions)."""
        self.denoiser(pipe).to(memory_format=torch.channels_last if on else torch.contiguous_format)

    # -- text -------------------------------------------------------------------------------------

    def text_pairs(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs, in the order the pipeline concatenates them."""
        return [(getattr(pipe, tok), getattr(pipe, enc)) for tok, enc in self.text_encoder_attrs
                if getattr(pipe, enc, None) is not None]

    def text_encoders(self, pipe: Any) -> list[Any]:
        return [enc for _, enc in self.text_pairs(pipe)]

    def encode(self, pipe: Any, prompts: str | list[str], device: Any) -> TextCond:
        """Text conditioning exactly as the pipeline computes it for sampling (no CFG batch)."""
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return TextCond(embeds)

    def zero_negative(self, pipe: Any, negative_prompt: str) -> bool:
        """Whether the negative prompt is all-zero conditioning instead of encoded text."""
        return False

    # -- micro-conditioning -----------------------------------------------------------------------

    def time_ids(self, pipe: Any, sizes: Sequence[Sequence[int]], *, dtype: torch.dtype, device: Any) -> Tensor | None:
        """Per-row micro-conditioning from ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``; None here."""
        return None

    def added_cond(self, cond: TextCond, time_ids: Tensor | None) -> dict[str, Tensor] | None:
        """The UNet's ``added_cond_kwargs`` for rows with conditioning ``cond``."""
        return None

    # -- the noise process ------------------------------------------------------------------------

    def noise_process(self, pipe: Any) -> NoiseProcess:
        return self.noise_class(pipe.scheduler.config)

    # -- latents and sizes ------------------------------------------------------------------------

    def latent_channels(self, pipe: Any) -> int:
        return int(self.denoiser(pipe).config.in_channels)

    def default_resolution(self, pipe: Any) -> int:
        return int(self.denoiser(pipe).config.sample_size) * int(pipe.vae_scale_factor)

    def resolution_multiple(self, pipe: Any) -> int:
        """What a training resolution must be a multiple of (every down block halves the latents)."""
        return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)

    def size_multiple(self, pipe: Any) -> int:
        """What a sampling height and width must be a multiple of."""
        return int(pipe.vae_scale_factor)

    def from_latents(self, vae_config: Any, latents: Tensor) -> Tensor:
        """The denoiser's latents -> VAE latents: latents / scale + shift, or with per-channel mean/std
        where the VAE config has them (the inverse of ``prcore.method.dco.LatentCache``'s (z - shift) * scale)."""
        mean = getattr(vae_config, "latents_mean", None)
        std = getattr(vae_config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return latents * std_t / vae_config.scaling_factor + mean_t
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return latents / vae_config.scaling_factor + shift

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

    # -- LoRA files -------------------------------------------------------------------------------

    def save_lora_kwargs(self, state: dict[str, Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the pipeline class's ``save_lora_weights`` for the denoiser's LoRA."""
        return {f"{self.denoiser_attr}_lora_layers": state, f"{self.denoiser_attr}_lora_adapter_metadata": metadata}

    def webui_lora(self, peft_state: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
        """The denoiser LoRA (peft's keys, ``<module path>.lora_A.weight``) in the layout ComfyUI and
        A1111 load: kohya's ``lora_unet_<diffusers module path, dots as _>`` with ``.lora_down.weight``
        (A), ``.lora_up.weight`` (B) and ``.alpha`` (the LoRA's own alpha, so alpha != rank keeps its
        scale; diffusers' converter would write the rank). ComfyUI maps these names onto every UNet
        family it loads; A1111 converts them for SD 1.x/2.x."""
        from diffusers.utils import convert_state_dict_to_kohya

        alpha_t = torch.tensor(float(alpha))
        converted = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
        return {k: alpha_t.clone() if k.endswith(".alpha") else v.detach().to("cpu", torch.float32).contiguous()
                for k, v in converted.items()}

    def kohya_base_metadata(self, pipe: Any) -> dict[str, str]:
        """The base-model fields of a kohya-layout LoRA's metadata, as kohya's sd-scripts write them
        and A1111's Lora extension reads them (``ss_base_model_version`` starting ``sdxl_``: SDXL;
        else ``ss_v2 == "True"``: SD 2.x; else SD 1.x), plus the SAI model spec architecture."""
        raise NotImplementedError
