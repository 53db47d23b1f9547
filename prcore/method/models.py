"""Loading base pipelines once per process (an explicit per-process cache), device and dtype choice.

The model family is read from the model's own ``model_index.json`` (a local folder, or the hub
repo's, honouring the offline cache), never guessed from its name; ``prcore.method.families``
says what each family needs to load.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prcore.method.families import ModelFamily, UnsupportedModelError, family_for_index


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


def model_index(source: str) -> dict[str, Any]:
    """The ``model_index.json`` of a local pipeline folder or a hub repo."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(source))


def load_pipeline(model: str | Path, *, device: str | None = None, dtype: str | torch.dtype | None = None, cache: bool = True):
    """Load an SD 1.x/2.x or SDXL pipeline from a local folder or a hub id, once per process.

    The same (model, device, dtype) returns the cached pipeline object, so a worker loads a base
    model once and reuses it across the subjects of its shard. Weights load from safetensors only.
    """
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    local = Path(model).expanduser()
    key = _CacheKey(str(local.resolve()) if local.exists() else str(model), device, str(torch_dtype))
    with _LOCK:
        if cache and key in _PIPELINES:
            return _PIPELINES[key]
        if local.exists() and not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{local} is not a diffusers pipeline folder (no model_index.json); "
                "point --model at a folder written by save_pretrained or at a hub id"
            )
        source = str(local) if local.exists() else str(model)
        try:
            family: ModelFamily = family_for_index(model_index(source))
            pipe = family.pipeline_class().from_pretrained(source, dtype=torch_dtype, use_safetensors=True, **family.load_kwargs())
        except (OSError, UnsupportedModelError) as exc:
            raise ModelNotFoundError(
                f"cannot load base model {model!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}. "
                "Give a local diffusers folder (save_pretrained layout, safetensors weights) or a hub id "
                "reachable from this machine (HF_TOKEN for gated models)."
            ) from exc
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe._prcore_model_id = str(model)  # recorded in fingerprints and sidecars
        if cache:
            _PIPELINES[key] = pipe
        return pipe


def clear_pipeline_cache() -> None:
    with _LOCK:
        _PIPELINES.clear()
