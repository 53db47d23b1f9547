"""Tiny, randomly initialised but complete SD 1.x, SDXL and SD3 pipeline folders, and locally
generated CLIP BPE and T5 tokenizers, for tests and demos (nothing is downloaded).

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

PipelineKind = Literal["sd", "sdxl", "sd3"]


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


def write_t5_tokenizer(path: str | Path, words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> Path:
    """Write a T5 tokenizer (``tokenizer.json``, a unigram model over ``words`` and single letters)
    generated locally; ``T5TokenizerFast.from_pretrained`` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    letters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789<>{}.,") | {"\u2581"})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)] + [(c, -5.0) for c in letters]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    tok = T5TokenizerFast(tokenizer_object=model, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(path)
    return Path(path)


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


def build_tiny_pipeline(path: str | Path, kind: PipelineKind = "sd", *, seed: int = 0, sample_size: int = 16,
                        with_t5: bool = True) -> Path:
    """Write a tiny, randomly initialised but complete diffusers pipeline folder.

    ``StableDiffusionPipeline.from_pretrained`` (kind="sd"),
    ``StableDiffusionXLPipeline.from_pretrained`` (kind="sdxl") or
    ``StableDiffusion3Pipeline.from_pretrained`` (kind="sd3": MMDiT-X with a dual-attention block and
    RMS q/k norm as in SD3.5 Medium, 16 latent channels, flow matching; ``with_t5=False`` leaves the
    T5 encoder out, as ``text_encoder_3=None``) load it. ``sample_size`` is the latent
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

    if kind not in ("sd", "sdxl", "sd3"):
        raise ValueError(f"kind must be 'sd', 'sdxl' or 'sd3', not {kind!r}")
    if kind == "sd3":
        return _build_tiny_sd3(Path(path), seed=seed, sample_size=sample_size, with_t5=with_t5)
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




def _tiny_vae(sample_size: int, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=latent_channels, norm_num_groups=8,
        sample_size=sample_size * 4, **extra,
    )


def _build_tiny_sd3(path: Path, *, seed: int, sample_size: int, with_t5: bool) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    tok_dir = write_clip_tokenizer(path / "_tokenizer_tmp")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    # SD3's VAE: 16 channels, latents (z - shift) * scale, no quant convs
    vae = _tiny_vae(sample_size, 16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed + 1)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=sample_size, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    text_encoder = _tiny_text_encoder(len(tokenizer), 32, 32, seed + 2)
    text_encoder_2 = _tiny_text_encoder(len(tokenizer), 32, 32, seed + 3)
    t5_dir = write_t5_tokenizer(path / "_t5_tmp") if with_t5 else None
    tokenizer_3 = T5TokenizerFast.from_pretrained(t5_dir) if t5_dir else None
    text_encoder_3 = None
    if with_t5:
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=64, num_layers=1,
                                                 num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tok_dir / name, path / sub / name)
    shutil.rmtree(tok_dir)
    if t5_dir:
        shutil.rmtree(t5_dir)
    return path
