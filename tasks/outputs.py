"""Per-subject outputs after sampling: catalogue partition and contact sheet (keys out)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prcore.outputs.sidecar import ImageRecord
from prcore.pipeline.subject import RunContext, SubjectInputs, write_subject_catalog, write_subject_contact_sheet
from tasks.common import RETRY_OPTIONS


@task(name="write-catalog", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def write_catalog_task(store: Any, run: RunContext, inputs: SubjectInputs, records: list[ImageRecord], generated: int) -> str | None:
    return write_subject_catalog(store, run, inputs.job, records, generated=generated)


@task(name="contact-sheet", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def contact_sheet_task(store: Any, run: RunContext, inputs: SubjectInputs, records: list[ImageRecord]) -> str | None:
    return write_subject_contact_sheet(store, run, inputs, records)
