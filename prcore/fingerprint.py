"""Content hashes that make outputs idempotent and LoRAs reusable.

A fingerprint is the sha256 of a canonical JSON document (sorted keys, no whitespace, floats as
repr) with a version constant of the algorithm it describes mixed in, shortened for use in keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

FP_LENGTH = 16  # hex chars used in keys (64 bits)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, compact separators, tuples as lists, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default)


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


def hash_many(chunks: Iterable[bytes]) -> str:
    """sha256 over a sequence of byte strings, each length-prefixed so boundaries count."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "big"))
        h.update(chunk)
    return h.hexdigest()
