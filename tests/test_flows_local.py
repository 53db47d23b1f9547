"""The nightly flow with local fan-out, in this process, on Prefect's temporary local API.

Kept small: two subjects, one prompt, one image each, 2 training and 2 denoising steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect_harness import manifest_rows, write_local_manifest

TRAIN = {"steps": 2}


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run_flow(manifest: Path, output: Path, model: str, cache: Path, **params):
    from flows.nightly import nightly_batch
    from prcore.pipeline.settings import FanOut, RunSettings

    settings = RunSettings.model_validate({"model": model, "train": TRAIN, "placement": {"device": "cpu", "dtype": "float32"},
                                           "cache_dir": str(cache)})
    fan_out = FanOut(subjects_per_shard=params.pop("subjects_per_shard", 1), **params)
    return nightly_batch(manifest=str(manifest), output=str(output), settings=settings, fan_out=fan_out, return_state=True)


def read_artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def summary_of(output: Path) -> dict:
    runs = sorted((output / "runs").glob("*/summary.json"))
    return json.loads(runs[-1].read_text())


def test_local_fan_out_runs_every_subject_then_rerun_does_nothing(prefect_api, tmp_path, tiny_sd_path):
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(2, prompts=1, num_images=1, steps=2), subjects=2)
    out = tmp_path / "out"
    state = run_flow(manifest, out, str(tiny_sd_path), tmp_path / "cache")
    assert state.is_completed(), state
    summary = summary_of(out)
    assert (summary["generated"], summary["trained"], summary["shards"], summary["failed_subjects"]) == (2, 2, 2, 0)
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert len(pngs) == 2 and all((out / p).with_suffix(".json").is_file() for p in pngs)
    rid = summary["run_id"]
    assert sorted(p.name for p in (out / "runs" / rid / "contact_sheets").glob("*.png")) == ["s0.png", "s1.png"]
    assert len(list((out / "catalog").rglob("*.parquet"))) == 2
    # every descriptive catalogue column is filled for a flow-made image (scores aside: no scorer ran)
    import polars as pl

    cat = pl.read_parquet(str(out / "catalog" / "**" / "*.parquet"), hive_partitioning=True)
    empty = [c for c in cat.columns if cat[c].null_count() == cat.height and c not in ("clip_t", "clip_i", "dino", "qc_pass")]
    assert cat.height == 2 and empty == []
    assert set(cat["class_noun"]) == {"dog", "toy"} and set(cat["identifier"]) == {"sks"} and cat["seconds"].min() > 0
    assert cat["scheduler"].to_list() == ["DDIMScheduler"] * 2 and set(cat["device"]) == {"cpu"} and set(cat["dtype"]) == {"float32"}
    extra = json.loads(cat["extra_json"][0])
    assert extra["worker"]["pid"] > 0
    assert json.loads((out / "runs" / rid / "failures.json").read_text())["failures"] == []

    arts = read_artifacts(state.state_details.flow_run_id)
    table = arts["nightly-batch-subjects"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [(r["subject"], r["generated"], r["failed"]) for r in rows] == [("s0", 1, 0), ("s1", 1, 0)]
    assert "contact_sheets/s0.png" in arts["nightly-batch-contact-sheets"].data
    assert float(arts["nightly-batch-progress"].data) == 100.0

    again = run_flow(manifest, out, str(tiny_sd_path), tmp_path / "cache")
    assert again.is_completed()
    second = summary_of(out)
    assert second["run_id"] != rid
    assert (second["generated"], second["skipped"], second["trained"], second["shards"]) == (0, 2, 0, 0)


def test_a_broken_subject_fails_the_run_after_the_others(prefect_api, tmp_path, tiny_sd_path):
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(2, prompts=1, num_images=1, steps=2), subjects=2)
    broken = tmp_path / "in" / "subjects" / "s0" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated: found when training decodes it
    out = tmp_path / "out"
    state = run_flow(manifest, out, str(tiny_sd_path), tmp_path / "cache", subjects_per_shard=2)
    assert state.is_failed()
    summary = summary_of(out)
    assert (summary["generated"], summary["failed_subjects"]) == (1, 1)
    assert [p.parts[-4] for p in (out / "images").rglob("*.png")] == ["s1"]
    report = json.loads((out / "runs" / summary["run_id"] / "failures.json").read_text())
    assert [(f["subject_id"], f["step"]) for f in report["failures"]] == [("s0", "train")]
    assert "1.png" in report["failures"][0]["error"]
    arts = read_artifacts(state.state_details.flow_run_id)
    assert "| s0 | train |" in arts["nightly-batch-failures"].data


def test_prcore_run_user_errors_are_one_line_exit_2(tmp_path, tiny_sd_path):
    """Bad manifest / model: one message, exit code 2, before Prefect starts; nothing written."""
    from typer.testing import CliRunner

    from prcore.cli import build_app

    app = build_app("run", "demo")
    bad_rows = manifest_rows(1, prompts=1)
    bad_rows[0]["prompt"] = "no placeholder here"
    manifest = write_local_manifest(tmp_path / "in", bad_rows, subjects=1)
    out = tmp_path / "out"
    runner = CliRunner()
    done = runner.invoke(app, ["run", str(manifest), "--output", str(out), "--model", str(tiny_sd_path)])
    assert done.exit_code == 2, done.output
    assert done.stderr.startswith("error: ") and "prompt" in done.stderr and "Traceback" not in done.output
    assert not out.exists() or not any(out.rglob("*.png"))

    done = runner.invoke(app, ["run", str(manifest), "--output", str(out), "--model", str(tmp_path / "no-model")])
    assert done.exit_code == 2 and "--model" in done.stderr and "model_index.json" in done.stderr

    # a hub id that does not resolve (no network here; HF_HUB_OFFLINE=1): one error before anything runs
    good = write_local_manifest(tmp_path / "good", manifest_rows(1, prompts=1), subjects=1)
    done = runner.invoke(app, ["run", str(good), "--output", str(out), "--model", "prcore-tests/no-such-model"])
    assert done.exit_code == 2, done.output
    assert done.stderr.startswith("error: --model") and "prcore-tests/no-such-model" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.output
    assert not out.exists() or not any(out.rglob("*.png"))


def test_waiting_for_shards_is_one_query_per_poll_with_backoff(prefect_api):
    """30 pending shard runs, 7 s of waiting: a handful of API calls (the old loop made one per run per
    second: ~200), and the runs that finish are reported with their state."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed, Scheduled

    from flows.common import Backoff, wait_for_flow_runs

    @flow(name="shard-stand-in")
    def stand_in() -> None:
        return None

    calls = []
    with get_client(sync_client=True, httpx_settings={"event_hooks": {"request": [calls.append]}}) as client:
        ids = [client.create_flow_run(stand_in, state=Scheduled()).id for _ in range(30)]
        calls.clear()
        assert wait_for_flow_runs(client, ids, timeout_s=7, backoff=Backoff(first=1, factor=2, most=8)) == {}
        assert 2 <= len(calls) <= 5, len(calls)  # polls at 0, 1, 3, 7 s
        client.set_flow_run_state(ids[0], Completed(), force=True)
        client.set_flow_run_state(ids[1], Failed(), force=True)
        assert [client.read_flow_run(i).state.type.value for i in ids[:3]] == ["COMPLETED", "FAILED", "SCHEDULED"]
        calls.clear()
        done = wait_for_flow_runs(client, ids, timeout_s=0.5)
        assert done == {ids[0]: "COMPLETED", ids[1]: "FAILED"} and len(calls) <= 2  # one poll, maybe a last one at the deadline
