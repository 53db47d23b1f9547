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
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

import polars as pl

from prcore.outputs.sidecar import ImageRecord
from prcore.store.keys import CATALOG_PREFIX, catalog_key, catalog_subject, legacy_catalog_key

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


def read_catalog(store: Any) -> pl.DataFrame:
    """The whole catalogue of ``store`` as one frame (files of the old layout are not read); a damaged
    file is :class:`CatalogCorruptError` naming it, never a silent gap."""
    found = sorted(k for k in store.list(f"{CATALOG_PREFIX}/") if catalog_subject(k) is not None)
    if not found:
        return pl.DataFrame(schema=CATALOG_SCHEMA)
    return pl.concat([parse_catalog(store.get(k), k) for k in found], how="vertical_relaxed")
