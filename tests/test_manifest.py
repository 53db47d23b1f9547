"""Manifest schema, validation (one test per rule), loading and planning."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from prcore.data.fingerprint import default_prompt_id, image_seed
from prcore.data.load import load_manifest
from prcore.data.plan import plan
from prcore.data.schema import GUIDANCE_MODES, GenerationDefaults, ManifestInvalid
from prcore.data.validate import validate
from prcore.store.keys import image_key
from prcore.store.storage import LocalStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def images(tmp_path) -> list[str]:
    """Three real (tiny) reference images, paths relative to tmp_path."""
    folder = tmp_path / "refs"
    folder.mkdir()
    out = []
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 80, 10, 10)).save(folder / f"{i}.png")
        out.append(f"refs/{i}.png")
    return out


def rows(images: list[str], **overrides) -> list[dict]:
    base = [
        {"subject_id": "dog1", "instance_images": images, "class_noun": "dog", "prompt": "a {subject} on the beach"},
        {"subject_id": "dog1", "instance_images": images, "class_noun": "dog", "prompt": "a {subject} in the snow"},
        {"subject_id": "cat2", "instance_images": images, "class_noun": "cat", "prompt": "a {subject} on the beach"},
    ]
    return base


def write(tmp_path: Path, data, name: str = "m.parquet") -> Path:
    df = data if isinstance(data, pl.DataFrame) else pl.DataFrame(data)
    path = tmp_path / name
    df.write_parquet(path)
    return path


def errors_for(tmp_path, data, check_images=True):
    return validate(load_manifest(write(tmp_path, data)), check_images=check_images)


def assert_one(errors, row, column, *words):
    hits = [e for e in errors if e.column == column and e.row == row]
    assert hits, f"no error for row {row} column {column}: {[str(e) for e in errors]}"
    text = str(hits[0])
    assert (f"row {row}" in text) if row is not None else ("row" not in text.split(":")[0])
    assert f"column {column}" in text
    for w in words:
        assert w in text, text
    return hits[0]


def test_valid_manifest_has_no_errors(tmp_path, images):
    assert errors_for(tmp_path, rows(images)) == []


def test_guidance_modes_have_one_owner():
    """The schema names the modes; the guidance module implements exactly those (nothing else lists them)."""
    from prcore.method.guidance import MODES

    assert tuple(MODES) == GUIDANCE_MODES
    hits = [p for p in (REPO / "prcore").rglob("*.py") if '"parallel_rescaled", "consistency", "cfg"' in p.read_text()]
    assert [p.relative_to(REPO).as_posix() for p in hits] == ["prcore/data/schema.py"]


def test_missing_required_column(tmp_path, images):
    data = [{k: v for k, v in r.items() if k != "class_noun"} for r in rows(images)]
    err = assert_one(errors_for(tmp_path, data), None, "class_noun", "missing")
    assert err.row is None


def test_wrong_dtype(tmp_path, images):
    data = [dict(r, num_images="four") for r in rows(images)]
    assert_one(errors_for(tmp_path, data), None, "num_images", "dtype", "integers")


def test_integral_floats_accepted_as_ints(tmp_path, images):
    data = pl.DataFrame(rows(images)).with_columns(pl.Series("seed", [1.0, None, 3.0]))
    assert errors_for(tmp_path, data) == []


def test_null_in_required_column(tmp_path, images):
    data = rows(images)
    data[1]["prompt"] = None
    assert_one(errors_for(tmp_path, data), 1, "prompt", "null")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(tmp_path, images, prompt):
    data = rows(images)
    data[2]["prompt"] = prompt
    assert_one(errors_for(tmp_path, data), 2, "prompt", "empty", "(subject cat2)")


def test_prompt_without_subject(tmp_path, images):
    data = rows(images)
    data[0]["prompt"] = "a dog on the beach"
    assert_one(errors_for(tmp_path, data), 0, "prompt", "{subject}")


def test_unknown_placeholder(tmp_path, images):
    data = rows(images)
    data[1]["prompt"] = "a {subject} in {place}"
    assert_one(errors_for(tmp_path, data), 1, "prompt", "{place}")


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", "", "x" * 129, ".hidden", "a..b", "has space"])
def test_unsafe_subject_id(tmp_path, images, bad):
    data = rows(images)
    data[2]["subject_id"] = bad
    assert_one(errors_for(tmp_path, data), 2, "subject_id", "not a safe id")


def test_unsafe_prompt_id(tmp_path, images):
    data = rows(images)
    for r in data:
        r["prompt_id"] = None
    data[0]["prompt_id"] = "../../etc"
    assert_one(errors_for(tmp_path, data), 0, "prompt_id", "not a safe id")


def test_duplicate_subject_and_prompt(tmp_path, images):
    data = rows(images)
    data.append(dict(data[0]))  # same subject, same template -> same default prompt_id
    err = assert_one(errors_for(tmp_path, data), 3, "prompt_id", "duplicate of row 0")
    assert err.subject_id == "dog1"


def test_conflicting_subject_columns(tmp_path, images):
    data = rows(images)
    data[1]["class_noun"] = "puppy"
    assert_one(errors_for(tmp_path, data), 1, "class_noun", "differs from row 0")


def test_conflicting_instance_images(tmp_path, images):
    data = rows(images)
    data[1]["instance_images"] = images[:2]
    assert_one(errors_for(tmp_path, data), 1, "instance_images", "differs from row 0")


@pytest.mark.parametrize(
    ("column", "value", "words"),
    [
        ("guidance_scale", -1.0, "0..30"),
        ("consistency_scale", -0.5, "0..30"),
        ("parallel_scale", float("nan"), "finite"),
        ("num_inference_steps", 0, "1..200"),
        ("num_images", 0, "1..64"),
        ("height", 500, "multiple of 8"),
        ("width", 8192, "4096"),
        ("seed", -3, "0..9223372036854775807"),
    ],
)
def test_out_of_range_numbers(tmp_path, images, column, value, words):
    data = rows(images)
    for r in data:
        r[column] = None
    data[1][column] = value
    data[0][column] = 512 if column in ("height", "width") else (1 if column in ("num_inference_steps", "num_images", "seed") else 1.0)
    assert_one(errors_for(tmp_path, data), 1, column, words)
    assert not [e for e in errors_for(tmp_path, data) if e.row == 0]


def test_qc_threshold_columns(tmp_path, images):
    data = rows(images)
    for r in data:
        r["qc_dino"] = 0.4 if r["subject_id"] == "dog1" else None
    data[2]["qc_dino"] = 1.5
    assert_one(errors_for(tmp_path, data), 2, "qc_dino", "[-1, 1]")
    data[2]["qc_dino"] = None
    jobs = plan(load_manifest(write(tmp_path, data)), base_model="tiny")
    assert jobs[0].qc_thresholds == {"dino": 0.4} and jobs[1].qc_thresholds == {}
    # thresholds decide QC only: they never change what is generated
    plain = plan(load_manifest(write(tmp_path, rows(images), name="plain.parquet")), base_model="tiny")
    assert [r.req_fp for r in jobs[0].requests] == [r.req_fp for r in plain[0].requests]


def test_unknown_guidance_mode(tmp_path, images):
    data = rows(images)
    for r in data:
        r["guidance"] = "parallel_rescaled"
    data[2]["guidance"] = "cfg++"
    assert_one(errors_for(tmp_path, data), 2, "guidance", "cfg++", "parallel_rescaled")


@pytest.mark.parametrize("value", [[], None])
def test_no_instance_images(tmp_path, images, value):
    data = rows(images)
    data[2]["instance_images"] = value
    assert_one(errors_for(tmp_path, pl.DataFrame(data, schema_overrides={"instance_images": pl.List(pl.String)})), 2, "instance_images", "no instance images")


def test_missing_instance_image_and_skippable_check(tmp_path, images):
    data = rows(images)
    for r in data[2:]:
        r["instance_images"] = [*images, "refs/missing.png"]
    err = assert_one(errors_for(tmp_path, data), 2, "instance_images", "missing.png", "does not exist")
    assert err.subject_id == "cat2"
    assert errors_for(tmp_path, data, check_images=False) == []


def test_instance_image_not_an_image(tmp_path, images):
    (tmp_path / "refs" / "notes.png").write_text("not a picture")
    data = rows(images)
    for r in data[:2]:
        r["instance_images"] = ["refs/notes.png"]
    errors = errors_for(tmp_path, data)
    assert_one(errors, 0, "instance_images", "not a readable image", "all 2 rows")
    assert len([e for e in errors if e.column == "instance_images"]) == 1  # once per subject


def test_unsupported_uri_scheme(tmp_path, images):
    data = rows(images)
    for r in data[2:]:
        r["instance_images"] = ["https://example.com/a.png"]
    assert_one(errors_for(tmp_path, data, check_images=False), 2, "instance_images", "unsupported URI scheme")


def test_unknown_training_override_and_range(tmp_path, images):
    data = rows(images)
    for r in data:
        r["train_stepz"] = 10
        r["train_rank"] = 0
    errors = errors_for(tmp_path, data)
    assert_one(errors, None, "train_stepz", "train_steps")
    assert_one(errors, 0, "train_rank", "1..256")


def test_unknown_column_suggests_name(tmp_path, images):
    data = [dict(r, guidence_scale=3.0, meta_owner="me") for r in rows(images)]
    errors = errors_for(tmp_path, data)
    assert_one(errors, None, "guidence_scale", "guidance_scale", "meta_")
    assert [e.column for e in errors] == ["guidence_scale"]


def test_empty_manifest(tmp_path, images):
    errors = errors_for(tmp_path, pl.DataFrame(rows(images)).head(0))
    assert [str(e) for e in errors] == ["the manifest has no rows; add one row per (subject, prompt)"]


def test_all_errors_collected(tmp_path, images):
    data = rows(images)
    data[0]["prompt"] = "no placeholder"
    data[1]["subject_id"] = "../x"
    data[2]["class_noun"] = None
    errors = errors_for(tmp_path, data)
    assert {(e.row, e.column) for e in errors} >= {(0, "prompt"), (1, "subject_id"), (2, "class_noun")}


# ---- loading ---------------------------------------------------------------------------------------


def test_relative_images_resolve_against_manifest(tmp_path, images):
    m = load_manifest(write(tmp_path, rows(images)))
    assert m.instance_images(0)[0] == str(tmp_path / "refs" / "0.png")
    assert plan(m)[0].instance_images == [str(tmp_path / "refs" / f"{i}.png") for i in range(3)]


def test_load_folder_and_glob(tmp_path, images):
    data = rows(images)
    (tmp_path / "parts").mkdir()
    pl.DataFrame(data[:2]).with_columns(pl.col("instance_images").list.eval("../" + pl.element())).write_parquet(tmp_path / "parts" / "a.parquet")
    pl.DataFrame(data[2:]).with_columns(pl.col("instance_images").list.eval("../" + pl.element())).write_parquet(tmp_path / "parts" / "b.parquet")
    for uri in (tmp_path / "parts", str(tmp_path / "parts" / "*.parquet")):
        m = load_manifest(uri)
        assert m.df.height == 3 and len(m.files) == 2
        assert validate(m) == []


def test_load_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_manifest(tmp_path / "nope.parquet")


def test_demo_manifest_is_valid():
    m = load_manifest(REPO / "manifests" / "demo.parquet")
    assert validate(m) == []
    assert m.df["subject_id"].n_unique() >= 2


# ---- planning -----------------------------------------------------------------------------------------


def test_plan_applies_defaults_and_seeds(tmp_path, images):
    data = rows(images)
    for r in data:
        r["seed"] = None
    data[2]["seed"] = 1234
    jobs = plan(load_manifest(write(tmp_path, data)), defaults=GenerationDefaults(num_images=3), base_model="tiny")
    assert [j.subject_id for j in jobs] == ["dog1", "cat2"]
    dog, cat = jobs
    assert dog.identifier == "sks" and dog.base_model == "tiny" and dog.n_images == 6
    r0 = dog.requests[0]
    assert r0.params["guidance"] == "parallel_rescaled" and r0.params["guidance_scale"] == 7.5
    assert r0.prompt_id == default_prompt_id("a {subject} on the beach")
    assert len(set(r0.seeds)) == 3 and r0.seeds != dog.requests[1].seeds
    assert cat.requests[0].seeds == [image_seed(1234, i) for i in range(3)]
    assert r0.keys[2] == image_key("dog1", r0.prompt_id, r0.req_fp, 2)
    # determinism: planning again gives the same fingerprints and seeds
    again = plan(load_manifest(write(tmp_path, data)), defaults=GenerationDefaults(num_images=3), base_model="tiny")
    assert again[0].requests[0].seeds == r0.seeds and again[0].requests[0].req_fp == r0.req_fp


def test_req_fp_tracks_what_changes_the_image(tmp_path, images):
    def fp(**change):
        data = rows(images)
        for r in data:
            r.update(change)
        return plan(load_manifest(write(tmp_path, data)), base_model="tiny")[0].requests[0].req_fp

    base = fp()
    assert fp(num_images=8) == base  # more images: the first ones stay done
    assert fp(guidance_scale=5.0) != base
    assert fp(seed=7) != base
    assert fp(identifier="zwx") != base
    assert fp(train_steps=100) != base
    assert fp(instance_images=images[:2]) != base
    data = rows(images)
    assert plan(load_manifest(write(tmp_path, data)), base_model="other")[0].requests[0].req_fp != base


def test_plan_skips_done_and_keeps_half_written(tmp_path, images):
    data = rows(images)
    store = LocalStore(tmp_path / "out")
    manifest = load_manifest(write(tmp_path, data))
    first = plan(manifest, store=store, defaults=GenerationDefaults(num_images=2))
    req = first[0].requests[0]
    store.put(req.keys[0], b"png")
    store.put(req.keys[0][:-4] + ".json", b"{}")  # image 0: finished
    store.put(req.keys[1], b"png")  # image 1: PNG without sidecar = half-written, not done
    jobs = plan(manifest, store=store, defaults=GenerationDefaults(num_images=2))
    r = jobs[0].requests[0]
    assert r.done == [True, False] and r.todo == [1]
    assert jobs[0].n_done == 1 and jobs[0].n_todo == 3
    assert all(not any(x.done) for x in jobs[0].requests[1:]) and jobs[1].n_done == 0


def test_plan_rejects_unsafe_ids_before_any_key(tmp_path, images):
    data = rows(images)
    data[0]["subject_id"] = "../x"
    data[1]["subject_id"] = "../x"
    manifest = load_manifest(write(tmp_path, data))
    store = LocalStore(tmp_path / "out")
    for check in (True, False):
        with pytest.raises(ManifestInvalid, match="subject_id"):
            plan(manifest, store=store, check=check)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="not a safe id"):
        image_key("../x", "p", "0123456789abcdef", 0)


def test_plan_invalid_manifest_raises_with_all_errors(tmp_path, images):
    data = rows(images)
    data[0]["prompt"] = "no placeholder"
    data[2]["prompt"] = "a {subject} at {time}"
    with pytest.raises(ManifestInvalid) as info:
        plan(load_manifest(write(tmp_path, data)))
    assert len(info.value.errors) == 2 and "row 0" in str(info.value) and "row 2" in str(info.value)


def test_consistency_window_columns_validate_and_keep_old_fingerprints(tmp_path):
    """The window is a request column like the scales; at (0, 1) (the whole trajectory, the default
    before the window existed) it leaves req_fp as it was then, so images made earlier stay current;
    the default window [0, 0.5) and any other are new requests."""
    import polars as pl

    from prcore.data.schema import GenerationDefaults

    base = {"subject_id": ["dog1"] * 3, "instance_images": [["a.png"]] * 3, "class_noun": ["dog"] * 3,
            "prompt": ["a {subject} on the beach"] * 3, "prompt_id": ["p0", "p1", "p2"]}
    before = plan(pl.DataFrame(base), check=False, defaults=GenerationDefaults(consistency_stop=1.0))[0].requests
    windowed = plan(pl.DataFrame({**base, "consistency_start": [0.0, None, 0.0], "consistency_stop": [1.0, None, 0.6]}),
                    check=False)[0].requests
    assert windowed[0].req_fp == before[0].req_fp  # explicit (0, 1): as before the column existed
    assert windowed[1].params["consistency_stop"] == GenerationDefaults().consistency_stop == 0.5  # the new default
    assert windowed[1].req_fp != before[1].req_fp and windowed[2].req_fp != before[2].req_fp
    assert windowed[2].params["consistency_stop"] == 0.6 and windowed[1].params["consistency_start"] == 0.0
    bad = validate(pl.DataFrame({**base, "consistency_start": [0.5, -0.1, 0.2], "consistency_stop": [0.4, 1.0, 1.5]}), check_images=False)
    assert [(e.row, e.column) for e in bad] == [(0, "consistency_stop"), (1, "consistency_start"), (2, "consistency_stop")]


# -- inputs that used to crash validate, hang it, or pass it and fail after work was spent -------------


def test_float_outside_int_range_is_an_error_naming_the_row(tmp_path, images):
    data = pl.DataFrame(rows(images)).with_columns(pl.Series("num_images", [1.0, 1e30, 2.0]), pl.Series("seed", [None, None, 2.0**64]))
    errors = errors_for(tmp_path, data, check_images=False)
    assert_one(errors, 1, "num_images", "64-bit range")
    assert_one(errors, 2, "seed", "64-bit range")


def test_files_storing_instance_images_differently_load_together(tmp_path, images):
    (tmp_path / "many").mkdir()
    single = [images[0]]
    write(tmp_path / "many", [{**rows(single)[0]}], "a.parquet")  # a list
    one = pl.DataFrame([{**rows(single)[1], "instance_images": images[0]}])  # a plain string
    one.write_parquet(tmp_path / "many" / "b.parquet")
    (tmp_path / "many" / "refs").symlink_to(tmp_path / "refs")
    m = load_manifest(tmp_path / "many")
    assert validate(m) == []
    assert [len(j.instance_images) for j in plan(m, check=False)] == [1]


def test_user_column_colliding_with_an_internal_one(tmp_path, images):
    data = pl.DataFrame(rows(images)).with_columns(pl.lit("x").alias("__file"), pl.lit(1).alias("__pid"))
    errors = errors_for(tmp_path, data, check_images=False)
    assert_one(errors, None, "__file", "reserves")
    assert_one(errors, None, "__pid", "reserves")
    assert_one(errors_for(tmp_path, pl.DataFrame(rows(images)).with_columns(pl.lit("x").alias("meta_api_token")),
                          check_images=False), None, "meta_api_token", "credential")


def test_scheduler_names_have_one_owner_and_class_names_are_refused(tmp_path, images):
    from prcore.data.schema import SCHEDULER_NAMES
    from prcore.method.families.noise import SCHEDULER_NAMES as SAMPLER_NAMES

    assert SCHEDULER_NAMES == SAMPLER_NAMES
    for bad in ("DPMSolverMultistepScheduler", "nope"):
        data = pl.DataFrame(rows(images)).with_columns(pl.lit(bad).alias("scheduler"))
        assert_one(errors_for(tmp_path, data, check_images=False), 0, "scheduler", "dpmpp_2m")
    ok = pl.DataFrame(rows(images)).with_columns(pl.lit("DPM++-2M").alias("scheduler"))  # spelled as the sampler normalises it
    assert errors_for(tmp_path, ok, check_images=False) == []


def test_caption_count_must_be_one_or_one_per_image(tmp_path, images):
    two = pl.DataFrame(rows(images)).with_columns(pl.lit(["a {subject}", "b {subject}"]).alias("instance_prompts"))
    assert_one(errors_for(tmp_path, two, check_images=False), 0, "instance_prompts", "2 captions for 3")
    one = pl.DataFrame(rows(images)).with_columns(pl.lit(["a photo of {subject}"]).alias("instance_prompts"))
    assert errors_for(tmp_path, one, check_images=False) == []
    job = plan(load_manifest(write(tmp_path, one)), check=False)[0]
    assert job.instance_prompts == ["a photo of {subject}"] * 3  # one for all: repeated per image for training


def test_base_model_folder_must_exist(tmp_path, images):
    missing = pl.DataFrame(rows(images)).with_columns(pl.lit(str(tmp_path / "no-model")).alias("base_model"))
    assert_one(errors_for(tmp_path, missing, check_images=False), 0, "base_model", "does not exist")
    (tmp_path / "empty-model").mkdir()
    empty = pl.DataFrame(rows(images)).with_columns(pl.lit(str(tmp_path / "empty-model")).alias("base_model"))
    assert_one(errors_for(tmp_path, empty, check_images=False), 0, "base_model", "model_index.json")
    hub = pl.DataFrame(rows(images)).with_columns(pl.lit("org/some-model").alias("base_model"))
    assert errors_for(tmp_path, hub, check_images=False) == []
    (tmp_path / "model.ckpt").write_bytes(b"pickle")  # single files: safetensors only, read before any work
    pickled = pl.DataFrame(rows(images)).with_columns(pl.lit(str(tmp_path / "model.ckpt")).alias("base_model"))
    assert_one(errors_for(tmp_path, pickled, check_images=False), 0, "base_model", "pickled", "safetensors")
    (tmp_path / "lora.safetensors").write_bytes(b"\x00" * 64)
    broken = pl.DataFrame(rows(images)).with_columns(pl.lit(str(tmp_path / "lora.safetensors")).alias("base_model"))
    assert_one(errors_for(tmp_path, broken, check_images=False), 0, "base_model", "not a safetensors file")


def test_instance_image_too_small_or_too_many_pixels(tmp_path, images, monkeypatch):
    Image.new("RGB", (16, 16)).save(tmp_path / "refs" / "tiny.png")
    data = pl.DataFrame(rows(images)).with_columns(pl.lit(["refs/tiny.png"]).alias("instance_images"))
    assert_one(errors_for(tmp_path, data), 0, "instance_images", "too small")
    monkeypatch.setenv("PRCORE_MAX_IMAGE_PIXELS", "1000")  # 32x32 = 1024 pixels
    assert_one(errors_for(tmp_path, pl.DataFrame(rows(images))), 0, "instance_images", "pixel limit")
    from prcore.data.images import ImageTooLargeError, decode_image

    with pytest.raises(ImageTooLargeError):
        decode_image(str(tmp_path / "refs" / "0.png"))


def test_fifo_and_device_files_are_refused_without_hanging(tmp_path, images, monkeypatch):
    import os
    import time

    from prcore.store.uris import InputTooLargeError, read_uri_bytes

    fifo = tmp_path / "refs" / "fifo.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    for uri in ("refs/fifo.png", "/dev/zero"):
        data = pl.DataFrame(rows(images)).with_columns(pl.lit([uri]).alias("instance_images"))
        assert_one(errors_for(tmp_path, data), 0, "instance_images", "not a regular file")
    with pytest.raises(ValueError, match="not a regular file"):
        read_uri_bytes(str(fifo))
    from prcore.data.images import UnreadableImageError, decode_image

    with pytest.raises(UnreadableImageError, match="not a regular file"):
        decode_image(str(fifo))
    assert time.monotonic() - started < 10
    big = tmp_path / "refs" / "big.png"
    big.write_bytes(b"\0" * 2048)
    monkeypatch.setenv("PRCORE_MAX_INPUT_BYTES", "1024")
    with pytest.raises(InputTooLargeError):
        read_uri_bytes(str(big))


def test_output_root_inside_a_folder_of_manifests_is_not_read_as_manifests(tmp_path, images):
    write(tmp_path, rows(images), "m.parquet")
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "catalog").mkdir()
    pl.DataFrame({"key": ["x"]}).write_parquet(out / "catalog" / "s0.parquet")
    (out / "runs" / "r1").mkdir(parents=True)
    pl.DataFrame({"key": ["x"]}).write_parquet(out / "runs" / "r1" / "scores.parquet")
    m = load_manifest(tmp_path)
    assert m.files == [str(tmp_path / "m.parquet")] and validate(m) == []


def test_meta_columns_are_carried_into_every_request(tmp_path, images):
    data = pl.DataFrame(rows(images)).with_columns(pl.Series("meta_sku", ["A1", None, "C3"]), pl.lit(7).alias("meta_batch"))
    jobs = plan(load_manifest(write(tmp_path, data)), check=False)
    metas = [r.meta for j in jobs for r in j.requests]
    assert metas == [{"meta_sku": "A1", "meta_batch": 7}, {"meta_batch": 7}, {"meta_sku": "C3", "meta_batch": 7}]
