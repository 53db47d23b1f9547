"""The catalogue: one Parquet file per subject per run under ``catalog/run_date=YYYY-MM-DD/``.

Every file has the same explicit schema (:data:`CATALOG_SCHEMA`), so the folder reads as one
hive-partitioned data set (``run_date`` comes from the folder name)::

    pl.scan_parquet("out/catalog/**/*.parquet", hive_partitioning=True)
    pyarrow.dataset.dataset("out/catalog", format="parquet", partitioning="hive")
    duckdb.sql("SELECT * FROM read_parquet('out/catalog/**/*.parquet', hive_partitioning = true)")

Fields of a sidecar without a column of their own are kept in ``extra_json``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import polars as pl

from prcore.outputs.sidecar import CATALOG_PREFIX, catalog_key

CATALOG_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "subject_id": pl.String(),
    "prompt_id": pl.String(),
    "req_fp": pl.String(),
    "index": pl.Int64(),
    "key": pl.String(),
    "sha256": pl.String(),
    "bytes": pl.Int64(),
    "width": pl.Int64(),
    "height": pl.Int64(),
    "seed": pl.Int64(),
    "prompt_template": pl.String(),
    "personal_prompt": pl.String(),
    "base_prompt": pl.String(),
    "negative_prompt": pl.String(),
    "class_noun": pl.String(),
    "identifier": pl.String(),
    "guidance": pl.String(),
    "guidance_scale": pl.Float64(),
    "consistency_scale": pl.Float64(),
    "parallel_scale": pl.Float64(),
    "num_inference_steps": pl.Int64(),
    "scheduler": pl.String(),
    "base_model": pl.String(),
    "lora_fp": pl.String(),
    "code_version": pl.String(),
    "seconds": pl.Float64(),
    # quality scores (prcore.quality.scorer) and the QC verdict; null when no scoring model is configured
    "clip_t": pl.Float64(),
    "clip_i": pl.Float64(),
    "dino": pl.Float64(),
    "qc_pass": pl.Boolean(),
    "created_at": pl.String(),
    "extra_json": pl.String(),
}


def catalog_frame(rows: Iterable[Mapping[str, Any]], *, run_id: str) -> pl.DataFrame:
    """Rows (sidecar dicts) -> a frame with exactly :data:`CATALOG_SCHEMA` (unknown fields -> extra_json)."""
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    columns: dict[str, list[Any]] = {name: [] for name in CATALOG_SCHEMA}
    for row in rows:
        row = dict(row)
        row.setdefault("run_id", run_id)
        row.setdefault("created_at", now)
        extra = {k: v for k, v in row.items() if k not in CATALOG_SCHEMA}
        for name in CATALOG_SCHEMA:
            columns[name].append(json.dumps(extra, sort_keys=True, default=str) if name == "extra_json" else row.get(name))
    return pl.DataFrame(columns, schema=CATALOG_SCHEMA)


def write_catalog(store: Any, run_date: str | _dt.date, subject_id: str, rows: Iterable[Mapping[str, Any]], *, run_id: str | None = None) -> str:
    """Write one subject's rows for one run; returns the key. Rewriting the same run replaces the file."""
    if isinstance(run_date, _dt.date):
        run_date = run_date.isoformat()
    run_id = run_id or uuid.uuid4().hex[:12]
    key = catalog_key(run_date, subject_id, run_id)
    frame = catalog_frame(rows, run_id=run_id)
    buf = io.BytesIO()
    frame.write_parquet(buf, compression="zstd")
    store.put(key, buf.getvalue(), content_type="application/vnd.apache.parquet")
    return key


def read_catalog(store: Any) -> pl.DataFrame:
    """The whole catalogue of ``store`` as one frame, ``run_date`` included (from the folder names)."""
    keys = [k for k in store.list(f"{CATALOG_PREFIX}/") if k.endswith(".parquet")]
    if not keys:
        return pl.DataFrame(schema={**CATALOG_SCHEMA, "run_date": pl.String()})
    frames = []
    for key in sorted(keys):
        run_date = key.split("/")[1].removeprefix("run_date=")
        frames.append(pl.read_parquet(io.BytesIO(store.get(key))).with_columns(pl.lit(run_date).alias("run_date")))
    return pl.concat(frames, how="vertical_relaxed")
