"""Sample one request's pending images and write PNG + sidecar to the store (records out, never bytes)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prcore.data.plan import ImageRequest
from prcore.pipeline.lora import LoraInfo, activate_lora, ready_lora
from prcore.pipeline.models import load_run_pipeline
from prcore.pipeline.settings import RunSettings
from prcore.pipeline.subject import RequestResult, RunContext, SubjectInputs, generate_requests
from tasks.common import RETRY_OPTIONS


@task(name="generate-batch", cache_policy=NO_CACHE, persist_result=False, cache_result_in_memory=False,
      **RETRY_OPTIONS)
def generate_batch_task(inputs: SubjectInputs, requests: list[ImageRequest], store: Any, model: str, lora: LoraInfo,
                        settings: RunSettings, run: RunContext, scorer: Any = None) -> list[RequestResult]:
    """Activate the subject's LoRA (the copy ``ensure_lora`` verified in this process, with no store request;
    downloaded and checked again only if that copy is gone), sample the requests in one denoising loop, write
    every image."""
    pipe = load_run_pipeline(model, settings)
    ready_lora(store, lora, settings.cache_path())
    activate_lora(pipe, lora)
    results = generate_requests(pipe, inputs, requests, store, adapter_name=lora.adapter_name, lora_fp=lora.lora_fp,
                                base_model=model, run=run, scorer=scorer,
                                qc_thresholds=settings.qc_for(inputs.job.qc_thresholds) if scorer is not None else None,
                                max_batch_rows=settings.placement.max_batch_rows, vae_tiling=settings.placement.vae_tiling)
    get_run_logger().info("subject %s: %d request(s) in one loop, %d image(s) generated (%.2fs)", inputs.job.subject_id,
                          len(requests), sum(r.generated for r in results), results[0].seconds if results else 0.0)
    return results
