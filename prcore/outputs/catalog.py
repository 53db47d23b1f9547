"""The catalogue: one Parquet file per subject per run under ``catalog/run_date=YYYY-MM-DD/``.

Its columns are the fields of :class:`prcore.outputs.sidecar.ImageRecord` (scalar fields as
columns, nested ones in ``extra_json``; ``run_date`` comes from the folder name), so every file
has the same explicit schema and the folder reads as one hive-partitioned data set::

    pl.scan_parquet("out/catalog/**/*.parquet", hive_partitioning=True)
    pyarrow.dataset.dataset("out/catalog", format="parquet", partitioning="hive")
    duckdb.sql("SELECT * FROM read_parquet('out/catalog/**/*.parquet', hive_partitioning = true)")
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import uuid
from collections.abc import Iterable
from dataclasses import fields, replace
from typing import Any

import polars as pl

from prcore.outputs.sidecar import ImageRecord
from prcore.store.keys import CATALOG_PREFIX, catalog_key, catalog_run_date

_POLARS = {"str": pl.String(), "int": pl.Int64(), "float": pl.Float64(), "bool": pl.Boolean()}
PARTITION = "run_date"  # from the folder name, not a column of the files


def _column_type(annotation: str) -> pl.DataType | None:
    return _POLARS.get(str(annotation).replace(" | None", ""))


SCALAR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ImageRecord) if f.name != PARTITION and _column_type(f.type) is not None)
NESTED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ImageRecord) if f.name != PARTITION and _column_type(f.type) is None)
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
        columns["extra_json"].append(json.dumps({**record.extra, **nested}, sort_keys=True, default=str))
    return pl.DataFrame(columns, schema=CATALOG_SCHEMA)


def write_catalog(store: Any, run_date: str | _dt.date, subject_id: str, records: Iterable[ImageRecord], *, run_id: str | None = None) -> str:
    """Write one subject's rows for one run; returns the key. Rewriting the same run replaces the file."""
    if isinstance(run_date, _dt.date):
        run_date = run_date.isoformat()
    run_id = run_id or uuid.uuid4().hex[:12]
    key = catalog_key(run_date, subject_id, run_id)
    records = [r if r.run_id else replace(r, run_id=run_id) for r in records]  # a record without a run: this one's
    buf = io.BytesIO()
    catalog_frame(records).write_parquet(buf, compression="zstd")
    store.put(key, buf.getvalue(), content_type="application/vnd.apache.parquet")
    return key


def read_catalog(store: Any) -> pl.DataFrame:
    """The whole catalogue of ``store`` as one frame, ``run_date`` included (from the folder names)."""
    found = [(k, catalog_run_date(k)) for k in store.list(f"{CATALOG_PREFIX}/")]
    found = sorted((k, d) for k, d in found if d is not None)
    if not found:
        return pl.DataFrame(schema={**CATALOG_SCHEMA, PARTITION: pl.String()})
    frames = [pl.read_parquet(io.BytesIO(store.get(k))).with_columns(pl.lit(d).alias(PARTITION)) for k, d in found]
    return pl.concat(frames, how="vertical_relaxed")
