"""A shard's seconds from start to first model work, for a small and a catalogue-size manifest.

For each ``--subjects`` size (default 10 and 10,000; ``--prompts`` 25 x 4 images, 2 instance images
per subject, real PNG files) the parent's side runs once, as the nightly flow does before it
submits deployment shards: describe the manifest (``manifest_identity``), load + validate + plan +
check the instance images of every subject with work left, write one plan file per shard of
``--per-shard`` subjects. Then shard 0's start is timed in a fresh process, as a shard is (after one
warm-up, the best of ``--repeats``, best of ``--rounds`` processes with the sizes alternating: the
machine is shared, and milliseconds drown in its noise; ``before`` at over 1,000 subjects: once), up to where the
model would load, the same three ways for every size:

- ``plan file``: read its plan file (checked against the manifest), then per subject what
  ``run_subject`` does before training: list ``images/{subject_id}/`` (``refresh_done``) and read
  its instance images.
- ``by hand``: a shard started without a plan file: plan its own subjects from the manifest (their
  rows validated, prefixes listed, images checked), then the same per-subject steps.
- ``before``: what every shard did before plan files: plan the whole manifest and check the
  instance images of every pending subject, then keep its own.

Listings of the store and instance-image files opened (Python audit hook) are counted per way and
split into the shard's own subjects and the others'. No GPU and no model are involved.

    python benchmarks/shard_start.py                         # ~2 min on 2 cores
    python benchmarks/shard_start.py --subjects 10 1000      # quick

Last line: ``shard_start_ratio_plan_file=<seconds at the largest size / seconds at the smallest>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str) and args[0].endswith(".png"):
        OPENED.append(args[0])


def counting_store(root: Path):
    """The real folder store, recording every listing's prefix."""
    from prcore.store.storage import LocalStore

    class Counting(LocalStore):
        listed: list[str] = []

        def list(self, prefix: str = ""):
            self.listed.append(prefix)
            return super().list(prefix)

        def list_info(self, prefix: str = ""):
            self.listed.append(prefix)
            return super().list_info(prefix)

    return Counting(root)


def write_manifest(folder: Path, subjects: int, prompts: int) -> Path:
    import io

    import polars as pl
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buf, format="PNG")
    png = buf.getvalue()
    for s in range(subjects):
        d = folder / "subjects" / f"s{s:05d}"
        d.mkdir(parents=True)
        for k in range(2):
            (d / f"{k}.png").write_bytes(png)
    n = subjects * prompts
    sid = [f"s{i // prompts:05d}" for i in range(n)]
    frame = pl.DataFrame({"subject_id": sid, "instance_images": [[f"subjects/{s}/0.png", f"subjects/{s}/1.png"] for s in sid],
                          "class_noun": ["dog"] * n, "prompt": [f"a {{subject}} in scene {i % prompts}" for i in range(n)],
                          "prompt_id": [f"p{i % prompts}" for i in range(n)], "num_images": [4] * n})
    path = folder / "manifest.parquet"
    frame.write_parquet(path)
    return path


def before_model(store, jobs) -> None:
    """What ``run_subject`` does per subject before training: re-mark what is done, read the inputs."""
    from prcore.pipeline.subject import read_subject_inputs, refresh_done

    for job in jobs:
        refresh_done(store, job)
        read_subject_inputs(job).check_images()


def shard_side(way: str, manifest: str, store_root: str, plan_key: str, own: list[str], cache_dir: str, repeats: int) -> dict:
    """Shard 0's start, timed in a fresh process (as a shard is: the parent's plan is not in memory)."""
    from prcore.pipeline.models import EMBEDDED_TINY
    from prcore.pipeline.settings import RunSettings
    from prcore.pipeline.shards import read_shard_plan, settings_fingerprint
    from prcore.pipeline.subject import plan_jobs

    sys.addaudithook(_audit)
    store = counting_store(Path(store_root))
    settings = RunSettings(cache_dir=cache_dir)
    kw = dict(model_id=EMBEDDED_TINY, defaults=settings.generation, cache_dir=settings.cache_path())

    def from_plan():
        got, why = read_shard_plan(store, plan_key, manifest=manifest, subject_ids=own, settings_fp=settings_fingerprint(settings))
        assert got is not None, why
        return got

    def by_hand():
        return plan_jobs(manifest, store, subject_ids=own, check_images=True, **kw)

    def before():
        return [j for j in plan_jobs(manifest, store, check_images=True, **kw) if j.subject_id in set(own)]

    fn = {"plan file": from_plan, "by hand": by_hand, "before": before}[way]
    before_model(store, fn())  # warm-up (imports, first touches of the file system): every size is timed warm
    times = []
    for _ in range(repeats):
        store.listed.clear()
        OPENED.clear()
        t = time.perf_counter()
        before_model(store, fn())
        times.append(time.perf_counter() - t)
    mine = tuple(f"/{s}/" for s in own)
    other_lists = [p for p in store.listed if p.startswith("images") and not any(p.startswith(f"images{m}") for m in mine)]
    return {"seconds": min(times), "median": statistics.median(times), "listings_other": len(other_lists), "listings": len(store.listed),
            "images_opened_other": sum(not any(m in p for m in mine) for p in OPENED), "images_opened": len(OPENED)}


def parent_side(subjects: int, args, tmp: Path) -> dict:
    """The parent's side, as the nightly flow does it before submitting deployment shards."""
    from prcore.data.load import manifest_identity
    from prcore.pipeline.models import EMBEDDED_TINY
    from prcore.pipeline.settings import RunSettings
    from prcore.pipeline.shards import settings_fingerprint, write_shard_plans
    from prcore.pipeline.subject import check_pending_images, plan_jobs
    from prcore.pipeline.subject import shard as make_shards

    folder = tmp / f"m{subjects}"
    manifest = str(write_manifest(folder, subjects, args.prompts))
    store = counting_store(tmp / f"out{subjects}")
    settings = RunSettings(cache_dir=str(tmp / "cache"))
    t0 = time.perf_counter()
    fp = manifest_identity(manifest)
    jobs = plan_jobs(manifest, store, model_id=EMBEDDED_TINY, defaults=settings.generation, cache_dir=settings.cache_path())
    planned = time.perf_counter() - t0
    t1 = time.perf_counter()
    check_pending_images(jobs, manifest)
    checked = time.perf_counter() - t1
    by_id = {j.subject_id: j for j in jobs}
    shards = make_shards(list(by_id), args.per_shard)
    t2 = time.perf_counter()
    keys = write_shard_plans(store, "bench", [[by_id[s] for s in ids] for ids in shards], manifest=manifest, manifest_fp=fp,
                             settings_fp=settings_fingerprint(settings))
    written = time.perf_counter() - t2
    return {"subjects": subjects, "rows": subjects * args.prompts, "parent_plan_s": planned, "parent_image_check_s": checked,
            "parent_plan_files_s": written, "shards": len(shards),
            "shard_args": (manifest, str(store.root), keys[0], shards[0], settings.cache_dir)}


WAYS = ("plan file", "by hand", "before")


def main(argv: list[str] | None = None) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[10, 10_000])
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--per-shard", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=3, help="fresh shard processes per size and way, sizes alternating")
    args = ap.parse_args(argv)
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        results = [parent_side(n, args, Path(tmp)) for n in args.subjects]
        for r in results:
            print(f"{r['subjects']:,} subjects ({r['rows']:,} rows, {r['shards']:,} shards), parent: describe + load + validate + "
                  f"plan {r['parent_plan_s']:.2f}s, image check {r['parent_image_check_s']:.2f}s, "
                  f"plan files {r['parent_plan_files_s']:.2f}s")
        for round_ in range(args.rounds):
            for r in results if round_ % 2 == 0 else results[::-1]:
                for way in WAYS:
                    slow = way == "before" and r["subjects"] > 1000
                    if slow and round_:
                        continue
                    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                        got = pool.submit(shard_side, way, *r["shard_args"], 1 if slow else args.repeats).result()
                    if way not in r or got["seconds"] < r[way]["seconds"]:
                        r[way] = got
    for r in results:
        print(f"{r['subjects']:,} subjects:")
        for way in WAYS:
            m = r[way]
            print(f"  shard start, {way:9s}: {m['seconds'] * 1000:8.1f} ms; listings {m['listings']} ({m['listings_other']} of "
                  f"other subjects); instance images opened {m['images_opened']} ({m['images_opened_other']} of other subjects)")
    small, large = results[0], results[-1]
    for way in WAYS:
        print(f"ratio {way}: {large[way]['seconds'] / small[way]['seconds']:.2f}x "
              f"({large['subjects']:,} vs {small['subjects']:,} subjects)")
    print(f"shard_start_ratio_plan_file={large['plan file']['seconds'] / small['plan file']['seconds']:.2f}")


if __name__ == "__main__":
    main()
