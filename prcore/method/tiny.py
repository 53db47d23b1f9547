"""Tiny, randomly initialised but complete SD 1.x and SDXL pipeline folders, and a locally
generated CLIP BPE tokenizer, for tests and demos (nothing is downloaded).

``build_tiny_pipeline`` writes a standard diffusers folder (``save_pretrained``, safetensors) that
``prcore.method.models.load_pipeline`` opens exactly like a real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch

from prcore.method.clip_tokenizer import bytes_to_unicode

PipelineKind = Literal["sd", "sdxl"]


DEFAULT_WORDS = (
    "a an the of on in with and photo dog cat sks toy backpack red blue green yellow white black "
    "snow beach jungle city street forest hat wearing background picture style"
).split()


def write_clip_tokenizer(path: str | Path, words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt) generated locally.

    The vocabulary holds every byte symbol (so any text tokenizes) plus a whole-word token for each
    of ``words``, reached by left-to-right merges; nothing is downloaded. Merges are ranked in word
    order, so a word whose pairs an earlier word already merged differently (e.g. "green" after
    "red") may still split into a few tokens: the text is always encodable, not always one token a word.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(sym, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merge = f"{left} {right}"
            left = left + right
            if left not in vocab:
                merges.append(merge)
                vocab[left] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=77)
    tok.save_pretrained(path)
    return path


def _tiny_text_encoder(vocab_size: int, hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def build_tiny_pipeline(path: str | Path, kind: PipelineKind = "sd", *, seed: int = 0, sample_size: int = 16) -> Path:
    """Write a tiny, randomly initialised but complete diffusers pipeline folder.

    ``StableDiffusionPipeline.from_pretrained`` (kind="sd") or
    ``StableDiffusionXLPipeline.from_pretrained`` (kind="sdxl") load it. ``sample_size`` is the latent
    size; images are 4x larger (the tiny VAE downsamples twice).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    if kind not in ("sd", "sdxl"):
        raise ValueError(f"kind must be 'sd' or 'sdxl', not {kind!r}")
    path = Path(path)
    tok_dir = write_clip_tokenizer(path / "_tokenizer_tmp")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 4,
    )
    common = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
    )
    if kind == "sd":
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            **common,
        )
        text_encoder = _tiny_text_encoder(vocab_size, 32, None, seed + 2)
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,  # 32 (encoder 1) + 32 (encoder 2) concatenated
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            use_linear_projection=True,
            **common,
        )
        text_encoder = _tiny_text_encoder(vocab_size, 32, None, seed + 2)
        text_encoder_2 = _tiny_text_encoder(vocab_size, 32, 32, seed + 3)
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading", steps_offset=1)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if (path / sub).is_dir():  # classic vocab/merges files too, for older transformers
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(tok_dir / name, path / sub / name)
    shutil.rmtree(tok_dir)
    return path


