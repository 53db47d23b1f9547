"""``personalize-subject``: fine-tune (or reuse) the LoRA of each subject in a shard and sample
every pending request of it. Runs as its own flow run on a GPU work pool (the nightly flow's
``fan_out.mode="deployment"``, deployment ``personalize-subject/gpu``); the nightly flow's local
mode calls :func:`run_shard` in its own process with the jobs it planned.

A subject that fails (bad image found at training, out of memory, NaN loss, ...) is recorded and
the shard goes on with the next; the shard's record goes to ``runs/{run_id}/shards/{i}.json`` and
the flow run ends Failed if any of its subjects failed.

Large task arguments (a subject's inputs, a batch of requests, image records) are passed in
``quote(...)``: Prefect then does not walk them looking for futures (they hold none), which cost
~0.1 s of CPU per task call (a subject's inputs hold its 25 requests and their seeds).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote

from flows.common import SubjectsFailed, gpu_slot, progress_event
from prcore.data.plan import SubjectJob
from prcore.outputs.reports import Failure, ShardRecord, SubjectResult, failure_from
from prcore.pipeline.lease import leased_by, subject_lease
from prcore.pipeline.lora import deactivate_lora, lora_fingerprint
from prcore.pipeline.models import default_model_id, load_run_pipeline
from prcore.pipeline.settings import RunSettings
from prcore.pipeline.subject import (
    RunContext,
    batches,
    clear_dirty,
    finished_records,
    make_scorer,
    mark_dirty,
    new_run_id,
    read_subject_inputs,
    refresh_done,
    worker_identity,
)
from prcore.store.storage import Store, StoreWriteError, open_store
from tasks.lora import ensure_lora_task
from tasks.outputs import contact_sheet_task, write_catalog_task
from tasks.plan import shard_jobs_task
from tasks.report import write_shard_record_task


def run_subject(job: SubjectJob, *, store: Store, settings: RunSettings, run: RunContext, scorer: Any,
                use_gpu_limit: bool, shard_index: int) -> tuple[SubjectResult, Failure | None]:
    """One subject: LoRA, every pending request, catalogue, contact sheet. Never raises."""
    from tasks.sample import generate_batch_task

    logger = get_run_logger()
    started = time.perf_counter()
    model = job.base_model or settings.model or default_model_id()
    res = SubjectResult(subject_id=job.subject_id, requests=job.n_requests, images=job.n_images, worker=run.worker)
    step = "fingerprint"
    adapter = None
    try:
        step = "lease"
        with subject_lease(store, job.subject_id, run) as lease:
            if lease is None:  # another live run holds the subject: it does the work, we count nothing
                holder = leased_by(store, job.subject_id)
                res.step, res.leased_by = "leased", holder
                res.seconds = time.perf_counter() - started
                logger.info("subject %s skipped: run %s holds its lease", job.subject_id, holder)
                progress_event(event="subject_leased", subject_id=job.subject_id, holder=holder)
                return res, None
            step = "fingerprint"
            refresh_done(store, job)  # what another run finished while we waited is not redone; damaged images are
            res.damaged.extend(job.damaged)  # not done (made again below)
            inputs = read_subject_inputs(job)  # the instance images, read once for every step below
            made = []
            if job.todo_requests:
                fp = lora_fingerprint(inputs, base_model_id=model, config=settings.train_config(job.train_overrides))
                res.lora_fp = fp
                mark_dirty(store, run, job.subject_id)
                with gpu_slot(use_gpu_limit):
                    step = "train"
                    lora = ensure_lora_task(quote(inputs), store, model, fp, settings)
                    adapter = lora.adapter_name
                    if lora.damaged:
                        res.damaged.append(f"LoRA {fp}: {lora.damaged}")
                    res.lora_source = lora.source
                    res.model_seconds += lora.train_seconds
                    step = "sample"
                    for batch in batches(job.todo_requests, settings.placement.max_batch_images):
                        lease.check()
                        for rr in generate_batch_task(quote(inputs), quote(batch), store, model, lora, settings, run, scorer):
                            made.extend(rr.records)
                            res.generated += rr.generated
                            res.qc_failed += rr.qc_failed
                            res.model_seconds += rr.sample_seconds
                            progress_event(event="request_done", subject_id=job.subject_id, generated=rr.generated, skipped=rr.skipped)
            res.skipped = job.n_done
            records = finished_records(store, job, made)
            lease.check()
            step = "contact_sheet"
            res.contact_sheet = contact_sheet_task(store, run, quote(inputs), quote(records))
            step = "catalog"  # last: with the dirty marker gone, the subject's derived outputs match its images
            write_catalog_task(store, quote(inputs), quote(made))
            clear_dirty(store, job.subject_id)
    except StoreWriteError:  # disk full / permissions: every later write would fail too; stop the run
        raise
    except Exception as exc:
        failure = failure_from(exc, subject_id=job.subject_id, step=step, run_id=run.run_id, shard=shard_index)
        res.error, res.step = failure.error, step
        res.failed = max(0, job.n_todo - res.generated) if step in ("lease", "fingerprint", "train", "sample") else 0
        res.seconds = time.perf_counter() - started
        logger.error("subject %s failed at %s: %s: %s", job.subject_id, step, failure.error_type, failure.error)
        progress_event(event="subject_failed", subject_id=job.subject_id, step=step, error=failure.error)
        return res, failure
    finally:
        if adapter is not None:  # the next subject of the shard starts from the bare base model
            deactivate_lora(load_run_pipeline(model, settings), adapter)
    res.seconds = time.perf_counter() - started
    logger.info("subject %s done: %d generated, %d skipped in %.1fs", job.subject_id, res.generated, res.skipped, res.seconds)
    progress_event(event="subject_done", subject_id=job.subject_id, generated=res.generated, skipped=res.skipped)
    return res, None


def run_shard(jobs: list[SubjectJob], *, store: Store, settings: RunSettings, run: RunContext, shard_index: int,
              use_gpu_limit: bool) -> ShardRecord:
    """Every subject of a shard, one after the other; the shard's record is written to the store."""
    started, started_at = time.perf_counter(), datetime.now(UTC).isoformat()
    scorer = make_scorer(settings)
    results = []
    for job in jobs:
        res, _ = run_subject(job, store=store, settings=settings, run=run, scorer=scorer, use_gpu_limit=use_gpu_limit,
                             shard_index=shard_index)
        results.append(res)
    record = ShardRecord(run_id=run.run_id, shard=shard_index, subjects=results, worker=run.worker, started=started_at,
                         finished=datetime.now(UTC).isoformat(), seconds=time.perf_counter() - started)
    write_shard_record_task(store, quote(record))
    return record


@flow(name="personalize-subject", persist_result=False, log_prints=True)
def personalize_subject(
    manifest: str,
    output: str,
    subject_ids: list[str],
    settings: RunSettings = RunSettings(),
    run_id: str | None = None,
    run_date: str | None = None,
    shard_index: int = 0,
    use_gpu_limit: bool = True,
    plan: str | None = None,
) -> dict[str, Any]:
    """Personalize the subjects ``subject_ids`` of ``manifest`` into ``output``.

    Args:
        manifest: Parquet manifest URI (file, folder or s3:// prefix).
        output: output root (folder or s3://bucket/prefix).
        subject_ids: the shard: subjects to run, in order.
        settings: the run's settings (model, generation and training defaults, placement, scoring, cache).
        run_id / run_date: the parent run's id (records go to runs/{run_id}/) and catalogue date.
        shard_index: this shard's number in the parent run.
        use_gpu_limit: hold the ``gpu`` global concurrency limit around model work.
        plan: key of the shard's plan file in ``output`` (the parent run writes it): the shard's jobs
            as the parent planned and image-checked them. Without it (a shard started by hand), or
            when it is stale (the manifest changed since; a warning says why), the shard plans its own
            subjects from the manifest: only their rows validated, prefixes listed, images checked.
    """
    store = open_store(output)
    run = RunContext(run_id or new_run_id(), run_date or datetime.now(UTC).date().isoformat(), worker_identity())
    jobs = shard_jobs_task(manifest, store, settings, subject_ids, plan)
    record = run_shard(jobs, store=store, settings=settings, run=run, shard_index=shard_index, use_gpu_limit=use_gpu_limit)
    failed = [r for r in record.subjects if not r.ok]
    get_run_logger().info("shard %d: %d subject(s), %d failed", shard_index, len(record.subjects), len(failed))
    if failed:
        raise SubjectsFailed(f"{len(failed)} of {len(record.subjects)} subject(s) failed in shard {shard_index}: "
                             + ", ".join(f"{r.subject_id} ({r.step}: {r.error})" for r in failed))
    return {"shard": shard_index, "subjects": len(record.subjects), "generated": sum(r.generated for r in record.subjects),
            "worker": record.worker}
