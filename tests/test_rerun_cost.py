"""What a rerun of an unchanged manifest asks the store: a fixed number of requests for any number of
subjects (listings and the snapshot), never a HEAD, GET and LIST per subject; and still every damaged,
missing or stale catalogue file, dirty marker and changed image is caught."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image
from prcore_testing import record_for
from prefect_harness import manifest_rows, subject_image, write_local_manifest

from prcore.data.load import load_manifest
from prcore.data.plan import plan
from prcore.outputs.catalog import write_snapshot
from prcore.outputs.sidecar import write_image
from prcore.pipeline import subject as S
from prcore.store.keys import LORA_RECORD_FILE, LORA_WEIGHTS_FILE, catalog_key, dirty_key
from prcore.store.storage import open_store


def _s3_calls(store) -> Counter:
    """Every S3 API call the store's client makes from now on, by operation (pages of a listing each count)."""
    calls: Counter = Counter()
    store.exists("probe")  # the first call made: from now on the store uses its retrying client
    store.client.meta.events.register("before-call.s3", lambda model, **_: calls.update([model.name]))
    return calls


def _night(tmp_path, store, n: int) -> str:
    """A manifest of ``n`` subjects (2 images each) whose images, catalogue files and snapshot are all in ``store``."""
    manifest = write_local_manifest(tmp_path / f"m{n}", manifest_rows(n, prompts=1, num_images=2), subjects=n)
    for job in plan(load_manifest(str(manifest)), store=store):
        for r in job.requests:
            for i in range(r.num_images):
                write_image(store, record_for(r, i), Image.open(io.BytesIO(subject_image(i))))
    for job in plan(load_manifest(str(manifest)), store=store):
        S.write_subject_catalog(store, job)
    write_snapshot(store)
    return str(manifest)


def _rerun(store, manifest: str, calls: Counter) -> tuple[list[str], Counter]:
    jobs = plan(load_manifest(manifest), store=store)
    calls.clear()
    picked = [j.subject_id for j in S.subjects_with_work(store, jobs)]
    return picked, Counter(calls)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_a_rerun_asks_the_store_the_same_few_requests_for_4_or_24_subjects(s3_server, s3_bucket, tmp_path):
    """4 and 24 subjects, nothing changed: one LIST of state/dirty/, one of catalog/, one GET of the snapshot,
    whatever the number of subjects (before: a HEAD, a GET and a LIST per subject)."""
    seen = {}
    for n in (4, 24):
        store = open_store(f"s3://{s3_bucket}/n{n}")
        calls = _s3_calls(store)
        manifest = _night(tmp_path, store, n)
        picked, seen[n] = _rerun(store, manifest, calls)
        assert picked == []
    assert seen[4] == seen[24] == Counter({"ListObjectsV2": 2, "GetObject": 1})


def test_a_rerun_still_catches_one_subjects_damaged_catalogue_file_and_changed_image_on_s3(s3_server, s3_bucket, tmp_path):
    """Of 8 idle subjects: a catalogue file with one flipped bit (same size: its ETag differs from the one the
    snapshot recorded, so it is read, and its checksums fail), a dirty marker, a PNG changed in place at the
    same size (the listing's MD5 is not the catalogue's) and a missing catalogue file are each picked, exactly
    those; only the damaged file costs per-subject requests; once rebuilt, the rerun picks nothing again."""
    store = open_store(f"s3://{s3_bucket}/out")
    calls = _s3_calls(store)
    manifest = _night(tmp_path, store, 8)
    key = catalog_key("s1")
    store.put(key, _flip(store.get(key), 40))
    store.put(dirty_key("s3"), b"{}")
    png = plan(load_manifest(manifest), store=store)[5].requests[0].keys[1]
    store.put(png, _flip(store.get(png), 60))
    store.delete(catalog_key("s6"))
    picked, used = _rerun(store, manifest, calls)
    assert picked == ["s1", "s3", "s5", "s6"]
    assert used == Counter({"ListObjectsV2": 2, "GetObject": 2, "HeadObject": 1})  # s1 alone: a HEAD and a GET

    store.delete(dirty_key("s3"))
    for job in plan(load_manifest(manifest), store=store):
        if job.subject_id in picked:
            S.write_subject_catalog(store, S.refresh_done(store, job))
    assert _rerun(store, manifest, calls)[0] == ["s5"]  # the changed PNG is work: made again by the run
    write_snapshot(store)
    assert _rerun(store, manifest, calls)[0] == ["s5"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_rerun_on_a_folder_catches_a_damaged_catalogue_file(tmp_path, damage):
    """A folder lists size, mtime and inode: a rewritten catalogue file is not the one the snapshot read,
    so it is read and its page checksums fail; it alone is picked."""
    store = open_store(str(tmp_path / "out"))
    manifest = _night(tmp_path, store, 5)
    key = catalog_key("s2")
    good = store.get(key)
    store.put(key, {"flip": _flip(good, 40), "truncate": good[: len(good) // 2], "garbage": b"not parquet"}[damage])
    assert [j.subject_id for j in S.subjects_with_work(store, plan(load_manifest(manifest), store=store))] == ["s2"]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_a_subjects_batches_sample_with_the_lora_verified_once_not_rechecked_in_the_store(prefect_api, tmp_path, tiny_sd_path,
                                                                                          monkeypatch):
    """One subject, 3 images in 3 denoising loops (``max_batch_images=1``): the store is asked about the LoRA
    once, before training (the GET that finds none), then only written; no loop re-reads, HEADs or lists it
    (before: a GET, a HEAD and a LIST per loop). Every image is made with it."""
    import flows.nightly
    from flows.nightly import nightly_batch
    from prcore.pipeline.settings import FanOut, RunSettings
    from prcore.store.storage import LocalStore

    calls: list[tuple[str, str]] = []

    class Counting(LocalStore):
        def get(self, key):
            calls.append(("get", key))
            return super().get(key)

        def exists(self, key):
            calls.append(("exists", key))
            return super().exists(key)

        def list_info(self, prefix=""):
            calls.append(("list", prefix))
            return super().list_info(prefix)

        def list(self, prefix=""):
            calls.append(("list", prefix))
            return super().list(prefix)

        def put(self, key, data, content_type=None, metadata=None):
            calls.append(("put", key))
            return super().put(key, data, content_type, metadata)

    manifest = write_local_manifest(tmp_path / "in", manifest_rows(1, prompts=1, num_images=3, steps=2), subjects=1)
    out = tmp_path / "out"
    monkeypatch.setattr(flows.nightly, "open_output", lambda uri: Counting(uri))
    settings = RunSettings.model_validate({"model": str(tiny_sd_path), "train": {"steps": 2}, "cache_dir": str(tmp_path / "cache"),
                                           "placement": {"device": "cpu", "dtype": "float32", "max_batch_images": 1}})
    state = nightly_batch(manifest=str(manifest), output=str(out), settings=settings, fan_out=FanOut(), return_state=True)
    assert state.is_completed(), state
    assert len(list((out / "images").rglob("*.png"))) == 3
    lora = [(op, key) for op, key in calls if key.startswith("loras/")]
    assert [op for op, _ in lora if op != "put"] == ["get"], lora
    assert {key.rsplit("/", 1)[-1] for op, key in lora if op == "put"} >= {LORA_RECORD_FILE, LORA_WEIGHTS_FILE}


def test_a_snapshot_of_an_earlier_version_is_checked_subject_by_subject_then_rewritten_once(tmp_path):
    """A snapshot without the files' versions (earlier versions wrote none): the rerun falls back to the
    per-subject check (same answer), and the next snapshot refresh rewrites it once, with the versions."""
    import polars as pl

    from prcore.outputs.catalog import catalog_sources, snapshot_bytes, snapshot_facts, sources_fingerprint
    from prcore.store.keys import CATALOG_SNAPSHOT_KEY

    store = open_store(str(tmp_path / "out"))
    manifest = _night(tmp_path, store, 3)
    sources = catalog_sources(store)
    frame = pl.read_parquet(io.BytesIO(store.get(CATALOG_SNAPSHOT_KEY)))
    store.put(CATALOG_SNAPSHOT_KEY, snapshot_bytes(frame, sources_fingerprint(sources), len(sources)))
    assert snapshot_facts(store) is None
    assert S.stale_catalogs(store, plan(load_manifest(manifest), store=store)) == (set(), ["s0", "s1", "s2"])
    assert S.subjects_with_work(store, plan(load_manifest(manifest), store=store)) == []
    assert write_snapshot(store).written and not write_snapshot(store).written
    assert S.stale_catalogs(store, plan(load_manifest(manifest), store=store)) == (set(), [])


def test_the_run_report_takes_a_finished_subjects_records_from_its_catalogue_file_not_its_sidecars(tmp_path):
    """The report's records of a subject that ended well: one GET of its catalogue file (the same records as its
    sidecars), no sidecar read; a failed subject's, or one whose catalogue file is damaged: from its sidecars."""
    from prcore.outputs.reports import SubjectResult
    from prcore.outputs.sidecar import read_sidecar
    from prcore.pipeline.report import report_subjects
    from prcore.store.storage import LocalStore

    class Reads(LocalStore):
        read: list[str] = []

        def get(self, key):
            Reads.read.append(key)
            return super().get(key)

    store = Reads(tmp_path / "out")
    manifest = _night(tmp_path, store, 3)
    jobs = plan(load_manifest(manifest), store=store)
    store.put(catalog_key("s2"), b"damaged")
    results = [SubjectResult("s0", requests=1, images=2, generated=2), SubjectResult("s1", requests=1, images=2, error="boom"),
               SubjectResult("s2", requests=1, images=2, generated=2)]
    Reads.read.clear()
    entries = {e["subject_id"]: e for e in report_subjects(store, jobs, results)}
    sidecars = [k for k in Reads.read if k.endswith(".json")]
    assert not any(k.startswith("images/s0/") for k in sidecars) and catalog_key("s0") in Reads.read
    assert sum(k.startswith("images/s1/") for k in sidecars) >= 2 and sum(k.startswith("images/s2/") for k in sidecars) >= 2
    keys = [k for r in jobs[0].requests for k in r.keys]
    assert entries["s0"]["records"] == [read_sidecar(store, k) for k in keys]
    assert all(len(e["records"]) == 2 and len(e["thumbs"]) == 2 for e in entries.values())
