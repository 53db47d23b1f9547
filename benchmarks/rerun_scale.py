"""The rerun of an unchanged manifest at 1,000 and 10,000 subjects against the local S3 server: seconds
and S3 requests by kind, the store-side steps of ``nightly-batch`` when nothing is left to do.

    .venv/bin/python benchmarks/rerun_scale.py [--subjects 1000,10000] [--prompts 1] [--images 2] [--old-sample 400]

For each size it writes, to moto's S3 server (started here on 127.0.0.1), a finished night as prcore
writes it, without a GPU or Prefect: a manifest of ``--subjects`` x ``--prompts`` rows of ``--images``
images (a local Parquet file), every image's PNG and JSON sidecar (``prcore.outputs.sidecar.write_image``,
an 8x8 PNG, the sidecar of a realistic record), each subject's catalogue file (``catalog_bytes`` of
those records) and the snapshot (``write_snapshot``). Then it times, each once, what a rerun does:

* ``plan``: load the manifest and plan it against the store (the listing of ``images/`` that marks what
  is done: one LIST page per 1,000 keys);
* ``catalogue checks``: :func:`prcore.pipeline.subject.subjects_with_work` on the planned jobs (must pick
  none);
* ``snapshot``: :func:`prcore.pipeline.catalog.refresh_catalog_snapshot` (nothing changed: not rewritten);
* ``old checks``: the per-subject check earlier versions ran for every subject
  (:func:`~prcore.pipeline.subject.catalog_is_current`, 16 at a time) on ``--old-sample`` subjects,
  extrapolated to all (labelled).

Requests are counted by S3 operation from botocore's ``before-call`` event. moto lists a page by scanning
and sorting every key of the bucket, so a page costs more as the bucket grows (real S3 does not); the
store is therefore kept small per subject (``--prompts 1 --images 2`` by default) and the listing's
pages at the production shape (25 x 4 images: 200 objects a subject) are given as a count.
The last line is ``rerun_scale_seconds=<x>``: plan + checks + snapshot at the largest size.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import polars as pl  # noqa: E402
from catalog_scale import moto_server, subject_records  # noqa: E402
from PIL import Image  # noqa: E402

from prcore.data.load import load_manifest  # noqa: E402
from prcore.data.plan import plan  # noqa: E402
from prcore.outputs.catalog import catalog_bytes, catalog_frame, write_snapshot  # noqa: E402
from prcore.outputs.sidecar import write_image  # noqa: E402
from prcore.pipeline.catalog import refresh_catalog_snapshot  # noqa: E402
from prcore.pipeline.subject import catalog_is_current, subjects_with_work  # noqa: E402
from prcore.store.keys import catalog_key  # noqa: E402
from prcore.store.storage import S3Store  # noqa: E402


def write_manifest(path: Path, n: int, prompts: int, images: int) -> str:
    rows = [{"subject_id": f"subj-{s:05d}", "instance_images": [f"s3://inputs/subj-{s:05d}/{k}.jpg" for k in range(3)],
             "class_noun": "handbag", "prompt": f"a photo of {{subject}} scene {p}", "prompt_id": f"p{p:03d}", "num_images": images}
            for s in range(n) for p in range(prompts)]
    pl.DataFrame(rows).write_parquet(path)
    return str(path)


def populate(store: Any, manifest: str, workers: int = 16) -> int:
    """Every image (PNG + sidecar), catalogue file and the snapshot of a finished night; returns the image count."""
    jobs = plan(load_manifest(manifest), store=None)
    rng = random.Random(0)
    template = subject_records("x", 1, 1, rng)[0]

    def subject(job: Any) -> int:
        records = []
        for r in job.requests:
            for i, key in enumerate(r.keys):
                pixels = bytes(random.Random(key).getrandbits(8) for _ in range(8 * 8 * 3))
                record = replace(template, subject_id=job.subject_id, prompt_id=r.prompt_id, req_fp=r.req_fp, index=i, key=key,
                                 seed=r.seeds[i], extra={"meta_sku": f"SKU-{job.subject_id}"})
                records.append(write_image(store, record, Image.frombytes("RGB", (8, 8), pixels)))
        store.put(catalog_key(job.subject_id), catalog_bytes(catalog_frame(records)), content_type="application/vnd.apache.parquet")
        return len(records)

    with ThreadPoolExecutor(workers) as pool:
        n = sum(pool.map(subject, jobs))
    write_snapshot(store)
    return n


def counting(store: Any) -> Counter:
    calls: Counter = Counter()
    store.exists("probe")  # the first call: from now on the store uses its retrying client
    store.client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return calls


def step(label: str, calls: Counter, fn: Any) -> tuple[float, Counter, Any]:
    calls.clear()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    used = Counter(calls)
    print(f"  {label}: {dt:.2f}s, {sum(used.values())} request(s) {dict(used)}", flush=True)
    return dt, used, out


def one_size(n: int, args: argparse.Namespace, endpoint: str, tmp: Path) -> float:
    import boto3

    bucket = f"rerun-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    store = S3Store(f"s3://{bucket}/out")
    manifest = write_manifest(tmp / f"m{n}.parquet", n, args.prompts, args.images)
    t = time.perf_counter()
    images = populate(store, manifest)
    print(f"{n:,} subjects x {args.prompts} x {args.images} = {images:,} images ({2 * images + n + 1:,} objects) written in "
          f"{time.perf_counter() - t:.0f}s", flush=True)
    calls = counting(store)
    t_plan, used_plan, jobs = step("plan (load + plan + listing of images/)", calls, lambda: plan(load_manifest(manifest), store=store))
    t_check, used_check, todo = step("catalogue checks (subjects_with_work)", calls, lambda: subjects_with_work(store, jobs))
    assert not todo, f"an unchanged store picked {len(todo)} subject(s)"
    t_snap, used_snap, snap = step("snapshot (refresh_catalog_snapshot)", calls, lambda: refresh_catalog_snapshot(store))
    assert snap is not None and not snap.written
    sample = [j.subject_id for j in jobs[: args.old_sample]]
    t_old, used_old, current = step(f"old per-subject checks, {len(sample)} subjects", calls, lambda: list(
        ThreadPoolExecutor(16).map(lambda sid: catalog_is_current(store, sid), sample)))
    assert all(current)
    total = t_plan + t_check + t_snap
    pages_full = -(-n * 25 * 4 * 2 // 1000)
    print(f"{n:,} subjects: rerun {total:.1f}s (plan {t_plan:.1f}, checks {t_check:.2f}, snapshot {t_snap:.2f}); "
          f"requests {sum((used_plan + used_check + used_snap).values())} = plan {sum(used_plan.values())} + checks "
          f"{sum(used_check.values())} + snapshot {sum(used_snap.values())}; the old checks: {t_old / len(sample) * n:.1f}s and "
          f"{sum(used_old.values()) // len(sample) * n:,} requests for {n:,} subjects (extrapolated from {len(sample)}); "
          f"at 25 x 4 images a subject the listing of images/ is {pages_full:,} pages", flush=True)
    return total


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", default="1000,10000")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--old-sample", type=int, default=400)
    args = ap.parse_args()
    sizes = [int(s) for s in args.subjects.split(",")]
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint:
        import os

        os.environ["AWS_ENDPOINT_URL"] = endpoint
        last = 0.0
        for n in sizes:
            last = one_size(n, args, endpoint, Path(tmp))
    print(f"rerun_scale_seconds={last:.1f}")


if __name__ == "__main__":
    main()
