"""End to end on real servers: a local Prefect server, process work pools `cpu` and `gpu`, two
process workers on `gpu` and one on `cpu`, the moto S3 server, `prefect deploy --all` from the
repository's prefect.yaml and `prefect deployment run 'nightly-batch/nightly' --watch`.

Models are tiny (the test pipeline, 2 training steps, 2 denoising steps, 64x64) so the whole
module runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest
from prefect_harness import kill_now, manifest_rows, upload_manifest

pytestmark = pytest.mark.slow

TRAIN = {"steps": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server, tiny_sd_path):
    """Server + pools + `gpu` limit + workers (w1, w2 on gpu; c1 on cpu) + deployments."""
    from prefect_harness import prefect_server

    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as server:
        server.create_process_pool("cpu")
        server.create_process_pool("gpu")
        server.create_global_concurrency_limit("gpu", 2)
        cache = home / "prcore-cache"
        workers = {
            "w1": server.start_worker("gpu", "w1", extra_env={"PRCORE_WORKER_LABEL": "w1", "PRCORE_CACHE_DIR": str(cache / "w1")}),
            "w2": server.start_worker("gpu", "w2", extra_env={"PRCORE_WORKER_LABEL": "w2", "PRCORE_CACHE_DIR": str(cache / "w2")}),
            "c1": server.start_worker("cpu", "c1", extra_env={"PRCORE_WORKER_LABEL": "c1", "PRCORE_CACHE_DIR": str(cache / "c1")}),
        }
        deployed = server.run_cli("--no-prompt", "deploy", "--all", timeout=300, log_name="deploy.log")
        assert deployed.returncode == 0, deployed.stdout[-3000:]
        server.wait_for_workers("gpu", {"w1", "w2"})
        server.wait_for_workers("cpu", {"c1"})
        yield {"server": server, "workers": workers, "model": str(tiny_sd_path), "endpoint": s3_server}


@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture(scope="module")
def bucket(s3):
    import uuid

    name = f"e2e-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=name)
    return name


def run_nightly(cluster, *, manifest: str, output: str, watch: bool = True, subjects_per_shard: int = 1) -> tuple[int, str]:
    """`prefect deployment run 'nightly-batch/nightly' --params JSON [--watch]`: (exit code, output)."""
    # check_images off: these tests need a corrupt image found when training decodes it (with the default
    # check the whole night is refused at planning, which tests/test_flows_local.py covers)
    settings = {"model": cluster["model"], "train": TRAIN, "placement": {"device": "cpu", "dtype": "float32"},
                "check_images": False}
    all_params = {"manifest": manifest, "output": output, "settings": settings,
                  "fan_out": {"mode": "deployment", "subjects_per_shard": subjects_per_shard}}
    args = ["deployment", "run", "nightly-batch/nightly", "--params", json.dumps(all_params)]
    if watch:
        args += ["--watch", "--watch-timeout", "600"]
    done = cluster["server"].run_cli(*args, timeout=660)
    return done.returncode, done.stdout


def keys(s3, bucket: str, prefix: str) -> list[str]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"][len(prefix):] for o in page.get("Contents", ())]
    return sorted(out)


def get(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def run_ids(s3, bucket: str, prefix: str) -> list[str]:
    return sorted({k.split("/")[0] for k in keys(s3, bucket, prefix + "runs/") if k.endswith("/summary.json")})


def latest_summary(s3, bucket: str, prefix: str) -> dict:
    rid = run_ids(s3, bucket, prefix)[-1]
    return json.loads(get(s3, bucket, f"{prefix}runs/{rid}/summary.json"))


def expected_images(manifest_uri: str, output: str, model: str) -> list[str]:
    from prcore.data.schema import GenerationDefaults
    from prcore.pipeline.subject import plan_jobs
    from prcore.store.storage import open_store

    jobs = plan_jobs(manifest_uri, open_store(output), model_id=model, defaults=GenerationDefaults())
    return sorted(k for j in jobs for r in j.requests for k in r.keys)


def check_images_complete(s3, bucket: str, prefix: str, expected: list[str]) -> None:
    """Every expected PNG exactly once with its sidecar, sidecar's sha256 = the PNG's; nothing else."""
    listed = keys(s3, bucket, prefix)
    pngs = sorted(k for k in listed if k.startswith("images/") and k.endswith(".png"))
    jsons = sorted(k for k in listed if k.startswith("images/") and k.endswith(".json"))
    assert pngs == expected
    assert jsons == sorted(k[:-4] + ".json" for k in expected)
    for key in pngs:
        sidecar = json.loads(get(s3, bucket, prefix + key[:-4] + ".json"))
        assert sidecar["sha256"] == hashlib.sha256(get(s3, bucket, prefix + key)).hexdigest(), key


def test_nightly_on_gpu_pool_then_rerun_is_a_no_op(cluster, s3, bucket):
    prefix = "run1/"
    manifest = upload_manifest(s3, bucket, "in1", manifest_rows(3, prompts=2, num_images=2, steps=2), subjects=3)
    output = f"s3://{bucket}/run1"
    rc, out = run_nightly(cluster, manifest=manifest, output=output)
    assert rc == 0, out[-4000:]

    expected = expected_images(manifest, output, cluster["model"])
    assert len(expected) == 12
    check_images_complete(s3, bucket, prefix, expected)

    summary = latest_summary(s3, bucket, prefix)
    assert summary["generated"] == 12 and summary["failed_subjects"] == 0 and summary["trained"] == 3
    rid = summary["run_id"]
    listed = keys(s3, bucket, prefix)
    assert {f"runs/{rid}/contact_sheets/s{i}.png" for i in range(3)} <= set(listed)
    assert sum(1 for k in listed if k.startswith("loras/") and k.endswith("training.json")) == 3
    # each shard got its plan file from the parent and used it (no shard planned the manifest again)
    assert sorted(k for k in listed if k.startswith(f"runs/{rid}/shard_plans/")) == [f"runs/{rid}/shard_plans/{i:04d}.json" for i in range(3)]
    worker_logs = "".join((cluster["server"].home / f"worker-{w}.log").read_text() for w in ("w1", "w2"))
    assert worker_logs.count(f"shard plan runs/{rid}/shard_plans/") == 3, worker_logs[-3000:]
    assert "planning the shard's subjects from the manifest" not in worker_logs
    failures = json.loads(get(s3, bucket, f"{prefix}runs/{rid}/failures.json"))
    assert failures["failures"] == []

    # The catalogue, read with polars straight from the S3 server.
    import polars as pl

    opts = {"aws_endpoint_url": cluster["endpoint"], "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "aws_region": "us-east-1", "aws_allow_http": "true"}
    catalog = pl.read_parquet(f"s3://{bucket}/run1/catalog/**/*.parquet", storage_options=opts, hive_partitioning=True)
    assert catalog.height == 12
    assert sorted(catalog["key"].to_list()) == expected
    assert set(catalog["subject_id"]) == {"s0", "s1", "s2"}

    # Three shards, handled by both GPU workers (each flow run records the worker that ran it).
    shards = [json.loads(get(s3, bucket, f"{prefix}runs/{rid}/{k}")) for k in keys(s3, bucket, f"{prefix}runs/{rid}/")
              if k.startswith("shards/")]
    assert len(shards) == 3
    labels = {s["worker"].get("label") for s in shards}
    assert labels == {"w1", "w2"}, labels

    # Second run: nothing to train, nothing to sample; the images are untouched.
    before = {k: s3.head_object(Bucket=bucket, Key=prefix + k)["ETag"] for k in expected}
    rc, out = run_nightly(cluster, manifest=manifest, output=output)
    assert rc == 0, out[-4000:]
    again = latest_summary(s3, bucket, prefix)
    assert again["run_id"] != rid
    assert (again["generated"], again["trained"], again["shards"], again["skipped"]) == (0, 0, 0, 12)
    assert {k: s3.head_object(Bucket=bucket, Key=prefix + k)["ETag"] for k in expected} == before


def test_worker_killed_mid_batch_then_rerun_completes_exactly_once_and_fails_the_broken_subject(cluster, s3, bucket):
    """Kill the GPU worker (and its flow-run process) while a shard is writing images; mark its run
    Crashed as Prefect's zombie automation would; re-run: every image of the good subjects present
    exactly once, and the subject with a corrupt instance image (found only when training decodes
    it) fails the run (exit 1) after the others finished, with the failure reported."""

    prefix = "run3/"
    rows = manifest_rows(3, prompts=3, num_images=2, steps=2)
    manifest = upload_manifest(s3, bucket, "in3", rows, subjects=3, corrupt={"s2"})
    output = f"s3://{bucket}/run3"
    server = cluster["server"]
    # One shard with all subjects (s0 first), so whichever worker takes it is mid-batch when we strike.
    rc, out = run_nightly(cluster, manifest=manifest, output=output, watch=False, subjects_per_shard=3)
    assert rc == 0, out[-3000:]
    parent_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)

    deadline = time.monotonic() + 300
    child, pngs = None, []
    with server.api() as api:
        while time.monotonic() < deadline:
            runs = api.post("/flow_runs/filter", json={}).json()
            child = next((r for r in runs if r.get("name", "").endswith("-shard-0")
                          and r["parameters"].get("output") == output), None)
            pngs = [k for k in keys(s3, bucket, prefix) if k.startswith("images/") and k.endswith(".png")]
            if child and child["state_type"] == "RUNNING" and pngs:
                break
            time.sleep(0.3)
        assert child is not None and pngs, "the shard never started writing images"
        # Kill the worker that took the shard, and its flow-run process, with SIGKILL: a crash.
        owners = [name for name in ("w1", "w2")
                  if f"Flow run '{child['name']}' submitted to infrastructure" in server.worker_log(name)]
        assert len(owners) == 1, owners
        kill_now(cluster["workers"][owners[0]])
        written = [k for k in keys(s3, bucket, prefix) if k.startswith("images/") and k.endswith(".png")]
        assert 0 < len(written) < 12 and all(k.startswith("images/s0/") for k in written)
        # Without a heartbeat the server still thinks the child runs: mark it Crashed (what the
        # zombie-flow automation in docs/orchestration.md does), so the parent's wait ends.
        api.post(f"/flow_runs/{child['id']}/set_state", json={"state": {"type": "CRASHED", "name": "Crashed"}, "force": True}).raise_for_status()
        # Make one finished image an orphan (PNG without sidecar): it must not count as done.
        done_jsons = [k for k in keys(s3, bucket, prefix) if k.startswith("images/") and k.endswith(".json")]
        if done_jsons:
            s3.delete_object(Bucket=bucket, Key=prefix + done_jsons[0])
        done_before = len(done_jsons) - (1 if done_jsons else 0)
        # The parent ends Failed, reporting the lost shard.
        while time.monotonic() < deadline:
            parent = api.get(f"/flow_runs/{parent_id}").json()
            if parent["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(0.5)
        assert parent["state_type"] == "FAILED"
    rid = run_ids(s3, bucket, prefix)[-1]
    report = json.loads(get(s3, bucket, f"{prefix}runs/{rid}/failures.json"))
    assert [(f["subject_id"], f["step"]) for f in report["failures"]] == [("s0", "shard"), ("s1", "shard"), ("s2", "shard")]

    # The other GPU worker is still there: the re-run finishes exactly what is missing of s0 and s1,
    # s2 fails at training, and the run ends Failed (exit 1) after the others finished.
    rc, out = run_nightly(cluster, manifest=manifest, output=output, subjects_per_shard=3)
    assert rc == 1, out[-4000:]
    assert "Failed" in out
    expected = [k for k in expected_images(manifest, output, cluster["model"]) if not k.startswith("images/s2/")]
    assert len(expected) == 12
    check_images_complete(s3, bucket, prefix, expected)
    rid = run_ids(s3, bucket, prefix)[-1]
    summary = json.loads(get(s3, bucket, f"{prefix}runs/{rid}/summary.json"))
    assert (summary["generated"], summary["skipped"], summary["failed_subjects"]) == (12 - done_before, done_before, 1)
    report = json.loads(get(s3, bucket, f"{prefix}runs/{rid}/failures.json"))
    assert [(f["subject_id"], f["step"]) for f in report["failures"]] == [("s2", "train")]
    assert f"s3://{bucket}/in3/subjects/s2/0.png" in report["failures"][0]["error"]
    assert {f"runs/{rid}/contact_sheets/s{i}.png" for i in (0, 1)} <= set(keys(s3, bucket, prefix))


def test_processes_are_ours_and_alive(cluster):
    """The fixture's processes run under their own process groups (stopped by PID in teardown)."""
    import os

    server = cluster["server"]
    assert os.getpgid(server.proc.pid) == server.proc.pid
    assert all(os.getpgid(p.pid) == p.pid for p in server.children if p.poll() is None)
