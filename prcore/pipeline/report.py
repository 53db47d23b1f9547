"""Gather what the browsable run report shows (Prefect-free; the nightly flow calls it once per run)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prcore.data.plan import SubjectJob
from prcore.outputs.reports import SubjectResult
from prcore.outputs.run_report import thumbnail_uri, write_run_report

log = logging.getLogger("prcore.pipeline")
MAX_IMAGES_PER_SUBJECT = 64


def report_subjects(store: Any, jobs: Sequence[SubjectJob], results: Sequence[SubjectResult]) -> list[dict[str, Any]]:
    """The subjects this run touched (made images, failed, was leased, or reconciled), with their
    reference thumbnails and the records + thumbnails of their finished images (at most
    MAX_IMAGES_PER_SUBJECT each)."""
    from prcore.pipeline.subject import finished_records, refresh_done
    from prcore.store.uris import read_uri_bytes

    by_id = {j.subject_id: j for j in jobs}
    out = []
    for r in results:
        if not (r.generated or r.error or r.leased_by or r.contact_sheet) or r.subject_id not in by_id:
            continue
        job = by_id[r.subject_id]
        refs, records, thumbs = [], [], {}
        try:
            refs = [thumbnail_uri(read_uri_bytes(u)) for u in job.instance_images]
        except Exception as exc:  # a broken reference is itself shown by the failure
            log.warning("run report: references of %s: %s", job.subject_id, exc)
        try:
            records = finished_records(store, refresh_done(store, job))[:MAX_IMAGES_PER_SUBJECT]
            thumbs = {rec.key: thumbnail_uri(store.get(rec.key)) for rec in records}
        except Exception as exc:
            log.warning("run report: images of %s: %s", job.subject_id, exc)
        out.append({"subject_id": r.subject_id, "result": r, "references": refs, "records": records, "thumbs": thumbs})
    return out


def write_report(store: Any, run_id: str, summary: dict[str, Any], jobs: Sequence[SubjectJob],
                 results: Sequence[SubjectResult]) -> str:
    return write_run_report(store, run_id, summary, report_subjects(store, jobs, results))
