"""A shard works on its own subjects only: the parent plans once and writes each shard's plan file;
the shard (the real ``personalize-subject`` flow, tiny model, on Prefect's temporary local API)
lists only its subjects' prefixes and opens only their instance images. A stale plan (the manifest
edited after the parent planned) is noticed; a shard started by hand plans its own subjects only and
refuses bad input before any work.

What a shard touches is counted on the real thing: every listing of the real ``LocalStore`` (a
subclass that records the prefix, then lists), and every file Python opens (an audit hook), with the
other subjects' instance images deleted after the parent checked them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest
from prefect_harness import manifest_rows, write_local_manifest

from prcore.store.storage import LocalStore

SUBJECTS = 3
OPENED: list[str] = []  # every path Python opened while a test records (see _record_opens)
_RECORDING: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if _RECORDING and event == "open" and isinstance(args[0], (str, bytes, Path)):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only while _RECORDING holds a value


class CountingStore(LocalStore):
    """The real folder store, recording the prefix of every listing it makes."""

    listed: list[str] = []

    def list(self, prefix: str = ""):
        CountingStore.listed.append(prefix)
        return super().list(prefix)

    def list_info(self, prefix: str = ""):
        CountingStore.listed.append(prefix)
        return super().list_info(prefix)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def counting(monkeypatch):
    """The shard flow's output store is a :class:`CountingStore`; Python's file opens are recorded."""
    import flows.personalize

    monkeypatch.setattr(flows.personalize, "open_store", CountingStore)
    CountingStore.listed, OPENED[:] = [], []
    _RECORDING.append(True)
    yield
    _RECORDING.clear()


def settings_for(model: Path, cache: Path):
    from prcore.pipeline.settings import RunSettings

    return RunSettings.model_validate({"model": str(model), "train": {"steps": 2}, "cache_dir": str(cache),
                                       "placement": {"device": "cpu", "dtype": "float32"}})


def parent_plans(manifest: Path, out: Path, settings, run_id: str, shards: list[list[str]]) -> list[str]:
    """What the nightly flow does before it submits deployment shards: describe the manifest, plan and
    image-check it once, write one plan file per shard."""
    from prcore.data.load import manifest_identity
    from prcore.pipeline.shards import settings_fingerprint, write_shard_plans
    from prcore.pipeline.subject import plan_jobs

    store = LocalStore(out)
    manifest_fp = manifest_identity(str(manifest))
    jobs = plan_jobs(str(manifest), store, model_id=settings.model, defaults=settings.generation, check_images=True,
                     cache_dir=settings.cache_path(), target_modules=settings.train.target_modules)
    by_id = {j.subject_id: j for j in jobs}
    return write_shard_plans(store, run_id, [[by_id[s] for s in ids] for ids in shards], manifest=str(manifest),
                             manifest_fp=manifest_fp, settings_fp=settings_fingerprint(settings))


def run_shard_flow(manifest: Path, out: Path, settings, subject_ids: list[str], **params):
    from flows.personalize import personalize_subject

    return personalize_subject(manifest=str(manifest), output=str(out), subject_ids=subject_ids, settings=settings,
                               return_state=True, **params)


def others_touched(own: list[str], folder: Path) -> dict[str, list[str]]:
    """Listings that would return a key of a subject not in ``own``, and files opened under its folder."""
    others = [f"s{i}" for i in range(SUBJECTS) if f"s{i}" not in own]
    their_keys = [k for o in others for k in (f"images/{o}/p0/0123456789abcdef/0.png", f"loras/{o}/x/training.json",
                                               f"catalog/{o}.parquet", f"state/leases/{o}.json", f"state/dirty/{o}.json")]
    listings = [p for p in CountingStore.listed if any(k.startswith(p) for k in their_keys)]
    opened = [p for p in OPENED if any(str(folder / "subjects" / o) in p for o in others)]
    return {"listings": listings, "opened": opened}


def delete_instance_images(folder: Path, subjects: list[str]) -> None:
    for s in subjects:
        for png in (folder / "subjects" / s).glob("*.png"):
            png.unlink()


def image_pngs(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")) if (out / "images").exists() else []


def test_a_shard_with_its_plan_file_reads_nothing_of_other_subjects(prefect_api, counting, tmp_path, tiny_sd_path):
    folder = tmp_path / "in"
    manifest = write_local_manifest(folder, manifest_rows(SUBJECTS, prompts=1, num_images=1, steps=2), subjects=SUBJECTS)
    out, settings = tmp_path / "out", settings_for(tiny_sd_path, tmp_path / "cache")
    plans = parent_plans(manifest, out, settings, "20260101T000000Z-test", [["s0"], ["s1", "s2"]])
    assert plans == ["runs/20260101T000000Z-test/shard_plans/0000.json", "runs/20260101T000000Z-test/shard_plans/0001.json"]
    delete_instance_images(folder, ["s1", "s2"])  # checked by the parent; a shard of s0 must not need them
    CountingStore.listed, OPENED[:] = [], []

    state = run_shard_flow(manifest, out, settings, ["s0"], run_id="20260101T000000Z-test", plan=plans[0])

    assert state.is_completed(), state.message
    assert [p.split("/")[1] for p in image_pngs(out)] == ["s0"]
    assert others_touched(["s0"], folder) == {"listings": [], "opened": []}
    assert CountingStore.listed and all("s0" in p for p in CountingStore.listed if p.startswith("images"))
    assert any(str(folder / "subjects" / "s0") in p for p in OPENED)  # the recorder sees the shard's own reads


def test_a_plan_made_before_the_manifest_was_edited_is_noticed_and_the_shard_plans_again(prefect_api, counting, tmp_path,
                                                                                        tiny_sd_path):
    from prcore.pipeline.subject import plan_jobs

    folder = tmp_path / "in"
    rows = manifest_rows(SUBJECTS, prompts=1, num_images=1, steps=2)
    manifest = write_local_manifest(folder, rows, subjects=SUBJECTS)
    out, settings = tmp_path / "out", settings_for(tiny_sd_path, tmp_path / "cache")
    plans = parent_plans(manifest, out, settings, "20260101T000000Z-edit", [["s0"], ["s1", "s2"]])
    rows[0]["prompt"] = "a {subject} in the snow"  # s0's request changes after the parent planned
    pl.DataFrame(rows).write_parquet(manifest)
    edited = plan_jobs(str(manifest), None, model_id=settings.model, defaults=settings.generation)[0].requests[0].keys[0]
    CountingStore.listed, OPENED[:] = [], []

    state = run_shard_flow(manifest, out, settings, ["s0"], run_id="20260101T000000Z-edit", plan=plans[0])

    assert state.is_completed(), state.message
    assert image_pngs(out) == [edited]  # what the manifest says now, not the stale plan
    assert others_touched(["s0"], folder) == {"listings": [], "opened": []}


def test_a_shard_started_by_hand_plans_its_own_subjects_and_refuses_bad_input_first(prefect_api, counting, tmp_path,
                                                                                   tiny_sd_path):
    folder = tmp_path / "in"
    rows = manifest_rows(SUBJECTS, prompts=1, num_images=1, steps=2)
    rows[1]["num_images"] = 0  # s1's row (row 1) is bad: a shard of other subjects does not stop for it
    manifest = write_local_manifest(folder, rows, subjects=SUBJECTS)
    out, settings = tmp_path / "out", settings_for(tiny_sd_path, tmp_path / "cache")
    delete_instance_images(folder, ["s1"])
    CountingStore.listed, OPENED[:] = [], []

    state = run_shard_flow(manifest, out, settings, ["s2", "s0"])

    assert state.is_completed(), state.message
    assert sorted(p.split("/")[1] for p in image_pngs(out)) == ["s0", "s2"]
    touched = others_touched(["s0"], folder)
    assert [p for p in touched["listings"] if "s2" not in p] == [] and [p for p in touched["opened"] if "/s1/" in p] == []
    assert sorted(CountingStore.listed) == sorted(set(CountingStore.listed)) or all("s1" not in p for p in CountingStore.listed)

    # bad input is refused before any work: nothing is written for the subject
    bad = tmp_path / "bad"
    state = run_shard_flow(manifest, bad, settings, ["s1"])
    assert state.is_failed() and "row 1" in str(state.message) and "num_images" in str(state.message)
    assert not (bad / "images").exists() and not (bad / "loras").exists()
    state = run_shard_flow(manifest, bad, settings, ["s9"])
    assert state.is_failed() and "s9" in str(state.message) and not (bad / "images").exists()
    (folder / "subjects" / "s2" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    state = run_shard_flow(manifest, tmp_path / "bad2", settings, ["s2"])
    assert state.is_failed() and "1.png" in str(state.message) and not (tmp_path / "bad2" / "images").exists()


def test_a_job_written_to_a_plan_file_reads_back_as_planned(tmp_path):
    """Every field a shard uses survives the plan file: specs, overrides, QC thresholds, meta cells,
    params, seeds, keys and what was done; before and after the requests were built."""
    import json

    from prcore.data.load import load_manifest
    from prcore.data.plan import SubjectJob, plan
    from prcore.data.schema import GenerationDefaults

    rows = manifest_rows(2, prompts=3, num_images=2, steps=2)
    for r in rows:
        r.update(meta_batch="b7", train_target_modules=["to_q", "to_v"], qc_clip_t=0.2, seed=11 if r["prompt_id"] == "p1" else None)
    manifest = write_local_manifest(tmp_path / "in", rows, subjects=2)
    jobs = plan(load_manifest(manifest), defaults=GenerationDefaults(), base_model="m")
    for built in (False, True):
        for job in jobs:
            if built:
                job.requests[1].done[1] = True
            record = json.loads(json.dumps(job.to_record()))
            back = SubjectJob.from_record(record)
            assert back.requests == job.requests and record["requests"][0]["meta"] == {"meta_batch": "b7"}
            assert (back.subject_fp, back.train_overrides, back.qc_thresholds, back.instance_images, back.n_done) == (
                job.subject_fp, {"target_modules": ("to_q", "to_v")}, {"clip_t": 0.2}, job.instance_images, int(built))


@pytest.mark.parametrize("where", ["folder", "s3 prefix", "s3 object"])
def test_the_manifest_identity_changes_when_a_file_is_edited_added_or_removed(where, tmp_path, request):
    """What a shard compares its plan file with: the manifest's files described (stat / one S3 LIST), not read."""
    import io
    import time

    from prcore.data.load import manifest_identity

    def frame(prompt: str) -> bytes:
        buf = io.BytesIO()
        pl.DataFrame([{**manifest_rows(1, prompts=1)[0], "prompt": prompt}]).write_parquet(buf)
        return buf.getvalue()

    if where == "folder":
        (tmp_path / "m").mkdir()

        def put(name: str, data: bytes | None) -> None:
            (tmp_path / "m" / name).unlink() if data is None else (tmp_path / "m" / name).write_bytes(data)
        uri = str(tmp_path / "m")
    else:
        import boto3

        bucket = request.getfixturevalue("s3_bucket")
        s3 = boto3.client("s3", endpoint_url=request.getfixturevalue("s3_server"))

        def put(name: str, data: bytes | None) -> None:
            s3.delete_object(Bucket=bucket, Key=f"m/{name}") if data is None else s3.put_object(Bucket=bucket, Key=f"m/{name}", Body=data)
        uri = f"s3://{bucket}/m" + ("/a.parquet" if where == "s3 object" else "")
    put("a.parquet", frame("a {subject}"))
    first = manifest_identity(uri)
    assert manifest_identity(uri) == first
    time.sleep(0.01)
    put("a.parquet", frame("a {subject} in the snow"))  # an edit
    edited = manifest_identity(uri)
    assert edited != first
    if where != "s3 object":
        put("b.parquet", frame("b {subject}"))  # a file added, then removed again
        assert manifest_identity(uri) not in (first, edited)
        put("b.parquet", None)
        assert manifest_identity(uri) == edited


def test_the_automatic_shard_size_balances_workers_within_the_start_cost_and_shard_count_bounds():
    from prcore.pipeline.shards import (
        MAX_SHARDS,
        MOST_SUBJECTS,
        SHARD_START_S,
        START_FRACTION,
        choose_subjects_per_shard,
    )

    sdxl = 400 * 1.088 + 100 * 3600 / 1864  # one subject of the nightly contract: 628 GPU s
    # balance: every worker gets 4 shards (64 subjects on 2 workers: 8 shards of 8) ...
    assert choose_subjects_per_shard(64, 2, sdxl) == 8
    assert choose_subjects_per_shard(800, 25, sdxl) == 8 and choose_subjects_per_shard(24, 2, sdxl) == 3
    # ... but a lost shard loses at most MOST_SUBJECTS, and never more than MAX_SHARDS flow runs
    assert choose_subjects_per_shard(2_000, 2, sdxl) == MOST_SUBJECTS == 10
    assert choose_subjects_per_shard(10_000, 100, sdxl) == 10 and choose_subjects_per_shard(10_000, 400, sdxl) == 10
    assert choose_subjects_per_shard(50_000, 1_000, sdxl) == 50_000 // MAX_SHARDS == 50
    # few subjects, many workers: two subjects per shard (one would pay a 35 s start on 628 s of GPU: 5.6%)
    assert choose_subjects_per_shard(3, 8, sdxl) == 2 and choose_subjects_per_shard(0, 8, sdxl) == 1
    # short subjects (10 images, no more training): shards grow until the fixed start is under 5%
    short = 10 * 3600 / 1864
    expected = -(-SHARD_START_S // (START_FRACTION * short))
    assert choose_subjects_per_shard(3, 8, short) == expected == 37
    # every size keeps the start under START_FRACTION of the shard's GPU time
    for n, w in [(1, 1), (7, 3), (64, 2), (999, 7), (10_000, 100)]:
        per = choose_subjects_per_shard(n, w, sdxl)
        assert SHARD_START_S <= START_FRACTION * per * sdxl + 1e-9 and -(-n // per) <= MAX_SHARDS


def test_gpu_workers_come_from_the_gpu_limit_else_the_pool_else_one(prefect_api):
    from prefect.client.orchestration import get_client

    from flows.nightly import gpu_workers
    from prcore.pipeline.settings import FanOut

    fan_out = FanOut(mode="deployment", shard_deployment="personalize-subject/nowhere")
    assert gpu_workers(fan_out) == 1  # no limit, no such deployment
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("gpu", 3)
        try:
            assert gpu_workers(fan_out) == 3
            assert gpu_workers(fan_out.model_copy(update={"use_gpu_limit": False})) == 1
        finally:
            client.delete_global_concurrency_limit_by_name("gpu")
