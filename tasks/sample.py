"""Sample one request's pending images and write PNG + sidecar to the store (keys out, never bytes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prcore.pipeline import runner
from prcore.store.storage import open_store
from tasks.common import RETRY_OPTIONS


@task(name="generate-request", cache_policy=NO_CACHE, persist_result=False, cache_result_in_memory=False,
      **RETRY_OPTIONS)
def generate_request_task(job: Any, request: Any, output: str, model: str, lora: runner.LoraInfo, cache_dir: str,
                          record: Mapping[str, Any] | None = None, device: str | None = None, dtype: str | None = None,
                          clip_model: str | None = None, dino_model: str | None = None,
                          qc: Mapping[str, Any] | None = None) -> runner.RequestResult:
    """Activate the subject's LoRA (download it if this machine lacks it), sample, write."""
    logger = get_run_logger()
    store = open_store(output)
    from prcore.method.models import load_pipeline  # torch: imported where model work happens

    pipe = load_pipeline(runner.resolve_model(model, cache_dir), device=device, dtype=dtype)
    local = runner.materialize_lora(store, lora.subject_id, lora.lora_fp, cache_dir)
    adapter = runner.adapter_name_for(lora.subject_id, lora.lora_fp)
    runner.activate_lora(pipe, local, adapter)
    scorer = runner.make_scorer(clip_model, dino_model, device) if (clip_model or dino_model) else None
    # The subject's qc_* manifest columns override the flow's thresholds.
    thresholds = {**(qc or {}), **(getattr(job, "qc_thresholds", None) or {})}
    if thresholds and scorer is None:
        logger.warning("subject %s: QC thresholds %s not checked: no clip_model/dino_model configured",
                       job.subject_id, thresholds)
    result = runner.generate_request(
        pipe, job, request, store, adapter_name=adapter, lora_fp=lora.lora_fp, record=record,
        scorer=scorer, qc_thresholds=runner.qc_thresholds(thresholds) if scorer is not None else None,
        references=runner.reference_images(job) if scorer is not None else None,
    )
    logger.info("subject %s prompt %s: %d generated, %d already done (%.2fs)", job.subject_id, request.prompt_id,
                result.generated, result.skipped, result.seconds)
    return result
