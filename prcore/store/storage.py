"""One small Store interface over a local folder or an S3 prefix.

    store = open_store("out/")                      # LocalStore
    store = open_store("s3://bucket/prefix")        # S3Store (boto3, standard credential chain)
    store.put("images/a/b.png", data); store.get(key); store.exists(key); store.list("images/a/")
    store.delete(key); store.url(key)

Keys are relative to the store's root, use ``/`` and never contain ``..``, empty segments,
backslashes or a leading ``/`` (:func:`check_key`), so nothing written through a Store can escape
its root. Local writes go to a temporary file in the target folder and are renamed into place
(``os.replace``), so a reader never sees half a file. S3 puts are single objects; payloads above
``multipart_threshold`` go through boto3's transfer manager.

Errors: :class:`StoreError` is permanent and user-fixable (no such bucket, access denied, bad or
missing credentials, a bad key); :class:`TransientStoreError` is worth retrying (throttling, 5xx,
connection trouble after boto3's own retries). ``is_transient(exc)`` tells them apart. Messages name
the bucket/key and what to check; they never contain credentials.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

__all__ = [
    "Store",
    "LocalStore",
    "S3Store",
    "StoreError",
    "StoreWriteError",
    "TransientStoreError",
    "ObjectInfo",
    "list_info",
    "probe_write",
    "KeyNotFoundError",
    "open_store",
    "check_key",
    "is_transient",
    "parse_s3_uri",
]

_SEGMENT = re.compile(r"^[A-Za-z0-9._=+@-]+$")


class StoreError(Exception):
    """A permanent, user-fixable storage error (bad bucket, permissions, credentials, key)."""


class TransientStoreError(StoreError):
    """A storage error worth retrying (throttling, 5xx, connection reset, timeout)."""


class StoreUnreachableError(TransientStoreError):
    """The endpoint cannot be reached (connection refused, DNS, connect timeout). Retried within the
    budget once a call to the store has succeeded (an outage in the middle of a night); before that
    it is a configuration error and fails at once."""


class StoreWriteError(StoreError):
    """The store refuses writes: disk full, quota, file too large, permission denied, read-only file
    system, an output root that is a file. Nothing else this run writes will succeed either: the CLI
    stops with one line and exit 2."""


_WRITE_ERRNOS = {"ENOSPC": "the disk is full", "EDQUOT": "the disk quota is exceeded", "EFBIG": "the file is too large for the file system or the process's file size limit",
                 "EACCES": "permission denied", "EPERM": "operation not permitted", "EROFS": "the file system is read-only",
                 "ENOTDIR": "a part of the path is a file, not a folder", "EEXIST": "a part of the path is a file, not a folder"}


def _write_error(key: str, root: str, exc: OSError) -> StoreError:
    """One line for an OSError of a local write: :class:`StoreWriteError` for the errors no retry fixes."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    if name in _WRITE_ERRNOS:
        return StoreWriteError(f"cannot write {key!r} under {root}: {_WRITE_ERRNOS[name]} ({exc.strerror}); "
                               "free space or fix the folder's permissions, then run again (finished outputs are kept)")
    return StoreError(f"cannot write {key!r} under {root}: {exc.strerror or exc}; check the folder's permissions and free space")


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing tells about an object without reading it: its key, size and (S3) ETag."""

    key: str
    size: int
    etag: str | None = None  # S3: the MD5 of the bytes for a single-part upload without SSE-KMS; None on a folder
    stamp: str | None = None  # a folder: "size:mtime_ns:inode" (every put is a new file renamed into place)

    @property
    def version(self) -> str | None:
        """What changes whenever the object is rewritten: size and ETag on S3, ``stamp`` on a folder;
        None when the listing tells neither."""
        return f"{self.size}:{self.etag.strip(chr(34))}" if self.etag else self.stamp

    @property
    def md5(self) -> str | None:
        """The MD5 hex digest when the ETag is one (a single-part upload), else None."""
        tag = (self.etag or "").strip('"')
        return tag if re.fullmatch(r"[0-9a-f]{32}", tag) else None

    def matches(self, size: int | None, md5: str | None) -> bool:
        """Whether this listed object can be the file recorded with ``size`` bytes and MD5 ``md5``: each
        is compared where both sides know it (a folder's listing has no MD5, an old record no size)."""
        if size is not None and self.size >= 0 and self.size != size:
            return False
        return not (md5 and self.md5 and md5 != self.md5)


def list_info(store: Any, prefix: str = "") -> Iterator[ObjectInfo]:
    """``store.list_info(prefix)`` where the store has it, else the keys with unknown size (-1)."""
    if hasattr(store, "list_info"):
        return store.list_info(prefix)
    return (ObjectInfo(k, -1) for k in store.list(prefix))


def probe_write(store: Any) -> None:
    """Write, read back and delete one small uniquely named object (``runs/.probe-*``): the output root
    takes writes. Raises :class:`StoreError` (one line) when it does not; leaves nothing behind."""
    import secrets

    from prcore.store.keys import probe_key

    key = probe_key(secrets.token_hex(8))
    data = b"prcore write probe\n"
    created: list[Path] = []  # a folder's root and runs/ made by the probe are removed again: nothing is left
    if isinstance(store, LocalStore):
        folder = store._path(key).parent
        while not folder.exists() and folder != folder.parent:
            created.append(folder)
            folder = folder.parent
    try:
        store.put(key, data, content_type="text/plain")
        if store.get(key) != data:
            raise StoreError(f"the output root {store.uri} does not return what was written to it (probe {key!r})")
    finally:
        with contextlib.suppress(StoreError, OSError):
            store.delete(key)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()


class KeyNotFoundError(StoreError, FileNotFoundError):
    """``get`` of a key that does not exist."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying ``exc`` may succeed (throttling, 5xx, timeouts, dropped connections)."""
    if isinstance(exc, TransientStoreError):
        return True
    if isinstance(exc, StoreError):
        return False
    try:
        from botocore.exceptions import ClientError, ReadTimeoutError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover
        return isinstance(exc, (ConnectionError, TimeoutError))
    if isinstance(exc, (BotoConnectionError, ReadTimeoutError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, ClientError):
        return _client_error_is_transient(exc)
    return False


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`StoreError`.

    Safe: non-empty ``/``-separated segments of letters, digits and ``. _ = + @ -``; no ``.`` or
    ``..`` segment, no leading ``/``, no backslash.
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid store key {key!r}: keys are non-empty relative paths like 'images/a/b.png'")
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _SEGMENT.match(part):
            raise StoreError(
                f"invalid store key {key!r}: segment {part!r} is not allowed (no '..', '.', empty segments, "
                "absolute paths or characters outside letters, digits and . _ = + @ -)"
            )
    return key


def _check_prefix(prefix: str) -> str:
    """A list prefix: '' or a key prefix, optionally ending in '/'."""
    if prefix == "":
        return prefix
    check_key(prefix.rstrip("/") if prefix.endswith("/") else prefix)
    return prefix


@runtime_checkable
class Store(Protocol):
    """What the product needs from storage. ``uri`` is the root (a folder path or ``s3://bucket/prefix``)."""

    uri: str

    def put(self, key: str, data: bytes, content_type: str | None = None, metadata: Mapping[str, str] | None = None) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def delete(self, key: str) -> None: ...

    def url(self, key: str, expires: int | None = None) -> str: ...


# --------------------------------------------------------------------------------------------------
# Local folder


class LocalStore:
    """A folder on local disk. Writes are atomic: temporary file in the same folder, then ``os.replace``.

    ``metadata`` and ``content_type`` are not stored locally (the JSON sidecars carry everything).
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes, content_type: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        except OSError as exc:
            raise _write_error(key, self.uri, exc) from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # never leave half a file behind (disk full, killed)
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise _write_error(key, self.uri, exc) from None
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyNotFoundError(f"no such key {key!r} under {self.uri}") from None
        except IsADirectoryError:
            raise KeyNotFoundError(f"{key!r} under {self.uri} is a folder, not an object") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys (relative, ``/``-separated, sorted) starting with ``prefix``; temporary files are skipped."""
        return iter([key for key, _ in self._walk(prefix, sizes=False)])

    def _walk(self, prefix: str, *, sizes: bool) -> list[tuple[str, os.stat_result | None]]:
        """(key, its stat with ``sizes``, else None) of every object under ``prefix``, sorted by key."""
        _check_prefix(prefix)
        # Walk only the deepest folder the prefix names, then filter by the remaining partial name.
        folder_part, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*folder_part.split("/")) if folder_part else self.root
        if not start.is_dir():
            return []
        rel_start = f"{folder_part}/" if folder_part else ""
        keys: list[tuple[str, os.stat_result | None]] = []
        stack = [(str(start), rel_start)]
        while stack:  # iterative scandir: d_type tells folders apart without a stat per entry
            path, rel = stack.pop()
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, f"{rel}{entry.name}/"))
                    elif not entry.name.startswith((".tmp-", ".lock-")):
                        try:
                            st = entry.stat(follow_symlinks=False) if sizes else None
                        except FileNotFoundError:  # removed meanwhile
                            continue
                        keys.append((rel + entry.name, st))
        if prefix and not prefix.endswith("/"):
            keys = [k for k in keys if k[0].startswith(prefix)]
        keys.sort()
        return keys

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """:meth:`list` with each object's size and stamp (one ``stat`` per object, in the same walk; no ETag on a folder)."""
        return iter([ObjectInfo(key, st.st_size, stamp=f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
                     for key, st in self._walk(prefix, sizes=True)])

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def url(self, key: str, expires: int | None = None) -> str:
        return self._path(key).as_uri()

    def clean_stale_tmp(self, max_age_s: float = 3600.0, prefix: str = "") -> int:
        """Remove ``.tmp-*`` files of writes interrupted more than ``max_age_s`` ago (a write in progress
        is younger); returns how many. Listing and reading skip them anyway."""
        import time

        folder = self.root.joinpath(*prefix.strip("/").split("/")) if prefix.strip("/") else self.root
        if not folder.is_dir():
            return 0
        cutoff, removed = time.time() - max_age_s, 0
        for path in folder.rglob(".tmp-*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    # -- conditional writes (leases): an flock on a lock file beside the key serialises them between
    # processes on this machine (and on NFSv4); the version ("etag") is the content's sha256.

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        import fcntl

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f".lock-{path.name}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _etag(data: bytes) -> str:
        import hashlib

        return hashlib.sha256(data).hexdigest()

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, self._etag(data)

    def put_if(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """Write only if the key is absent (``if_none_match``) or still has version ``if_match``; the new
        version, or None when the condition does not hold."""
        with self._locked(key) as path:
            try:
                current = self._etag(path.read_bytes())
            except FileNotFoundError:
                current = None
            if (if_none_match and current is not None) or (if_match is not None and current != if_match):
                return None
            self.put(key, data)
            return self._etag(data)

    def delete_if(self, key: str, if_match: str) -> bool:
        with self._locked(key) as path:
            try:
                if self._etag(path.read_bytes()) != if_match:
                    return False
            except FileNotFoundError:
                return False
            path.unlink()
            return True


# --------------------------------------------------------------------------------------------------
# S3

_PERMANENT_HINTS = {
    "NoSuchBucket": "the bucket does not exist: check the bucket name in the URI and the endpoint/region (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION)",
    "AccessDenied": "access denied: check that your credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID or the instance role) allow s3:GetObject, s3:PutObject, s3:ListBucket and s3:DeleteObject on this bucket",
    "AllAccessDisabled": "access to the bucket is disabled: check the bucket's policy",
    "InvalidAccessKeyId": "the access key id is not known to the server: check AWS_ACCESS_KEY_ID / AWS_PROFILE and that AWS_ENDPOINT_URL points at the right service",
    "SignatureDoesNotMatch": "the request signature does not match: check AWS_SECRET_ACCESS_KEY (or the profile's secret) and the region",
    "InvalidToken": "the session token is invalid: refresh your credentials (AWS_SESSION_TOKEN / SSO login)",
    "ExpiredToken": "the session token has expired: refresh your credentials (AWS_SESSION_TOKEN / SSO login)",
    "PermanentRedirect": "the bucket lives in another region: set AWS_DEFAULT_REGION or the region option",
    "AuthorizationHeaderMalformed": "the region in the request is wrong for this bucket: set AWS_DEFAULT_REGION or the region option",
    "InvalidBucketName": "the bucket name is not valid",
}
_TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequestsException",
}


def _client_error_is_transient(exc: Any) -> bool:
    err = exc.response.get("Error", {}) if hasattr(exc, "response") else {}
    code = str(err.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if hasattr(exc, "response") else 0
    return code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix") (prefix without surrounding slashes)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    return parsed.netloc, unquote(parsed.path).strip("/")


@dataclass
class S3Options:
    """How to reach S3. ``None`` means boto3's default (environment, config files, instance role)."""

    endpoint_url: str | None = None  # default: AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (read by boto3)
    region: str | None = None
    profile: str | None = None
    # botocore retries throttling, 5xx and dropped connections; AWS_RETRY_MODE / AWS_MAX_ATTEMPTS apply
    retry_mode: str = field(default_factory=lambda: os.environ.get("AWS_RETRY_MODE", "adaptive"))
    max_attempts: int = field(default_factory=lambda: int(os.environ.get("AWS_MAX_ATTEMPTS", "8")))
    multipart_threshold: int = 64 * 1024 * 1024
    # every S3 call has a deadline: connecting, and each read of the socket (no read hangs forever)
    connect_timeout: float = field(default_factory=lambda: float(os.environ.get("PRCORE_S3_CONNECT_TIMEOUT", "10")))
    read_timeout: float = field(default_factory=lambda: float(os.environ.get("PRCORE_S3_READ_TIMEOUT", "60")))
    presign_expires: int = 7 * 24 * 3600
    # After botocore's own quick retries, a transient failure (endpoint away, 5xx, throttling) is retried
    # with exponential backoff (1 s doubling to retry_max_delay_s, jittered) until retry_budget_s has
    # passed since the call began: an S3 outage of a few minutes costs a night nothing.
    retry_budget_s: float = field(default_factory=lambda: float(os.environ.get("PRCORE_STORE_RETRY_BUDGET_S", "600")))
    retry_max_delay_s: float = field(default_factory=lambda: float(os.environ.get("PRCORE_STORE_RETRY_MAX_DELAY_S", "60")))
    extra: dict[str, Any] = field(default_factory=dict)


class S3Store:
    """``s3://bucket/prefix`` through boto3 (standard credential chain; S3-compatible endpoints allowed)."""

    def __init__(self, uri: str, **options: Any):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        known = set(S3Options.__dataclass_fields__) - {"extra"}
        self.options = S3Options(**{k: v for k, v in options.items() if k in known})
        unknown = sorted(set(options) - known)
        if unknown:
            raise StoreError(f"unknown S3 store option(s) {unknown}; known: {sorted(known)}")
        if self.options.retry_mode not in ("adaptive", "standard", "legacy"):
            raise StoreError(f"retry_mode must be 'adaptive' or 'standard', not {self.options.retry_mode!r}")
        self._client = None
        self._first_client = None
        self._reached = False  # has any call succeeded? (the retry budget is for outages after that)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    @property
    def client(self) -> Any:
        """boto3's client; until a first call has succeeded, one without botocore's connection retries
        (a typo'd endpoint fails in seconds, not after minutes of backoff)."""
        if not self._reached:
            if self._first_client is None:
                from dataclasses import replace

                self._first_client = make_s3_client(replace(self.options, max_attempts=1))
            return self._first_client
        if self._client is None:
            self._client = make_s3_client(self.options)
        return self._client

    @property
    def endpoint(self) -> str:
        """The endpoint URL (without any user:password part), for messages."""
        url = urlparse(str(self.client.meta.endpoint_url))
        return url._replace(netloc=url.hostname + (f":{url.port}" if url.port else "")).geturl() if url.hostname else str(url.geturl())

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: BaseException, action: str, key: str | None) -> StoreError:
        return translate_s3_error(exc, bucket=self.bucket, action=action, key=self._full(key) if key else None)

    def _retry(self, fn: Any) -> Any:
        """``fn()``, retried on :class:`TransientStoreError` within the store's retry budget."""
        import random
        import time

        started = time.monotonic()
        delay = 1.0
        while True:
            try:
                result = fn()
                self._reached = True
                return result
            except StoreUnreachableError as exc:
                if not self._reached:  # nothing ever answered: a wrong endpoint, not an outage
                    raise StoreError(f"{exc} (endpoint {self.endpoint}: no call to it has succeeded; "
                                     "check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, the port and that the service runs)") from None
                if time.monotonic() - started + delay > self.options.retry_budget_s:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.options.retry_max_delay_s)
            except TransientStoreError:
                if time.monotonic() - started + delay > self.options.retry_budget_s:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.options.retry_max_delay_s)

    def put(self, key: str, data: bytes, content_type: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        self._retry(lambda: self._put(key, data, content_type, metadata))

    def get(self, key: str) -> bytes:
        return self._retry(lambda: self._get(key))

    def exists(self, key: str) -> bool:
        return self._retry(lambda: self._exists(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        return iter(self._retry(lambda: list(self._list(prefix))))

    def delete(self, key: str) -> None:
        self._retry(lambda: self._delete(key))

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """:meth:`list` with each object's size and ETag, from the same listing (no extra request)."""
        return iter(self._retry(lambda: list(self._list(prefix, info=True))))

    def _put(self, key: str, data: bytes, content_type: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        full = self._full(key)
        extra: dict[str, Any] = {}
        if content_type:
            extra["ContentType"] = content_type
        if metadata:
            extra["Metadata"] = {str(k): str(v) for k, v in metadata.items()}
        try:
            if len(data) >= self.options.multipart_threshold:
                from boto3.s3.transfer import TransferConfig

                config = TransferConfig(multipart_threshold=self.options.multipart_threshold)
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, full, ExtraArgs=extra or None, Config=config)
            else:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, **extra)
        except Exception as exc:
            raise self._error(exc, "write", key) from None

    def _get(self, key: str) -> bytes:
        full = self._full(key)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise KeyNotFoundError(f"no such key {key!r} under {self.uri}") from None
            raise self._error(exc, "read", key) from None

    def _exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._error(exc, "check", key) from None

    def _list(self, prefix: str = "", info: bool = False) -> Iterator[Any]:
        _check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(root) :]
                    yield ObjectInfo(key, int(obj.get("Size", -1)), obj.get("ETag")) if info else key
        except StoreError:
            raise
        except Exception as exc:
            raise self._error(exc, "list", None) from None

    def _delete(self, key: str) -> None:
        full = self._full(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            raise self._error(exc, "delete", key) from None

    def url(self, key: str, expires: int | None = None) -> str:
        """A presigned GET URL (https on AWS; the endpoint's scheme on S3-compatible stores), valid
        ``expires`` seconds (default ``presign_expires``). A bearer link: it carries the access key id
        (and the session token under STS); hand it only to whom may read the object."""
        full = self._full(key)
        try:
            return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": full},
                                                      ExpiresIn=expires or self.options.presign_expires)
        except Exception as exc:
            raise self._error(exc, "presign", key) from None

    # -- conditional writes (leases): S3's If-None-Match / If-Match on PutObject and If-Match on
    # DeleteObject (AWS since 2024; the moto server honours them too); a failed condition is None/False.

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        return self._retry(lambda: self._get_versioned(key))

    def put_if(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        """A retried conditional put may find its own first attempt's write (None): callers check the body."""
        return self._retry(lambda: self._put_if(key, data, if_none_match=if_none_match, if_match=if_match))

    def delete_if(self, key: str, if_match: str) -> bool:
        return self._retry(lambda: self._delete_if(key, if_match))

    def _get_versioned(self, key: str) -> tuple[bytes, str]:
        full = self._full(key)
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=full)
            return obj["Body"].read(), obj["ETag"]
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise KeyNotFoundError(f"no such key {key!r} under {self.uri}") from None
            raise self._error(exc, "read", key) from None

    def _put_if(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str | None:
        full = self._full(key)
        cond: dict[str, str] = {}
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        if if_match is not None:
            cond["IfMatch"] = if_match
        try:
            return self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType="application/json", **cond)["ETag"]
        except Exception as exc:
            if _error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                return None
            raise self._error(exc, "write", key) from None

    def _delete_if(self, key: str, if_match: str) -> bool:
        full = self._full(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full, IfMatch=if_match)
            return True
        except Exception as exc:
            if _error_code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404", "NotFound"):
                return False
            raise self._error(exc, "delete", key) from None

    def check(self) -> None:
        """Fail fast: one ``HeadBucket``; raises :class:`StoreError` naming the bucket and what to check."""

        def head() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except Exception as exc:
                raise self._error(exc, "open", None) from None

        self._retry(head)


def make_s3_client(options: S3Options | None = None) -> Any:
    """A boto3 S3 client with retries in adaptive/standard mode and the standard credential chain."""
    import boto3
    from botocore.config import Config

    options = options or S3Options()
    session = boto3.session.Session(profile_name=options.profile) if options.profile else boto3.session.Session()
    config = Config(retries={"mode": options.retry_mode, "max_attempts": options.max_attempts},
                    connect_timeout=options.connect_timeout, read_timeout=options.read_timeout, **options.extra)
    kwargs: dict[str, Any] = {"config": config}
    if options.endpoint_url:
        kwargs["endpoint_url"] = options.endpoint_url
    if options.region:
        kwargs["region_name"] = options.region
    return session.client("s3", **kwargs)


_SHARED_CLIENTS: dict[str, Any] = {}  # an explicit per-process cache: one client per S3Options (thread-safe clients)
_SHARED_LOCK = threading.Lock()
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE")


def shared_s3_client(options: S3Options | None = None) -> Any:
    """One :func:`make_s3_client` per process and per ``options`` (boto3 clients are thread-safe; making one
    builds a session and reads the credential chain: 0.2-0.7 s each on the 2-core machine, against ~8 ms
    for a request). Read paths that are given no client (``read_uri_bytes``) use it, so a shard reading
    its subjects' instance images makes one client instead of one per image."""
    import hashlib

    options = options or S3Options()
    env = [os.environ.get(k, "") for k in _CLIENT_ENV]  # a changed endpoint, profile or key makes a new client
    key = hashlib.sha256(repr((options, env)).encode()).hexdigest()  # no credential kept in the clear
    with _SHARED_LOCK:
        client = _SHARED_CLIENTS.get(key)
        if client is None:
            client = _SHARED_CLIENTS[key] = make_s3_client(options)
        return client


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return str(status)
    return ""


def translate_s3_error(exc: BaseException, *, bucket: str, action: str, key: str | None = None) -> StoreError:
    """One clear :class:`StoreError` for a boto3/botocore exception; never includes credentials."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StoreError(
            f"cannot {action} {where}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run on a machine with an instance role"
        )
    if isinstance(exc, ProfileNotFound):
        return StoreError(f"cannot {action} {where}: the AWS profile named in AWS_PROFILE / the profile option does not exist")
    if isinstance(exc, EndpointConnectionError):
        return StoreUnreachableError(
            f"cannot {action} {where}: cannot connect to the S3 endpoint; check AWS_ENDPOINT_URL / the endpoint_url option and the network"
        )
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in _PERMANENT_HINTS:
            return StoreError(f"cannot {action} {where} (bucket {bucket!r}): {_PERMANENT_HINTS[code]}")
        if code in ("403", "Forbidden"):
            return StoreError(f"cannot {action} {where} (bucket {bucket!r}): {_PERMANENT_HINTS['AccessDenied']}")
        if code in ("404", "NotFound") and key is None:
            return StoreError(f"cannot {action} {where} (bucket {bucket!r}): {_PERMANENT_HINTS['NoSuchBucket']}")
        if _client_error_is_transient(exc):
            return TransientStoreError(f"cannot {action} {where}: the server answered {code} after retries; try again later")
        return StoreError(f"cannot {action} {where} (bucket {bucket!r}): the server answered {code}")
    if is_transient(exc):
        return TransientStoreError(f"cannot {action} {where}: {type(exc).__name__} after retries; try again later")
    return StoreError(f"cannot {action} {where}: {type(exc).__name__}")


def open_store(uri: str | os.PathLike[str], **options: Any) -> Store:
    """``s3://bucket/prefix`` -> :class:`S3Store` (``options``: see :class:`S3Options`); a folder path
    or ``file://`` URI -> :class:`LocalStore` (created on first write)."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        return S3Store(text, **options)
    if options:
        raise StoreError(f"options {sorted(options)} only apply to s3:// stores")
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return LocalStore(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" style drive letters are paths
        raise StoreError(f"unsupported output URI scheme {parsed.scheme!r} in {text!r}: use a folder path, file:// or s3://bucket/prefix")
    return LocalStore(text)

