"""Tiny, randomly initialised CLIP and ViT (DINO-style) model folders for tests and demos.

They are written with ``save_pretrained`` (safetensors) together with their tokenizer and image
processor, so :class:`prcore.quality.scorer.Scorer` loads them through exactly the path it uses for
``openai/clip-vit-large-patch14`` or ``facebook/dino-vits16``. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_clip(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny ``CLIPModel`` folder (model, CLIP tokenizer, ``CLIPImageProcessor``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from prcore.method.tiny import write_clip_tokenizer

    path = Path(path)
    write_clip_tokenizer(path)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    vocab_size = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return path


def build_tiny_dino(path: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny ``ViTModel`` folder (DINO ViT-S/16 architecture, scaled down) + ``ViTImageProcessor``."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = Path(path)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        qkv_bias=True,
    )
    torch.manual_seed(seed)
    ViTModel(config).eval().save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path
