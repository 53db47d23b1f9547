"""Base pipelines: building tiny local ones for tests and demos, loading real ones once per process."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

PipelineKind = Literal["sd", "sdxl"]

# Byte-level BPE alphabet as in CLIP/GPT-2: every byte maps to one printable unicode char.
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


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
    alphabet = list(_bytes_to_unicode().values())
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


def detect_kind(folder: str | Path) -> PipelineKind:
    """SD 1.x/2.x vs SDXL, from a pipeline folder's model_index.json."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    cls = index.get("_class_name", "")
    if "XL" in cls or "text_encoder_2" in index:
        return "sdxl"
    return "sd"


@dataclass(frozen=True)
class _CacheKey:
    model: str
    device: str
    dtype: str


_PIPELINES: dict[_CacheKey, object] = {}
_LOCK = threading.Lock()


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class ModelNotFoundError(RuntimeError):
    """A base model that is neither a local diffusers folder nor loadable from the hub."""


def load_pipeline(model: str | Path, *, device: str | None = None, dtype: str | torch.dtype | None = None, cache: bool = True):
    """Load an SD 1.x/2.x or SDXL pipeline from a local folder or a hub id, once per process.

    The same (model, device, dtype) returns the cached pipeline object, so a worker loads a base
    model once and reuses it across the subjects of its shard. Weights load from safetensors only.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    local = Path(model).expanduser()
    key = _CacheKey(str(local.resolve()) if local.exists() else str(model), device, str(torch_dtype))
    with _LOCK:
        if cache and key in _PIPELINES:
            return _PIPELINES[key]
        if local.exists():
            if not (local / "model_index.json").is_file():
                raise ModelNotFoundError(
                    f"{local} is not a diffusers pipeline folder (no model_index.json); "
                    "point --model at a folder written by save_pretrained or at a hub id"
                )
            kind = detect_kind(local)
            source = str(local)
        else:
            kind = "sdxl" if "xl" in str(model).lower() else "sd"
            source = str(model)
        cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = cls.from_pretrained(source, dtype=torch_dtype, use_safetensors=True, **extra)
        except OSError as exc:
            raise ModelNotFoundError(
                f"cannot load base model {model!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}. "
                "Give a local diffusers folder (save_pretrained layout, safetensors weights) or a hub id "
                "reachable from this machine (HF_TOKEN for gated models)."
            ) from exc
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe._prcore_model_id = str(model)  # recorded in fingerprints and sidecars
        pipe._prcore_kind = kind
        if cache:
            _PIPELINES[key] = pipe
        return pipe


def clear_pipeline_cache() -> None:
    with _LOCK:
        _PIPELINES.clear()
