"""A shard's plan file: the jobs of its subjects as the parent run planned them.

With deployment fan-out the parent (``nightly-batch``) loads, validates, plans and image-checks the
manifest once, then writes one file per shard, ``runs/{run_id}/shard_plans/{i:04d}.json``
(:func:`prcore.store.keys.shard_plan_key`), holding exactly that shard's :class:`SubjectJob` records
and what they were planned from: the manifest's URI and :func:`prcore.data.load.manifest_identity`
(taken before the parent loaded it) and the fingerprint of the run's settings. A shard reads its
file instead of the manifest (:func:`read_shard_plan`), so it touches nothing of other subjects;
when the file is missing, unreadable, for other subjects or settings, or the manifest changed since,
the shard is told why and plans its own subjects from the manifest as it is now.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prcore.data.fingerprint import fingerprint
from prcore.data.plan import SubjectJob
from prcore.store.keys import shard_plan_key

PLAN_FORMAT = 1


def settings_fingerprint(settings: Any) -> str:
    """The run's settings (a :class:`~prcore.pipeline.settings.RunSettings`) as one fingerprint, as
    the parent and each shard see them (the value travels as JSON to the shards)."""
    return fingerprint("run-settings", 1, settings.model_dump(mode="json"))


def shard_plan_document(run_id: str, shard_index: int, jobs: Sequence[SubjectJob], *, manifest: str, manifest_fp: str,
                        settings_fp: str) -> dict[str, Any]:
    """The content of shard ``shard_index``'s plan file."""
    return {"format": PLAN_FORMAT, "run_id": run_id, "shard": shard_index, "manifest": manifest, "manifest_fp": manifest_fp,
            "settings_fp": settings_fp, "subject_ids": [j.subject_id for j in jobs], "jobs": [j.to_record() for j in jobs]}


def write_shard_plans(store: Any, run_id: str, shards: Sequence[Sequence[SubjectJob]], *, manifest: str, manifest_fp: str,
                      settings_fp: str, workers: int = 8) -> list[str]:
    """Write every shard's plan file (``workers`` at once); returns their keys, by shard index."""

    def put(i: int) -> str:
        key = shard_plan_key(run_id, i)
        doc = shard_plan_document(run_id, i, shards[i], manifest=manifest, manifest_fp=manifest_fp, settings_fp=settings_fp)
        store.put(key, json.dumps(doc, separators=(",", ":")).encode(), content_type="application/json")
        return key

    with ThreadPoolExecutor(max(1, min(workers, len(shards) or 1))) as pool:
        return list(pool.map(put, range(len(shards))))


def read_shard_plan(store: Any, key: str, *, manifest: str, subject_ids: Sequence[str],
                    settings_fp: str) -> tuple[list[SubjectJob] | None, str]:
    """``(jobs, "")`` when ``key`` holds the jobs of exactly ``subject_ids`` planned from ``manifest``
    as it is now (same files, sizes and modification times or ETags) with these settings; else
    ``(None, why)``, the reason in one line. Reads one object and describes the manifest's files
    (:func:`~prcore.data.load.manifest_identity`); opens no image and lists no image prefix."""
    from prcore.data.load import manifest_identity
    from prcore.store.storage import KeyNotFoundError

    try:
        doc = json.loads(store.get(key))
    except KeyNotFoundError:
        return None, f"shard plan {key} is not in the store"
    except ValueError as exc:
        return None, f"shard plan {key} does not read as JSON ({type(exc).__name__})"
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        return None, f"shard plan {key} is not a format-{PLAN_FORMAT} plan"
    expected = {"manifest": manifest, "subject_ids": list(subject_ids), "settings_fp": settings_fp}
    for name, value in expected.items():
        if doc.get(name) != value:
            return None, f"shard plan {key} was made for other {name.removesuffix('_fp')} ({doc.get(name)!r}, this shard: {value!r})"
    try:
        now = manifest_identity(manifest)
    except (OSError, ValueError) as exc:
        return None, f"manifest {manifest} cannot be described ({type(exc).__name__}: {exc})"
    if doc.get("manifest_fp") != now:
        return None, f"manifest {manifest} changed since run {doc.get('run_id')} planned shard {doc.get('shard')}"
    try:
        jobs = [SubjectJob.from_record(r) for r in doc["jobs"]]
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"shard plan {key} holds a job that does not read ({type(exc).__name__}: {exc})"
    if [j.subject_id for j in jobs] != list(subject_ids):
        return None, f"shard plan {key} holds the jobs of other subjects"
    return jobs, ""
