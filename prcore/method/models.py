"""Loading base pipelines once per process (an explicit per-process cache), device and dtype choice.

The model family is read from the model's own ``model_index.json`` (a local folder, or the hub
repo's, honouring the offline cache), never guessed from its name; ``prcore.method.families``
says what each family needs to load.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prcore.data.model_source import ModelSourceError, local_model_problem, looks_local
from prcore.method.families import ModelFamily, UnsupportedModelError, family_for_index


@dataclass(frozen=True)
class _CacheKey:
    model: str
    device: str
    dtype: str


_PIPELINES: dict[_CacheKey, object] = {}
_LOCK = threading.Lock()


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX, oneDNN's check). Without it, torch's
    bf16 convolutions fall back to a slow path: 145x slower than fp32 for a 320-channel 3x3 conv at
    64x64 on an AVX2 EPYC (linear layers 6x)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """The weights' dtype: as asked, or (None / "auto") bf16 on CUDA devices that have it, else fp16
    on CUDA, else fp32. fp16 off CUDA is refused: it runs ~290x slower than fp32 on a CPU. bf16 on a
    CPU without native bf16 (:func:`cpu_has_native_bf16`) runs, with a warning: its convolutions
    are ~145x slower than fp32 there."""
    if isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif dtype in (None, "auto"):
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    if torch_dtype == torch.float16 and not device.startswith("cuda"):
        raise ValueError(f"dtype float16 on {device} is not supported (about 290x slower than float32 there); "
                         "use --dtype bfloat16 or float32, or run on a CUDA GPU")
    if torch_dtype == torch.bfloat16 and device == "cpu" and not cpu_has_native_bf16():
        warnings.warn("dtype bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): convolutions run ~145x "
                      "slower than float32 here; use --dtype float32 unless memory forces bf16", stacklevel=2)
    return torch_dtype


def weights_variant(folder: Path, torch_dtype: torch.dtype) -> str | None:
    """Which weight files of a local pipeline folder to read: "fp16" when the folder ships the fp16
    variant (``*.fp16.safetensors``) and fp16 is asked for, or when it ships nothing else; else None."""
    files = [p.name for p in folder.glob("*/*.safetensors")]
    fp16 = [f for f in files if ".fp16." in f]
    plain = [f for f in files if ".fp16." not in f]
    if fp16 and (torch_dtype == torch.float16 or not plain):
        return "fp16"
    return None


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
    """Load a pipeline of a supported family (:mod:`prcore.method.families`) once per process: from a local diffusers folder, a hub id
    (the offline cache honoured), or a single-file ``.safetensors`` checkpoint (A1111 / civitai layout,
    loaded offline: :mod:`prcore.method.single_file`).

    The same (model, device, dtype) returns the cached pipeline object, so a worker loads a base
    model once and reuses it across the subjects of its shard. Weights load from safetensors only.
    """
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    local = Path(str(model).removeprefix("file://")).expanduser()
    is_local = local.exists() or looks_local(str(model))
    key = _CacheKey(str(local.resolve()) if is_local else str(model), device, str(torch_dtype))
    with _LOCK:
        if cache and key in _PIPELINES:
            return _PIPELINES[key]
        problem = local_model_problem(local) if is_local and not local.is_file() else None  # a file: checked as it loads
        if problem:
            raise ModelNotFoundError(f"cannot load base model: {problem}")
        try:
            if local.is_file():
                from prcore.method.single_file import load_single_file

                pipe, _ = load_single_file(local, torch_dtype=torch_dtype)
            else:
                pipe = _load_pretrained(str(local) if is_local else str(model), local if is_local else None, torch_dtype)
        except ModelSourceError as exc:
            raise ModelNotFoundError(f"cannot load base model {model!r}: {exc}") from exc
        except (OSError, UnsupportedModelError) as exc:
            raise ModelNotFoundError(
                f"cannot load base model {model!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}. "
                "Give a local diffusers folder (save_pretrained layout, safetensors weights), a single-file "
                ".safetensors checkpoint, or a hub id reachable from this machine (HF_TOKEN for gated models)."
            ) from exc
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe._prcore_model_id = str(model)  # recorded in fingerprints and sidecars
        if cache:
            _PIPELINES[key] = pipe
        return pipe


def _load_pretrained(source: str, local: Path | None, torch_dtype: torch.dtype):
    """``from_pretrained`` of a diffusers folder or hub repo; the family from its ``model_index.json``."""
    index = model_index(source)
    family: ModelFamily = family_for_index(index)
    cls, kwargs = family.pipeline_class(), dict(dtype=torch_dtype, use_safetensors=True, **family.load_kwargs(index))
    if local is not None:
        return cls.from_pretrained(source, variant=weights_variant(local, torch_dtype), **kwargs)
    if torch_dtype == torch.float16:  # a hub repo: its fp16 files where it has them (half the download)
        try:
            return cls.from_pretrained(source, variant="fp16", **kwargs)
        except (OSError, ValueError):
            pass
    return cls.from_pretrained(source, **kwargs)


def placement(pipe) -> tuple[str, str]:
    """(device, dtype) of a pipeline's denoiser, as sidecars record them ("cuda:0", "bfloat16")."""
    from prcore.method.families import family_of

    denoiser = family_of(pipe).denoiser(pipe)
    return str(denoiser.device), str(denoiser.dtype).removeprefix("torch.")


def clear_pipeline_cache() -> None:
    with _LOCK:
        _PIPELINES.clear()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory` on a CUDA device (the process' max RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory on ``device`` since :func:`reset_peak_memory`, bytes, and what was measured: the CUDA
    allocator's peak, else the process' max RSS (since the process started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"
