"""Per-subject LoRA: fingerprint, then reuse from the store or train + upload.

No Prefect cache: the store is the truth. ``prcore.pipeline.lora.ensure_lora`` asks the store every
time (a HEAD of the record and of the weights, a GET of the small record) and uses this machine's
folder cache only when its record matches the store's; an output root deleted or emptied since is
noticed and the LoRA trained again, instead of a cached answer naming a LoRA that exists nowhere.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prcore.pipeline.lora import LoraInfo, ensure_lora
from prcore.pipeline.models import load_run_pipeline
from prcore.pipeline.settings import RunSettings
from prcore.pipeline.subject import SubjectInputs
from tasks.common import RETRY_OPTIONS


@task(name="ensure-lora", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def ensure_lora_task(inputs: SubjectInputs, store: Any, model: str, lora_fp: str, settings: RunSettings) -> LoraInfo:
    logger = get_run_logger()
    job = inputs.job
    info = ensure_lora(inputs, store, load_run_pipeline(model, settings), config=settings.train_config(job.train_overrides),
                       lora_fp=lora_fp, base_model_id=model, cache_dir=settings.cache_path())
    if info.trained:
        logger.info("subject %s: trained LoRA %s in %.1fs (final loss %s)", job.subject_id, info.lora_fp,
                    info.train_seconds, info.final_loss)
    else:
        logger.info("subject %s: reused LoRA %s from the %s", job.subject_id, info.lora_fp, info.source)
    return info
