"""The published SD 1.5, SD 2.1, SDXL-base, SD 3 Medium and SD 3.5 Medium / Large architectures: one
owner of their configurations.

Two things need them without any download: :mod:`prcore.method.full_size` builds random-weight
pipelines of these exact shapes (tests, the GPU suite), and :mod:`prcore.method.single_file` loads an
A1111 / civitai checkpoint, which holds weights but no configs or tokenizer. :func:`write_config_folder`
writes what both need: a diffusers pipeline folder with every component's config and the real CLIP
tokenizers (:mod:`prcore.method.clip_tokenizer`), and no weights.

SD 3 / 3.5 (``sd3m``, ``sd35m``, ``sd35l``; the hub's ``transformer/``, ``vae/``, ``text_encoder*/`` and
``scheduler/`` configs of ``stabilityai/stable-diffusion-3-medium-diffusers``,
``stabilityai/stable-diffusion-3.5-medium`` and ``stabilityai/stable-diffusion-3.5-large``): an MMDiT
transformer, a 16-channel VAE without quant convs, CLIP ViT-L and OpenCLIP ViT-bigG (both
``CLIPTextModelWithProjection``; CLIP-L's projection is the identity, SD3 conditions on its unprojected
pooled output) and flow matching (``FlowMatchEulerDiscreteScheduler``, shift 3.0). T5-XXL (4.7 B parameters,
19 GB in fp32) is left out of the config folders: ``model_index.json`` names ``text_encoder_3`` /
``tokenizer_3`` ``[null, null]`` and the pipeline runs without it (prcore carries no T5 tokenizer; a
folder beside a single file can bring one, :mod:`prcore.method.single_file`). :data:`T5_XXL` is its config.
Parameter counts (``SD3_PUBLISHED_PARAMS``) are checked against keras-hub's SD3 presets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prcore.method.clip_tokenizer import CLIP_VOCAB_SIZE, END, OPENCLIP_PAD, write_clip_tokenizer

_SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)

_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
            layers_per_block=2, norm_num_groups=32)

_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               hidden_act="quick_gelu", projection_dim=768)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                   hidden_act="gelu", projection_dim=512)  # SD 2.x uses the penultimate layer: 23 of ViT-H's 24
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                      hidden_act="gelu", projection_dim=1280)

_SD_UNET = dict(act_fn="silu", block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2,
                mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": dict(
        pipeline="StableDiffusionPipeline",
        unet={**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        vae={**_VAE, "sample_size": 512, "scaling_factor": 0.18215},
        text_encoders=[("CLIPTextModel", _CLIP_L, END)],
        scheduler=("PNDMScheduler", {**_SD_SCHEDULE, "skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon"}),
    ),
    "sd21": dict(
        pipeline="StableDiffusionPipeline",
        unet={**_SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
              "use_linear_projection": True, "upcast_attention": True},
        vae={**_VAE, "sample_size": 768, "scaling_factor": 0.18215},
        text_encoders=[("CLIPTextModel", _OPENCLIP_H, OPENCLIP_PAD)],
        scheduler=("DDIMScheduler", {**_SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False, "prediction_type": "v_prediction"}),
    ),
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        unet=dict(act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256,
                  attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
                  cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4,
                  layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
                  projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True),
        vae={**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        text_encoders=[("CLIPTextModel", _CLIP_L, END), ("CLIPTextModelWithProjection", _OPENCLIP_BIGG, OPENCLIP_PAD)],
        scheduler=("EulerDiscreteScheduler", {**_SD_SCHEDULE, "timestep_spacing": "leading", "interpolation_type": "linear",
                                              "use_karras_sigmas": False, "prediction_type": "epsilon"}),
    ),
}

_SD3_VAE = {**_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True}
_SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                        joint_attention_dim=4096, pooled_projection_dim=2048)
_SD3 = dict(
    pipeline="StableDiffusion3Pipeline",
    vae=_SD3_VAE,
    text_encoders=[("CLIPTextModelWithProjection", _CLIP_L, END), ("CLIPTextModelWithProjection", _OPENCLIP_BIGG, OPENCLIP_PAD)],
    scheduler=("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
)
ARCHITECTURES.update({
    "sd3m": {**_SD3, "transformer": {**_SD3_TRANSFORMER, "num_layers": 24, "num_attention_heads": 24,
                                     "caption_projection_dim": 1536, "pos_embed_max_size": 192,
                                     "dual_attention_layers": [], "qk_norm": None}},
    "sd35m": {**_SD3, "transformer": {**_SD3_TRANSFORMER, "num_layers": 24, "num_attention_heads": 24,  # MMDiT-X
                                      "caption_projection_dim": 1536, "pos_embed_max_size": 384,
                                      "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}},
    "sd35l": {**_SD3, "transformer": {**_SD3_TRANSFORMER, "num_layers": 38, "num_attention_heads": 38,
                                      "caption_projection_dim": 2432, "pos_embed_max_size": 192,
                                      "dual_attention_layers": [], "qk_norm": "rms_norm"}},
})
SD3_ARCHITECTURES = ("sd3m", "sd35m", "sd35l")

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
"""T5 v1.1 XXL's encoder as SD3 ships it (``text_encoder_3/config.json``): not written to config folders."""

SD3_PUBLISHED_PARAMS = {"sd3m": 2_987_080_931, "sd35m": 3_371_793_763, "sd35l": 9_048_410_595}
"""Transformer (with its stored position embedding) + CLIP-L + CLIP-bigG + VAE parameters, without T5, as
keras-hub's ``stable_diffusion_3_presets.py`` publishes them ("params")."""

PREDICTION_TYPES = ("epsilon", "v_prediction")


def denoiser(arch: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``(component, class name, config)`` of an :func:`architecture`'s denoiser: the UNet of SD 1.x /
    2.x / SDXL, the MMDiT transformer of SD 3 / 3.5."""
    if "transformer" in arch:
        return "transformer", "SD3Transformer2DModel", arch["transformer"]
    return "unet", "UNet2DConditionModel", arch["unet"]


def component_name(kind: str, i: int) -> str:
    """``text_encoder`` / ``tokenizer`` for the first, ``text_encoder_2`` / ``tokenizer_2`` after."""
    return kind if i == 0 else f"{kind}_{i + 1}"


def architecture(name: str, *, prediction_type: str | None = None) -> dict[str, Any]:
    """The configuration of ``name``, optionally with another prediction type. SD 2.x with epsilon
    prediction is the 512 px ``stable-diffusion-2-1-base`` (the 768 px release is v-prediction)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if prediction_type is not None and name in SD3_ARCHITECTURES:
        raise ValueError(f"{name} is a flow-matching model: it has no prediction type to choose")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
    arch = json.loads(json.dumps(ARCHITECTURES[name]))  # a deep copy
    if prediction_type is not None:
        arch["scheduler"][1]["prediction_type"] = prediction_type
        if name == "sd21" and prediction_type == "epsilon":
            arch["unet"]["sample_size"], arch["vae"]["sample_size"] = 64, 512
    return arch


def text_encoder_config(cls_name: str, spec: dict[str, Any], tokenizer: Any) -> Any:
    """The transformers config of one text encoder (CLIP's 49,408-token vocabulary, 77 positions)."""
    import transformers

    return transformers.CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, layer_norm_eps=1e-5,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, architectures=[cls_name], **spec)


def write_config_folder(name: str, path: str | Path, *, prediction_type: str | None = None) -> Path:
    """A diffusers pipeline folder for ``name`` holding configs and tokenizers only (no weights):
    ``model_index.json``, ``unet/`` (or ``transformer/``), ``vae/``, ``text_encoder*/``, ``tokenizer*/``,
    ``scheduler/``. SD 3 / 3.5 folders leave T5 out (``text_encoder_3`` / ``tokenizer_3`` null)."""
    import diffusers
    from transformers import CLIPTokenizer

    arch = architecture(name, prediction_type=prediction_type)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": arch["pipeline"], "_diffusers_version": diffusers.__version__}
    for component, cls_name, config in (denoiser(arch), ("vae", "AutoencoderKL", arch["vae"])):
        (path / component).mkdir(exist_ok=True)
        (path / component / "config.json").write_text(json.dumps({"_class_name": cls_name, **config}, indent=2))
        index[component] = ["diffusers", cls_name]
    for i, (cls_name, spec, pad) in enumerate(arch["text_encoders"]):
        tok_dir = write_clip_tokenizer(path / component_name("tokenizer", i), pad_token=pad)
        text_encoder_config(cls_name, spec, CLIPTokenizer.from_pretrained(tok_dir)).save_pretrained(path / component_name("text_encoder", i))
        index[component_name("tokenizer", i)] = ["transformers", "CLIPTokenizer"]
        index[component_name("text_encoder", i)] = ["transformers", cls_name]
    sched_cls, sched_cfg = arch["scheduler"]
    getattr(diffusers, sched_cls)(**sched_cfg).save_pretrained(path / "scheduler")
    index["scheduler"] = ["diffusers", sched_cls]
    if arch["pipeline"] == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    elif arch["pipeline"] == "StableDiffusion3Pipeline":
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None], image_encoder=[None, None],
                     feature_extractor=[None, None])
    else:
        index.update(force_zeros_for_empty_prompt=True)
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
