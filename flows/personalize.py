"""``personalize-subject``: fine-tune (or reuse) the LoRA of each subject in a shard and sample
every pending request of it. Runs in-process under ``nightly-batch`` (fan_out="local") or as its
own flow run on a GPU work pool (fan_out="deployment", deployment ``personalize-subject/gpu``).

A subject that fails (bad image found at training, out of memory, NaN loss, ...) is recorded and
the shard goes on with the next; the shard's record goes to ``runs/{run_id}/shards/{i}.json`` and
the flow run ends Failed if any of its subjects failed.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger

from flows.common import SubjectsFailed, gpu_slot, progress_event
from prcore.pipeline import runner
from tasks.lora import ensure_lora_task, lora_fingerprint_task
from tasks.outputs import contact_sheet_task, write_catalog_task
from tasks.plan import plan_task
from tasks.report import write_shard_record_task


def run_subject(job: Any, *, output: str, model: str, run_id: str, run_date: str, cache_dir: str,
                train: dict[str, Any] | None, device: str | None, dtype: str | None,
                clip_model: str | None, dino_model: str | None, qc: dict[str, Any] | None,
                use_gpu_limit: bool, shard_index: int) -> tuple[runner.SubjectResult, runner.Failure | None]:
    """One subject: LoRA, every pending request, catalogue, contact sheet. Never raises."""
    from tasks.sample import generate_request_task

    logger = get_run_logger()
    started = time.perf_counter()
    model = runner.job_model(job, model)
    res = runner.SubjectResult(subject_id=job.subject_id, requests=job.n_requests, images=job.n_images,
                               worker=runner.worker_identity())
    step = "fingerprint"
    try:
        fp = lora_fingerprint_task(job, model, train)
        res.lora_fp = fp
        with gpu_slot(use_gpu_limit):
            step = "train"
            lora_state = ensure_lora_task(job, output, model, fp, cache_dir, train, device, dtype, return_state=True)
            lora = lora_state.result()
            if lora_state.name == "Cached":  # Prefect's cache by LoRA fingerprint: nothing ran now
                lora = dataclasses.replace(lora, source="cache", seconds=0.0, train_seconds=0.0)
            res.lora_source = lora.source
            res.model_seconds += lora.train_seconds
            step = "sample"
            record = {"run_id": run_id, "run_date": run_date, "base_model": model, "worker": res.worker}
            for request in job.requests:
                rr = generate_request_task(job, request, output, model, lora, cache_dir, record, device, dtype,
                                           clip_model, dino_model, qc)
                res.generated += rr.generated
                res.skipped += rr.skipped
                res.qc_failed += rr.qc_failed
                res.model_seconds += rr.sample_seconds
                progress_event(event="request_done", subject_id=job.subject_id, generated=rr.generated, skipped=rr.skipped)
        step = "catalog"
        write_catalog_task(job, output, run_date, run_id, res.generated)
        step = "contact_sheet"
        res.contact_sheet = contact_sheet_task(job, output, run_id)
    except Exception as exc:
        failure = runner.failure_from(exc, subject_id=job.subject_id, step=step, run_id=run_id, shard=shard_index)
        res.error, res.step = failure.error, step
        res.failed = max(0, job.n_images - job.n_done - res.generated) if step in ("fingerprint", "train", "sample") else 0
        res.seconds = time.perf_counter() - started
        logger.error("subject %s failed at %s: %s: %s", job.subject_id, step, failure.error_type, failure.error)
        progress_event(event="subject_failed", subject_id=job.subject_id, step=step, error=failure.error)
        return res, failure
    finally:
        _unload(model, cache_dir, res.lora_fp, job.subject_id, device, dtype)
    res.seconds = time.perf_counter() - started
    logger.info("subject %s done: %d generated, %d skipped in %.1fs", job.subject_id, res.generated, res.skipped, res.seconds)
    progress_event(event="subject_done", subject_id=job.subject_id, generated=res.generated, skipped=res.skipped)
    return res, None


def _unload(model: str, cache_dir: str, lora_fp: str | None, subject_id: str, device: str | None,
            dtype: str | None) -> None:
    """Drop the subject's adapter so the next subject of the shard starts from the bare base model."""
    if not lora_fp:
        return
    from prcore.method.models import load_pipeline

    try:
        pipe = load_pipeline(runner.resolve_model(model, cache_dir), device=device, dtype=dtype)
    except Exception:
        return
    runner.deactivate_lora(pipe, runner.adapter_name_for(subject_id, lora_fp))


@flow(name="personalize-subject", persist_result=False, log_prints=True)
def personalize_subject(
    manifest: str,
    output: str,
    subject_ids: list[str],
    model: str | None = None,
    run_id: str | None = None,
    run_date: str | None = None,
    shard_index: int = 0,
    defaults: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    clip_model: str | None = None,
    dino_model: str | None = None,
    qc: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    use_gpu_limit: bool = True,
) -> dict[str, Any]:
    """Personalize the subjects ``subject_ids`` of ``manifest`` into ``output``.

    Args:
        manifest: Parquet manifest URI (file, folder or s3:// prefix).
        output: output root (folder or s3://bucket/prefix).
        subject_ids: the shard: subjects to run, in order.
        model: base model (local diffusers folder or hub id); default: the embedded model.
        run_id / run_date: the parent run's id (records go to runs/{run_id}/) and catalogue date.
        shard_index: this shard's number in the parent run.
        defaults: generation defaults for null manifest cells (GenerationDefaults fields).
        train: TrainConfig field defaults for null ``train_*`` cells (e.g. {"steps": 400}).
        device / dtype: where and how the model runs (default: cuda if available, fp16 on GPU).
        clip_model / dino_model / qc: optional scoring models and QC thresholds {clip_t, clip_i, dino}.
        cache_dir: local cache for models and downloaded LoRAs (default ~/.cache/prcore).
        use_gpu_limit: hold the ``gpu`` global concurrency limit around model work.
    """
    logger = get_run_logger()
    shard_started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat()
    run_id = run_id or runner.new_run_id()
    run_date = run_date or datetime.now(UTC).date().isoformat()
    cache_dir = str(cache_dir or runner.default_cache_dir())
    model = model or runner.default_model_id()
    jobs = plan_task(manifest, output, model, defaults, subject_ids)
    results: list[runner.SubjectResult] = []
    failures: list[runner.Failure] = []
    for job in jobs:
        res, failure = run_subject(job, output=output, model=model, run_id=run_id, run_date=run_date,
                                   cache_dir=cache_dir, train=train, device=device, dtype=dtype,
                                   clip_model=clip_model, dino_model=dino_model, qc=qc,
                                   use_gpu_limit=use_gpu_limit, shard_index=shard_index)
        results.append(res)
        if failure:
            failures.append(failure)
    record = runner.ShardRecord(run_id=run_id, shard=shard_index, subjects=results, worker=runner.worker_identity(),
                                started=started_at, finished=datetime.now(UTC).isoformat(),
                                seconds=time.perf_counter() - shard_started)
    key = write_shard_record_task(output, record)
    logger.info("shard %d: %d subject(s), %d failed; record %s", shard_index, len(results), len(failures), key)
    if failures:
        raise SubjectsFailed(f"{len(failures)} of {len(results)} subject(s) failed in shard {shard_index}: "
                             + ", ".join(f"{f.subject_id} ({f.step}: {f.error})" for f in failures))
    return {"shard": shard_index, "record": key, "subjects": len(results),
            "generated": sum(r.generated for r in results), "worker": record.worker}
