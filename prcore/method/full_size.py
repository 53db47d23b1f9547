"""The exact SD 1.5, SD 2.1 (768 px, v-prediction) and SDXL-base architectures, random-initialised.

No weights can be downloaded where prcore is developed and tested, so the real path (shapes,
dtypes, conditioning, memory, file layout) is exercised on pipelines built here from the published
configurations: :func:`build_full_size` writes a standard diffusers folder (hub layout: one
sub-folder per component, ``model_index.json``, safetensors, optionally the ``fp16`` variant)
that :func:`prcore.method.models.load_pipeline` opens exactly like the hub's. Random weights draw
noise, but every tensor has the real shape. The tokenizer is generated locally
(:func:`prcore.method.tiny.write_clip_tokenizer`); the text encoders keep CLIP's 49,408-row
embedding, so shapes and memory are the real ones.

    python -m prcore.method.full_size sd15 OUT [--seed 0] [--no-fp16]    # also sd21, sdxl
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

CLIP_VOCAB = 49408

_SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)

_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
            layers_per_block=2, norm_num_groups=32)

_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               hidden_act="quick_gelu", projection_dim=768)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                   hidden_act="gelu", projection_dim=512)
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
        text_encoders=[("CLIPTextModel", _CLIP_L)],
        scheduler=("PNDMScheduler", {**_SD_SCHEDULE, "skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon"}),
    ),
    "sd21": dict(
        pipeline="StableDiffusionPipeline",
        unet={**_SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
              "use_linear_projection": True, "upcast_attention": True},
        vae={**_VAE, "sample_size": 768, "scaling_factor": 0.18215},
        text_encoders=[("CLIPTextModel", _OPENCLIP_H)],
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
        text_encoders=[("CLIPTextModel", _CLIP_L), ("CLIPTextModelWithProjection", _OPENCLIP_BIGG)],
        scheduler=("EulerDiscreteScheduler", {**_SD_SCHEDULE, "timestep_spacing": "leading", "interpolation_type": "linear",
                                              "use_karras_sigmas": False, "prediction_type": "epsilon"}),
    ),
}


def _text_encoder(cls_name: str, spec: dict[str, Any], tokenizer) -> Any:
    import transformers

    config = transformers.CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=77, layer_norm_eps=1e-5,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **spec)
    return getattr(transformers, cls_name)(config).eval()


def build_full_size(path: str | Path, name: str, *, seed: int = 0, fp16_variant: bool = True) -> Path:
    """Write the ``name`` architecture ("sd15", "sd21", "sdxl") with random weights to ``path``.

    Components are built and saved one at a time (with their fp16 variant right after), so peak
    memory is the largest component, not the whole pipeline.
    """
    import diffusers
    from transformers import CLIPTokenizer

    from prcore.method.tiny import write_clip_tokenizer

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    tok_dir = write_clip_tokenizer(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    index: dict[str, Any] = {"_class_name": arch["pipeline"], "_diffusers_version": diffusers.__version__}

    def save(component: str, module: Any, library: str) -> None:
        module.save_pretrained(path / component, safe_serialization=True)
        if fp16_variant:
            module.to(torch.float16).save_pretrained(path / component, safe_serialization=True, variant="fp16")
        index[component] = [library, type(module).__name__]

    torch.manual_seed(seed)
    save("unet", diffusers.UNet2DConditionModel(**arch["unet"]).eval(), "diffusers")
    torch.manual_seed(seed + 1)
    save("vae", diffusers.AutoencoderKL(**arch["vae"]).eval(), "diffusers")
    for i, (cls_name, spec) in enumerate(arch["text_encoders"]):
        torch.manual_seed(seed + 2 + i)
        suffix = "" if i == 0 else f"_{i + 1}"
        save(f"text_encoder{suffix}", _text_encoder(cls_name, spec, tokenizer), "transformers")
        if suffix:
            shutil.copytree(tok_dir, path / f"tokenizer{suffix}")
    index.update({f"tokenizer{'' if i == 0 else f'_{i + 1}'}": ["transformers", "CLIPTokenizer"] for i in range(len(arch["text_encoders"]))})
    sched_cls, sched_cfg = arch["scheduler"]
    getattr(diffusers, sched_cls)(**sched_cfg).save_pretrained(path / "scheduler")
    index["scheduler"] = ["diffusers", sched_cls]
    if arch["pipeline"] == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("architecture", choices=sorted(ARCHITECTURES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16 variant files")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    build_full_size(args.out, args.architecture, seed=args.seed, fp16_variant=not args.no_fp16)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.architecture} to {args.out}: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
