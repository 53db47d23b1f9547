"""The catalogue: one Parquet file per subject, ``catalog/{subject_id}.parquet``, with exactly one row
per finished image of the subject (its current sidecar: the current sha256), rewritten whole in
one put whenever the subject changes (atomic on a folder and on S3: a reader sees the old file or
the new, never half). Nothing is appended: a rerun, a crash, a second run or a manifest edit
leaves one row per image.

Its columns are the fields of :class:`prcore.outputs.sidecar.ImageRecord` (scalar fields as
columns, ``run_date`` included: the date of the run that made the image; nested ones in
``extra_json``), so every file has the same explicit schema and the folder reads as one data set
(the ``**`` and ``hive`` forms of earlier versions keep working; there are no partition folders)::

    pl.scan_parquet("out/catalog/**/*.parquet", hive_partitioning=True)
    pyarrow.dataset.dataset("out/catalog", format="parquet", partitioning="hive")
    duckdb.sql("SELECT * FROM read_parquet('out/catalog/**/*.parquet', hive_partitioning = true)")

The snapshot, ``catalog.parquet`` beside ``catalog/``, is all of those files in one (same schema, same
rows, same order), so a full read is one object instead of one per subject (10,000 at catalogue
scale: the small-files problem; figures in docs/manifest_and_storage.md). :func:`write_snapshot`
rebuilds it from the per-subject files (each verified) and replaces it in one put; its Parquet
metadata holds the fingerprint of the per-subject files it was built from (key + S3 ETag, or on a
folder size + mtime + inode), so :func:`read_catalog` uses it only while it is exactly those files,
and reads the per-subject files otherwise (a stale, damaged or missing snapshot is never trusted).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import polars as pl

from prcore.outputs.sidecar import ImageRecord
from prcore.store.keys import CATALOG_PREFIX, CATALOG_SNAPSHOT_KEY, catalog_key, catalog_subject, legacy_catalog_key

_POLARS = {"str": pl.String(), "int": pl.Int64(), "float": pl.Float64(), "bool": pl.Boolean()}


def _column_type(annotation: str) -> pl.DataType | None:
    return _POLARS.get(str(annotation).replace(" | None", ""))


SCALAR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ImageRecord) if _column_type(f.type) is not None)
NESTED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ImageRecord) if _column_type(f.type) is None)
CATALOG_SCHEMA: dict[str, pl.DataType] = {
    **{f.name: _column_type(f.type) for f in fields(ImageRecord) if f.name in SCALAR_FIELDS},  # type: ignore[misc]
    "extra_json": pl.String(),
}


def catalog_frame(records: Iterable[ImageRecord]) -> pl.DataFrame:
    """Records -> a frame with exactly :data:`CATALOG_SCHEMA`."""
    columns: dict[str, list[Any]] = {name: [] for name in CATALOG_SCHEMA}
    for record in records:
        for name in SCALAR_FIELDS:
            columns[name].append(getattr(record, name))
        nested = {name: getattr(record, name) for name in NESTED_FIELDS if name != "extra"}
        columns["extra_json"].append(json.dumps({**record.extra, **nested}, sort_keys=True, default=str, allow_nan=False))
    return pl.DataFrame(columns, schema=CATALOG_SCHEMA)


def catalog_records(frame: pl.DataFrame) -> list[ImageRecord]:
    """A catalogue frame's rows as records (what :func:`catalog_frame` was given: scalar columns, and the
    nested fields and ``extra`` from ``extra_json``)."""
    out = []
    for row in frame.iter_rows(named=True):
        nested = json.loads(row.pop("extra_json") or "{}")
        out.append(ImageRecord.from_dict({**row, **nested}))
    return out


class CatalogCorruptError(ValueError):
    """A catalogue file that does not read back (bytes changed since written: a page checksum fails, or not
    Parquet at all). The next ``prcore run`` rebuilds it from the sidecars."""


def catalog_bytes(frame: pl.DataFrame) -> bytes:
    """The Parquet bytes of a catalogue frame, with a CRC32 checksum on every data page (Parquet's own
    integrity field, verified by :func:`parse_catalog`)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(frame.to_arrow(), buf, compression="zstd", write_page_checksum=True)
    return buf.getvalue()


def parse_catalog(data: bytes, key: str) -> pl.DataFrame:
    """A catalogue file's frame, every page checksum verified; :class:`CatalogCorruptError` when the bytes
    are not the file that was written."""
    import pyarrow.parquet as pq

    try:
        frame = pl.from_arrow(pq.read_table(io.BytesIO(data), page_checksum_verification=True))
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise CatalogCorruptError(f"catalogue file {key} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                                  "the next prcore run rebuilds it from the image sidecars") from None
    assert isinstance(frame, pl.DataFrame)
    missing = [c for c in ("key", "sha256", "bytes") if c not in frame.columns]
    if missing:
        raise CatalogCorruptError(f"catalogue file {key} lacks the column(s) {missing}; the next prcore run rebuilds it")
    return frame


def write_catalog(store: Any, subject_id: str, records: Iterable[ImageRecord]) -> str:
    """Replace the subject's catalogue file with ``records`` (one row per key: a key given twice keeps
    its last record); returns the key. Files of the old layout for the subject are removed after."""
    by_key: dict[str, ImageRecord] = {}
    for record in records:
        if record.subject_id != subject_id:
            raise ValueError(f"record of subject {record.subject_id!r} in the catalogue of {subject_id!r}")
        by_key[record.key] = record
    key = catalog_key(subject_id)
    rows = sorted(by_key.values(), key=lambda r: (r.prompt_id, r.req_fp, r.index))
    store.put(key, catalog_bytes(catalog_frame(rows)), content_type="application/vnd.apache.parquet")
    for old in list(store.list(f"{CATALOG_PREFIX}/run_date=")):
        if legacy_catalog_key(old) == subject_id:
            store.delete(old)
    return key


def read_subject_catalog(store: Any, subject_id: str) -> pl.DataFrame | None:
    """The subject's catalogue file, or None when it has none; :class:`CatalogCorruptError` when it is damaged."""
    from prcore.store.storage import KeyNotFoundError

    key = catalog_key(subject_id)
    try:
        data = store.get(key)
    except KeyNotFoundError:
        return None
    return parse_catalog(data, key)


SNAPSHOT_SOURCES_META = b"prcore.catalog.sources"  # Parquet metadata: fingerprint of the files a snapshot holds
SNAPSHOT_FILES_META = b"prcore.catalog.files"
SNAPSHOT_VERSIONS_META = b"prcore.catalog.versions"  # "key<TAB>version" of each file it holds, one a line
SNAPSHOT_ROW_GROUP_ROWS = 100_000  # row groups a reader decodes in parallel (and skips by subject_id statistics)
READ_THREADS = 16  # parallel GETs of per-subject files (S3 round trips overlap)


def catalog_sources(store: Any) -> list[tuple[str, str | None]]:
    """``(key, version)`` of every per-subject catalogue file, sorted by key, from one listing
    (:attr:`~prcore.store.storage.ObjectInfo.version`: size and ETag on S3, size, mtime and inode on a
    folder; None where the store tells neither)."""
    from prcore.store.storage import list_info

    return sorted((info.key, info.version) for info in list_info(store, f"{CATALOG_PREFIX}/") if catalog_subject(info.key) is not None)


def sources_fingerprint(sources: list[tuple[str, str | None]]) -> str | None:
    """sha256 of the listing of per-subject files; None when a version is unknown (no snapshot can be checked)."""
    import hashlib

    if any(v is None for _, v in sources):
        return None
    return hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sources).encode()).hexdigest()


def _read_files(store: Any, keys: list[str]) -> pl.DataFrame:
    """The per-subject files ``keys`` as one frame, in that order (GETs in parallel, every page checksum
    verified; a damaged file is :class:`CatalogCorruptError` naming it)."""
    if not keys:
        return pl.DataFrame(schema=CATALOG_SCHEMA)
    with ThreadPoolExecutor(max(1, min(READ_THREADS, len(keys)))) as pool:
        frames = list(pool.map(lambda k: parse_catalog(store.get(k), k), keys))
    return pl.concat(frames, how="vertical_relaxed")


@dataclass(frozen=True)
class Snapshot:
    """What :func:`write_snapshot` wrote (or found current)."""

    key: str
    files: int
    rows: int
    fingerprint: str | None
    written: bool


def snapshot_bytes(frame: pl.DataFrame, fingerprint: str, files: int,
                   sources: list[tuple[str, str | None]] | None = None) -> bytes:
    """The snapshot's Parquet bytes: page checksums, row groups of SNAPSHOT_ROW_GROUP_ROWS, and in the file's
    key-value metadata the fingerprint of its source files and (``sources``) each file's key and version."""
    import pyarrow.parquet as pq

    table = frame.to_arrow()
    meta = {**(table.schema.metadata or {}), SNAPSHOT_SOURCES_META: fingerprint.encode(), SNAPSHOT_FILES_META: str(files).encode()}
    if sources is not None:
        meta[SNAPSHOT_VERSIONS_META] = "\n".join(f"{k}\t{v}" for k, v in sources).encode()
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd", write_page_checksum=True,
                   row_group_size=SNAPSHOT_ROW_GROUP_ROWS)
    return buf.getvalue()


def _snapshot_data(store: Any) -> bytes | None:
    """The snapshot's bytes (one GET); None when there is none."""
    from prcore.store.storage import KeyNotFoundError

    try:
        return store.get(CATALOG_SNAPSHOT_KEY)
    except KeyNotFoundError:
        return None


def _snapshot_meta(data: bytes) -> dict[bytes, bytes]:
    """A snapshot's footer key-value metadata (the footer only: no page is decoded); {} when the bytes are not Parquet."""
    import pyarrow.parquet as pq

    try:
        return dict(pq.read_schema(io.BytesIO(data)).metadata or {})
    except Exception:  # not Parquet (damaged footer): not a snapshot of anything
        return {}


def read_snapshot(store: Any, fingerprint: str | None, *, with_versions: bool = False) -> pl.DataFrame | None:
    """The snapshot's frame when it was built from exactly the files of ``fingerprint`` and every page checksum
    holds (``with_versions``: and it records each file's version, as this version writes it); None when it is
    missing, stale or damaged (the caller reads the per-subject files)."""
    data = _snapshot_data(store) if fingerprint is not None else None
    if data is None:
        return None
    meta = _snapshot_meta(data)
    if meta.get(SNAPSHOT_SOURCES_META, b"").decode() != fingerprint or (with_versions and SNAPSHOT_VERSIONS_META not in meta):
        return None
    try:
        return parse_catalog(data, CATALOG_SNAPSHOT_KEY)
    except CatalogCorruptError:
        return None


@dataclass(frozen=True)
class SnapshotFacts:
    """What the snapshot recorded of each per-subject file it holds: its version when it was read (and
    verified) into the snapshot, and each of its rows' ``key``, ``bytes`` and ``md5``."""

    versions: dict[str, str]  # catalogue file key -> version (ObjectInfo.version)
    rows: dict[str, list[tuple[str, int | None, str | None]]]  # subject_id -> [(key, bytes, md5)]


def snapshot_facts(store: Any) -> SnapshotFacts | None:
    """The snapshot's record of its files (one GET; the pages of the four columns read here checksum-verified);
    None when there is no snapshot, it is damaged or it does not record its files' versions (written by an
    earlier version). A file whose listed version is the one recorded here holds exactly these rows."""
    import pyarrow.parquet as pq

    data = _snapshot_data(store)
    meta = _snapshot_meta(data) if data is not None else {}
    if SNAPSHOT_VERSIONS_META not in meta:
        return None
    try:
        table = pq.read_table(io.BytesIO(data), columns=["subject_id", "key", "bytes", "md5"], page_checksum_verification=True)
    except Exception:  # a failed checksum or a missing column: nothing recorded can be trusted
        return None
    versions = dict(line.split("\t", 1) for line in meta[SNAPSHOT_VERSIONS_META].decode().splitlines() if "\t" in line)
    rows: dict[str, list[tuple[str, int | None, str | None]]] = {}
    cols = [table.column(c).to_pylist() for c in ("subject_id", "key", "bytes", "md5")]
    for sid, key, size, md5 in zip(*cols, strict=True):
        rows.setdefault(sid, []).append((key, size, md5))
    return SnapshotFacts(versions, rows)


def write_snapshot(store: Any, *, force: bool = False) -> Snapshot:
    """Rebuild ``catalog.parquet`` from the per-subject files (one listing, one GET each, every page checksum
    verified) and replace it in one put (a reader sees the old snapshot or the new); skipped when the
    snapshot already holds exactly the listed files, records their versions (an earlier version's does not:
    it is rewritten once) and reads back whole (one GET of it, every page checksum verified) unless ``force``.
    A damaged per-subject file is :class:`CatalogCorruptError` naming it, and the old snapshot stays
    (:func:`read_catalog` no longer trusts it: its fingerprint does not match)."""
    sources = catalog_sources(store)
    fingerprint = sources_fingerprint(sources)
    if fingerprint is None:
        raise ValueError(f"{store!r} lists no version (ETag, or a folder's mtime) of its catalogue files; a snapshot could not be checked")
    if not force:
        current = read_snapshot(store, fingerprint, with_versions=True)
        if current is not None:
            return Snapshot(CATALOG_SNAPSHOT_KEY, len(sources), current.height, fingerprint, written=False)
    frame = _read_files(store, [k for k, _ in sources])
    store.put(CATALOG_SNAPSHOT_KEY, snapshot_bytes(frame, fingerprint, len(sources), sources), content_type="application/vnd.apache.parquet")
    return Snapshot(CATALOG_SNAPSHOT_KEY, len(sources), frame.height, fingerprint, written=True)


def read_catalog(store: Any, *, use_snapshot: bool = True) -> pl.DataFrame:
    """The whole catalogue of ``store`` as one frame: the per-subject files, read from the snapshot when it
    holds exactly them (one LIST + one GET), else file by file (files of the old layout are not read); a
    damaged file is :class:`CatalogCorruptError` naming it, never a silent gap."""
    sources = catalog_sources(store)
    if not sources:
        return pl.DataFrame(schema=CATALOG_SCHEMA)
    snap = read_snapshot(store, sources_fingerprint(sources)) if use_snapshot else None
    return snap if snap is not None else _read_files(store, [k for k, _ in sources])
