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
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from prcore.method.models import default_device, resolve_dtype

METRICS: tuple[str, ...] = ("clip_t", "clip_i", "dino")
"""Every metric name :class:`Scorer` can produce (and the catalogue/sidecar field names)."""

QC_COLUMNS: dict[str, str] = {"clip_t": "qc_clip_t", "clip_i": "qc_clip_i", "dino": "qc_dino"}
"""Manifest columns (and flow parameters) holding the per-metric QC thresholds."""

ImageLike = Image.Image | np.ndarray | bytes
"""A PIL image, an HxWx3 array (uint8, or float in [0, 1]) or encoded image bytes."""


class MetricModelError(ValueError):
    """A configured CLIP/DINO model that cannot be loaded (bad folder, hub id, no safetensors)."""


class QCConfigError(ValueError):
    """A QC threshold that cannot be applied (metric not scored, value out of range)."""


# --------------------------------------------------------------------------------------------
# the pluggable interface


@runtime_checkable
class ImageScorerProtocol(Protocol):
    """What the eval command, the DreamBench runner and the flows need from a scorer.

    ``score`` returns one dict per image mapping metric names (a subset of ``metrics``) to floats;
    ``prompt`` is the base prompt (one string, or one per image); ``references`` the subject's
    reference images (or whatever the scorer's own ``embed_references`` returned for them).
    """

    @property
    def metrics(self) -> tuple[str, ...]: ...

    def score(self, images: Sequence[Any], prompt: str | Sequence[str] | None, references: Any) -> list[dict[str, float]]: ...


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
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            return im.convert("RGB")
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


# --------------------------------------------------------------------------------------------
# QC


@dataclass(frozen=True)
class QCThresholds:
    """Per-metric minimum scores; None means no check on that metric."""

    clip_t: float | None = None
    clip_i: float | None = None
    dino: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise QCConfigError(f"QC threshold {f.name}={value!r} is not a finite number")
            if not -1.0 <= float(value) <= 1.0:
                raise QCConfigError(f"QC threshold {f.name}={value} is outside [-1, 1], the range of a cosine similarity")

    def configured(self) -> dict[str, float]:
        """{metric: threshold} for the thresholds that are set."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    def __bool__(self) -> bool:
        return bool(self.configured())

    def check_metrics(self, metrics: Sequence[str]) -> None:
        """Raise QCConfigError when a threshold is set for a metric that is not scored."""
        missing = [m for m in self.configured() if m not in metrics]
        if missing:
            raise QCConfigError(
                f"QC threshold set for {', '.join(missing)} but that metric is not scored (scored: "
                f"{', '.join(metrics) or 'none'}); configure its model (--clip-model for clip_t/clip_i, "
                "--dino-model for dino) or drop the threshold"
            )

    @classmethod
    def from_columns(cls, row: Mapping[str, Any], defaults: QCThresholds | None = None) -> QCThresholds:
        """Thresholds from manifest columns ``qc_clip_t``/``qc_clip_i``/``qc_dino`` (or flow
        parameters of the same names); a missing or null column falls back to ``defaults``."""
        base = defaults or cls()
        values: dict[str, float | None] = {}
        for metric, column in QC_COLUMNS.items():
            value = row.get(column)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                values[metric] = getattr(base, metric)
            else:
                values[metric] = value
        return cls(**values)


def failed_metrics(scores: Mapping[str, float], thresholds: QCThresholds) -> list[str]:
    """The metrics whose score is below its threshold (NaN counts as below)."""
    configured = thresholds.configured()
    thresholds.check_metrics(tuple(scores))
    return [m for m, t in configured.items() if not scores[m] >= t]


def qc_pass(scores: Mapping[str, float], thresholds: QCThresholds) -> bool:
    """True iff ``scores[m] >= t_m`` for every configured threshold ``t_m``.

    A threshold for a metric missing from ``scores`` raises :class:`QCConfigError`.
    """
    return not failed_metrics(scores, thresholds)


def score_and_qc(
    scorer: ImageScorerProtocol,
    images: Sequence[Any],
    *,
    prompt: str | Sequence[str] | None,
    references: Any,
    thresholds: QCThresholds | None = None,
) -> list[dict[str, Any]]:
    """The flow stage's hook: scores plus ``qc_pass`` per image, ready to merge into a sidecar
    record / catalogue row; with thresholds set, also ``qc_thresholds`` ({metric: threshold}, so
    ``prcore eval`` re-applies them). ``qc_pass`` is None when no threshold is set. Thresholds
    naming a metric the scorer does not produce fail before any model runs."""
    thresholds = thresholds or QCThresholds()
    thresholds.check_metrics(scorer.metrics)
    records: list[dict[str, Any]] = []
    for scores in scorer.score(images, prompt, references):
        record: dict[str, Any] = dict(scores)
        record["qc_pass"] = qc_pass(scores, thresholds) if thresholds else None
        if thresholds:
            record["qc_thresholds"] = thresholds.configured()
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# scoring an existing output root (``prcore eval``)

SIDECAR_KEY = re.compile(r"^images/(?P<subject_id>[^/]+)/(?P<prompt_id>[^/]+)/(?P<req_fp>[^/]+)/(?P<index>\d+)\.json$")


@dataclass
class EvalResult:
    """What :func:`evaluate_outputs` did: one row per scored image, and what it could not score."""

    rows: list[dict[str, Any]]
    scores_key: str | None
    skipped: list[str]  # "key: reason"

    def summary(self) -> list[dict[str, Any]]:
        """Per subject: images, mean of each metric, QC failures."""
        by_subject: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            by_subject.setdefault(row["subject_id"], []).append(row)
        out = []
        for subject_id, rows in sorted(by_subject.items()):
            entry: dict[str, Any] = {"subject_id": subject_id, "images": len(rows)}
            for m in METRICS:
                values = [r[m] for r in rows if r.get(m) is not None]
                if values:
                    entry[m] = sum(values) / len(values)
            checked = [r for r in rows if r.get("qc_pass") is not None]
            entry["qc_failed"] = sum(1 for r in checked if not r["qc_pass"]) if checked else None
            out.append(entry)
        return out


def _sidecar_thresholds(sidecar: Mapping[str, Any]) -> dict[str, float]:
    """QC thresholds recorded with an image: its ``qc_thresholds`` dict (written by
    :func:`score_and_qc`), else the manifest columns ``qc_*`` (top level or under ``params``)."""
    recorded = sidecar.get("qc_thresholds")
    if isinstance(recorded, Mapping):
        return {m: v for m, v in recorded.items() if m in METRICS and v is not None}
    params = sidecar.get("params") if isinstance(sidecar.get("params"), Mapping) else {}
    found: dict[str, float] = {}
    for metric, column in QC_COLUMNS.items():
        value = sidecar.get(column, params.get(column))
        if value is not None:
            found[metric] = value
    return found


def _base_prompt(sidecar: Mapping[str, Any]) -> str | None:
    if sidecar.get("base_prompt"):
        return str(sidecar["base_prompt"])
    template, noun = sidecar.get("prompt"), sidecar.get("class_noun")
    if template and noun and "{subject}" in str(template):
        return str(template).replace("{subject}", str(noun))
    return None


def _reference_images(subject_id: str, sidecar: Mapping[str, Any], reference_uris: Mapping[str, Sequence[str]] | None) -> list[bytes] | None:
    """A subject's reference image bytes: ``reference_uris[subject_id]`` when given, else the
    sidecar's ``instance_images`` URIs (file paths, file://, s3://)."""
    from prcore.store.uris import read_uri_bytes

    uris = (reference_uris or {}).get(subject_id) or sidecar.get("instance_images")
    if not uris:
        return None
    return [read_uri_bytes(str(u)) for u in uris]


def reference_uris_from_folder(folder: str | Path) -> dict[str, list[str]]:
    """``{subject_id: [image paths]}`` from a folder with one sub-folder of images per subject."""
    root = Path(folder)
    out: dict[str, list[str]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in sub.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        if files:
            out[sub.name] = files
    return out


def reference_uris_from_manifest(uri: str | Path) -> dict[str, list[str]]:
    """``{subject_id: [resolved instance image URIs]}`` from a manifest (file, folder or s3 prefix)."""
    from prcore.data.manifest import load_manifest

    manifest = load_manifest(str(uri))
    out: dict[str, list[str]] = {}
    for row, subject_id in enumerate(manifest.df["subject_id"].to_list()):
        if subject_id is not None and subject_id not in out:
            out[subject_id] = manifest.instance_images(row)
    return out


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def update_sidecar(store: Any, key: str, sidecar: Mapping[str, Any], fields_: Mapping[str, Any]) -> dict[str, Any]:
    """Rewrite a sidecar with ``fields_`` merged in, as one atomic put (the store renames a
    temporary file into place locally; an S3 put replaces the object whole), so the commit marker
    is never missing or half written."""
    merged = {**sidecar, **fields_}
    store.put(key, json.dumps(merged, sort_keys=True, indent=1).encode(), content_type="application/json")
    return merged


def evaluate_outputs(
    store: Any,
    scorer: ImageScorerProtocol,
    *,
    run_id: str | None = None,
    thresholds: QCThresholds | None = None,
    reference_uris: Mapping[str, Sequence[str]] | None = None,
    write: bool = True,
    now: datetime | None = None,
) -> EvalResult:
    """Score every committed image under ``images/`` of an output root (or only ``run_id``'s).

    Each image (a PNG whose sidecar exists) is scored against its base prompt and its subject's
    reference images (``reference_uris[subject_id]`` when given, else the sidecar's
    ``instance_images`` URIs; see :func:`reference_uris_from_folder`,
    :func:`reference_uris_from_manifest`). A subject without reference images gets CLIP-T only.
    QC thresholds: ``thresholds`` (explicit) win per metric over the ``qc_*`` values recorded in
    the sidecar by the run. Everything is read, checked and scored before anything is written;
    then each sidecar gets the scores, ``qc_pass``, ``qc_thresholds`` and ``score_models``, and all
    rows go to ``runs/{run_id or eval-<UTC time>}/scores.parquet``.
    """
    import polars as pl

    thresholds = thresholds or QCThresholds()
    thresholds.check_metrics(scorer.metrics)
    skipped: list[str] = []

    # 1. read the committed images' sidecars, grouped by (subject, base prompt)
    groups: dict[tuple[str, str | None], list[tuple[str, dict[str, Any], re.Match[str]]]] = {}
    for key in sorted(store.list("images/")):
        match = SIDECAR_KEY.match(key)
        if match is None:
            continue
        sidecar = json.loads(store.get(key))
        if run_id is not None and sidecar.get("run_id") != run_id:
            continue
        groups.setdefault((match["subject_id"], _base_prompt(sidecar)), []).append((key, sidecar, match))
    if run_id is not None and not groups:
        raise ValueError(f"no image in {store.uri} records run_id {run_id!r}; check the run id (see runs/ in the output root)")

    # 2. references per subject, and every image's thresholds checked against what can be scored
    references: dict[str, list[bytes] | None] = {}
    effective: dict[str, QCThresholds] = {}
    for (subject_id, _), items in groups.items():
        if subject_id not in references:
            references[subject_id] = _reference_images(subject_id, items[0][1], reference_uris)
            if references[subject_id] is None and any(m in scorer.metrics for m in ("clip_i", "dino")):
                skipped.append(f"subject {subject_id}: no reference images known (CLIP-I/DINO not scored); pass --references or --manifest")
        scorable = [m for m in scorer.metrics if references[subject_id] is not None or m not in ("clip_i", "dino")]
        for key, sidecar, _ in items:
            recorded = _sidecar_thresholds(sidecar)
            t = QCThresholds(**{m: getattr(thresholds, m) if getattr(thresholds, m) is not None else recorded.get(m) for m in METRICS})
            try:
                t.check_metrics(scorable)
            except QCConfigError as exc:
                raise QCConfigError(f"{key} (thresholds recorded by its run: {recorded or 'none'}): {exc}") from None
            effective[key] = t

    # 3. score (nothing written yet)
    embed = getattr(scorer, "embed_references", None)
    scored: list[tuple[str, dict[str, Any], re.Match[str], str | None, str, dict[str, float]]] = []
    for (subject_id, base_prompt), items in groups.items():
        raw = references[subject_id]
        refs = (embed(raw) if callable(embed) else raw) if raw else None
        present = []
        for key, sidecar, match in items:
            png_key = key[: -len(".json")] + ".png"
            try:
                present.append((key, sidecar, match, store.get(png_key), png_key))
            except FileNotFoundError:
                skipped.append(f"{key}: its PNG {png_key} is missing")
        if present:
            scores = scorer.score([p[3] for p in present], base_prompt, refs)
            for (key, sidecar, match, _png, png_key), image_scores in zip(present, scores, strict=True):
                scored.append((key, sidecar, match, base_prompt, png_key, image_scores))

    # 4. write sidecars, then the run's score table
    models = {k: v for k, v in (("clip_model", getattr(scorer, "clip_model", None)), ("dino_model", getattr(scorer, "dino_model", None))) if v}
    rows: list[dict[str, Any]] = []
    for key, sidecar, match, base_prompt, png_key, image_scores in scored:
        t = effective[key]
        passed = qc_pass(image_scores, t) if t else None
        if write:
            update_sidecar(store, key, sidecar, {**image_scores, "qc_pass": passed, "qc_thresholds": t.configured(), "score_models": models})
        rows.append(
            {
                "subject_id": match["subject_id"], "prompt_id": match["prompt_id"], "req_fp": match["req_fp"],
                "index": int(match["index"]), "key": png_key, "run_id": sidecar.get("run_id"), "base_prompt": base_prompt,
                **{m: image_scores.get(m) for m in scorer.metrics}, "qc_pass": passed,
            }
        )
    scores_key = None
    if write and rows:
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        scores_key = f"runs/{run_id or 'eval-' + stamp}/scores.parquet"
        buf = io.BytesIO()
        pl.DataFrame(rows, infer_schema_length=None).write_parquet(buf)
        store.put(scores_key, buf.getvalue(), content_type="application/vnd.apache.parquet")
    return EvalResult(rows, scores_key, skipped)
