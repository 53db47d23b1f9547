"""The DreamBench runner on a 2-subject x 2-prompt toy data set with the tiny SD pipeline and tiny CLIP/ViT."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from prcore.quality.dreambench import (
    BenchConfig,
    BenchError,
    load_protocol,
    parse_train_overrides,
    run_dreambench,
    summarize,
)
from prcore.quality.scorer import Scorer
from prcore.quality.tiny import build_tiny_clip, build_tiny_dino

SUBJECTS = [("red_toy", "toy", "object"), ("blue_dog", "dog", "live")]
TRAIN = {"steps": 2, "rank": 2, "alpha": 2.0, "resolution": 32}
SIZE = 32  # images and training at 32x32 (latents 8x8): the tiny UNet's cost is all convolutions


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """One work dir for the module: a subject's LoRA (same fingerprint) is trained once and reused."""
    return tmp_path_factory.mktemp("bench-loras")


@pytest.fixture(scope="module")
def bench_scorer(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-metric-models")
    return Scorer(clip_model=build_tiny_clip(root / "clip"), dino_model=build_tiny_dino(root / "dino"), device="cpu")


def make_dataset(root, *, with_protocol_files: bool = True):
    """google/dreambooth layout: one folder of images per subject (+ the protocol files)."""
    rng = np.random.default_rng(0)
    for s, (sid, _, _) in enumerate(SUBJECTS):
        (root / sid).mkdir(parents=True)
        for j in range(3):
            arr = np.full((64, 64, 3), 40 * j, dtype=np.uint8)
            arr[16:48, 16 + 2 * j : 48 + 2 * j] = (200, 30, 30) if s == 0 else (30, 30, 200)
            arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
            Image.fromarray(arr).save(root / sid / f"{j:02d}.jpg")
    if with_protocol_files:
        (root / "dreambench_subjects.csv").write_text("subject_id,class_noun,kind\n" + "".join(f"{a},{b},{c}\n" for a, b, c in SUBJECTS))
        (root / "dreambench_object_prompts.txt").write_text("a {subject} in the snow\na {subject} on the beach\na red {subject}\n")
        (root / "dreambench_live_prompts.txt").write_text("a {subject} in the jungle\na {subject} wearing a hat\na {subject} in the city\n")
    return root


def config(model, **kw) -> BenchConfig:
    base = dict(model=str(model), prompts_per_subject=2, images_per_prompt=2, num_inference_steps=2, height=SIZE, width=SIZE,
                train_overrides=TRAIN)
    return BenchConfig(**{**base, **kw})


@pytest.mark.slow
def test_dreambench_runner_produces_its_table(tiny_sd, tiny_sd_path, bench_scorer, lora_dir, tmp_path):
    data = make_dataset(tmp_path / "data")
    protocol = load_protocol(data)
    assert [s.subject_id for s in protocol.subjects] == ["red_toy", "blue_dog"]
    assert [len(s.images) for s in protocol.subjects] == [3, 3]
    out = tmp_path / "bench"
    cfg = config(tiny_sd_path)
    result = run_dreambench(protocol, config=cfg, scorer=bench_scorer, output=str(out), pipe=tiny_sd, work_dir=lora_dir)

    # 2 subjects x 2 prompts x 3 modes x 2 images
    scores = pl.read_parquet(out / "scores.parquet")
    assert scores.height == 24 and result.scores.height == 24
    assert scores.group_by("mode").len().sort("mode")["len"].to_list() == [8, 8, 8]
    assert set(scores["base_prompt"]) == {"a toy in the snow", "a toy on the beach", "a dog in the jungle", "a dog wearing a hat"}
    assert set(scores["personal_prompt"]) >= {"a sks toy in the snow"}
    for key in scores["key"]:
        with Image.open(out / key) as im:
            assert im.size == (SIZE, SIZE)
    # the same seeds for every mode
    seeds = scores.group_by("mode").agg(pl.col("seed").sort()).sort("mode")["seed"].to_list()
    assert seeds[0] == seeds[1] == seeds[2]

    table = pl.read_parquet(out / "table.parquet")
    assert table["mode"].to_list() == ["parallel_rescaled", "consistency", "cfg"]
    assert table.columns == ["mode", "dino", "clip_i", "clip_t", "images", "subjects"]
    assert table["images"].to_list() == [8, 8, 8] and table["subjects"].to_list() == [2, 2, 2]
    for mode in table["mode"]:
        row = table.filter(pl.col("mode") == mode)
        for m in ("dino", "clip_i", "clip_t"):
            assert row[m][0] == pytest.approx(scores.filter(pl.col("mode") == mode)[m].mean(), abs=1e-9)
            assert -1.0 <= row[m][0] <= 1.0
    md = (out / "table.md").read_text()
    assert "| guidance mode | DINO | CLIP-I | CLIP-T | images | subjects |" in md
    assert f"| parallel_rescaled | {table['dino'][0]:.3f} |" in md
    assert pl.read_csv(out / "table.csv").height == 3
    # the scores are the scorer's, against the subject's reference images and base prompt
    row = scores.row(0, named=True)
    refs = [Image.open(p) for p in protocol.subjects[0].images]
    again = bench_scorer.score([Image.open(out / row["key"])], row["base_prompt"], refs)[0]
    assert again["dino"] == pytest.approx(row["dino"], abs=1e-5)
    # the pipeline is left without the bench adapters
    from prcore.method.adapters import loaded_adapters

    assert not any(name.startswith("bench") for name in loaded_adapters(tiny_sd))

    # re-run: nothing redone; a different configuration refuses the same output
    again = run_dreambench(protocol, config=cfg, scorer=bench_scorer, output=str(out), pipe=tiny_sd)
    assert again.skipped_subjects == ["red_toy", "blue_dog"] and again.scores.height == 24
    with pytest.raises(BenchError, match="different configuration"):
        run_dreambench(protocol, config=config(tiny_sd_path, images_per_prompt=1), scorer=bench_scorer, output=str(out), pipe=tiny_sd)


class MeanColorScorer:
    """A different instrument behind the same protocol (as the toy world's are): redness of the image."""

    metrics = ("redness",)

    def embed_references(self, references):
        return references

    def score(self, images, prompt, references):
        return [{"redness": float(np.asarray(im, dtype=np.float32)[..., 0].mean() / 255.0)} for im in images]


@pytest.mark.slow
def test_dreambench_accepts_any_scorer_and_s3_output(tiny_sd, tiny_sd_path, lora_dir, tmp_path, s3_bucket):
    from prcore.store.storage import open_store

    data = make_dataset(tmp_path / "data")
    protocol = load_protocol(data, subjects=["red_toy"])
    uri = f"s3://{s3_bucket}/bench"
    result = run_dreambench(
        protocol, config=config(tiny_sd_path, modes=("parallel_rescaled", "pretrained"), prompts_per_subject=1),
        scorer=MeanColorScorer(), output=uri, pipe=tiny_sd, work_dir=lora_dir,
    )
    store = open_store(uri)
    table = pl.read_parquet(io.BytesIO(store.get("table.parquet")))
    assert table.columns == ["mode", "redness", "images", "subjects"] and table["images"].to_list() == [2, 2]
    assert "redness" in store.get("table.md").decode() and result.output_uri == store.uri
    assert json.loads(store.get("bench.json"))["scorer"] == {"class": "MeanColorScorer", "metrics": ["redness"]}
    assert sum(1 for k in store.list("images/") if k.endswith(".png")) == 4


@pytest.mark.slow
def test_prcore_bench_dreambench_cli(tiny_sd, tiny_sd_path, bench_scorer, lora_dir, tmp_path):
    from prcore.cli import build_app

    app = build_app()
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "bench-cli"
    args = ["bench", "dreambench", "--data", str(data), "--model", str(tiny_sd_path), "--output", str(out),
            "--clip-model", bench_scorer.clip_model, "--dino-model", bench_scorer.dino_model, "--device", "cpu",
            "--subjects", "red_toy", "--prompts-per-subject", "2", "--images-per-prompt", "1", "--num-inference-steps", "2",
            "--modes", "parallel_rescaled,cfg", "--height", str(SIZE), "--width", str(SIZE), "--work-dir", str(lora_dir),
            "--train-steps", "2", "--train", "rank=2", "--train", "alpha=2.0", "--train", "resolution=32"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| parallel_rescaled |" in res.output and "| cfg |" in res.output
    assert "red_toy: LoRA on 3 images reused from the work dir" in res.output  # trained by the first test
    assert pl.read_parquet(out / "scores.parquet").height == 2 * 2 * 1
    assert json.loads((out / "bench.json").read_text())["config"]["train_overrides"] == TRAIN


def test_protocol_and_option_errors(tmp_path, bench_scorer):
    from prcore.cli import build_app

    data = make_dataset(tmp_path / "data", with_protocol_files=False)
    (tmp_path / "subjects.csv").write_text("subject_id,class_noun,kind\nred_toy,toy,object\n../x,dog,live\n")
    with pytest.raises(BenchError, match="not a safe id"):
        load_protocol(data, subjects_csv=tmp_path / "subjects.csv")
    (tmp_path / "subjects.csv").write_text("subject_id,class_noun,kind\nred_toy,toy,object\nghost,dog,live\n")
    with pytest.raises(BenchError, match="'ghost': no reference images"):
        load_protocol(data, subjects_csv=tmp_path / "subjects.csv")
    with pytest.raises(BenchError, match="--subjects nope"):
        load_protocol(data, subjects=["nope"], subjects_csv=tmp_path / "subjects.csv")
    (tmp_path / "objects.txt").write_text("a photo of a toy\n")
    with pytest.raises(BenchError, match="no {subject} placeholder"):
        load_protocol(data, subjects=["red_toy"], subjects_csv=tmp_path / "subjects.csv", object_prompts=tmp_path / "objects.txt")
    with pytest.raises(BenchError, match="unknown guidance mode"):
        BenchConfig(model="m", modes=("cfg", "fancy"))
    with pytest.raises(BenchError, match="KEY=VALUE"):
        parse_train_overrides(["rank"])
    assert parse_train_overrides(["rank=4", "target_modules=[\"to_q\"]", "snr_gamma=null"]) == {
        "rank": 4, "target_modules": ("to_q",), "snr_gamma": None}

    res = CliRunner().invoke(build_app("evaluate"), ["bench", "dreambench", "--data", str(tmp_path / "none"), "--model", "m",
                                   "--output", str(tmp_path / "o"), "--clip-model", bench_scorer.clip_model])
    assert res.exit_code == 2 and "is not a folder" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()  # nothing written on a bad input


def test_summarize_orders_modes_and_averages():
    scores = pl.DataFrame({
        "subject_id": ["a", "a", "b", "b"], "mode": ["cfg", "parallel_rescaled", "cfg", "parallel_rescaled"],
        "clip_t": [0.1, 0.3, 0.2, 0.5], "dino": [0.5, 0.6, 0.7, 0.8],
    })
    table = summarize(scores, ("parallel_rescaled", "cfg"))
    assert table["mode"].to_list() == ["parallel_rescaled", "cfg"] and table.columns == ["mode", "dino", "clip_t", "images", "subjects"]
    assert table["clip_t"].to_list() == pytest.approx([0.4, 0.15]) and table["dino"].to_list() == pytest.approx([0.7, 0.6])


def test_protocol_templates_default_to_the_shipped_dreambench_prompts(tmp_path):
    """Without prompt files in --data, the DreamBench templates the repo ships (25 per kind) are used."""
    data = make_dataset(tmp_path / "data", with_protocol_files=False)
    (tmp_path / "subjects.csv").write_text("subject_id,class_noun,kind\nred_toy,toy,object\nblue_dog,dog,live\n")
    protocol = load_protocol(data, subjects_csv=tmp_path / "subjects.csv")
    assert len(protocol.prompts["object"]) == 25 and len(protocol.prompts["live"]) == 25
    assert protocol.prompts["object"][0] == "a {subject} in the jungle"
    assert protocol.prompts_for(protocol.subjects[1], 2) == protocol.prompts["live"][:2]
