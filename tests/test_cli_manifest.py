"""``prcore manifest validate|show|init`` through the Typer app (exit codes and messages)."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
import typer
from PIL import Image
from prcore_testing import record_for
from typer.testing import CliRunner

from prcore.cli import build_app
from prcore.data.load import load_manifest
from prcore.data.plan import plan
from prcore.data.schema import GenerationDefaults
from prcore.data.validate import validate
from prcore.outputs.sidecar import write_image
from prcore.store.storage import LocalStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return build_app("manifest")


@pytest.fixture
def run(app):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["manifest", *map(str, args)])

    return invoke


def test_validate_ok(run):
    res = run("validate", REPO / "manifests" / "demo.parquet")
    assert res.exit_code == 0, res.output
    df = load_manifest(REPO / "manifests" / "demo.parquet").df
    assert f"valid ({df.height} rows, {df['subject_id'].n_unique()} subjects)" in res.stdout


def test_validate_errors_exit_2_one_line_each(run, tmp_path):
    rows = [
        {"subject_id": "dog", "instance_images": ["nope.png"], "class_noun": "dog", "prompt": "a dog"},
        {"subject_id": "../x", "instance_images": ["nope.png"], "class_noun": "cat", "prompt": "a {subject} in {city}"},
    ]
    path = tmp_path / "bad.parquet"
    pl.DataFrame(rows).write_parquet(path)
    res = run("validate", path, "--no-check-images")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert "row 0 (subject dog), column prompt: 'a dog' has no {subject} placeholder" in lines[0]
    assert any(line.startswith("row 1 (subject ../x), column subject_id:") for line in lines)
    assert any(line.startswith("row 1 (subject ../x), column prompt:") and "{city}" in line for line in lines)
    assert lines[-1].endswith("3 error(s)") and "Traceback" not in res.output
    res = run("validate", path)  # with the image check: the missing image is reported too
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_validate_missing_file_is_one_clear_error(run, tmp_path):
    res = run("validate", tmp_path / "nope.parquet")
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: manifest not found: {tmp_path / 'nope.parquet'}"


def test_show_counts_done(run, tmp_path):
    out = tmp_path / "out"
    manifest = load_manifest(REPO / "manifests" / "demo.parquet")
    job = plan(manifest, store=LocalStore(out), defaults=GenerationDefaults())[0]
    write_image(LocalStore(out), record_for(job.requests[0], 0), Image.new("RGB", (8, 8)))
    res = run("show", REPO / "manifests" / "demo.parquet", "--output", out)
    assert res.exit_code == 0, res.output
    n_images = int(manifest.df["num_images"].sum())
    assert "subjects: 2" in res.stdout and f"requests: {manifest.df.height}" in res.stdout and f"images:   {n_images}" in res.stdout
    assert "done:     1" in res.stdout and f"to do:    {n_images - 1}" in res.stdout
    assert "redblue_circle" in res.stdout


def _dreambooth_folder(root: Path) -> Path:
    subjects = root / "dataset"
    for sid, colour in (("dog", (120, 80, 40)), ("backpack", (200, 0, 0))):
        (subjects / sid).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), colour).save(subjects / sid / f"{i:02d}.jpg")
    return subjects


def test_init_from_dreambooth_layout(run, tmp_path):
    subjects = _dreambooth_folder(tmp_path)
    nouns = tmp_path / "classes.csv"
    nouns.write_text("subject_id,class_noun,kind\ndog,dog,live\nbackpack,backpack,object\n")
    out = tmp_path / "manifests" / "db.parquet"
    res = run(
        "init", "--subjects", subjects, "--prompts", REPO / "manifests" / "dreambench_object_prompts.txt",
        "--live-prompts", REPO / "manifests" / "dreambench_live_prompts.txt", "--class-nouns", nouns, "-o", out,
    )
    assert res.exit_code == 0, res.output
    m = load_manifest(out)
    assert validate(m) == []
    assert m.df.height == 50 and m.df["subject_id"].n_unique() == 2
    dog = m.df.filter(pl.col("subject_id") == "dog")
    live = (REPO / "manifests" / "dreambench_live_prompts.txt").read_text().splitlines()
    assert dog["prompt"].to_list() == [p for p in live if p.strip()]
    assert m.instance_images(0)[0].endswith("dataset/backpack/00.jpg")
    assert m.df["instance_images"][0][0] == "../dataset/backpack/00.jpg"  # portable: relative to the manifest
    # refuses to overwrite without --force
    res = run("init", "--subjects", subjects, "--prompts", REPO / "manifests" / "dreambench_object_prompts.txt", "-o", out)
    assert res.exit_code == 2 and "--force" in res.stderr


def test_init_bad_input_writes_nothing(run, tmp_path):
    subjects = _dreambooth_folder(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {subject} at {place}\n")
    out = tmp_path / "m.parquet"
    res = run("init", "--subjects", subjects, "--prompts", prompts, "-o", out)
    assert res.exit_code == 2 and "{place}" in res.stderr and "nothing written" in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    shutil.rmtree(subjects / "dog")
    (subjects / "dog").mkdir()
    res = run("init", "--subjects", subjects, "--prompts", REPO / "manifests" / "dreambench_object_prompts.txt", "-o", out)
    assert res.exit_code == 2 and "holds no images" in res.stderr and not out.exists()
