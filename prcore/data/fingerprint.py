"""Content hashes that make outputs idempotent and LoRAs reusable.

A fingerprint is the sha256 of a canonical JSON document (sorted keys, no whitespace, floats as
repr) with a version constant of the algorithm it describes mixed in, shortened for use in keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from prcore.data.schema import SEED_MAX

FP_LENGTH = 16  # hex chars used in keys (64 bits)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, compact separators, tuples as lists, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) as None, recursively: for JSON that reports
    aggregates (a mean over nothing is NaN), which strict JSON has no token for."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"cannot fingerprint object of type {type(o).__name__}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(kind: str, version: int | str, payload: Mapping[str, Any], *, length: int = FP_LENGTH) -> str:
    """Hash of ``payload`` tagged with what it describes (``kind``) and that algorithm's ``version``."""
    doc = canonical_json({"kind": kind, "version": version, "payload": payload})
    return hashlib.sha256(doc.encode()).hexdigest()[:length]


# --- 64-bit mixing for seeds and request fingerprints at manifest scale ---------------------------
#
# Planning a 1,000,000-row manifest cannot afford one sha256 per row in Python. Every input is hashed
# once per *distinct* value with sha256 (subjects, prompt ids, request specs), and the per-row values
# are combined with the splitmix64 finaliser, a bijection on 64-bit integers, vectorised in numpy:
#
#     splitmix64(z):  z += 0x9E3779B97F4A7C15
#                     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
#                     z = (z ^ (z >> 27)) * 0x94D049BB133111EB
#                     return z ^ (z >> 31)                              (all mod 2**64)
#     mix64(a, b)  =  splitmix64(a ^ splitmix64(b))
#
# For a fixed ``b``, ``mix64(., b)`` is a bijection (and vice versa), so two different subjects never
# collide on the same request spec and one subject's different specs never collide with each other.

_M64 = (1 << 64) - 1


def sha256_u64(text: str) -> int:
    """First 64 bits of sha256(text) as an unsigned integer."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _splitmix64_int(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def splitmix64(z: Any) -> Any:
    """splitmix64 finaliser (see module notes); works on Python ints and numpy uint64 arrays."""
    if isinstance(z, int):
        return _splitmix64_int(z & _M64)
    import numpy as np

    z = np.asarray(z).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix64(a: Any, b: Any) -> Any:
    """``splitmix64(a ^ splitmix64(b))``: combines two 64-bit values (ints or uint64 arrays)."""
    if isinstance(a, int) and isinstance(b, int):
        return _splitmix64_int((a & _M64) ^ _splitmix64_int(b & _M64))
    import numpy as np

    a = np.asarray(a).astype(np.uint64)
    b = np.asarray(b).astype(np.uint64)
    return splitmix64(a ^ splitmix64(b))


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` of a request whose row gives ``seed``: ``mix64(seed, index) & SEED_MAX``."""
    return mix64(int(seed), int(index)) & SEED_MAX


def default_prompt_id(template: str) -> str:
    """A stable id for a prompt template: a slug of it plus 8 hex chars of its sha256.

    ``"a {subject} in the snow"`` -> ``"a-subject-in-the-snow-<8 hex>"``.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", template.lower()).strip("-")[:40].strip("-") or "prompt"
    return f"{slug}-{hashlib.sha256(template.encode()).hexdigest()[:8]}"
