"""Per-subject outputs after sampling: contact sheet and catalogue file; the run's catalogue snapshot (keys out)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prcore.outputs.sidecar import ImageRecord
from prcore.pipeline.catalog import refresh_catalog_snapshot
from prcore.pipeline.subject import RunContext, SubjectInputs, write_subject_catalog, write_subject_contact_sheet
from tasks.common import RETRY_OPTIONS


@task(name="write-catalog", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def write_catalog_task(store: Any, inputs: SubjectInputs, made_now: list[ImageRecord]) -> str:
    """Rewrite the subject's catalogue file from the store (one row per finished image)."""
    return write_subject_catalog(store, inputs.job, made_now)


@task(name="contact-sheet", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def contact_sheet_task(store: Any, run: RunContext, inputs: SubjectInputs, records: list[ImageRecord]) -> str | None:
    return write_subject_contact_sheet(store, run, inputs, records)


@task(name="catalog-snapshot", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def catalog_snapshot_task(store: Any) -> str | None:
    """Rebuild the catalogue snapshot (``catalog.parquet``) from the per-subject files, if they changed; its key."""
    snap = refresh_catalog_snapshot(store)
    return None if snap is None else snap.key
