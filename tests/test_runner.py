"""The Prefect-free layer the tasks wrap: LoRA reuse, request sampling, records, contact sheets."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from prefect_harness import manifest_rows, subject_image, write_local_manifest

from prcore.pipeline import runner
from prcore.outputs.sidecar import sidecar_key_for
from prcore.store.storage import open_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd_path, tiny_sd):
    folder = tmp_path_factory.mktemp("runner")
    manifest = write_local_manifest(folder, manifest_rows(2, prompts=2, num_images=2, steps=2, train_steps=2), subjects=2)
    return {"manifest": str(manifest), "model": str(tiny_sd_path), "pipe": tiny_sd, "folder": folder}


def plan(setup, store, **kw):
    return runner.plan_jobs(setup["manifest"], store, model_id=setup["model"], **kw)


def test_ensure_lora_trains_once_then_reuses_from_cache_and_from_store(setup, tmp_path):
    store = open_store(str(tmp_path / "out"))
    job = plan(setup, store)[0]
    pipe = setup["pipe"]
    first = runner.ensure_lora(job, store, pipe, cache_dir=tmp_path / "cacheA")
    assert first.source == "trained" and first.train_seconds > 0 and first.final_loss is not None
    keys = sorted(store.list("loras/"))
    assert keys == [f"loras/s0/{first.lora_fp}/pytorch_lora_weights.safetensors", f"loras/s0/{first.lora_fp}/training.json"]
    assert first.lora_fp == runner.subject_lora_fingerprint(job, base_model_id=setup["model"])

    again = runner.ensure_lora(job, store, pipe, cache_dir=tmp_path / "cacheA")
    assert (again.source, again.lora_fp, again.train_seconds) == ("cache", first.lora_fp, 0.0)

    # Another machine (empty cache): downloads from the store, byte for byte.
    other = runner.ensure_lora(job, store, pipe, cache_dir=tmp_path / "cacheB")
    assert other.source == "store"
    weights = "pytorch_lora_weights.safetensors"
    assert (Path(other.local_dir) / weights).read_bytes() == (Path(first.local_dir) / weights).read_bytes()

    # A changed training config is another LoRA, next to the first.
    changed = runner.ensure_lora(job, store, pipe, cache_dir=tmp_path / "cacheA", train_defaults={"rank": 2})
    assert changed.source == "trained" and changed.lora_fp != first.lora_fp
    assert len([k for k in store.list("loras/s0/") if k.endswith("training.json")]) == 2


def test_half_uploaded_lora_is_not_reused(setup, tmp_path):
    """Weights without training.json (an upload cut short) do not count as a LoRA in the store."""
    store = open_store(str(tmp_path / "out"))
    store.put("loras/s1/0123456789abcdef/pytorch_lora_weights.safetensors", b"partial upload")
    with pytest.raises(FileNotFoundError, match="neither in"):
        runner.materialize_lora(store, "s1", "0123456789abcdef", tmp_path / "cache")
    assert not (tmp_path / "cache" / "loras" / "s1").exists()


def test_generate_request_writes_png_and_sidecar_then_skips_and_redoes_orphans(setup, tmp_path):
    store = open_store(str(tmp_path / "out"))
    job = plan(setup, store)[0]
    pipe = setup["pipe"]
    lora = runner.ensure_lora(job, store, pipe, cache_dir=tmp_path / "cache")
    adapter = runner.adapter_name_for(job.subject_id, lora.lora_fp)
    runner.activate_lora(pipe, lora, adapter)
    try:
        request = job.requests[0]
        res = runner.generate_request(pipe, job, request, store, adapter_name=adapter, lora_fp=lora.lora_fp,
                                      record={"run_id": "r1"})
        assert (res.generated, res.skipped) == (2, 0) and res.keys == request.keys and res.sample_seconds > 0
        for key in request.keys:
            png = store.get(key)
            sidecar = json.loads(store.get(sidecar_key_for(key)))
            assert sidecar["sha256"] == hashlib.sha256(png).hexdigest()
            assert (sidecar["run_id"], sidecar["lora_fp"]) == ("r1", lora.lora_fp)
            assert sidecar["personal_prompt"] == "a sks dog on the beach"
            assert Image.open(io.BytesIO(png)).size == (64, 64)

        # Re-plan: both done, nothing sampled.
        replanned = plan(setup, store)[0]
        again = runner.generate_request(pipe, replanned, replanned.requests[0], store, adapter_name=adapter,
                                        lora_fp=lora.lora_fp)
        assert (again.generated, again.skipped, again.sample_seconds) == (0, 2, 0.0)

        # An orphan PNG (its sidecar lost, e.g. a crash between the two writes) is not done: redone.
        orphan = request.keys[1]
        original = store.get(orphan)
        store.delete(sidecar_key_for(orphan))
        store.put(orphan, b"garbage from a crashed run")
        replanned = plan(setup, store)[0]
        assert replanned.requests[0].done == [True, False]
        redo = runner.generate_request(pipe, replanned, replanned.requests[0], store, adapter_name=adapter,
                                       lora_fp=lora.lora_fp)
        assert (redo.generated, redo.skipped, redo.keys) == (1, 1, [orphan])
        import numpy as np

        redone = np.asarray(Image.open(io.BytesIO(store.get(orphan))), dtype=np.int16)
        first = np.asarray(Image.open(io.BytesIO(original)), dtype=np.int16)
        assert np.abs(redone - first).max() <= 2  # same seed, same pixels (up to batch-size rounding)
        assert json.loads(store.get(sidecar_key_for(orphan)))["sha256"] == hashlib.sha256(store.get(orphan)).hexdigest()
    finally:
        runner.deactivate_lora(pipe, adapter)


def test_catalog_and_contact_sheet_for_a_subject(setup, tmp_path):
    import polars as pl

    store = open_store(str(tmp_path / "out"))
    job = plan(setup, store)[0]
    assert runner.write_subject_catalog(store, "2026-01-02", job, "r0") is None  # nothing finished yet
    assert runner.write_contact_sheet(store, "r0", job) is None
    # Two finished images written as a run would (sampling is tested above; any PIL image will do here).
    from prcore.outputs.sidecar import write_image

    request = job.requests[0]
    for i in range(2):
        write_image(store, request, i, Image.open(io.BytesIO(subject_image(7 + i))), {"run_id": "r0", "lora_fp": "0" * 16})
    key = runner.write_subject_catalog(store, "2026-01-02", job, "r0")
    assert key == "catalog/run_date=2026-01-02/r0--s0.parquet"
    frame = pl.read_parquet(io.BytesIO(store.get(key)))
    assert sorted(frame["key"].to_list()) == sorted(request.keys)
    assert runner.write_subject_catalog(store, "2026-01-02", job, "r1", generated=0) is None

    sheet_key = runner.write_contact_sheet(store, "r0", job, cell=64)
    assert sheet_key == "runs/r0/contact_sheets/s0.png"
    sheet = Image.open(io.BytesIO(store.get(sheet_key)))
    # Two reference rows (left column) and one row of two generated images beside them.
    assert sheet.size == (6 + 64 + 18 + 2 * (64 + 6), 18 + 6 + 2 * (64 + 6))


def test_contact_sheet_geometry_places_references_left_of_the_grid():
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    blue = Image.new("RGB", (40, 40), (0, 0, 255))
    sheet = runner.contact_sheet([red], [blue] * 5, cell=32, columns=4, gap=4)
    assert sheet.size == (4 + 32 + 12 + 4 * 36, 4 + 2 * 36)
    assert sheet.getpixel((4 + 16, 4 + 16)) == (255, 0, 0)
    x0 = 4 + 32 + 4 + 8
    assert sheet.getpixel((x0 + 16, 4 + 16)) == (0, 0, 255)
    assert sheet.getpixel((x0 + 16, 4 + 36 + 16)) == (0, 0, 255)  # 5th image: second row
    assert sheet.getpixel((x0 + 36 + 16, 4 + 36 + 16)) == (255, 255, 255)  # nothing after it


def test_shards_records_and_failure_report(tmp_path):
    assert runner.shard(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert runner.shard([], 3) == []
    with pytest.raises(ValueError, match="subjects_per_shard"):
        runner.shard(["a"], 0)

    try:
        raise FloatingPointError("training of subject 'x' diverged (final loss nan)\nmore")
    except FloatingPointError as exc:
        failure = runner.failure_from(exc, subject_id="x", step="train", run_id="r", shard=3)
    assert (failure.error, failure.error_type, failure.shard) == ("training of subject 'x' diverged (final loss nan)",
                                                                  "FloatingPointError", 3)
    assert "FloatingPointError" in failure.traceback

    ok = runner.SubjectResult("a", requests=2, images=4, generated=3, skipped=1, model_seconds=1.5, lora_source="trained")
    bad = runner.SubjectResult("x", requests=1, images=2, failed=2, error=failure.error, step="train")
    record = runner.ShardRecord(run_id="r", shard=3, subjects=[ok, bad], worker=runner.worker_identity(),
                                started="s", finished="f", seconds=2.0)
    assert runner.ShardRecord.from_json(record.to_json()) == record
    assert runner.summarize([ok, bad]) | {} == {
        "subjects": 2, "failed_subjects": 1, "requests": 3, "images": 6, "generated": 3, "skipped": 1, "failed": 2,
        "trained": 1, "model_seconds": 1.5, "qc_failed": 0}
    rows = runner.table_rows([ok, bad])
    assert [r["subject"] for r in rows] == ["a", "x"] and rows[1]["error"].startswith("train: training of subject")

    store = open_store(str(tmp_path))
    key = runner.write_failure_report(store, "r", [failure])
    report = json.loads(store.get(key))
    assert key == "runs/r/failures.json" and report["failures"][0]["subject_id"] == "x"
    assert "| x | train | FloatingPointError" in runner.failures_markdown("r", [failure])


def test_unknown_generation_default_is_one_clear_error(setup, tmp_path):
    with pytest.raises(ValueError, match="unknown generation default"):
        plan(setup, open_store(str(tmp_path)), defaults={"num_imgs": 3})


def test_scoring_is_skipped_without_models(caplog):
    with caplog.at_level("INFO", logger="prcore.pipeline.runner"):
        assert runner.make_scorer(None, None) is None
    assert "scoring skipped" in caplog.text
    assert runner.qc_thresholds({"clip_t": None}) is None


def test_scores_and_qc_land_in_sidecars_and_catalogue(setup, tmp_path_factory, tmp_path):
    """The flow's scoring stage: CLIP-T/CLIP-I/DINO and qc_pass in every sidecar and catalogue row;
    a threshold between two images' scores flags exactly the one below it."""
    import polars as pl

    from prcore.outputs.catalog import read_catalog
    from prcore.quality.tiny import build_tiny_clip, build_tiny_dino

    models = tmp_path_factory.mktemp("metric-models")
    scorer = runner.make_scorer(str(build_tiny_clip(models / "clip")), str(build_tiny_dino(models / "dino")), device="cpu")
    store = open_store(str(tmp_path / "out"))
    job = plan(setup, store)[0]
    pipe = setup["pipe"]
    refs = runner.reference_images(job)
    lora = runner.ensure_lora(job, store, pipe, cache_dir=tmp_path / "cache")
    adapter = runner.adapter_name_for(job.subject_id, lora.lora_fp)
    runner.activate_lora(pipe, lora, adapter)
    try:
        request = job.requests[0]
        runner.generate_request(pipe, job, request, store, adapter_name=adapter, lora_fp=lora.lora_fp,
                                scorer=scorer, references=refs)
        first = [json.loads(store.get(sidecar_key_for(k))) for k in request.keys]
        for sc in first:
            assert {"clip_t", "clip_i", "dino"} <= set(sc) and sc["qc_pass"] is None  # no thresholds: no verdict
        dino = [sc["dino"] for sc in first]
        assert dino[0] != dino[1]
        threshold = (dino[0] + dino[1]) / 2

        for key in request.keys:  # redo the request with a QC threshold between the two scores
            store.delete(sidecar_key_for(key))
        replanned = plan(setup, store)[0]
        res = runner.generate_request(pipe, replanned, replanned.requests[0], store, adapter_name=adapter,
                                      lora_fp=lora.lora_fp, scorer=scorer, references=refs,
                                      qc_thresholds=runner.qc_thresholds({"dino": threshold}))
        second = [json.loads(store.get(sidecar_key_for(k))) for k in request.keys]
        assert [sc["dino"] for sc in second] == pytest.approx(dino, abs=1e-5)  # same seeds, same scores
        assert [sc["qc_pass"] for sc in second] == [d >= threshold for d in dino]
        assert res.qc_failed == 1

        runner.write_subject_catalog(store, "2026-11-25", replanned, "r-qc", generated=res.generated)
        cat = read_catalog(store).sort("index")
        assert cat["qc_pass"].to_list() == [d >= threshold for d in dino]
        assert cat["dino"].to_list() == pytest.approx([sc["dino"] for sc in second])
        assert cat.select(pl.col("clip_t").is_not_null().all(), pl.col("clip_i").is_not_null().all()).row(0) == (True, True)

        # the contact sheet frames the failed image in red and captions every image with its scores
        key = runner.write_contact_sheet(store, "r-qc", replanned, image_keys=request.keys, cell=64)
        sheet = Image.open(io.BytesIO(store.get(key))).convert("RGB")
        notes = [runner.score_note(sc) for sc in second]
        assert [n[1] for n in notes] == [d >= threshold for d in dino]
        assert all(n[0].count(".") == 3 for n in notes) and sum("QC fail" in n[0] for n in notes) == 1
        plain = runner.contact_sheet(refs, [Image.open(io.BytesIO(store.get(k))) for k in request.keys], cell=64,
                                     label=f"{job.subject_id}: references | generated")
        assert sheet.size == plain.size
        red = [(x, y) for x in range(sheet.width) for y in range(sheet.height) if sheet.getpixel((x, y)) == (220, 0, 0)]
        assert red and not [(x, y) for x in range(plain.width) for y in range(plain.height) if plain.getpixel((x, y)) == (220, 0, 0)]
    finally:
        runner.deactivate_lora(pipe, adapter)
