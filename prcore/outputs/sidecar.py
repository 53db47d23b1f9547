"""Output keys, PNGs with their parameters embedded, and JSON sidecars (the commit marker).

Layout under one root (a folder or ``s3://bucket/prefix``)::

    loras/{subject_id}/{lora_fp}/            LoRA weights + training.json
    images/{subject_id}/{prompt_id}/{req_fp}/{i}.png   + {i}.json sidecar (written last)
    catalog/run_date=YYYY-MM-DD/...parquet   one row per image
    runs/{run_id}/                           summary.json, contact sheets, failure report

Keys are built only from ids that pass :func:`prcore.data.manifest.is_safe_id` and from hex
fingerprints; anything else raises ``ValueError`` before a key exists.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

from prcore.data.fingerprint import canonical_json, sha256_bytes

IMAGES_PREFIX = "images"
LORAS_PREFIX = "loras"
CATALOG_PREFIX = "catalog"
RUNS_PREFIX = "runs"
PNG_TEXT_KEY = "parameters"  # the tEXt/iTXt key image viewers (and A1111-style tools) show
SIDECAR_VERSION = 1

_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _safe(kind: str, value: str) -> str:
    from prcore.data.manifest import is_safe_id

    if not is_safe_id(value):
        raise ValueError(f"{kind} {value!r} is not a safe id (letters, digits, '.', '_', '-'; no '..'); no key was built")
    return value


def _fp(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _HEX.match(value):
        raise ValueError(f"{kind} {value!r} is not a hex fingerprint; no key was built")
    return value


def _index(index: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"image index {index!r} must be an int >= 0")
    return index


def request_prefix(subject_id: str, prompt_id: str, req_fp: str) -> str:
    return f"{IMAGES_PREFIX}/{_safe('subject_id', subject_id)}/{_safe('prompt_id', prompt_id)}/{_fp('req_fp', req_fp)}/"


def image_key(subject_id: str, prompt_id: str, req_fp: str, index: int) -> str:
    """``images/{subject_id}/{prompt_id}/{req_fp}/{index}.png``"""
    return f"{request_prefix(subject_id, prompt_id, req_fp)}{_index(index)}.png"


def sidecar_key(subject_id: str, prompt_id: str, req_fp: str, index: int) -> str:
    """``images/{subject_id}/{prompt_id}/{req_fp}/{index}.json`` (the commit marker)."""
    return f"{request_prefix(subject_id, prompt_id, req_fp)}{_index(index)}.json"


def sidecar_key_for(png_key: str) -> str:
    if not png_key.endswith(".png"):
        raise ValueError(f"{png_key!r} is not a PNG key")
    return png_key[: -len(".png")] + ".json"


def lora_prefix(subject_id: str, lora_fp: str) -> str:
    """``loras/{subject_id}/{lora_fp}/``"""
    return f"{LORAS_PREFIX}/{_safe('subject_id', subject_id)}/{_fp('lora_fp', lora_fp)}/"


def run_key(run_id: str, name: str) -> str:
    """``runs/{run_id}/{name}`` (``name`` may contain ``/``-separated safe segments)."""
    for part in name.split("/"):
        _safe("file name", part)
    return f"{RUNS_PREFIX}/{_safe('run_id', run_id)}/{name}"


def catalog_key(run_date: str, subject_id: str, run_id: str) -> str:
    """``catalog/run_date=YYYY-MM-DD/{run_id}--{subject_id}.parquet`` (one file per subject per run)."""
    if not isinstance(run_date, str) or not _DATE.match(run_date):
        raise ValueError(f"run_date {run_date!r} must be YYYY-MM-DD")
    return f"{CATALOG_PREFIX}/run_date={run_date}/{_safe('run_id', run_id)}--{_safe('subject_id', subject_id)}.parquet"


def is_done(store: Any, png_key: str) -> bool:
    """An image counts as done only when its sidecar exists."""
    return bool(store.exists(sidecar_key_for(png_key)))


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


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"prcore {version('prcore')}"
    except PackageNotFoundError:  # pragma: no cover
        return "prcore (not installed)"


_FORBIDDEN_RECORD_KEYS = re.compile(r"(secret|password|token|credential|access_key)", re.IGNORECASE)


def write_image(store: Any, request: Any, index: int, image: Any, record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write image ``index`` of ``request`` (an :class:`prcore.data.manifest.ImageRequest`): PNG first, then
    the JSON sidecar, which is the commit marker. Returns the sidecar dict.

    ``record`` adds fields to the sidecar (prompts as rendered, model ids, lora_fp, timings, ...);
    keys that look like credentials are refused. The PNG's ``parameters`` chunk holds the same
    generation parameters (everything except the sha256 and size of the PNG itself).
    """
    record = dict(record or {})
    bad = [k for k in record if _FORBIDDEN_RECORD_KEYS.search(k)]
    if bad:
        raise ValueError(f"refusing to store credential-like fields {bad} in a sidecar")
    key = image_key(request.subject_id, request.prompt_id, request.req_fp, index)
    if index >= len(request.seeds):
        raise ValueError(f"image index {index} out of range for a request of {len(request.seeds)} images")
    parameters: dict[str, Any] = {
        "sidecar_version": SIDECAR_VERSION,
        "subject_id": request.subject_id,
        "prompt_id": request.prompt_id,
        "prompt_template": request.prompt,
        "req_fp": request.req_fp,
        "index": index,
        "seed": int(request.seeds[index]),
        "key": key,
        **{k: v for k, v in request.params.items()},
        "code_version": code_version(),
        **record,
    }
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        width = height = None
    else:
        data = encode_png(image, parameters)
        width, height = image.size
    sidecar = {**parameters, "sha256": sha256_bytes(data), "bytes": len(data), "width": width, "height": height}
    store.put(key, data, content_type="image/png", metadata={"req_fp": request.req_fp, "seed": str(sidecar["seed"])})
    store.put(sidecar_key_for(key), json.dumps(sidecar, sort_keys=True, indent=1).encode(), content_type="application/json")
    return sidecar


def read_sidecar(store: Any, png_key: str) -> dict[str, Any]:
    return json.loads(store.get(sidecar_key_for(png_key)))
