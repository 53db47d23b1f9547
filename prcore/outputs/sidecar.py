"""One record per image: the sidecar, the PNG's ``parameters`` chunk and the catalogue row.

:class:`ImageRecord` is the single record builder. The flow (``prcore.pipeline``) and
``prcore sample`` fill it; :func:`write_image` writes the PNG (its text chunk holds the record
without the PNG's own sha256 and size) and then the JSON sidecar, which is the commit marker; the
catalogue (``prcore.outputs.catalog``) takes its columns from the record's fields. A new field
is one line here.

Sidecar version 2 (version 1 wrote ``sample_seconds`` and left ``class_noun``, ``identifier``
and the scheduler used out); :meth:`ImageRecord.from_dict` reads both.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from prcore.data.fingerprint import canonical_json, sha256_bytes
from prcore.data.schema import CREDENTIAL_LIKE
from prcore.store.keys import sidecar_key_for

PNG_TEXT_KEY = "parameters"  # the tEXt/iTXt key image viewers (and A1111-style tools) show
SIDECAR_VERSION = 2

_FORBIDDEN_KEYS = re.compile(CREDENTIAL_LIKE, re.IGNORECASE)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"prcore {version('prcore')}"
    except PackageNotFoundError:  # pragma: no cover
        return "prcore (not installed)"


@dataclass
class ImageRecord:
    """Everything known about one generated image. Field order is the catalogue's column order."""

    # where it is
    subject_id: str
    prompt_id: str
    req_fp: str
    index: int
    key: str
    seed: int
    # prompts
    prompt_template: str
    personal_prompt: str
    base_prompt: str
    negative_prompt: str
    class_noun: str
    identifier: str
    # sampling, as used
    guidance: str
    guidance_scale: float
    consistency_scale: float
    parallel_scale: float
    num_inference_steps: int
    scheduler: str  # the name asked for, or the model's own scheduler class
    height: int
    width: int
    # models and placement
    base_model: str
    lora_fp: str | None
    device: str
    dtype: str
    peak_memory_bytes: int | None = None  # peak device memory of the sampling process
    consistency_start: float = 0.0  # the consistency window used
    consistency_stop: float = 1.0
    unet_rows: int | None = None  # UNet rows evaluated for this image over its trajectory
    # the run that made it
    run_id: str | None = None
    run_date: str | None = None
    seconds: float | None = None  # sampling time of this image (the batch's time / its images)
    # quality (prcore.quality); None when no scorer ran
    clip_t: float | None = None
    clip_i: float | None = None
    dino: float | None = None
    qc_pass: bool | None = None
    # the file
    sha256: str | None = None
    bytes: int | None = None
    md5: str | None = None  # what S3 lists as the ETag of a single-part upload: checked on rerun without a download
    code_version: str = field(default_factory=code_version)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    sidecar_version: int = SIDECAR_VERSION
    # nested values (catalogue: extra_json)
    worker: dict[str, Any] | None = None
    qc_thresholds: dict[str, float] | None = None
    score_models: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # anything else, e.g. meta_* columns

    def __post_init__(self) -> None:
        bad = [k for k in self.extra if _FORBIDDEN_KEYS.search(k)]
        if bad:
            raise ValueError(f"refusing to store credential-like fields {bad} in a sidecar")

    def to_dict(self) -> dict[str, Any]:
        """The sidecar: every field, ``extra`` merged at the top level."""
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageRecord:
        """A record from a sidecar (version 1 or 2); fields it does not know go to ``extra``."""
        data = dict(data)
        if "sample_seconds" in data and "seconds" not in data:  # version 1
            data["seconds"] = data.pop("sample_seconds")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: data.pop(k) for k in list(data) if k in known}
        for f in fields(cls):  # a field an old sidecar lacks and that has no default: unknown
            if f.name not in values and f.name != "extra" and f.default is MISSING and f.default_factory is MISSING:
                values[f.name] = None
        return cls(**values, extra=data)

    def with_scores(self, scores: Mapping[str, Any]) -> ImageRecord:
        """A copy with quality fields (clip_t, clip_i, dino, qc_pass, qc_thresholds, score_models) set."""
        names = {f.name for f in fields(self)}
        unknown = [k for k in scores if k not in names]
        if unknown:
            raise ValueError(f"unknown score fields {unknown}")
        return replace(self, **dict(scores))


def encode_png(image: Any, parameters: Mapping[str, Any]) -> bytes:
    """PNG bytes of a PIL image with ``parameters`` as canonical JSON in the ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(PNG_TEXT_KEY, canonical_json(dict(parameters)))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_parameters(data: bytes) -> dict[str, Any]:
    """The ``parameters`` dict embedded by :func:`encode_png`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        text = im.text.get(PNG_TEXT_KEY)  # type: ignore[attr-defined]
    if text is None:
        raise ValueError("PNG has no 'parameters' text chunk")
    return json.loads(text)


def encode_image(record: ImageRecord, image: Any) -> tuple[bytes, ImageRecord]:
    """The PNG bytes (parameters chunk = the record without sha256/bytes) and the completed record."""
    import hashlib

    parameters = {k: v for k, v in record.to_dict().items() if k not in ("sha256", "bytes", "md5")}
    data = encode_png(image, parameters)
    return data, replace(record, sha256=sha256_bytes(data), bytes=len(data), md5=hashlib.md5(data, usedforsecurity=False).hexdigest())


def sidecar_bytes(record: ImageRecord) -> bytes:
    """The sidecar as strict JSON: a non-finite float raises (never a NaN token no JSON parser reads)."""
    return json.dumps(record.to_dict(), sort_keys=True, indent=1, default=str, allow_nan=False).encode()


def write_image(store: Any, record: ImageRecord, image: Any) -> ImageRecord:
    """Write the PNG at ``record.key``, then its JSON sidecar (the commit marker); returns the
    record as written (sha256 and size of the PNG filled in)."""
    data, record = encode_image(record, image)
    store.put(record.key, data, content_type="image/png", metadata={"req_fp": record.req_fp, "seed": str(record.seed)})
    store.put(sidecar_key_for(record.key), sidecar_bytes(record), content_type="application/json")
    return record


def read_sidecar(store: Any, png_key: str) -> ImageRecord:
    return ImageRecord.from_dict(json.loads(store.get(sidecar_key_for(png_key))))


def update_sidecar(store: Any, record: ImageRecord, **changes: Any) -> ImageRecord:
    """Rewrite a sidecar with ``changes`` as one atomic put (the store renames a temporary file
    into place locally; an S3 put replaces the object whole), so the commit marker is never
    missing or half written."""
    record = replace(record, **changes)
    store.put(sidecar_key_for(record.key), sidecar_bytes(record), content_type="application/json")
    return record
