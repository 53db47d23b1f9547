"""Per-subject outputs after sampling: catalogue partition and contact sheet (keys out)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prcore.pipeline import runner
from prcore.store.storage import open_store
from tasks.common import RETRY_OPTIONS


@task(name="write-catalog", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def write_catalog_task(job: Any, output: str, run_date: str, run_id: str, generated: int) -> str | None:
    return runner.write_subject_catalog(open_store(output), run_date, job, run_id, generated=generated)


@task(name="contact-sheet", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def contact_sheet_task(job: Any, output: str, run_id: str) -> str | None:
    return runner.write_contact_sheet(open_store(output), run_id, job)
