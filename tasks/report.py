"""Run records in the store and artifacts in Prefect: table, progress, contact sheets, failures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from prcore.outputs import reports
from prcore.store.keys import shard_record_key
from tasks.common import RETRY_OPTIONS


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


@task(name="write-shard-record", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def write_shard_record_task(store: Any, record: reports.ShardRecord) -> str:
    key = shard_record_key(record.run_id, record.shard)
    store.put(key, record.to_json(), content_type="application/json")
    return key


@task(name="read-shard-record", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def read_shard_record_task(store: Any, run_id: str, shard_index: int) -> reports.ShardRecord | None:
    key = shard_record_key(run_id, shard_index)
    if not store.exists(key):
        return None
    return reports.ShardRecord.from_json(store.get(key))


@task(name="write-run-report", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def write_run_report_task(store: Any, run_id: str, summary: dict[str, Any],
                          failures: Sequence[reports.Failure]) -> dict[str, str]:
    return {
        "summary": reports.write_summary(store, run_id, summary),
        "failures": reports.write_failure_report(store, run_id, failures),
    }


@task(name="write-html-report", cache_policy=NO_CACHE, persist_result=False, **RETRY_OPTIONS)
def write_html_report_task(store: Any, run_id: str, summary: dict[str, Any], jobs: Sequence[Any],
                           results: Sequence[reports.SubjectResult]) -> str:
    """``runs/{run_id}/index.html``: the browsable run report."""
    from prcore.pipeline.report import write_report

    return write_report(store, run_id, summary, jobs, results)


def publish_artifacts(store: Any, run_id: str, results: Sequence[reports.SubjectResult],
                      failures: Sequence[reports.Failure], report_key: str | None = None) -> None:
    """Table (one row per subject), contact sheets and the run report (addresses, no bearer links), failures."""
    create_table_artifact(table=reports.table_rows(results), key="nightly-batch-subjects",
                          description=f"Run {run_id}: one row per subject")
    create_markdown_artifact(markdown=reports.contact_sheets_markdown(store, run_id, results, report_key=report_key),
                             key="nightly-batch-contact-sheets", description=f"Run {run_id}: contact sheets")
    if failures:
        create_markdown_artifact(markdown=reports.failures_markdown(run_id, failures), key="nightly-batch-failures",
                                 description=f"Run {run_id}: failed subjects")


class Progress:
    """A progress artifact (percent of shards finished), created once and updated in place."""

    def __init__(self, total: int, description: str):
        self.total = max(total, 1)
        self.done = 0
        self._id: UUID | None = create_progress_artifact(progress=0.0 if total else 100.0, key="nightly-batch-progress",
                                                         description=description)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._id is not None:
            update_progress_artifact(self._id, progress=100.0 * min(self.done, self.total) / self.total)
