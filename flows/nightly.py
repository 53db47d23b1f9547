"""``nightly-batch``: manifest in, images + metadata out.

Reads and validates the manifest, plans (what is done is skipped), groups the subjects with work
left into shards and fans out: in this process, one shard at a time (``fan_out="local"``), or one
``run_deployment`` per shard onto the ``personalize-subject/gpu`` deployment (``"deployment"``),
linked as child runs with idempotency keys derived from this flow run's id, then waits for all.
Writes ``runs/{run_id}/summary.json`` and ``failures.json``, publishes the run table, progress and
contact-sheet artifacts, and ends Failed when any subject failed (after all the others finished).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_run

from flows.common import SubjectsFailed, progress_event
from prcore.pipeline import runner
from prcore.store.storage import open_store
from tasks.plan import plan_task
from tasks.report import Progress, publish_artifacts, read_shard_record_task, write_run_report_task

SHARD_DEPLOYMENT = "personalize-subject/gpu"


def _run_identity() -> tuple[str, str, str | None]:
    """(run_id, run_date, flow_run_id): stable across retries of the same flow run.

    run_date is the scheduled start's UTC date (a 02:00 nightly run belongs to its night).
    """
    fr_id = current_run.id
    scheduled = current_run.scheduled_start_time
    when = scheduled if scheduled is not None else datetime.now(UTC)
    when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    run_id = runner.new_run_id(when, (fr_id or "")[:8])
    return run_id, when.date().isoformat(), fr_id


@flow(name="nightly-batch", persist_result=False, log_prints=True)
def nightly_batch(
    manifest: str,
    output: str,
    model: str | None = None,
    # Generation defaults: what a null/absent optional manifest column means.
    identifier: str | None = None,
    num_images: int | None = None,
    guidance: Literal["parallel_rescaled", "consistency", "cfg"] | None = None,
    guidance_scale: float | None = None,
    consistency_scale: float | None = None,
    parallel_scale: float | None = None,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    train: dict[str, Any] | None = None,
    # Fan-out and limits.
    fan_out: Literal["local", "deployment"] = "local",
    subjects_per_shard: int = 4,
    shard_deployment: str = SHARD_DEPLOYMENT,
    max_subjects: int | None = None,
    shard_timeout_s: float = 6 * 3600,
    check_images: bool = False,
    # Model placement and scoring.
    device: str | None = None,
    dtype: str | None = None,
    clip_model: str | None = None,
    dino_model: str | None = None,
    qc_clip_t: float | None = None,
    qc_clip_i: float | None = None,
    qc_dino: float | None = None,
    cache_dir: str | None = None,
    use_gpu_limit: bool = True,
) -> dict[str, Any]:
    """Personalize every subject of ``manifest`` and write its images into ``output``.

    Args:
        manifest: Parquet manifest URI: a file, a folder of files or an s3:// prefix.
        output: output root: a folder or s3://bucket/prefix.
        model: base model (local diffusers folder or hub id) for rows without ``base_model``;
            default: the embedded model (``prcore:toyworld`` if installed, else ``prcore:tiny-sd``).
        identifier ... scheduler: defaults for null/absent optional manifest columns (None keeps
            prcore's defaults: identifier "sks", 4 images, parallel_rescaled, 7.5 / 3.0 / 0.5,
            50 steps, the model's size, empty negative prompt, the model's scheduler).
        train: defaults for null ``train_*`` columns, as TrainConfig fields, e.g. {"steps": 400}.
        fan_out: "local" (shards in this process, one at a time) or "deployment" (one flow run
            per shard on ``shard_deployment``, picked up by the GPU pool's workers).
        subjects_per_shard: subjects per shard (a shard loads the base model once).
        max_subjects: run at most this many subjects with work left (None: all).
        shard_timeout_s: how long to wait for the deployment shards before reporting them failed.
        check_images: open every instance image before anything runs (slower; otherwise a bad
            image fails only its subject, at training).
        device / dtype: model placement (default cuda if available; fp16 on GPU).
        clip_model / dino_model: score every image (CLIP-T/CLIP-I, DINO) when set.
        qc_clip_t / qc_clip_i / qc_dino: QC thresholds recorded per image (needs the model).
        cache_dir: local cache for the embedded model and downloaded LoRAs.
        use_gpu_limit: hold the ``gpu`` global concurrency limit around model work.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    run_id, run_date, flow_run_id = _run_identity()
    model = model or runner.default_model_id()
    defaults = {"identifier": identifier, "num_images": num_images, "guidance": guidance,
                "guidance_scale": guidance_scale, "consistency_scale": consistency_scale,
                "parallel_scale": parallel_scale, "num_inference_steps": num_inference_steps,
                "height": height, "width": width, "negative_prompt": negative_prompt, "scheduler": scheduler}
    defaults = {k: v for k, v in defaults.items() if v is not None}
    qc = {k: v for k, v in {"clip_t": qc_clip_t, "clip_i": qc_clip_i, "dino": qc_dino}.items() if v is not None} or None
    if qc and not (clip_model or dino_model):
        raise ValueError("QC thresholds need a scoring model: set clip_model (clip_t/clip_i) and/or dino_model (dino)")
    if fan_out not in ("local", "deployment"):
        raise ValueError(f"fan_out must be 'local' or 'deployment', not {fan_out!r}")
    runner.shard([], subjects_per_shard)  # validates subjects_per_shard

    store = open_store(output)
    if hasattr(store, "check"):
        store.check()
    jobs = plan_task(manifest, output, model, defaults, None, check_images)
    todo = [j for j in jobs if runner.pending_images(j) > 0]
    if max_subjects is not None:
        todo = todo[:max_subjects]
    todo_ids = {j.subject_id for j in todo}
    shards = runner.shard([j.subject_id for j in todo], subjects_per_shard)
    logger.info("run %s: %d subject(s), %d with work left, %d shard(s), fan-out %s", run_id, len(jobs), len(todo),
                len(shards), fan_out)
    progress_event(event="planned", run_id=run_id, subjects=len(jobs), todo_subjects=len(todo),
                   images=sum(runner.total_images(j) for j in jobs),
                   pending=sum(runner.pending_images(j) for j in todo), shards=len(shards))
    progress = Progress(len(shards), f"Run {run_id}: shards finished")

    shard_params = dict(manifest=manifest, output=output, model=model, run_id=run_id, run_date=run_date,
                        defaults=defaults or None, train=train, device=device, dtype=dtype, clip_model=clip_model,
                        dino_model=dino_model, qc=qc, cache_dir=cache_dir,  # None: each worker's own default
                        use_gpu_limit=use_gpu_limit)
    shard_states: dict[int, str] = {}
    if fan_out == "local":
        from flows.personalize import personalize_subject  # imports torch: only where shards run here

        for i, ids in enumerate(shards):
            state = personalize_subject(subject_ids=ids, shard_index=i, return_state=True, **shard_params)
            shard_states[i] = state.type.value
            progress.advance()
    else:
        shard_states = _fan_out_deployments(shards, shard_params, shard_deployment, flow_run_id, run_id,
                                            shard_timeout_s, progress)

    # Collect: shard records from the store; a shard without one (crashed, timed out) fails its subjects.
    results_by_id: dict[str, runner.SubjectResult] = {}
    failures: list[runner.Failure] = []
    for i, ids in enumerate(shards):
        record = read_shard_record_task(output, run_id, i)
        if record is None:
            for sid in ids:
                err = f"shard {i} ended {shard_states.get(i, 'UNKNOWN')} without a record (crashed or timed out)"
                results_by_id[sid] = runner.SubjectResult(subject_id=sid, error=err, step="shard")
                failures.append(runner.Failure(subject_id=sid, step="shard", error=err, error_type="ShardLost",
                                               run_id=run_id, shard=i))
            continue
        for res in record.subjects:
            results_by_id[res.subject_id] = res
            if res.error:
                failures.append(runner.Failure(subject_id=res.subject_id, step=res.step or "?", error=res.error,
                                               error_type="SubjectFailed", run_id=run_id, shard=i))
    results: list[runner.SubjectResult] = []
    for job in jobs:
        if job.subject_id in results_by_id:
            res = results_by_id[job.subject_id]
            res.requests, res.images = job.n_requests, job.n_images
            res.skipped = max(res.skipped, job.n_done)
            results.append(res)
        elif job.subject_id not in todo_ids:
            done = runner.pending_images(job) == 0
            results.append(runner.SubjectResult(subject_id=job.subject_id, requests=job.n_requests, images=job.n_images,
                                                skipped=job.n_done, step=None if done else "limit"))
    summary = {"run_id": run_id, "run_date": run_date, "flow_run_id": flow_run_id, "manifest": manifest,
               "output": store.uri, "model": model, "fan_out": fan_out, "shards": len(shards),
               "shard_states": {str(k): v for k, v in shard_states.items()},
               "seconds": round(time.perf_counter() - started, 3), **runner.summarize(results),
               "subjects_detail": runner.table_rows(results)}
    keys = write_run_report_task(output, run_id, summary, failures)
    publish_artifacts(output, run_id, results, failures)
    logger.info("run %s: %d generated, %d skipped, %d subject(s) failed; summary %s", run_id, summary["generated"],
                summary["skipped"], len(failures), keys["summary"])
    progress_event(event="finished", run_id=run_id, summary=summary)
    if failures:
        raise SubjectsFailed(
            f"{len(failures)} of {len(results)} subject(s) failed: "
            + "; ".join(f"{f.subject_id} at {f.step}: {f.error}" for f in failures[:5])
            + f". Report: {store.uri}/{keys['failures']}"
        )
    return {k: summary[k] for k in ("run_id", "subjects", "generated", "skipped", "failed", "shards")} | {
        "summary": keys["summary"]}


def _fan_out_deployments(shards: list[list[str]], params: dict[str, Any], deployment: str, flow_run_id: str | None,
                         run_id: str, timeout_s: float, progress: Progress) -> dict[int, str]:
    """Submit one child flow run per shard (idempotent per parent run + shard), then wait for all."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    submitted: dict[int, Any] = {}
    for i, ids in enumerate(shards):
        key = f"{flow_run_id or run_id}-shard-{i}"
        fr = run_deployment(name=deployment, parameters={**params, "subject_ids": ids, "shard_index": i},
                            timeout=0, idempotency_key=key, flow_run_name=f"{run_id}-shard-{i}",
                            tags=["prcore", f"run:{run_id}"])
        submitted[i] = fr.id
        logger.info("shard %d (%s) submitted as flow run %s", i, ", ".join(ids), fr.id)
    states: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while len(states) < len(submitted) and time.monotonic() < deadline:
            for i, fr_id in submitted.items():
                if i in states:
                    continue
                fr = client.read_flow_run(fr_id)
                if fr.state is not None and fr.state.is_final():
                    states[i] = fr.state.type.value
                    progress.advance()
                    logger.info("shard %d finished: %s", i, fr.state.name)
            if len(states) < len(submitted):
                time.sleep(1.0)
    for i in submitted:
        states.setdefault(i, "TIMED_OUT")
    return states
