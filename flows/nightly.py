"""``nightly-batch``: manifest in, images + metadata out.

Reads and validates the manifest, plans (what is done is skipped), groups the subjects with work
left into shards and fans out: in this process, one shard at a time (``fan_out="local"``), or one
``run_deployment`` per shard onto the ``personalize-subject/gpu`` deployment (``"deployment"``),
linked as child runs with idempotency keys derived from this flow run's id, then waits for all.
A deployment shard gets its plan file (``runs/{run_id}/shard_plans/{i}.json``: its subjects' jobs as
planned and image-checked here), so it reads nothing of other subjects.
Rebuilds the catalogue snapshot ``catalog.parquet`` from the per-subject files (when they changed), writes
``runs/{run_id}/summary.json`` and ``failures.json``, publishes the run table, progress and
contact-sheet artifacts, and ends Failed when any subject failed (after all the others finished).
Task arguments that grow with the manifest (every job, every result) are passed in ``quote(...)``, so
Prefect does not walk them (see ``flows/personalize.py``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_run
from prefect.utilities.annotations import quote

from flows.common import GPU_LIMIT, SubjectsFailed, progress_event, wait_for_flow_runs
from prcore.data.load import manifest_identity
from prcore.outputs.reports import Failure, SubjectResult, summarize, table_rows
from prcore.pipeline.settings import FanOut, RunSettings
from prcore.pipeline.shards import choose_subjects_per_shard, subject_gpu_seconds
from prcore.pipeline.subject import RunContext, new_run_id, open_output, shard, subjects_with_work, worker_identity
from tasks.outputs import catalog_snapshot_task
from tasks.plan import plan_task, write_shard_plans_task
from tasks.report import (
    Progress,
    publish_artifacts,
    read_shard_record_task,
    write_html_report_task,
    write_run_report_task,
)


def _run_identity() -> tuple[str, str, str | None]:
    """(run_id, run_date, flow_run_id): stable across retries of the same flow run.

    run_date is the scheduled start's UTC date (a 02:00 nightly run belongs to its night).
    """
    fr_id = current_run.id
    scheduled = current_run.scheduled_start_time
    when = scheduled if scheduled is not None else datetime.now(UTC)
    when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    run_id = new_run_id(when, (fr_id or "")[:8])
    return run_id, when.date().isoformat(), fr_id


@flow(name="nightly-batch", persist_result=False, log_prints=True)
def nightly_batch(manifest: str, output: str, settings: RunSettings = RunSettings(), fan_out: FanOut = FanOut()) -> dict[str, Any]:
    """Personalize every subject of ``manifest`` and write its images into ``output``.

    Args:
        manifest: Parquet manifest URI: a file, a folder of files or an s3:// prefix.
        output: output root: a folder or s3://bucket/prefix.
        settings: the run's settings: base model (default: the embedded model), generation defaults
            for null manifest cells, training defaults for null ``train_*`` cells, placement
            (device, dtype), scoring models and QC thresholds, cache folder, image check.
        fan_out: how shards run: "local" (in this process, one at a time) or "deployment" (one flow
            run per shard on ``shard_deployment``, picked up by the GPU pool's workers); subjects
            per shard, a cap on subjects, the shard timeout, the ``gpu`` concurrency limit.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    run_id, run_date, flow_run_id = _run_identity()
    run = RunContext(run_id, run_date, worker_identity())
    store = open_output(output)  # reachable and writable (a probe write), before anything is planned
    if hasattr(store, "clean_stale_tmp"):  # a folder: temporary files of writes a killed run interrupted
        removed = store.clean_stale_tmp()
        if removed:
            logger.info("removed %d stale temporary file(s) under %s", removed, store.uri)
    # what the shards' plan files are checked against: the manifest's files as they are before it is read
    manifest_fp = manifest_identity(manifest) if fan_out.mode == "deployment" else None
    jobs = plan_task(manifest, store, settings)
    # work left: images to make, or derived outputs (contact sheet, catalogue) that do not match the store
    todo = subjects_with_work(store, jobs)[: fan_out.max_subjects]
    todo_ids = {j.subject_id for j in todo}
    per_shard = fan_out.subjects_per_shard or _auto_subjects_per_shard(todo, settings, fan_out)
    shards = shard([j.subject_id for j in todo], per_shard)
    logger.info("run %s: %d subject(s), %d with work left, %d shard(s) of %d%s, fan-out %s", run_id, len(jobs), len(todo),
                len(shards), per_shard, "" if fan_out.subjects_per_shard else " (chosen)", fan_out.mode)
    progress_event(event="planned", run_id=run_id, subjects=len(jobs), todo_subjects=len(todo),
                   images=sum(j.n_images for j in jobs), pending=sum(j.n_todo for j in todo), shards=len(shards))
    progress = Progress(len(shards), f"Run {run_id}: shards finished")

    shard_states: dict[int, str] = {}
    if fan_out.mode == "local":
        from flows.personalize import run_shard  # imports torch: only where shards run here

        by_id = {j.subject_id: j for j in todo}
        for i, ids in enumerate(shards):
            run_shard([by_id[s] for s in ids], store=store, settings=settings, run=run, shard_index=i,
                      use_gpu_limit=fan_out.use_gpu_limit)
            shard_states[i] = "COMPLETED"
            progress.advance()
    else:
        by_id = {j.subject_id: j for j in todo}
        plans = write_shard_plans_task(store, run_id, quote([[by_id[s] for s in ids] for ids in shards]), manifest, manifest_fp,
                                       settings) if shards else []
        params = dict(manifest=manifest, output=output, settings=settings.model_dump(mode="json"), run_id=run_id,
                      run_date=run_date, use_gpu_limit=fan_out.use_gpu_limit)
        shard_states = _fan_out_deployments(shards, params, fan_out.shard_deployment, flow_run_id, run_id,
                                            fan_out.shard_timeout_s, progress, plans)

    # Collect: shard records from the store; a shard without one (crashed, timed out) fails its subjects.
    results_by_id: dict[str, SubjectResult] = {}
    failures: list[Failure] = []
    for i, ids in enumerate(shards):
        record = read_shard_record_task(store, run_id, i)
        if record is None:
            for sid in ids:
                err = f"shard {i} ended {shard_states.get(i, 'UNKNOWN')} without a record (crashed or timed out)"
                results_by_id[sid] = SubjectResult(subject_id=sid, error=err, step="shard")
                failures.append(Failure(subject_id=sid, step="shard", error=err, error_type="ShardLost", run_id=run_id, shard=i))
            continue
        for res in record.subjects:
            results_by_id[res.subject_id] = res
            if res.error:
                failures.append(Failure(subject_id=res.subject_id, step=res.step or "?", error=res.error,
                                        error_type="SubjectFailed", run_id=run_id, shard=i))
    results: list[SubjectResult] = []
    for job in jobs:
        if job.subject_id in results_by_id:
            res = results_by_id[job.subject_id]
            res.requests, res.images = job.n_requests, job.n_images
            res.skipped = max(res.skipped, job.n_done)
            results.append(res)
        elif job.subject_id not in todo_ids:
            results.append(SubjectResult(subject_id=job.subject_id, requests=job.n_requests, images=job.n_images,
                                         skipped=job.n_done, step=None if job.n_todo == 0 else "limit"))
    summary = {"run_id": run_id, "run_date": run_date, "flow_run_id": flow_run_id, "manifest": manifest,
               "output": store.uri, "model": settings.model, "fan_out": fan_out.mode, "shards": len(shards),
               "subjects_per_shard": per_shard,
               "shard_states": {str(k): v for k, v in shard_states.items()},
               "seconds": round(time.perf_counter() - started, 3), **summarize(results),
               "subjects_detail": table_rows(results)}
    summary["catalog_snapshot"] = catalog_snapshot_task(store)  # after every shard: the per-subject files in one
    keys = write_run_report_task(store, run_id, quote(summary), quote(failures))
    try:  # the browsable report: a failure to write it is logged, never fails the night
        keys["report"] = write_html_report_task(store, run_id, quote(summary), quote(jobs), quote(results))
    except Exception as exc:
        logger.warning("run report not written: %s", exc)
    publish_artifacts(store, run_id, results, failures, report_key=keys.get("report"))
    logger.info("run %s: %d generated, %d skipped, %d subject(s) failed; summary %s", run_id, summary["generated"],
                summary["skipped"], len(failures), keys["summary"])
    progress_event(event="finished", run_id=run_id, summary=summary)
    if failures:
        raise SubjectsFailed(
            f"{len(failures)} of {len(results)} subject(s) failed: "
            + "; ".join(f"{f.subject_id} at {f.step}: {f.error}" for f in failures[:5])
            + f". Report: {store.uri}/{keys['failures']}"
        )
    kept = ("run_id", "subjects", "generated", "skipped", "failed", "shards", "subjects_per_shard")
    return {k: summary[k] for k in kept} | {"summary": keys["summary"]}


def _auto_subjects_per_shard(todo: list[Any], settings: RunSettings, fan_out: FanOut) -> int:
    """The shard size when the run does not fix one (:func:`choose_subjects_per_shard`)."""
    workers = 1 if fan_out.mode == "local" else fan_out.gpu_workers or gpu_workers(fan_out)
    gpu_s = subject_gpu_seconds(todo, [settings.train_config(j.train_overrides).steps for j in todo])
    per_shard = choose_subjects_per_shard(len(todo), workers, gpu_s)
    get_run_logger().info("subjects per shard: %d, chosen for %d subject(s) with work left on %d GPU worker(s) "
                          "(~%.0f GPU s per subject)", per_shard, len(todo), workers, gpu_s)
    return per_shard


def gpu_workers(fan_out: FanOut) -> int:
    """How many shards run at once: the ``gpu`` global concurrency limit's slots when the shards hold
    it (and it is active), else the online workers of the shard deployment's work pool (each runs
    one shard at a time on its GPU), else 1."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        if fan_out.use_gpu_limit:
            try:
                limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
                if limit.active and limit.limit > 0:
                    return int(limit.limit)
            except ObjectNotFound:
                pass
        try:
            pool = client.read_deployment_by_name(fan_out.shard_deployment).work_pool_name
            online = [w for w in client.read_workers_for_work_pool(pool) if w.status == WorkerStatus.ONLINE] if pool else []
        except ObjectNotFound:
            online = []
    return max(1, len(online))


def submit_shards(shards: list[list[str]], params: dict[str, Any], deployment: str, flow_run_id: str | None, run_id: str,
                  *, workers: int = 8, plans: list[str] | None = None) -> dict[int, Any]:
    """One child flow run per shard on ``deployment``, idempotent per parent run + shard, linked to
    the current flow run (a task run per shard, as ``run_deployment`` links them); shard ``i`` gets
    ``subject_ids``, ``shard_index`` and, with ``plans``, the key of its plan file (``plan``).

    What ``run_deployment`` does in four API calls and a new client per shard is done here with one
    client: the deployment is read once, then two calls per shard (link, flow run) from ``workers``
    threads; thousands of shards are submitted in seconds, not minutes.
    """
    from concurrent.futures import ThreadPoolExecutor

    from prefect import Task
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Pending, Scheduled

    parent = FlowRunContext.get()
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        link_task = Task(name=deployment, fn=lambda: None)
        link_task.task_key = f"prcore.shard.{deployment}"

        def submit(i: int) -> Any:
            for attempt in range(6):  # a busy server answers 503/429 (SQLite write locks): back off and retry
                try:
                    return submit_once(i)
                except PrefectHTTPStatusError as exc:
                    if exc.response.status_code not in (429, 503) or attempt == 5:
                        raise
                    time.sleep(min(8.0, 0.5 * 2**attempt))

        def submit_once(i: int) -> Any:  # idempotent: the link's dynamic key and the run's idempotency key
            link = None
            if parent is not None and parent.flow_run is not None:
                link = client.create_task_run(task=link_task, flow_run_id=parent.flow_run.id, dynamic_key=str(i),
                                              state=Pending()).id
            return client.create_flow_run_from_deployment(
                dep.id, parameters={**params, "subject_ids": shards[i], "shard_index": i, **({"plan": plans[i]} if plans else {})},
                state=Scheduled(),
                name=f"{run_id}-shard-{i}", tags=["prcore", f"run:{run_id}"],
                idempotency_key=f"{flow_run_id or run_id}-shard-{i}", parent_task_run_id=link).id

        with ThreadPoolExecutor(max(1, min(workers, len(shards) or 1))) as pool:
            return dict(enumerate(pool.map(submit, range(len(shards)))))


def _fan_out_deployments(shards: list[list[str]], params: dict[str, Any], deployment: str, flow_run_id: str | None,
                         run_id: str, timeout_s: float, progress: Progress, plans: list[str]) -> dict[int, str]:
    """Submit one child flow run per shard (with its plan file), then wait for all (one filtered query per poll)."""
    from prefect.client.orchestration import get_client

    logger = get_run_logger()
    submitted = submit_shards(shards, params, deployment, flow_run_id, run_id, plans=plans)
    logger.info("%d shard(s) submitted to %s", len(submitted), deployment)
    shard_of = {fr_id: i for i, fr_id in submitted.items()}

    def finished(fr_id, fr) -> None:
        progress.advance()
        logger.info("shard %d finished: %s", shard_of[fr_id], fr.state.name)

    with get_client(sync_client=True) as client:
        final = wait_for_flow_runs(client, list(submitted.values()), timeout_s=timeout_s, on_final=finished)
    states = {shard_of[fr_id]: state for fr_id, state in final.items()}
    for i in submitted:
        states.setdefault(i, "TIMED_OUT")
    return states
