"""Load, validate and plan the manifest (small records out: SubjectJob / ImageRequest); a shard's plan
files: written by the parent run, read by each shard."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prcore.pipeline.models import default_model_id
from prcore.pipeline.settings import RunSettings
from prcore.pipeline.shards import read_shard_plan, settings_fingerprint, write_shard_plans
from prcore.pipeline.subject import plan_jobs
from tasks.common import RETRY_OPTIONS


def _plan(manifest: str, store: Any, settings: RunSettings, subject_ids: list[str] | None) -> list[Any]:
    jobs = plan_jobs(manifest, store, model_id=settings.model or default_model_id(), defaults=settings.generation,
                     subject_ids=subject_ids, check_images=settings.check_images, cache_dir=settings.cache_path(),
                     target_modules=settings.train.target_modules)
    pending = sum(j.n_todo for j in jobs)
    get_run_logger().info("planned %d subject(s), %d image(s), %d pending, from %s", len(jobs),
                          sum(j.n_images for j in jobs), pending, manifest)
    return jobs


@task(name="plan", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def plan_task(manifest: str, store: Any, settings: RunSettings, subject_ids: list[str] | None = None) -> list[Any]:
    """The manifest's jobs, with what is already done in ``store`` marked (only ``subject_ids`` if given:
    only their rows validated, their image prefixes listed and their instance images checked)."""
    return _plan(manifest, store, settings, subject_ids)


@task(name="write-shard-plans", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def write_shard_plans_task(store: Any, run_id: str, shards: list[list[Any]], manifest: str, manifest_fp: str,
                           settings: RunSettings) -> list[str]:
    """One plan file per shard (``runs/{run_id}/shard_plans/{i}.json``): that shard's jobs as planned here."""
    keys = write_shard_plans(store, run_id, shards, manifest=manifest, manifest_fp=manifest_fp,
                             settings_fp=settings_fingerprint(settings))
    get_run_logger().info("%d shard plan(s) written under runs/%s/shard_plans/", len(keys), run_id)
    return keys


@task(name="plan-shard", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def shard_jobs_task(manifest: str, store: Any, settings: RunSettings, subject_ids: list[str], plan: str | None) -> list[Any]:
    """The shard's jobs: from its plan file when it holds them as planned from the manifest as it is now;
    else (no plan file: a shard started by hand; or a stale one, said in a warning) its own subjects
    planned from the manifest, validated and image-checked before any work."""
    logger = get_run_logger()
    if plan:
        jobs, why = read_shard_plan(store, plan, manifest=manifest, subject_ids=subject_ids,
                                    settings_fp=settings_fingerprint(settings))
        if jobs is not None:
            logger.info("shard plan %s: %d subject(s), %d pending", plan, len(jobs), sum(j.n_todo for j in jobs))
            return jobs
        logger.warning("%s: planning the shard's subjects from the manifest as it is now", why)
    return _plan(manifest, store, settings, subject_ids)
