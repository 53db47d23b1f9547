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
                                           "cache_dir": str(cache), "check_images": params.pop("check_images", True)})
    fan_out = FanOut(subjects_per_shard=params.pop("subjects_per_shard", 1), **params)  # None: chosen by the run
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
    # the browsable run report, linked from the artifact (by its address: no bearer links)
    assert (out / "runs" / rid / "index.html").is_file()
    assert f"runs/{rid}/index.html" in arts["nightly-batch-contact-sheets"].data
    assert "X-Amz" not in arts["nightly-batch-contact-sheets"].data
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
    # by default the flow opens the images of subjects with work left while planning: refused, nothing written
    state = run_flow(manifest, out, str(tiny_sd_path), tmp_path / "cache", subjects_per_shard=2)
    assert state.is_failed() and "1.png" in str(state.message) and not out.exists()
    # without that check the broken image is found when training decodes it; the other subject still finishes
    state = run_flow(manifest, out, str(tiny_sd_path), tmp_path / "cache", subjects_per_shard=2, check_images=False)
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


def _catalog(out: Path):
    import polars as pl

    return pl.read_parquet(str(out / "catalog" / "**" / "*.parquet"), hive_partitioning=True)


def _assert_catalog_true(out: Path) -> None:
    """Exactly one row per finished image in the store, each with the sidecar's current sha256."""
    cat = _catalog(out)
    sidecars = {p.relative_to(out).with_suffix(".png").as_posix(): json.loads(p.read_text())
                for p in (out / "images").rglob("*.json")}
    assert cat.height == len(sidecars) and sorted(cat["key"]) == sorted(sidecars)
    assert {k: s for k, s in zip(cat["key"], cat["sha256"], strict=True)} == {k: v["sha256"] for k, v in sidecars.items()}
    # the run's snapshot: exactly the rows of the per-subject files (same order), no row twice
    import polars as pl

    snapshot = pl.read_parquet(out / "catalog.parquet")
    assert snapshot.equals(pl.concat([pl.read_parquet(p) for p in sorted((out / "catalog").glob("*.parquet"))]))
    assert snapshot["key"].n_unique() == snapshot.height


def test_catalogue_leases_and_store_checked_cache_across_a_sequence_of_runs(prefect_api, tmp_path, tiny_sd_path):
    """Rerun with manifest growth, a crash-leftover dirty marker, a subject leased by a live run, and an
    output root deleted under a warm cache: the catalogue stays one row per image, the derived outputs of a
    finished subject are reconciled, a leased subject is left to its holder, LoRAs always exist in the store."""
    import polars as pl

    from prcore.pipeline.subject import RunContext, mark_dirty
    from prcore.store.keys import lease_key
    from prcore.store.storage import open_store

    model, cache, out = str(tiny_sd_path), tmp_path / "cache", tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(2, prompts=1, num_images=1, steps=2), subjects=2)
    pl.read_parquet(manifest).with_columns(pl.Series("meta_sku", ["A-1", "B-2"])).write_parquet(manifest)
    assert run_flow(manifest, out, model, cache).is_completed()
    _assert_catalog_true(out)
    assert sorted(p.name for p in (out / "catalog").iterdir()) == ["s0.parquet", "s1.parquet"]
    # meta_* columns: carried into every sidecar and the catalogue's extra_json
    cat = _catalog(out).sort("subject_id")
    assert [json.loads(e)["meta_sku"] for e in cat["extra_json"]] == ["A-1", "B-2"]
    assert json.loads(next((out / "images" / "s1").rglob("*.json")).read_text())["meta_sku"] == "B-2"

    # manifest growth: one more image per subject; the rerun rewrites each subject's file, never appends
    pl.DataFrame(manifest_rows(2, prompts=1, num_images=2, steps=2)).write_parquet(manifest)
    assert run_flow(manifest, out, model, cache).is_completed()
    assert summary_of(out)["generated"] == 2
    _assert_catalog_true(out)
    assert _catalog(out).height == 4

    # a run that wrote images of s1 and died before its contact sheet / catalogue: the rerun reconciles s1
    store = open_store(str(out))
    mark_dirty(store, RunContext("crashed", "2026-01-01"), "s1")
    (out / "catalog" / "s1.parquet").unlink()
    state = run_flow(manifest, out, model, cache)
    assert state.is_completed()
    third = summary_of(out)
    assert (third["generated"], third["trained"], third["shards"]) == (0, 0, 1)
    assert (out / "runs" / third["run_id"] / "contact_sheets" / "s1.png").is_file()
    assert not (out / "state" / "dirty" / "s1.json").exists()
    _assert_catalog_true(out)

    # s0 is leased by another live run: this run leaves it alone (not failed, nothing counted twice)
    pl.DataFrame(manifest_rows(2, prompts=1, num_images=3, steps=2)).write_parquet(manifest)
    store.put(lease_key("s0"), json.dumps({"run_id": "other-run", "host": "elsewhere", "pid": 1,
                                           "expires": __import__("time").time() + 3600}).encode())
    state = run_flow(manifest, out, model, cache)
    assert state.is_completed(), state
    fourth = summary_of(out)
    assert (fourth["generated"], fourth["leased"], fourth["failed_subjects"]) == (1, 1, 0)
    assert [r["error"] for r in fourth["subjects_detail"] if r["subject"] == "s0"] == ["leased by run other-run"]
    assert len(list((out / "images" / "s0").rglob("*.png"))) == 2 and store.exists(lease_key("s0"))
    _assert_catalog_true(out)
    store.delete(lease_key("s0"))

    # the output root deleted, the machine's LoRA cache (and Prefect's database) still warm: retrained,
    # and every image's LoRA exists in the store
    import shutil

    shutil.rmtree(out)
    state = run_flow(manifest, out, model, cache)
    assert state.is_completed(), state
    fifth = summary_of(out)
    assert (fifth["generated"], fifth["trained"]) == (6, 2)
    _assert_catalog_true(out)
    for sid, fp in set(zip(_catalog(out)["subject_id"], _catalog(out)["lora_fp"], strict=True)):
        assert (out / "loras" / sid / fp / "training.json").is_file() and (out / "loras" / sid / fp / "pytorch_lora_weights.safetensors").is_file()


def test_two_prcore_runs_at_once_do_every_image_and_lora_once(tmp_path, tiny_sd_path):
    """Two ``prcore run`` processes on the same manifest and output root, started half a second apart
    (each with its own ephemeral Prefect API): per-subject leases make each subject the work of one run;
    together they train each LoRA once, make each image once and catalogue it once."""
    import os
    import subprocess
    import sys
    import time

    manifest = write_local_manifest(tmp_path / "in", manifest_rows(3, prompts=1, num_images=1, steps=2, train_steps=2),
                                    subjects=3)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PRCORE_LEASE_TTL_S": "120"}
    env.pop("PREFECT_API_URL", None)
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-c", "from prcore.cli import main; main()", "run", str(manifest), "--output", str(out),
               "--model", str(tiny_sd_path), "--device", "cpu", "--dtype", "float32", "--subjects-per-shard", "1",
               "--cache-dir", str(tmp_path / f"cache{i}")]
        procs.append(subprocess.Popen(cmd, env={**env, "PREFECT_HOME": str(tmp_path / f"prefect{i}")},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(0.5)
    outputs = []
    for p in procs:
        text, _ = p.communicate(timeout=600)
        outputs.append(text.decode(errors="replace"))
    assert [p.returncode for p in procs] == [0, 0], outputs
    summaries = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/summary.json"))]
    assert len(summaries) == 2
    assert sum(s["generated"] for s in summaries) == 3 and sum(s["trained"] for s in summaries) == 3, summaries
    assert len(list((out / "images").rglob("*.png"))) == 3
    assert len([p for p in (out / "loras").rglob("training.json")]) == 3
    _assert_catalog_true(out)
    from prcore.store.storage import open_store

    assert list(open_store(str(out)).list("state/")) == []  # every lease released, no dirty marker left
    print("split between the runs (generated, trained, leased):",
          [(s["generated"], s["trained"], s["leased"]) for s in summaries])


def test_prcore_run_checks_defaults_and_images_like_validate(tmp_path, tiny_sd_path):
    """CLI defaults are checked by the manifest's rules, and instance images are checked by default
    (as validate does): exit 2, one line, before Prefect starts, nothing written."""
    from typer.testing import CliRunner

    from prcore.cli import build_app

    app = build_app("run", "demo")
    runner = CliRunner()
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(1, prompts=1), subjects=1)
    out = tmp_path / "out"
    for option, words in ((["--num-images", "0"], "num_images"), (["--guidance", "nope"], "guidance"),
                          (["--identifier", "two words"], "identifier")):
        done = runner.invoke(app, ["run", str(manifest), "--output", str(out), "--model", str(tiny_sd_path), *option])
        assert done.exit_code == 2, done.output
        assert words in done.stderr and "Traceback" not in done.output
    broken = tmp_path / "in" / "subjects" / "s0" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])
    done = runner.invoke(app, ["run", str(manifest), "--output", str(out), "--model", str(tiny_sd_path)])
    assert done.exit_code == 2, done.output
    assert "1.png" in done.stderr and "instance_images" in done.stderr and "Traceback" not in done.output
    assert not out.exists() or not any(out.rglob("*"))


def test_killed_prcore_run_leaves_no_process_behind(tmp_path, tiny_sd_path):
    """SIGKILL of `prcore run` while its ephemeral Prefect API runs: every process it started is gone soon after."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect_harness import descendants

    manifest = write_local_manifest(tmp_path / "in", manifest_rows(1, prompts=1, num_images=1, steps=2, train_steps=2),
                                    subjects=1)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-c", "from prcore.cli import main; main()", "run", str(manifest), "--output",
                             str(tmp_path / "out"), "--model", str(tiny_sd_path), "--device", "cpu", "--dtype", "float32",
                             "--cache-dir", str(tmp_path / "cache")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # until the ephemeral API (a python child) is up
            kids = descendants(proc.pid)
            seen.update(kids)
            if any("uvicorn" in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="replace")
                   for k in kids if Path(f"/proc/{k}/cmdline").exists()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "prcore run ended before its ephemeral API was seen"
        seen.update(descendants(proc.pid))
        assert len(seen) >= 2  # the watchdog and the API server, at least
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30
        alive = seen
        while time.monotonic() < deadline:
            alive = {p for p in seen if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]}
            if not alive:
                break
            time.sleep(0.5)
        assert not alive, [Path(f"/proc/{p}/cmdline").read_bytes() for p in alive]
    finally:
        for p in seen:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass


def test_a_rerun_verifies_the_store_and_remakes_what_is_damaged(prefect_api, tmp_path, tiny_sd_path):
    """The three damages of issue 21 at once, rerun on another machine (empty LoRA cache) with one more image
    asked for: a truncated PNG whose sidecar remains is made again; a LoRA whose stored weights had bits
    flipped is never sampled with, it is trained again and replaced; an unreadable catalogue file does not
    crash the run, it is rebuilt with one row per image from the sidecars."""
    import hashlib

    import polars as pl

    model = str(tiny_sd_path)
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(1, prompts=1, num_images=2, steps=2), subjects=1)
    out = tmp_path / "out"
    assert run_flow(manifest, out, model, tmp_path / "cacheA").is_completed()
    pngs = sorted((out / "images").rglob("*.png"))
    truncated = pngs[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    (weights,) = (out / "loras").rglob("pytorch_lora_weights.safetensors")
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    weights.write_bytes(bytes(data))
    (out / "catalog" / "s0.parquet").write_bytes(b"PAR1 this is not a catalogue PAR1")
    pl.DataFrame(manifest_rows(1, prompts=1, num_images=3, steps=2)).write_parquet(manifest)

    state = run_flow(manifest, out, model, tmp_path / "cacheB")
    assert state.is_completed(), state
    second = summary_of(out)
    assert (second["generated"], second["trained"], second["failed_subjects"]) == (2, 1, 0)
    assert second["damaged"] == 2  # reported: the PNG and the LoRA (in the shard record: which and why)
    (shard,) = (out / "runs" / second["run_id"] / "shards").glob("*.json")
    damaged = json.loads(shard.read_text())["subjects"][0]["damaged"]
    assert "is not the" in damaged[0] and damaged[0].startswith(truncated.relative_to(out).as_posix())
    assert damaged[1].startswith("LoRA ") and "pytorch_lora_weights.safetensors is not the file training.json recorded" in damaged[1]
    sidecar = json.loads(truncated.with_suffix(".json").read_text())
    assert sidecar["sha256"] == hashlib.sha256(truncated.read_bytes()).hexdigest()
    record = json.loads((weights.parent / "training.json").read_text())
    assert record["files"][weights.name]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    _assert_catalog_true(out)
    assert _catalog(out).height == 3


def test_prcore_run_refuses_an_output_root_that_takes_no_writes_in_seconds(tmp_path, tiny_sd_path):
    """An output root that is a file (or under one): one line, exit 2, before the model is loaded or the
    manifest planned (a real probe write), the file untouched."""
    import time

    from typer.testing import CliRunner

    from prcore.cli import build_app

    app = build_app("run", "demo")
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(1, prompts=1), subjects=1)
    afile = tmp_path / "out.bin"
    afile.write_bytes(b"keep me")
    for root in (afile, afile / "sub"):
        started = time.monotonic()
        done = CliRunner().invoke(app, ["run", str(manifest), "--output", str(root), "--model", str(tiny_sd_path)])
        assert done.exit_code == 2, done.output
        assert done.stderr.startswith(f"error: --output {root}: cannot write") and "is a file, not a folder" in done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.output
        assert time.monotonic() - started < 10
    assert afile.read_bytes() == b"keep me"


def test_prcore_run_stops_at_a_write_the_store_refuses_mid_run_with_one_line_exit_2(tmp_path, tiny_sd_path):
    """A write refused after planning (here the images folder is a file, as a full disk or a permission
    change refuses it): the run stops with one line and exit 2, no traceback; what was finished is kept."""
    from typer.testing import CliRunner

    from prcore.cli import build_app

    app = build_app("run", "demo")
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(1, prompts=1, num_images=1, steps=2), subjects=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").write_bytes(b"in the way")
    done = CliRunner().invoke(app, ["run", str(manifest), "--output", str(out), "--model", str(tiny_sd_path),
                                    "--train-steps", "2", "--device", "cpu", "--dtype", "float32",
                                    "--cache-dir", str(tmp_path / "cache")])
    assert done.exit_code == 2, done.output
    assert "Traceback" not in done.output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot write 'images/s0/" in errors[0] and "is a file, not a folder" in errors[0], done.stderr
    assert sum("cannot write" in line for line in done.stderr.splitlines()) == 1, done.stderr  # no echo of Prefect's
    assert (out / "images").read_bytes() == b"in the way"
    assert list((out / "loras").rglob("training.json"))  # the LoRA trained before the refusal is kept
    assert not list(out.rglob(".tmp-*"))


def test_the_nightly_flow_runs_an_sd3_model_like_an_sd_one(prefect_api, tmp_path, tiny_sd3_path):
    """The same flow, manifest and outputs for a flow-matching transformer (tiny SD3): trained LoRA in the
    transformer layout, images sampled with its flow-matching scheduler, catalogue rows, a rerun that does nothing."""
    import polars as pl
    from safetensors import safe_open

    manifest = write_local_manifest(tmp_path / "in", manifest_rows(1, prompts=2, num_images=1, steps=2, size=32), subjects=1)
    out = tmp_path / "out"
    state = run_flow(manifest, out, str(tiny_sd3_path), tmp_path / "cache")
    assert state.is_completed(), state
    summary = summary_of(out)
    assert (summary["generated"], summary["trained"], summary["failed_subjects"]) == (2, 1, 0)
    record = json.loads(next((out / "loras").rglob("training.json")).read_text())
    assert record["model_family"] == "sd3" and record["resolution"] == 64
    with safe_open(str(next((out / "loras").rglob("pytorch_lora_weights.safetensors"))), framework="pt") as fh:
        assert all(k.startswith("transformer.") for k in fh.keys())
    cat = pl.read_parquet(str(out / "catalog" / "**" / "*.parquet"), hive_partitioning=True)
    assert cat.height == 2 and set(cat["scheduler"]) == {"FlowMatchEulerDiscreteScheduler"} and set(cat["width"]) == {32}
    again = run_flow(manifest, out, str(tiny_sd3_path), tmp_path / "cache")
    assert again.is_completed() and (summary_of(out)["generated"], summary_of(out)["trained"]) == (0, 0)


def test_the_default_shard_size_is_chosen_by_the_run_and_recorded(prefect_api, tmp_path, tiny_sd_path):
    from prcore.pipeline.settings import FanOut
    from prcore.pipeline.shards import GPU_S_PER_IMAGE, GPU_S_PER_STEP, choose_subjects_per_shard

    assert FanOut().subjects_per_shard is None
    manifest = write_local_manifest(tmp_path / "in", manifest_rows(3, prompts=1, num_images=1, steps=2), subjects=3)
    out = tmp_path / "out"
    state = run_flow(manifest, out, str(tiny_sd_path), tmp_path / "cache", subjects_per_shard=None)
    assert state.is_completed(), state
    summary = summary_of(out)
    # 3 subjects of 2 training steps + 1 image on one worker (local mode): 4.1 GPU s each at the reference
    # speeds, so the 35 s start needs 171 per shard to stay under 5%: one shard of all three
    per = choose_subjects_per_shard(3, 1, 2 * GPU_S_PER_STEP + GPU_S_PER_IMAGE)
    assert (summary["subjects_per_shard"], summary["shards"], summary["generated"]) == (per, 1, 3) and per == 171
