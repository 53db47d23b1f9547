"""``prcore train`` on the tiny SD pipeline: a LoRA folder written; bad input -> one message, exit 2."""

from __future__ import annotations

import json

import pytest
import typer
from test_training import subject_images
from typer.testing import CliRunner

from prcore.cli import build_app


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return build_app("train")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("instance")
    for i, im in enumerate(subject_images(2)):
        im.save(d / f"{i}.png")
    (d / "notes.txt").write_text("not an image: ignored")
    return d


def invoke(app, *args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def base_args(model, images, out):
    return ["--model", model, "--images", images, "--class-noun", "dog", "--identifier", "sks", "--out", out,
            "--train-steps", 2, "--rank", 2, "--alpha", 1, "--resolution", 32, "--device", "cpu", "--dtype", "float32",
            "--no-progress"]


def test_trains_then_reuses(app, tiny_sd_path, image_dir, tmp_path):
    out = tmp_path / "lora"
    result = invoke(app, *base_args(tiny_sd_path, image_dir, out), "--caption", "a {subject} on a table")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["lora_kohya.safetensors", "pytorch_lora_weights.safetensors", "training.json"]
    rec = json.loads((out / "training.json").read_text())
    assert rec["config"]["steps"] == 2 and rec["config"]["rank"] == 2 and rec["config"]["alpha"] == 1.0
    assert rec["num_images"] == 2 and rec["personal_captions"] == ["a sks dog on a table"] * 2
    assert len(rec["losses"]) == 2
    again = invoke(app, *base_args(tiny_sd_path, image_dir, out), "--caption", "a {subject} on a table")
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert json.loads((out / "training.json").read_text()) == rec


@pytest.mark.parametrize("change,message", [
    ({"--train-steps": 0}, "--train-steps 0 is not allowed: steps must be an integer in 1..10000"),
    ({"--rank": -1}, "--rank -1 is not allowed: rank must be an integer in 1..256"),
    ({"--identifier": "dog"}, "collides with the class noun"),
    ({"--images": "EMPTY"}, "no instance images found"),
    ({"--images": "MISSING"}, "does not exist"),
    ({"--images": "BAD"}, "bad.png"),
    ({"--model": "NOMODEL"}, "has no model_index.json"),
])
def test_bad_input_one_message_exit_2(app, tiny_sd_path, image_dir, tmp_path, change, message):
    special = {"EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing", "BAD": tmp_path / "bad.png",
               "NOMODEL": tmp_path / "empty"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = base_args(tiny_sd_path, image_dir, tmp_path / "out")
    for flag, value in change.items():
        args[args.index(flag) + 1] = special.get(value, value) if isinstance(value, str) else value
    result = invoke(app, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_refuses_other_subjects_lora(app, tiny_sd_path, image_dir, tmp_path):
    out = tmp_path / "lora"
    assert invoke(app, *base_args(tiny_sd_path, image_dir, out)).exit_code == 0
    before = (out / "training.json").read_text()
    result = invoke(app, *base_args(tiny_sd_path, image_dir, out)[:-1], "--class-noun", "cat", "--no-progress")
    assert result.exit_code == 2 and "different subject's LoRA" in result.output
    assert (out / "training.json").read_text() == before
