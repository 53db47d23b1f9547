"""The Prefect-free layer the tasks wrap: LoRA reuse, request sampling, records, contact sheets."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from prefect_harness import manifest_rows, subject_image, write_local_manifest

from prcore.data.schema import GenerationDefaults, TrainConfig
from prcore.outputs import reports
from prcore.outputs.contact_sheet import LINE, SheetRow, contact_sheet, request_label, request_rows, score_note
from prcore.pipeline import lora as L
from prcore.pipeline import subject as S
from prcore.pipeline.settings import RunSettings
from prcore.quality.qc import QCThresholds
from prcore.store.keys import sidecar_key_for
from prcore.store.storage import open_store

CONFIG = TrainConfig(steps=2)
RUN = S.RunContext("r1", "2026-01-02")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd_path, tiny_sd):
    folder = tmp_path_factory.mktemp("runner")
    manifest = write_local_manifest(folder, manifest_rows(2, prompts=2, num_images=2, steps=2, train_steps=2), subjects=2)
    return {"manifest": str(manifest), "model": str(tiny_sd_path), "pipe": tiny_sd, "folder": folder}


def plan(setup, store, defaults=GenerationDefaults()):
    return S.plan_jobs(setup["manifest"], store, model_id=setup["model"], defaults=defaults)


def lora_for(setup, inputs, store, cache, config=CONFIG):
    config = RunSettings(train=config).train_config(inputs.job.train_overrides)
    fp = L.lora_fingerprint(inputs, base_model_id=setup["model"], config=config)
    return L.ensure_lora(inputs, store, setup["pipe"], config=config, lora_fp=fp, base_model_id=setup["model"], cache_dir=cache)


def generate(setup, inputs, request, store, lora, **kw):
    return S.generate_request(setup["pipe"], inputs, request, store, adapter_name=lora.adapter_name, lora_fp=lora.lora_fp,
                              base_model=setup["model"], **kw)


def test_ensure_lora_trains_once_then_reuses_from_cache_and_from_store(setup, tmp_path):
    store = open_store(str(tmp_path / "out"))
    inputs = S.read_subject_inputs(plan(setup, store)[0])
    first = lora_for(setup, inputs, store, tmp_path / "cacheA")
    assert first.source == "trained" and first.train_seconds > 0 and first.final_loss is not None
    keys = sorted(store.list("loras/"))
    assert keys == [f"loras/s0/{first.lora_fp}/{name}" for name in ("lora_kohya.safetensors", "pytorch_lora_weights.safetensors", "training.json")]
    again = lora_for(setup, inputs, store, tmp_path / "cacheA")
    assert (again.source, again.lora_fp, again.train_seconds) == ("cache", first.lora_fp, 0.0)

    # Another machine (empty cache): downloads from the store, byte for byte.
    other = lora_for(setup, inputs, store, tmp_path / "cacheB")
    assert other.source == "store"
    weights = "pytorch_lora_weights.safetensors"
    assert (Path(other.local_dir) / weights).read_bytes() == (Path(first.local_dir) / weights).read_bytes()

    # A changed training config is another LoRA, next to the first.
    changed = lora_for(setup, inputs, store, tmp_path / "cacheA", TrainConfig(steps=2, rank=2))
    assert changed.source == "trained" and changed.lora_fp != first.lora_fp
    assert len([k for k in store.list("loras/s0/") if k.endswith("training.json")]) == 2


def test_half_uploaded_lora_is_not_reused(setup, tmp_path):
    """Weights without training.json (an upload cut short) do not count as a LoRA in the store."""
    store = open_store(str(tmp_path / "out"))
    store.put("loras/s1/0123456789abcdef/pytorch_lora_weights.safetensors", b"partial upload")
    with pytest.raises(FileNotFoundError, match=r"not \(complete\) in"):
        L.materialize_lora(store, "s1", "0123456789abcdef", tmp_path / "cache")
    assert not (tmp_path / "cache" / "loras" / "s1").exists()


def test_lora_cache_is_checked_against_the_store(setup, tmp_path):
    """The store decides: an emptied output root retrains even with a warm local cache; a record whose
    weights are gone retrains; a local copy that differs from the store's is replaced by the store's."""
    import shutil

    store = open_store(str(tmp_path / "out"))
    inputs = S.read_subject_inputs(plan(setup, store)[0])
    first = lora_for(setup, inputs, store, tmp_path / "cache")
    assert first.source == "trained"
    shutil.rmtree(tmp_path / "out")  # the output root deleted; this machine's cache is still warm
    again = lora_for(setup, inputs, store, tmp_path / "cache")
    assert again.source == "trained" and store.exists(f"loras/s0/{first.lora_fp}/pytorch_lora_weights.safetensors")

    store.delete(f"loras/s0/{first.lora_fp}/pytorch_lora_weights.safetensors")  # marked complete, weights gone
    third = lora_for(setup, inputs, store, tmp_path / "cache")
    assert third.source == "trained" and store.exists(f"loras/s0/{first.lora_fp}/pytorch_lora_weights.safetensors")

    local = Path(third.local_dir) / "training.json"
    local.write_text("{}")  # a local copy that is not the store's LoRA
    assert lora_for(setup, inputs, store, tmp_path / "cache").source == "store"
    assert local.read_bytes() == store.get(f"loras/s0/{first.lora_fp}/training.json")
    assert L.materialize_lora(store, "s0", first.lora_fp, tmp_path / "cache") == Path(third.local_dir)


    # a training.json naming an embedding file outside the LoRA folder is refused, the file never read
    import copy

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not for you")
    evil = copy.deepcopy(json.loads(local.read_text()))
    evil["learned_embeddings"] = {"file": "../../../../outside.safetensors", "tokens": ["<x>"], "layout": "sd"}
    local.write_text(json.dumps(evil))
    with pytest.raises(ValueError, match="only learned_embeds.safetensors inside the folder"):
        L.activate_lora(setup["pipe"], third)
    assert third.adapter_name not in getattr(setup["pipe"].unet, "peft_config", {})


def test_generate_request_writes_png_and_sidecar_then_skips_and_redoes_orphans(setup, tmp_path):
    store = open_store(str(tmp_path / "out"))
    inputs = S.read_subject_inputs(plan(setup, store)[0])
    pipe = setup["pipe"]
    lora = lora_for(setup, inputs, store, tmp_path / "cache")
    L.activate_lora(pipe, lora)
    try:
        request = inputs.job.requests[0]
        res = generate(setup, inputs, request, store, lora, run=RUN)
        assert (res.generated, res.skipped) == (2, 0) and [r.key for r in res.records] == request.keys and res.sample_seconds > 0
        for key in request.keys:
            png = store.get(key)
            sidecar = json.loads(store.get(sidecar_key_for(key)))
            assert sidecar["sha256"] == hashlib.sha256(png).hexdigest()
            assert (sidecar["run_id"], sidecar["lora_fp"]) == ("r1", lora.lora_fp)
            assert sidecar["personal_prompt"] == "a sks dog on the beach"
            assert Image.open(io.BytesIO(png)).size == (64, 64)

        # Re-plan: both done, nothing sampled.
        replanned = S.SubjectInputs(plan(setup, store)[0], inputs.images)
        again = generate(setup, replanned, replanned.job.requests[0], store, lora)
        assert (again.generated, again.skipped, again.sample_seconds) == (0, 2, 0.0)

        # An orphan PNG (its sidecar lost, e.g. a crash between the two writes) is not done: redone.
        orphan = request.keys[1]
        original = store.get(orphan)
        store.delete(sidecar_key_for(orphan))
        store.put(orphan, b"garbage from a crashed run")
        replanned = S.SubjectInputs(plan(setup, store)[0], inputs.images)
        assert replanned.job.requests[0].done == [True, False]
        redo = generate(setup, replanned, replanned.job.requests[0], store, lora)
        assert (redo.generated, redo.skipped, [r.key for r in redo.records]) == (1, 1, [orphan])
        import numpy as np

        redone = np.asarray(Image.open(io.BytesIO(store.get(orphan))), dtype=np.int16)
        first = np.asarray(Image.open(io.BytesIO(original)), dtype=np.int16)
        assert np.abs(redone - first).max() <= 2  # same seed, same pixels (up to batch-size rounding)
        assert json.loads(store.get(sidecar_key_for(orphan)))["sha256"] == hashlib.sha256(store.get(orphan)).hexdigest()
    finally:
        L.deactivate_lora(pipe, lora.adapter_name)


def test_catalog_and_contact_sheet_for_a_subject(setup, tmp_path):
    import polars as pl

    store = open_store(str(tmp_path / "out"))
    inputs = S.read_subject_inputs(plan(setup, store)[0])
    run = S.RunContext("r0", "2026-01-02")
    assert S.finished_records(store, inputs.job) == []  # nothing finished yet
    assert S.catalog_is_current(store, "s0")  # nothing in the store, no file: nothing to reconcile
    assert S.write_subject_contact_sheet(store, run, inputs, []) is None
    # Two finished images written as a run would (sampling is tested above; any PIL image will do here).
    from prcore_testing import record_for

    from prcore.outputs.sidecar import write_image

    request = inputs.job.requests[0]
    for i in range(2):
        write_image(store, record_for(request, i, run_id="r0", lora_fp="0" * 16), Image.open(io.BytesIO(subject_image(7 + i))))
    job = plan(setup, store)[0]
    records = S.finished_records(store, job)
    assert not S.catalog_is_current(store, "s0")  # images without a catalogue file: a rerun writes it
    key = S.write_subject_catalog(store, job)
    assert key == "catalog/s0.parquet" and S.catalog_is_current(store, "s0")
    frame = pl.read_parquet(io.BytesIO(store.get(key)))
    assert sorted(frame["key"].to_list()) == sorted(request.keys)
    store.delete(sidecar_key_for(request.keys[1]))  # an image removed by hand: the file no longer matches
    assert not S.catalog_is_current(store, "s0")
    assert S.write_subject_catalog(store, job) == key and pl.read_parquet(io.BytesIO(store.get(key)))["key"].to_list() == request.keys[:1]
    S.mark_dirty(store, run, "s0")  # a run that wrote images and crashed before its catalogue
    assert not S.catalog_is_current(store, "s0")
    S.clear_dirty(store, "s0")
    assert S.catalog_is_current(store, "s0")

    from prcore.outputs.contact_sheet import write_contact_sheet

    sheet_key = write_contact_sheet(store, "r0", job.subject_id, inputs.references, records, cell=64)
    assert sheet_key == "runs/r0/contact_sheets/s0.png"
    sheet = Image.open(io.BytesIO(store.get(sheet_key)))
    # Two reference rows (left column) and one row of two generated images beside them.
    assert sheet.size == (6 + 64 + 18 + 2 * (64 + 6), 18 + 6 + 2 * (64 + 6))


def test_contact_sheet_geometry_places_references_left_of_labelled_rows():
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    blue = Image.new("RGB", (40, 40), (0, 0, 255))
    green = Image.new("RGB", (40, 40), (0, 255, 0))
    rows = [SheetRow(["a sks dog in the snow", "parallel_rescaled: cfg 7.5, cg 3, eta 0.5"], [blue] * 5),
            SheetRow(["a sks dog, sketch", "cfg: cfg 7.5"], [green])]
    sheet = contact_sheet([red], rows, cell=32, columns=4, gap=4)
    label_h = 2 * LINE
    assert sheet.size == (4 + 32 + 12 + 4 * 36, 4 + (label_h + 2 * 36) + (label_h + 36))
    assert sheet.getpixel((4 + 16, 4 + 16)) == (255, 0, 0)
    x0 = 4 + 32 + 4 + 8
    dark = [x for x in range(x0, sheet.width) for y in range(4, 4 + label_h) if sum(sheet.getpixel((x, y))) < 300]
    assert dark  # the row's label is drawn above its images
    y1 = 4 + label_h
    assert sheet.getpixel((x0 + 16, y1 + 16)) == (0, 0, 255)
    assert sheet.getpixel((x0 + 16, y1 + 36 + 16)) == (0, 0, 255)  # 5th image: second line of the first row
    assert sheet.getpixel((x0 + 36 + 16, y1 + 36 + 16)) == (255, 255, 255)  # nothing after it
    y2 = y1 + 2 * 36 + label_h
    assert sheet.getpixel((x0 + 16, y2 + 16)) == (0, 255, 0)  # the second request: its own row, below its label


def test_request_rows_group_by_request_and_label_the_settings():
    from dataclasses import replace

    from prcore.outputs.sidecar import ImageRecord

    a = ImageRecord(subject_id="s", prompt_id="p0", req_fp="r0", index=0, key="k0", seed=1, prompt_template="a {subject}",
                    personal_prompt="a sks dog", base_prompt="a dog", negative_prompt="", class_noun="dog", identifier="sks",
                    guidance="parallel_rescaled", guidance_scale=7.5, consistency_scale=3.0, parallel_scale=0.5,
                    num_inference_steps=20, scheduler="DDIMScheduler", height=8, width=8, base_model="m", lora_fp="f",
                    device="cpu", dtype="float32", consistency_start=0.2)
    b = replace(a, req_fp="r1", prompt_id="p1", personal_prompt="a sks dog in sketch style", guidance="cfg")
    images = [Image.new("RGB", (8, 8))] * 3
    rows = request_rows([a, b, a], images)
    assert [len(r.images) for r in rows] == [2, 1]
    assert rows[0].label[0] == a.personal_prompt and f"cfg {a.guidance_scale:g}" in rows[0].label[1]
    assert "eta 0.5" in rows[0].label[1] and "window 0.2-1" in rows[0].label[1]
    assert rows[1].label == ["a sks dog in sketch style", "cfg: cfg 7.5; 20 steps DDIMScheduler"]


def test_shards_records_and_failure_report(tmp_path):
    assert S.shard(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert S.shard([], 3) == []
    with pytest.raises(ValueError, match="subjects_per_shard"):
        S.shard(["a"], 0)

    try:
        raise FloatingPointError("training of subject 'x' diverged (final loss nan)\nmore")
    except FloatingPointError as exc:
        failure = reports.failure_from(exc, subject_id="x", step="train", run_id="r", shard=3)
    assert (failure.error, failure.error_type, failure.shard) == ("training of subject 'x' diverged (final loss nan)",
                                                                  "FloatingPointError", 3)
    assert "FloatingPointError" in failure.traceback

    ok = reports.SubjectResult("a", requests=2, images=4, generated=3, skipped=1, model_seconds=1.5, lora_source="trained")
    bad = reports.SubjectResult("x", requests=1, images=2, failed=2, error=failure.error, step="train")
    record = reports.ShardRecord(run_id="r", shard=3, subjects=[ok, bad], worker=S.worker_identity(),
                                started="s", finished="f", seconds=2.0)
    assert reports.ShardRecord.from_json(record.to_json()) == record
    assert reports.summarize([ok, bad]) | {} == {
        "subjects": 2, "failed_subjects": 1, "requests": 3, "images": 6, "generated": 3, "skipped": 1, "failed": 2,
        "trained": 1, "model_seconds": 1.5, "qc_failed": 0, "leased": 0, "damaged": 0}
    rows = reports.table_rows([ok, bad])
    assert [r["subject"] for r in rows] == ["a", "x"] and rows[1]["error"].startswith("train: training of subject")

    store = open_store(str(tmp_path))
    key = reports.write_failure_report(store, "r", [failure])
    report = json.loads(store.get(key))
    assert key == "runs/r/failures.json" and report["failures"][0]["subject_id"] == "x"
    assert "| x | train | FloatingPointError" in reports.failures_markdown("r", [failure])


def test_settings_refuse_unknown_and_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="num_imgs"):
        RunSettings.model_validate({"generation": {"num_imgs": 3}})
    with pytest.raises(ValidationError, match="steps must be an integer in 1..10000"):
        RunSettings.model_validate({"train": {"steps": 0}})
    s = RunSettings.model_validate({"train": {"steps": 2}, "scoring": {"qc": {"clip_t": 0.2}}})
    assert s.train_config({"rank": 2}) == TrainConfig(steps=2, rank=2)
    assert s.qc_for({"clip_t": 0.3}) == QCThresholds(clip_t=0.3) and s.qc_for(None) == QCThresholds(clip_t=0.2)
    assert RunSettings.model_validate(s.model_dump(mode="json")) == s  # what travels to a shard


def test_scoring_is_skipped_without_models():
    assert S.make_scorer(RunSettings()) is None


def test_scores_and_qc_land_in_sidecars_and_catalogue(setup, tmp_path_factory, tmp_path):
    """The flow's scoring stage: CLIP-T/CLIP-I/DINO and qc_pass in every sidecar and catalogue row;
    a threshold between two images' scores flags exactly the one below it."""
    import polars as pl

    from prcore.outputs.catalog import read_catalog
    from prcore.quality.tiny import build_tiny_clip, build_tiny_dino

    models = tmp_path_factory.mktemp("metric-models")
    scoring = {"clip_model": str(build_tiny_clip(models / "clip")), "dino_model": str(build_tiny_dino(models / "dino"))}
    scorer = S.make_scorer(RunSettings.model_validate({"scoring": scoring, "placement": {"device": "cpu"}}))
    store = open_store(str(tmp_path / "out"))
    inputs = S.read_subject_inputs(plan(setup, store)[0])
    pipe = setup["pipe"]
    refs = inputs.references
    lora = lora_for(setup, inputs, store, tmp_path / "cache")
    L.activate_lora(pipe, lora)
    try:
        request = inputs.job.requests[0]
        generate(setup, inputs, request, store, lora, scorer=scorer)
        first = [json.loads(store.get(sidecar_key_for(k))) for k in request.keys]
        for sc in first:
            assert {"clip_t", "clip_i", "dino"} <= set(sc) and sc["qc_pass"] is None  # no thresholds: no verdict
        dino = [sc["dino"] for sc in first]
        assert dino[0] != dino[1]
        threshold = (dino[0] + dino[1]) / 2

        for key in request.keys:  # redo the request with a QC threshold between the two scores
            store.delete(sidecar_key_for(key))
        replanned = S.SubjectInputs(plan(setup, store)[0], inputs.images)
        res = generate(setup, replanned, replanned.job.requests[0], store, lora, scorer=scorer,
                       qc_thresholds=QCThresholds(dino=threshold))
        second = [json.loads(store.get(sidecar_key_for(k))) for k in request.keys]
        assert [sc["dino"] for sc in second] == pytest.approx(dino, abs=1e-5)  # same seeds, same scores
        assert [sc["qc_pass"] for sc in second] == [d >= threshold for d in dino]
        assert res.qc_failed == 1

        S.write_subject_catalog(store, replanned.job, res.records)
        cat = read_catalog(store).sort("index")
        assert cat["qc_pass"].to_list() == [d >= threshold for d in dino]
        assert cat["dino"].to_list() == pytest.approx([sc["dino"] for sc in second])
        assert cat.select(pl.col("clip_t").is_not_null().all(), pl.col("clip_i").is_not_null().all()).row(0) == (True, True)

        # the contact sheet frames the failed image in red and captions every image with its scores
        from prcore.outputs.contact_sheet import write_contact_sheet

        key = write_contact_sheet(store, "r-qc", replanned.job.subject_id, refs, res.records, cell=64)
        sheet = Image.open(io.BytesIO(store.get(key))).convert("RGB")
        notes = [score_note(r) for r in res.records]
        assert [n[1] for n in notes] == [d >= threshold for d in dino]
        assert all(n[0].count(".") == 3 for n in notes) and sum("QC fail" in n[0] for n in notes) == 1
        plain = contact_sheet(refs, [SheetRow(request_label(res.records[0]), [Image.open(io.BytesIO(store.get(k))) for k in request.keys])],
                              cell=64, label=f"{inputs.job.subject_id}: references | generated, one row per prompt")
        assert sheet.size == plain.size
        red = [(x, y) for x in range(sheet.width) for y in range(sheet.height) if sheet.getpixel((x, y)) == (220, 0, 0)]
        assert red and not [(x, y) for x in range(plain.width) for y in range(plain.height) if plain.getpixel((x, y)) == (220, 0, 0)]
    finally:
        L.deactivate_lora(pipe, lora.adapter_name)


def test_a_subjects_requests_share_denoising_loops_and_draw_what_each_draws_alone(setup, tmp_path):
    """Both requests of a subject (2 images each) in one loop: 4 images, the same PNG pixels as one
    request at a time, each with its own sidecar; ``batches`` packs by parameters and image budget."""
    import numpy as np

    store_a, store_b = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    inputs = S.read_subject_inputs(plan(setup, store_a)[0])
    pipe = setup["pipe"]
    lora = lora_for(setup, inputs, store_a, tmp_path / "cache")
    L.activate_lora(pipe, lora)
    try:
        requests = inputs.job.requests
        assert [len(b) for b in S.batches(requests, 4)] == [2] and [len(b) for b in S.batches(requests, 3)] == [1, 1]
        together = S.generate_requests(pipe, inputs, requests, store_a, adapter_name=lora.adapter_name, lora_fp=lora.lora_fp,
                                       base_model=setup["model"])
        apart = [generate(setup, inputs, r, store_b, lora) for r in requests]
        assert [r.generated for r in together] == [2, 2] and [len(r.records) for r in together] == [2, 2]
        for t, a in zip(together, apart, strict=True):
            for rt, ra in zip(t.records, a.records, strict=True):
                assert rt.key == ra.key and rt.seed == ra.seed and rt.unet_rows == ra.unet_rows
                pt = np.asarray(Image.open(io.BytesIO(store_a.get(rt.key))), dtype=np.int16)
                pa = np.asarray(Image.open(io.BytesIO(store_b.get(ra.key))), dtype=np.int16)
                assert np.abs(pt - pa).max() <= 1
        with pytest.raises(ValueError, match="share their sampling parameters"):
            other = dataclasses.replace(requests[1], params={**requests[1].params, "guidance_scale": 1.0})
            S.generate_requests(pipe, inputs, [requests[0], other], store_a, adapter_name=lora.adapter_name,
                                lora_fp=lora.lora_fp, base_model=setup["model"])
    finally:
        L.deactivate_lora(pipe, lora.adapter_name)


def _flip(data: bytes, at: int) -> bytes:
    """The same bytes with one bit flipped at ``at`` (same size: only a checksum can tell)."""
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_damaged_image_is_not_done_and_is_made_again(setup, tmp_path, where, request):
    """A finished image counts as done only while its stored PNG is the file its sidecar recorded: a
    truncated PNG (size, both stores), a same-size bit flip (S3: the listing's ETag is the MD5 the sidecar
    recorded), a PNG deleted under its sidecar; the catalogue of such a subject is no longer current and is
    rewritten with only the images that are whole. Checked from one listing + the catalogue, no PNG read."""
    from prcore_testing import record_for

    from prcore.outputs.sidecar import write_image

    if where == "s3":
        request.getfixturevalue("s3_server")
        store = open_store(f"s3://{request.getfixturevalue('s3_bucket')}/out")
    else:
        store = open_store(str(tmp_path / "out"))
    job = plan(setup, store)[0]
    keys = [k for r in job.requests for k in r.keys]
    for r in job.requests:
        for i in range(r.num_images):
            write_image(store, record_for(r, i, lora_fp="0" * 16), Image.open(io.BytesIO(subject_image(3 + i))))
    S.write_subject_catalog(store, plan(setup, store)[0])
    assert S.catalog_is_current(store, "s0")

    truncated, deleted = keys[0], keys[1]
    store.put(truncated, store.get(truncated)[:100])  # a PNG cut short, its sidecar still there
    assert not S.catalog_is_current(store, "s0")
    job = S.refresh_done(store, plan(setup, store)[0])
    assert [k for r in job.requests for k, d in zip(r.keys, r.done, strict=True) if not d] == [truncated]
    assert job.n_done == len(keys) - 1

    store.delete(deleted)  # the PNG gone, its sidecar left: not done, already at planning (listing only)
    job = plan(setup, store)[0]
    assert not job.requests[0].done[1] and S.refresh_done(store, job).requests[0].done[:2] == [False, False]
    S.write_subject_catalog(store, job)
    import polars as pl

    cat = pl.read_parquet(io.BytesIO(store.get("catalog/s0.parquet")))
    assert sorted(cat["key"].to_list()) == sorted(keys[2:])
    assert not S.catalog_is_current(store, "s0")  # the damaged image is still work left
    r = job.requests[0]
    for i in (0, 1):  # made again (replacing the bad bytes), then the catalogue: current again
        write_image(store, record_for(r, i, lora_fp="0" * 16), Image.open(io.BytesIO(subject_image(3 + i))))
    S.write_subject_catalog(store, S.refresh_done(store, plan(setup, store)[0]))
    assert S.catalog_is_current(store, "s0") and S.verified_images(store, "s0") == (set(keys), [])

    if where == "s3":  # same size, one bit changed: the ETag (MD5) no longer matches the recorded md5
        flipped = keys[2]
        store.put(flipped, _flip(store.get(flipped), 60))
        assert not S.catalog_is_current(store, "s0")
        assert flipped not in S.verified_images(store, "s0")[0]


def test_a_damaged_catalogue_file_is_detected_and_rebuilt_from_the_sidecars(setup, tmp_path):
    """Catalogue files carry Parquet page checksums: garbage or one flipped bit is a CatalogCorruptError
    naming the file (never a traceback of the run, never silently fewer rows); the subject is not current,
    and its file is rebuilt with one row per image from the sidecars."""
    import polars as pl
    from prcore_testing import record_for

    from prcore.outputs.catalog import CatalogCorruptError, read_catalog, read_subject_catalog
    from prcore.outputs.sidecar import write_image

    store = open_store(str(tmp_path / "out"))
    job = plan(setup, store)[0]
    for r in job.requests:
        for i in range(r.num_images):
            write_image(store, record_for(r, i), Image.open(io.BytesIO(subject_image(5 + i))))
    key = S.write_subject_catalog(store, plan(setup, store)[0])
    good = store.get(key)
    n = sum(r.num_images for r in job.requests)
    for bad in (b"not parquet at all", good[: len(good) // 2], _flip(good, 40), _flip(good, 200)):
        store.put(key, bad)
        with pytest.raises(CatalogCorruptError, match="catalog/s0.parquet is damaged"):
            read_subject_catalog(store, "s0")
        with pytest.raises(CatalogCorruptError, match="rebuilds it"):
            read_catalog(store)
        assert not S.catalog_is_current(store, "s0")
        S.write_subject_catalog(store, plan(setup, store)[0])
        assert read_subject_catalog(store, "s0").height == n and S.catalog_is_current(store, "s0")
    assert pl.read_parquet(io.BytesIO(store.get(key))).height == n  # still plain Parquet for every reader


def test_a_damaged_lora_is_never_used_it_is_trained_again_once(setup, tmp_path):
    """training.json records every LoRA file's sha256 and size; before sampling, the copy is hashed against
    it. A bit flipped in the store's weights: not downloaded into use but trained again and replaced (the
    store then holds a whole LoRA); a damaged local cache copy: downloaded again from the store;
    materialize_lora refuses a damaged store copy with one error."""
    store = open_store(str(tmp_path / "out"))
    inputs = S.read_subject_inputs(plan(setup, store)[0])
    first = lora_for(setup, inputs, store, tmp_path / "cacheA")
    weights_key = f"loras/s0/{first.lora_fp}/pytorch_lora_weights.safetensors"
    record = json.loads(store.get(f"loras/s0/{first.lora_fp}/training.json"))
    assert record["files"]["pytorch_lora_weights.safetensors"]["sha256"] == hashlib.sha256(store.get(weights_key)).hexdigest()

    local = Path(first.local_dir) / "pytorch_lora_weights.safetensors"
    local.write_bytes(_flip(local.read_bytes(), len(local.read_bytes()) - 10))  # this machine's copy damaged
    again = lora_for(setup, inputs, store, tmp_path / "cacheA")
    assert again.source == "store" and L.lora_problem(Path(again.local_dir)) is None

    good = store.get(weights_key)
    store.put(weights_key, good[:1000])  # the store's copy cut short, this machine's copy whole: the listing
    assert lora_for(setup, inputs, store, tmp_path / "cacheA").source == "cache"  # (size) tells; re-uploaded from
    assert store.get(weights_key) == good  # the verified local copy
    store.put(weights_key, _flip(good, len(good) - 10))  # the store's copy damaged (same size)
    with pytest.raises(ValueError, match="is damaged: pytorch_lora_weights.safetensors is not the file"):
        L.materialize_lora(store, "s0", first.lora_fp, tmp_path / "cacheB")
    assert not (tmp_path / "cacheB" / "loras" / "s0" / first.lora_fp).exists()
    repaired = lora_for(setup, inputs, store, tmp_path / "cacheB")
    assert repaired.source == "trained" and repaired.lora_fp == first.lora_fp
    assert L.lora_problem(Path(repaired.local_dir)) is None
    record = json.loads(store.get(f"loras/s0/{first.lora_fp}/training.json"))
    assert record["files"]["pytorch_lora_weights.safetensors"]["sha256"] == hashlib.sha256(store.get(weights_key)).hexdigest()
    assert lora_for(setup, inputs, store, tmp_path / "cacheC").source == "store"  # whole again: reused, not retrained


def test_a_lora_an_earlier_version_wrote_in_two_key_layouts_is_trained_again_once(setup, tmp_path):
    """training.json without file hashes (an earlier version) is still checked: a weights file mixing peft's and
    diffusers' key layouts (what earlier versions wrote for non-attention targets: diffusers drops one layout
    on load) counts as damaged and is trained again once; a whole file of that age is reused."""
    from safetensors.torch import load_file, save_file

    store = open_store(str(tmp_path / "out"))
    inputs = S.read_subject_inputs(plan(setup, store)[0])
    first = lora_for(setup, inputs, store, tmp_path / "cacheA")
    prefix = f"loras/s0/{first.lora_fp}/"
    record = json.loads(store.get(prefix + "training.json"))
    record.pop("files")  # as an earlier version wrote it
    store.put(prefix + "training.json", json.dumps(record).encode())
    assert lora_for(setup, inputs, store, tmp_path / "cacheB").source == "store"  # whole: reused as before

    tensors = load_file(str(Path(first.local_dir) / "pytorch_lora_weights.safetensors"))
    keys = sorted(tensors)
    mixed = {(k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.") if "attn1" in k else k): v
             for k, v in tensors.items()}
    assert any(".lora_A." in k for k in mixed) and any(".lora.down." in k for k in mixed) and len(mixed) == len(keys)
    old = tmp_path / "old.safetensors"
    save_file(mixed, str(old))
    store.put(prefix + "pytorch_lora_weights.safetensors", old.read_bytes())
    again = lora_for(setup, inputs, store, tmp_path / "cacheC")
    assert again.source == "trained" and "mixes two LoRA key layouts" in (again.damaged or "")
    assert L.lora_problem(Path(again.local_dir)) is None
    assert lora_for(setup, inputs, store, tmp_path / "cacheD").source == "store"  # replaced once: reused after


def test_subjects_with_work_checks_the_idle_subjects_in_parallel_and_keeps_the_order(tmp_path):
    """A rerun of an unchanged manifest is one catalogue check per subject: they run side by side (a real
    LocalStore, its HEADs counted while in flight), and the answer is what the serial check gives."""
    import threading
    import time
    from types import SimpleNamespace

    from prcore.store.storage import LocalStore

    class InFlight(LocalStore):
        now = peak = 0
        lock = threading.Lock()

        def exists(self, key: str) -> bool:
            with self.lock:
                InFlight.now += 1
                InFlight.peak = max(InFlight.peak, InFlight.now)
            time.sleep(0.05)
            with self.lock:
                InFlight.now -= 1
            return super().exists(key)

    from prcore.store.keys import dirty_key
    from prcore.store.storage import LocalStore

    store = InFlight(tmp_path / "out")
    jobs = [SimpleNamespace(subject_id=f"s{i}", n_todo=1 if i == 3 else 0) for i in range(12)]
    store.put(dirty_key("s7"), b"{}")  # a run wrote images of s7 and did not finish its catalogue
    picked = S.subjects_with_work(store, jobs)
    assert [j.subject_id for j in picked] == ["s3", "s7"]
    assert [j.subject_id for j in jobs if j.n_todo > 0 or not S.catalog_is_current(store, j.subject_id)] == ["s3", "s7"]
    assert InFlight.peak > 1
