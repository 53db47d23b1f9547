"""Per-subject LoRA: fingerprint, then reuse from the store or train + upload.

``ensure_lora_task`` is cached by the LoRA fingerprint (and output root): an unchanged subject
skips even the store lookup on a machine that ran it before; on any other machine
``prcore.pipeline.runner.ensure_lora`` finds ``loras/{subject_id}/{lora_fp}/`` in the store and downloads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prcore.pipeline import runner
from prcore.store.storage import open_store
from tasks.common import RETRY_OPTIONS


@task(name="lora-fingerprint", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def lora_fingerprint_task(job: Any, model: str, train: Mapping[str, Any] | None = None) -> str:
    return runner.subject_lora_fingerprint(job, base_model_id=model, train_defaults=train)


def _lora_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """``prcore-lora-{output root hash}-{subject}-{lora_fp}`` (a file name in Prefect's result storage)."""
    import hashlib

    root = hashlib.sha256(parameters["output"].encode()).hexdigest()[:12]
    return f"prcore-lora-{root}-{parameters['job'].subject_id}-{parameters['lora_fp']}"


@task(
    name="ensure-lora",
    cache_key_fn=_lora_cache_key,
    persist_result=True,  # a small LoraInfo record, so the cache survives across runs
    cache_result_in_memory=False,
    **RETRY_OPTIONS,
)
def ensure_lora_task(job: Any, output: str, model: str, lora_fp: str, cache_dir: str,
                     train: Mapping[str, Any] | None = None, device: str | None = None,
                     dtype: str | None = None) -> runner.LoraInfo:
    logger = get_run_logger()
    from prcore.method.models import load_pipeline  # torch: imported where model work happens

    pipe = load_pipeline(runner.resolve_model(model, cache_dir), device=device, dtype=dtype)
    info = runner.ensure_lora(job, open_store(output), pipe, cache_dir=cache_dir, train_defaults=train, lora_fp=lora_fp,
                              base_model_id=model)
    if info.trained:
        logger.info("subject %s: trained LoRA %s in %.1fs (final loss %s)", job.subject_id, info.lora_fp,
                    info.train_seconds, info.final_loss)
    else:
        logger.info("subject %s: reused LoRA %s from the %s", job.subject_id, info.lora_fp, info.source)
    return info
