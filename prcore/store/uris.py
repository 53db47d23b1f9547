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
    parse_s3_uri,
    shared_s3_client,
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


DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # = prcore.data.schema.MAX_INPUT_BYTES


def max_input_bytes() -> int:
    raw = os.environ.get("PRCORE_MAX_INPUT_BYTES")
    return int(raw) if raw and raw.isdigit() else DEFAULT_MAX_BYTES


class InputTooLargeError(ValueError):
    """An input larger than the read cap."""


def refuse_special_file(path: str | os.PathLike[str], what: str = "input") -> None:
    """Raise ValueError when ``path`` is a FIFO, device or socket: something a reader would block on
    or read forever. ``os.stat`` opens nothing, so this never blocks; a missing path, a regular file
    or a folder passes (the caller's own checks name those)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ValueError(f"{what} {os.fspath(path)} is not a regular file (a FIFO, device or socket); give a file")


def _read_local(path: Path, uri: str, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit``. Opened non-blocking, so a FIFO never hangs the
    read; anything but a regular file (FIFO, device, socket, folder) is refused before reading."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no such file: {uri}") from None
    except IsADirectoryError:
        raise ValueError(f"{uri} is a folder, not a file; give an image file") from None
    except OSError as exc:  # e.g. ENXIO: a FIFO without a writer
        raise ValueError(f"{uri} cannot be opened ({exc.strerror}); give a regular image file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{uri} is not a regular file (a FIFO, device or socket); give an image file")
        if st.st_size > limit:
            raise InputTooLargeError(f"{uri} is {st.st_size} bytes, over the {limit}-byte limit (PRCORE_MAX_INPUT_BYTES)")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(limit + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > limit:  # grew while we read it
        raise InputTooLargeError(f"{uri} is over the {limit}-byte limit (PRCORE_MAX_INPUT_BYTES)")
    return data


def read_uri_bytes(uri: str, *, s3_options: S3Options | None = None, client: Any = None, max_bytes: int | None = None) -> bytes:
    """The bytes at ``uri`` (path, ``file://``, ``s3://``), at most ``max_bytes`` (default
    :func:`max_input_bytes`). Missing -> FileNotFoundError; bad scheme, not a regular file or too
    large -> ValueError. S3 reads run under the client's connect/read timeouts."""
    scheme = uri_scheme(uri)
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://")
    limit = max_bytes if max_bytes is not None else max_input_bytes()
    path = local_path(uri)
    if path is not None:
        return _read_local(path, uri, limit)
    bucket, key = parse_s3_uri(uri)
    if not key:
        raise ValueError(f"{uri!r} names a bucket, not an object")
    client = client or shared_s3_client(s3_options)
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
        size = int(obj.get("ContentLength") or 0)
        if size > limit:
            obj["Body"].close()
            raise InputTooLargeError(f"{uri} is {size} bytes, over the {limit}-byte limit (PRCORE_MAX_INPUT_BYTES)")
        data = obj["Body"].read(limit + 1)
        if len(data) > limit:
            raise InputTooLargeError(f"{uri} is over the {limit}-byte limit (PRCORE_MAX_INPUT_BYTES)")
        return data
    except InputTooLargeError:
        raise
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
        if code in ("NoSuchKey", "404", "NotFound"):
            raise KeyNotFoundError(f"no such object: {uri}") from None
        err = translate_s3_error(exc, bucket=bucket, action="read", key=key)
        raise err from None


__all__ = ["SUPPORTED_SCHEMES", "read_uri_bytes", "refuse_special_file", "resolve_uri", "uri_scheme", "local_path", "StoreError"]
