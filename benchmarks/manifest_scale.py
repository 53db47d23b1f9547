"""How long load + validate + plan take on a catalogue-scale manifest.

    .venv/bin/python benchmarks/manifest_scale.py [--subjects 10000] [--prompts 100] [--done 100000]

Builds a manifest of subjects x prompts rows (default 1,000,000) with 3 relative instance image
paths per subject, and an output folder in which ``--done`` images (PNG + sidecar) already exist,
spread over the first subjects. The setup is not timed. Timed: ``load_manifest`` +
``validate(check_images=False)`` + ``plan(store=LocalStore)``; the last line is
``manifest_scale_seconds=<x>``. Also printed (not part of the figure): the time to build every
ImageRequest object of every job, which the flow does per subject as it processes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prcore.data.load import load_manifest
from prcore.data.plan import plan
from prcore.data.validate import validate  # noqa: E402
from prcore.store.storage import LocalStore  # noqa: E402


def build_manifest(path: Path, n_subjects: int, n_prompts: int) -> None:
    prompts = [f"a {{subject}} in scene number {p}" for p in range(n_prompts)]
    subjects = pl.DataFrame({"subject_id": [f"subj-{s:05d}" for s in range(n_subjects)]}).with_columns(
        pl.concat_list(*[pl.format("images/{}/{}.jpg", pl.col("subject_id"), pl.lit(i)) for i in range(3)]).alias("instance_images"),
        pl.lit("dog").alias("class_noun"),
    )
    df = subjects.join(pl.DataFrame({"prompt": prompts}), how="cross")
    df.write_parquet(path)


def make_done(root: Path, manifest: Path, n_done: int) -> int:
    """Write n_done finished images (tiny PNG stand-in + sidecar) for the first requests of the plan."""
    jobs = plan(load_manifest(manifest), check=False)
    written = 0
    for job in jobs:
        for req in job.requests:
            for key in req.keys:
                if written >= n_done:
                    return written
                path = root / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"\x89PNG")
                path.with_suffix(".json").write_bytes(b"{}")
                written += 1
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--done", type=int, default=100_000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp_path = Path(tmp)
        manifest = tmp_path / "manifest.parquet"
        out = tmp_path / "out"
        t = time.perf_counter()
        build_manifest(manifest, args.subjects, args.prompts)
        written = make_done(out, manifest, args.done)
        print(f"setup: {args.subjects * args.prompts} rows, {written} done images written in {time.perf_counter() - t:.1f}s (not timed)")

        c0 = time.process_time()
        t0 = time.perf_counter()
        m = load_manifest(manifest)
        t1 = time.perf_counter()
        errors = validate(m, check_images=False)
        t2 = time.perf_counter()
        jobs = plan(m, store=LocalStore(out), check=False)
        t3 = time.perf_counter()
        cpu = time.process_time() - c0
        assert not errors, errors[:5]
        n_images = sum(j.n_images for j in jobs)
        n_done = sum(j.n_done for j in jobs)
        assert n_done == written, (n_done, written)
        print(f"rows={m.df.height} subjects={len(jobs)} images={n_images} done={n_done} todo={n_images - n_done}")
        load1, load5, _ = os.getloadavg()
        print(f"load={t1 - t0:.2f}s validate={t2 - t1:.2f}s plan={t3 - t2:.2f}s (cpu cores: {os.cpu_count()}, load average 1/5 min: {load1:.1f}/{load5:.1f}, process cpu time: {cpu:.2f}s)")
        t4 = time.perf_counter()
        n_req = sum(len(j.requests) for j in jobs)
        print(f"materialising all {n_req} ImageRequest objects (done per subject by the flow; not in the figure): {time.perf_counter() - t4:.2f}s")
        print(f"manifest_scale_seconds={t3 - t0:.2f}")


if __name__ == "__main__":
    main()
