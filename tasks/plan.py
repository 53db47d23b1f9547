"""Load, validate and plan the manifest (small records out: SubjectJob / ImageRequest)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prcore.pipeline import runner
from prcore.store.storage import open_store
from tasks.common import RETRY_OPTIONS


@task(name="plan", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def plan_task(manifest: str, output: str, model: str, defaults: Mapping[str, Any] | None = None,
              subject_ids: list[str] | None = None, check_images: bool = False) -> list[Any]:
    """The manifest's jobs, with what is already done in ``output`` marked (only ``subject_ids`` if given)."""
    logger = get_run_logger()
    store = open_store(output)
    jobs = runner.plan_jobs(manifest, store, model_id=model, defaults=defaults, subject_ids=subject_ids,
                            check_images=check_images)
    pending = sum(runner.pending_images(j) for j in jobs)
    total = sum(runner.total_images(j) for j in jobs)
    logger.info("planned %d subject(s), %d image(s), %d pending, from %s", len(jobs), total, pending, manifest)
    return jobs
