"""Quality scores of generated images (CLIP-T, CLIP-I, DINO) and the automatic QC rule.

The metrics are those of the personalization literature (DreamBooth's DreamBench protocol):

    CLIP-T(x, p) = cos(E_img(x), E_txt(p))                  CLIP image and text towers (projected)
    CLIP-I(x, R) = (1/|R|) * sum_{r in R} cos(E_img(x), E_img(r))
    DINO(x, R)   = (1/|R|) * sum_{r in R} cos(D(x), D(r))   D = a ViT's CLS token (DINO ViT-S/16)

with ``p`` the *base* prompt (the template with the class noun, no identifier) and ``R`` the
subject's reference (instance) images. Cosines are computed in float32 whatever the model dtype.

QC: an image passes iff every configured threshold ``t_m`` has ``score_m >= t_m``.

Anything with ``score(images, prompt, references) -> list[dict]`` and a ``metrics`` tuple
(:class:`ImageScorerProtocol`) can stand in for :class:`Scorer` (e.g. the toy world's
instruments), so the benchmark and the product share one scoring path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from prcore.method.models import default_device, resolve_dtype
from prcore.quality.qc import METRICS, ImageScorerProtocol, QCConfigError  # noqa: F401  (the scorer's interface)

"""Every metric name :class:`Scorer` can produce (and the catalogue/sidecar field names)."""

ImageLike = Image.Image | np.ndarray | bytes
"""A PIL image, an HxWx3 array (uint8, or float in [0, 1]) or encoded image bytes."""


class MetricModelError(ValueError):
    """A configured CLIP/DINO model that cannot be loaded (bad folder, hub id, no safetensors)."""


# --------------------------------------------------------------------------------------------
# model loading (cached per process, like prcore.method.models.load_pipeline)


@dataclass(frozen=True)
class _ClipBundle:
    model: Any
    tokenizer: Any
    processor: Any
    max_length: int


@dataclass(frozen=True)
class _DinoBundle:
    model: Any
    processor: Any


_MODELS: dict[tuple[str, str, str, str], Any] = {}
# Reference embeddings per (models, device, dtype, content hash), per process: a worker that builds
# a new Scorer per task still embeds a subject's references once.
_REFERENCES: OrderedDict[tuple[str | None, str | None, str, str, str], RefEmbeddings] = OrderedDict()
REFERENCE_CACHE_SIZE = 256
_LOCK = threading.RLock()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _model_source(model: str | Path) -> tuple[str, str]:
    """(cache key, what to pass to from_pretrained): a local folder's resolved path or the hub id."""
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise MetricModelError(
                f"{local} is not a transformers model folder (no config.json); point the option at a "
                "folder written by save_pretrained or at a hub id such as openai/clip-vit-large-patch14"
            )
        return str(local.resolve()), str(local)
    return str(model), str(model)


def _load_error(kind: str, model: str | Path, exc: Exception) -> MetricModelError:
    first = str(exc).splitlines()[0].rstrip(".") if str(exc) else ""
    return MetricModelError(
        f"cannot load the {kind} model {str(model)!r}: {exc.__class__.__name__}: {first}. Give a local folder "
        "(save_pretrained layout with model.safetensors, tokenizer/processor files) or a hub id reachable "
        "from this machine; weights load from safetensors only"
    )


def _cached_model(kind: str, model: str | Path, *, device: str, dtype: torch.dtype, cache: bool, load: Callable[[str], Any]) -> Any:
    """``load(source)`` once per (kind, model, device, dtype) and process; load failures -> one clear error."""
    key_model, source = _model_source(model)
    key = (kind, key_model, device, str(dtype))
    with _LOCK:
        if cache and key in _MODELS:
            return _MODELS[key]
        try:
            with _quiet_transformers():
                bundle = load(source)
        except (OSError, ValueError, KeyError) as exc:
            raise _load_error(kind.upper(), model, exc) from exc
        if cache:
            _MODELS[key] = bundle
        return bundle


def load_clip(model: str | Path, *, device: str, dtype: torch.dtype, cache: bool = True) -> _ClipBundle:
    """CLIPModel + tokenizer + image processor from a folder or hub id, once per process."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    def load(source: str) -> _ClipBundle:
        net = CLIPModel.from_pretrained(source, dtype=dtype, use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
        max_length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), net.config.text_config.max_position_embeddings)
        return _ClipBundle(net, tokenizer, processor, max_length)

    return _cached_model("clip", model, device=device, dtype=dtype, cache=cache, load=load)


def load_dino(model: str | Path, *, device: str, dtype: torch.dtype, cache: bool = True) -> _DinoBundle:
    """A ViT-family backbone (ViTModel for DINO, Dinov2Model, ...) + image processor, once per process."""
    from transformers import AutoImageProcessor, AutoModel

    def load(source: str) -> _DinoBundle:
        net = AutoModel.from_pretrained(source, dtype=dtype, use_safetensors=True).to(device).eval()
        return _DinoBundle(net, AutoImageProcessor.from_pretrained(source))

    return _cached_model("dino", model, device=device, dtype=dtype, cache=cache, load=load)


def clear_metric_model_cache() -> None:
    """Forget the loaded CLIP/DINO models and the cached reference embeddings."""
    with _LOCK:
        _MODELS.clear()
        _REFERENCES.clear()


# --------------------------------------------------------------------------------------------
# images and embeddings


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image, an HxWx3 array or encoded image bytes."""
    from prcore.data.images import viewer_rgb  # 16-bit, palette, alpha, CMYK, EXIF rotation: as a viewer shows them

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" and "exif" not in image.info else viewer_rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            return viewer_rgb(im)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"cannot score an image of type {type(image).__name__}; pass PIL images, arrays or PNG bytes")


def image_content_hash(images: Sequence[Image.Image]) -> str:
    """sha256 over each image's size and RGB pixels: the reference-embedding cache key."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.width}x{im.height};".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@dataclass(frozen=True)
class RefEmbeddings:
    """L2-normalised float32 embeddings of one subject's reference images (rows = images)."""

    key: str
    count: int
    models: tuple[str | None, str | None]
    clip: torch.Tensor | None = None
    dino: torch.Tensor | None = None


class Scorer:
    """CLIP-T, CLIP-I and DINO of generated images against a prompt and reference images.

    ``clip_model`` / ``dino_model``: a local folder or hub id (None: that metric is off). Models
    load with ``from_pretrained(..., use_safetensors=True)`` and are cached per process. Images
    are embedded in batches of ``batch_size``; a subject's reference embeddings are computed once
    and kept in a per-process cache keyed by the models and their pixels' content hash (or pass
    the :class:`RefEmbeddings` from :meth:`embed_references` yourself).
    """

    def __init__(
        self,
        clip_model: str | Path | None = None,
        dino_model: str | Path | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.clip_model = str(clip_model) if clip_model else None
        self.dino_model = str(dino_model) if dino_model else None
        self._clip = load_clip(clip_model, device=self.device, dtype=self.dtype) if clip_model else None
        self._dino = load_dino(dino_model, device=self.device, dtype=self.dtype) if dino_model else None

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this scorer produces, in METRICS order."""
        on = []
        if self._clip is not None:
            on += ["clip_t", "clip_i"]
        if self._dino is not None:
            on.append("dino")
        return tuple(on)

    @property
    def enabled(self) -> bool:
        return bool(self.metrics)

    def __repr__(self) -> str:
        return f"Scorer(clip_model={self.clip_model!r}, dino_model={self.dino_model!r}, device={self.device!r})"

    # -- embeddings ---------------------------------------------------------------------------

    def _batches(self, images: Sequence[Image.Image]) -> Iterator[list[Image.Image]]:
        for i in range(0, len(images), self.batch_size):
            yield list(images[i : i + self.batch_size])

    @torch.no_grad()
    def clip_image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        assert self._clip is not None
        chunks = []
        for batch in self._batches(images):
            pixels = self._clip.processor(images=batch, return_tensors="pt")["pixel_values"]
            out = self._clip.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(_normalize(_features(out)).cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def clip_text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        assert self._clip is not None
        chunks = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self._clip.tokenizer(
                list(prompts[i : i + self.batch_size]), padding=True, truncation=True,
                max_length=self._clip.max_length, return_tensors="pt",
            )
            out = self._clip.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            chunks.append(_normalize(_features(out)).cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def dino_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The backbone's CLS token (last hidden state, position 0, after the final layer norm)."""
        assert self._dino is not None
        chunks = []
        for batch in self._batches(images):
            pixels = self._dino.processor(images=batch, return_tensors="pt")["pixel_values"]
            out = self._dino.model(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(_normalize(out.last_hidden_state[:, 0]).cpu())
        return torch.cat(chunks)

    def embed_references(self, references: Sequence[ImageLike]) -> RefEmbeddings:
        """Embeddings of a subject's reference images, cached by content hash."""
        pil = [to_pil(r) for r in references]
        if not pil:
            raise ValueError("no reference images: CLIP-I and DINO compare against the subject's instance images")
        key = image_content_hash(pil)
        cache_key = (self.clip_model, self.dino_model, self.device, str(self.dtype), key)
        with _LOCK:
            hit = _REFERENCES.get(cache_key)
            if hit is not None:
                _REFERENCES.move_to_end(cache_key)
                return hit
        refs = RefEmbeddings(
            key=key,
            count=len(pil),
            models=(self.clip_model, self.dino_model),
            clip=self.clip_image_embeddings(pil) if self._clip is not None else None,
            dino=self.dino_embeddings(pil) if self._dino is not None else None,
        )
        with _LOCK:
            _REFERENCES[cache_key] = refs
            while len(_REFERENCES) > REFERENCE_CACHE_SIZE:
                _REFERENCES.popitem(last=False)
        return refs

    # -- scores -------------------------------------------------------------------------------

    def score(
        self,
        images: Sequence[ImageLike],
        prompt: str | Sequence[str] | None,
        references: Sequence[ImageLike] | RefEmbeddings | None,
    ) -> list[dict[str, float]]:
        """One dict per image with ``clip_t``, ``clip_i``, ``dino`` (those configured and computable).

        ``prompt`` is the base prompt (class noun, no identifier), one for all images or one per
        image; None leaves ``clip_t`` out. ``references`` None leaves ``clip_i``/``dino`` out.
        """
        pil = [to_pil(im) for im in images]
        n = len(pil)
        if n == 0:
            return []
        prompts: list[str] | None
        if prompt is None:
            prompts = None
        elif isinstance(prompt, str):
            prompts = [prompt] * n
        else:
            prompts = list(prompt)
            if len(prompts) != n:
                raise ValueError(f"{len(prompts)} prompts for {n} images: give one prompt, or one per image")
        refs: RefEmbeddings | None
        if references is None:
            refs = None
        elif isinstance(references, RefEmbeddings):
            if references.models != (self.clip_model, self.dino_model):
                raise ValueError(
                    f"reference embeddings were computed with models {references.models}, this scorer uses "
                    f"{(self.clip_model, self.dino_model)}; embed them with this scorer"
                )
            refs = references
        else:
            refs = self.embed_references(references)

        columns: dict[str, torch.Tensor] = {}
        if self._clip is not None:
            img = self.clip_image_embeddings(pil)
            if prompts is not None:
                unique = list(dict.fromkeys(prompts))
                txt = self.clip_text_embeddings(unique)
                index = torch.tensor([unique.index(p) for p in prompts])
                columns["clip_t"] = (img * txt[index]).sum(-1)
            if refs is not None and refs.clip is not None:
                columns["clip_i"] = (img @ refs.clip.T).mean(dim=1)
        if self._dino is not None and refs is not None and refs.dino is not None:
            columns["dino"] = (self.dino_embeddings(pil) @ refs.dino.T).mean(dim=1)
        return [{m: float(columns[m][i]) for m in METRICS if m in columns} for i in range(n)]
