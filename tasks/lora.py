"""Per-subject LoRA: fingerprint, then reuse from the store or train + upload.

``ensure_lora_task`` is cached by the LoRA fingerprint (and output root): an unchanged subject
skips even the store lookup on a machine that ran it before; on any other machine
``prcore.pipeline.lora.ensure_lora`` finds ``loras/{subject_id}/{lora_fp}/`` in the store and downloads it.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from prcore.pipeline.lora import LoraInfo, ensure_lora
from prcore.pipeline.models import load_run_pipeline
from prcore.pipeline.settings import RunSettings
from prcore.pipeline.subject import SubjectInputs
from tasks.common import RETRY_OPTIONS


def _lora_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """``prcore-lora-{output root hash}-{subject}-{lora_fp}`` (a file name in Prefect's result storage)."""
    import hashlib

    root = hashlib.sha256(parameters["store"].uri.encode()).hexdigest()[:12]
    return f"prcore-lora-{root}-{parameters['inputs'].job.subject_id}-{parameters['lora_fp']}"


@task(
    name="ensure-lora",
    cache_key_fn=_lora_cache_key,
    persist_result=True,  # a small LoraInfo record, so the cache survives across runs
    cache_result_in_memory=False,
    **RETRY_OPTIONS,
)
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
