"""A shard's plan file: the jobs of its subjects as the parent run planned them.

With deployment fan-out the parent (``nightly-batch``) loads, validates, plans and image-checks the
manifest once, then writes one file per shard, ``runs/{run_id}/shard_plans/{i:04d}.json``
(:func:`prcore.store.keys.shard_plan_key`), holding exactly that shard's :class:`SubjectJob` records
and what they were planned from: the manifest's URI and :func:`prcore.data.load.manifest_identity`
(taken before the parent loaded it) and the fingerprint of the run's settings. A shard reads its
file instead of the manifest (:func:`read_shard_plan`), so it touches nothing of other subjects;
when the file is missing, unreadable, for other subjects or settings, or the manifest changed since,
the shard is told why and plans its own subjects from the manifest as it is now.

How many subjects a shard gets, when the run does not say (``FanOut.subjects_per_shard=None``):
:func:`choose_subjects_per_shard`, from the number of subjects with work left, the GPU workers the
shards share and the measured fixed start of a shard (see docs/orchestration.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prcore.data.fingerprint import fingerprint
from prcore.data.plan import SubjectJob
from prcore.store.keys import shard_plan_key

PLAN_FORMAT = 1

# What the automatic shard size is chosen from (measured; docs/orchestration.md, "Shard size"):
SHARD_START_S = 35.0  # a shard's fixed start, GPU idle: the worker's next poll (5 s on average at Prefect's default
#                       10 s query interval), process + imports + plan file + lease to first GPU work (~6 s,
#                       benchmarks/night_scale.py on 2 shared cores), the base model's load (22 s, SDXL, GPU suite)
GPU_S_PER_STEP = 1.088  # one DCO step, SDXL bf16 on an H200 (README, "Measured on an H200")
GPU_S_PER_IMAGE = 3600 / 1864  # one image, same (1,864 images/h)
START_FRACTION = 0.05  # a shard's fixed start stays under this share of its GPU time
SHARDS_PER_WORKER = 4  # each GPU worker gets at least this many shards: the last ones end close together
MOST_SUBJECTS = 10  # a lost shard (crash, preemption) loses at most this many subjects of the night (~1.7 h of SDXL GPU)
MAX_SHARDS = 1_000  # flow runs per night: plan + submit of 1,000 shards took 40.7 s, 2,500 took 128.8 s


def subject_gpu_seconds(jobs: Sequence[SubjectJob], train_steps: Sequence[int]) -> float:
    """The mean GPU seconds of one subject with work left: its LoRA trained (``train_steps``, one per
    job) and its pending images sampled, at the reference speeds above (an upper bound when LoRAs are
    reused; the reference GPU is the slowest model on the fastest card measured, so faster models
    only make the fixed start a larger share: :data:`START_FRACTION` guards it)."""
    if not jobs:
        return 0.0
    total = sum(steps * GPU_S_PER_STEP + job.n_todo * GPU_S_PER_IMAGE for job, steps in zip(jobs, train_steps, strict=True))
    return total / len(jobs)


def choose_subjects_per_shard(subjects: int, workers: int, subject_gpu_s: float, *, start_s: float = SHARD_START_S) -> int:
    """Subjects per shard for ``subjects`` subjects with work left on ``workers`` GPU workers.

    The largest size that still gives every worker :data:`SHARDS_PER_WORKER` shards, at most
    :data:`MOST_SUBJECTS`; at least what keeps a shard's fixed start (``start_s``) under
    :data:`START_FRACTION` of its GPU time (``subject_gpu_s`` per subject) and the run under
    :data:`MAX_SHARDS` flow runs. The lower bounds win over the upper ones (cost before balance).
    """
    if subjects < 1:
        return 1
    balance = subjects // (max(workers, 1) * SHARDS_PER_WORKER)
    start_floor = math.ceil(start_s / (START_FRACTION * subject_gpu_s)) if subject_gpu_s > 0 else MOST_SUBJECTS
    count_floor = math.ceil(subjects / MAX_SHARDS)
    return max(1, min(balance, MOST_SUBJECTS), start_floor, count_floor)


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
