"""Load, validate and plan the manifest (small records out: SubjectJob / ImageRequest)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prcore.pipeline.models import default_model_id
from prcore.pipeline.settings import RunSettings
from prcore.pipeline.subject import plan_jobs
from tasks.common import RETRY_OPTIONS


@task(name="plan", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def plan_task(manifest: str, store: Any, settings: RunSettings, subject_ids: list[str] | None = None) -> list[Any]:
    """The manifest's jobs, with what is already done in ``store`` marked (only ``subject_ids`` if given)."""
    jobs = plan_jobs(manifest, store, model_id=settings.model or default_model_id(), defaults=settings.generation,
                     subject_ids=subject_ids, check_images=settings.check_images, cache_dir=settings.cache_path(),
                     target_modules=settings.train.target_modules)
    pending = sum(j.n_todo for j in jobs)
    get_run_logger().info("planned %d subject(s), %d image(s), %d pending, from %s", len(jobs),
                          sum(j.n_images for j in jobs), pending, manifest)
    return jobs
