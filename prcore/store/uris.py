"""Instance image URIs: a local path, ``file://`` or ``s3://bucket/key``.

Relative paths in a manifest are resolved against the manifest's own location when it is loaded
(:func:`resolve_uri`), so everything downstream sees absolute paths or URIs.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from prcore.store.storage import (
    KeyNotFoundError,
    S3Options,
    StoreError,
    make_s3_client,
    parse_s3_uri,
    translate_s3_error,
)

SUPPORTED_SCHEMES = ("", "file", "s3")


def uri_scheme(uri: str) -> str:
    """'' for a plain path (including ``C:\\...``), else the lower-case URI scheme."""
    parsed = urlparse(uri)
    return "" if len(parsed.scheme) <= 1 else parsed.scheme.lower()


def resolve_uri(uri: str, base: str) -> str:
    """``uri`` made absolute against ``base`` (a folder path or an ``s3://bucket/prefix`` folder)."""
    if uri.startswith("/") or "://" in uri:
        return uri
    if base.startswith("s3://"):
        bucket, prefix = parse_s3_uri(base)
        return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(prefix, uri)).lstrip("/")
    if uri.startswith(".") or "/." in uri or "//" in uri:
        return os.path.normpath(os.path.join(base, uri))
    return f"{base.rstrip('/')}/{uri}"


def local_path(uri: str) -> Path | None:
    """The local path a URI names, or None for a remote URI."""
    scheme = uri_scheme(uri)
    if scheme == "":
        return Path(uri)
    if scheme == "file":
        return Path(unquote(urlparse(uri).path))
    return None


def read_uri_bytes(uri: str, *, s3_options: S3Options | None = None, client: Any = None) -> bytes:
    """The bytes at ``uri`` (path, ``file://``, ``s3://``). Missing -> FileNotFoundError; bad scheme -> ValueError."""
    scheme = uri_scheme(uri)
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://")
    path = local_path(uri)
    if path is not None:
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"no such file: {uri}") from None
    bucket, key = parse_s3_uri(uri)
    if not key:
        raise ValueError(f"{uri!r} names a bucket, not an object")
    client = client or make_s3_client(s3_options)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
        if code in ("NoSuchKey", "404", "NotFound"):
            raise KeyNotFoundError(f"no such object: {uri}") from None
        err = translate_s3_error(exc, bucket=bucket, action="read", key=key)
        raise err from None


__all__ = ["SUPPORTED_SCHEMES", "read_uri_bytes", "resolve_uri", "uri_scheme", "local_path", "StoreError"]
