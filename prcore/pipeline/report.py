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
MAX_SUBJECTS_WITH_IMAGES = 200  # the page's images: a few MB of thumbnails, not a night's 10,000 subjects


def report_subjects(store: Any, jobs: Sequence[SubjectJob], results: Sequence[SubjectResult], *,
                    max_subjects: int = MAX_SUBJECTS_WITH_IMAGES, workers: int = 16) -> list[dict[str, Any]]:
    """The subjects this run touched (made images, failed, was leased, or reconciled). The first
    ``max_subjects`` of them, failed subjects first, come with their reference thumbnails and the
    records + thumbnails of their finished images (at most MAX_IMAGES_PER_SUBJECT each; the records from
    the subject's catalogue file, one GET, when it ended well; else from its sidecars), read ``workers`` at a time; the others are listed with their result only (``omitted``): a night of
    10,000 subjects read one by one took ~1.3 s and 168 GETs each (benchmarks/night_scale.py)."""
    by_id = {j.subject_id: j for j in jobs}
    touched = [r for r in results if (r.generated or r.error or r.leased_by or r.contact_sheet) and r.subject_id in by_id]
    touched.sort(key=lambda r: r.error is None)  # stable: failures first, then the run's order
    shown, rest = touched[:max_subjects], touched[max_subjects:]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(workers, len(shown) or 1))) as pool:
        out = list(pool.map(lambda r: _subject_entry(store, by_id[r.subject_id], r), shown))
    out += [{"subject_id": r.subject_id, "result": r, "references": [], "records": [], "thumbs": {}, "omitted": True} for r in rest]
    return out


def _subject_entry(store: Any, job: SubjectJob, r: SubjectResult) -> dict[str, Any]:
    from prcore.pipeline.subject import finished_records, refresh_done
    from prcore.store.uris import read_uri_bytes

    refs, records, thumbs = [], [], {}
    try:
        refs = [thumbnail_uri(read_uri_bytes(u)) for u in job.instance_images]
    except Exception as exc:  # a broken reference is itself shown by the failure
        log.warning("run report: references of %s: %s", job.subject_id, exc)
    try:
        records = None if r.error or r.leased_by else _catalogued_records(store, job)
        if records is None:  # no current catalogue to trust: the images as the store lists them, their sidecars read
            records = finished_records(store, refresh_done(store, job))
        records = records[:MAX_IMAGES_PER_SUBJECT]
        thumbs = {rec.key: thumbnail_uri(store.get(rec.key)) for rec in records}
    except Exception as exc:
        log.warning("run report: images of %s: %s", job.subject_id, exc)
    return {"subject_id": r.subject_id, "result": r, "references": refs, "records": records, "thumbs": thumbs}


def _catalogued_records(store: Any, job: SubjectJob) -> list[Any] | None:
    """The records of the job's finished images, in request order, from the subject's catalogue file (one GET,
    page checksums verified), which a subject that ended well rewrote last from the store; None when it has
    none or it is damaged (the caller reads the sidecars)."""
    from prcore.outputs.catalog import CatalogCorruptError, catalog_records, read_subject_catalog

    try:
        frame = read_subject_catalog(store, job.subject_id)
    except CatalogCorruptError:
        return None
    if frame is None:
        return None
    by_key = {rec.key: rec for rec in catalog_records(frame)}
    return [by_key[key] for request in job.requests for key in request.keys if key in by_key]


def write_report(store: Any, run_id: str, summary: dict[str, Any], jobs: Sequence[SubjectJob],
                 results: Sequence[SubjectResult]) -> str:
    return write_run_report(store, run_id, summary, report_subjects(store, jobs, results))
