"""Run records: one row per subject, shard records, the failure report, the run summary, and their
markdown for Prefect artifacts. Written under ``runs/{run_id}/`` (keys: ``prcore.store.keys``)."""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prcore.data.fingerprint import json_safe
from prcore.store.keys import failures_key, summary_key


@dataclass
class SubjectResult:
    """One row of the run table."""

    subject_id: str
    requests: int = 0
    images: int = 0  # images the manifest asks for
    generated: int = 0
    skipped: int = 0
    failed: int = 0  # images not produced because of an error
    seconds: float = 0.0
    model_seconds: float = 0.0  # training steps + sampling
    lora_fp: str | None = None
    lora_source: str | None = None
    contact_sheet: str | None = None
    qc_failed: int = 0
    error: str | None = None
    step: str | None = None
    worker: dict[str, Any] = field(default_factory=dict)
    leased_by: str | None = None  # skipped: this run id held the subject's lease (it does the work)
    damaged: list[str] = field(default_factory=list)  # stored files found damaged before use, and remade

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Failure:
    subject_id: str
    step: str
    error: str
    error_type: str
    run_id: str = ""
    shard: int | None = None
    traceback: str = ""


@dataclass
class ShardRecord:
    run_id: str
    shard: int
    subjects: list[SubjectResult]
    worker: dict[str, Any]
    started: str
    finished: str
    seconds: float

    def to_json(self) -> bytes:
        return json.dumps(json_safe(asdict(self)), indent=1, default=str, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardRecord:
        raw = json.loads(data)
        raw["subjects"] = [SubjectResult(**s) for s in raw["subjects"]]
        return cls(**raw)


def failure_from(exc: BaseException, *, subject_id: str, step: str, run_id: str = "", shard: int | None = None) -> Failure:
    """A failure record: the error's one-line message (no credentials: messages come from our own
    error types or library exceptions, never from the environment) and a short traceback."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))
    return Failure(subject_id=subject_id, step=step, error=message[:2000], error_type=exc.__class__.__name__,
                   run_id=run_id, shard=shard, traceback=tb[-4000:])


def put_json(store, key: str, obj: Any) -> str:
    text = json.dumps(json_safe(json.loads(json.dumps(obj, default=_json_default))), indent=1, allow_nan=False)  # NaN/inf -> null
    store.put(key, text.encode(), content_type="application/json")
    return key


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def write_failure_report(store, run_id: str, failures: Sequence[Failure]) -> str:
    """``runs/{run_id}/failures.json``: one entry per failed subject (subject, step, error)."""
    return put_json(store, failures_key(run_id),
                    {"run_id": run_id, "failed_subjects": len(failures), "failures": [asdict(f) for f in failures]})


def write_summary(store, run_id: str, summary: Mapping[str, Any]) -> str:
    return put_json(store, summary_key(run_id), dict(summary))


def summarize(results: Sequence[SubjectResult]) -> dict[str, Any]:
    """Totals over a run's subject rows."""
    return {
        "subjects": len(results),
        "failed_subjects": sum(1 for r in results if not r.ok),
        "requests": sum(r.requests for r in results),
        "images": sum(r.images for r in results),
        "generated": sum(r.generated for r in results),
        "skipped": sum(r.skipped for r in results),
        "failed": sum(r.failed for r in results),
        "trained": sum(1 for r in results if r.lora_source == "trained"),
        "model_seconds": round(sum(r.model_seconds for r in results), 3),
        "qc_failed": sum(r.qc_failed for r in results),
        "leased": sum(1 for r in results if r.leased_by),
        "damaged": sum(len(r.damaged) for r in results),  # stored files that did not match their record: remade
    }


def table_rows(results: Sequence[SubjectResult]) -> list[dict[str, Any]]:
    """The run table: subject, requests, generated, skipped, failed, seconds (+ LoRA and error)."""
    return [
        {
            "subject": r.subject_id,
            "requests": r.requests,
            "generated": r.generated,
            "skipped": r.skipped,
            "failed": r.failed,
            "seconds": round(r.seconds, 2),
            "qc_failed": r.qc_failed,
            "lora": f"{r.lora_source or '-'} {r.lora_fp or ''}".strip(),
            "error": f"{r.step}: {r.error}" if r.error else (f"leased by run {r.leased_by}" if r.leased_by else ""),
        }
        for r in results
    ]


def artifact_link(store, key: str) -> tuple[str, str | None]:
    """(text, href) for a key shown in a Prefect artifact, carrying no credentials by default:

    - ``PRCORE_PUBLIC_BASE_URL`` set (an S3 static website / CDN / reverse proxy in front of the output
      root, behind your own access control): ``{base}/{key}``, an image the UI can show;
    - ``PRCORE_ARTIFACT_PRESIGN_S`` set (opt-in): a presigned link valid that many seconds. It is a bearer
      link (it carries the access key id, and the session token under STS) readable by every user of
      the Prefect UI until it expires;
    - otherwise no href: the object's address (``s3://bucket/key`` or the local path), as text.
    """
    import os

    base = os.environ.get("PRCORE_PUBLIC_BASE_URL", "").strip()
    if base:
        return key, f"{base.rstrip('/')}/{key}"
    presign = os.environ.get("PRCORE_ARTIFACT_PRESIGN_S", "").strip()
    address = f"{store.uri.rstrip('/')}/{key}"
    if presign.isdigit() and int(presign) > 0 and address.startswith("s3://"):
        return address, store.url(key, expires=int(presign))
    return address, None


def contact_sheets_markdown(store, run_id: str, results: Sequence[SubjectResult], report_key: str | None = None) -> str:
    """Markdown with one contact sheet per subject; links from :func:`artifact_link` (no credentials
    unless presigning is chosen)."""
    lines = [f"# Contact sheets, run `{run_id}`", "", f"Output: `{store.uri}`", ""]
    if report_key:
        text, href = artifact_link(store, report_key)
        lines += [f"Run report: [{text}]({href})" if href else f"Run report: `{text}` (open it from the store)", ""]
    for r in results:
        lines.append(f"## {r.subject_id}")
        if r.contact_sheet:
            text, href = artifact_link(store, r.contact_sheet)
            if href:
                lines.append(f"![{r.subject_id}]({href})")
                lines.append(f"[{r.contact_sheet}]({href})")
            else:
                lines.append(f"`{text}`")
        else:
            lines.append("_no images_" + (f" (failed at {r.step}: {r.error})" if r.error else ""))
        lines.append("")
    return "\n".join(lines)


def failures_markdown(run_id: str, failures: Sequence[Failure]) -> str:
    lines = [f"# Failures, run `{run_id}`", "", "| subject | step | error |", "| --- | --- | --- |"]
    for f in failures:
        lines.append(f"| {f.subject_id} | {f.step} | {f.error_type}: {f.error.replace('|', '/')} |")
    return "\n".join(lines)
