"""``prcore sample`` end to end on the tiny SD pipeline: PNGs written, bad input -> one message, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import typer
from PIL import Image
from test_sampler import save_random_lora
from typer.testing import CliRunner

from prcore.cli import build_app


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return build_app("sample")


@pytest.fixture(scope="module")
def model_and_lora(tiny_sd_path, tmp_path_factory):
    # A private copy of the model folder: the CLI's process-wide pipeline cache then holds its own
    # pipeline, and loading the LoRA into it leaves the shared `tiny_sd` fixture untouched.
    root = tmp_path_factory.mktemp("cli")
    model = shutil.copytree(tiny_sd_path, root / "model")
    lora = root / "lora"
    save_random_lora(model, lora)
    return model, lora


def invoke(app, *args):
    return CliRunner().invoke(app, ["sample", *map(str, args)])


def base_args(model, lora, out):
    return ["--model", model, "--lora", lora, "--prompt", "a {subject} in the snow", "--class-noun", "dog",
            "--identifier", "sks", "--out", out, "--num-inference-steps", 2, "--height", 32, "--width", 32, "--no-progress"]


def test_writes_pngs_and_never_overwrites(app, model_and_lora, tmp_path):
    model, lora = model_and_lora
    out = tmp_path / "out"
    result = invoke(app, *base_args(model, lora, out), "--num-images", 2, "--seed", 4, "--parallel-scale", 0.3)
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["parallel_rescaled-seed4-000.png", "parallel_rescaled-seed4-001.png"]
    for p in pngs:
        with Image.open(p) as img:
            assert img.size == (32, 32)
        record = json.loads(p.with_suffix(".json").read_text())
        assert record["personal_prompt"] == "a sks dog in the snow" and record["parallel_scale"] == 0.3
        assert record["unet_batching"] == "batched"
        from prcore.outputs.sidecar import ImageRecord

        assert ImageRecord.from_dict(record).to_dict() == record  # the flow's sidecar schema
        assert (record["class_noun"], record["identifier"], record["height"]) == ("dog", "sks", 32) and record["scheduler"]
    before = [p.read_bytes() for p in pngs]
    again = invoke(app, *base_args(model, lora, out), "--num-images", 2, "--seed", 4)
    assert again.exit_code == 2
    assert again.stderr.strip().count("\n") == 0 and "already holds" in again.stderr
    assert [p.read_bytes() for p in pngs] == before
    # the same request into another folder gives the same pixels
    twin = invoke(app, *base_args(model, lora, tmp_path / "twin"), "--num-images", 2, "--seed", 4, "--parallel-scale", 0.3)
    assert twin.exit_code == 0
    pixels = lambda paths: [np.asarray(Image.open(p)) for p in paths]  # noqa: E731 (the text chunk has a timestamp)
    assert all((a == b).all() for a, b in zip(pixels(sorted((tmp_path / "twin").glob("*.png"))), pixels(pngs), strict=True))


def test_pretrained_needs_no_lora(app, model_and_lora, tmp_path):
    model, _ = model_and_lora
    args = base_args(model, "x", tmp_path)
    i = args.index("--lora")
    del args[i : i + 2]
    result = invoke(app, *args, "--guidance", "pretrained", "--scheduler", "dpmpp_2m")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pretrained-seed0-000.png").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--prompt": "a dog in the snow"}, "no {subject} placeholder"),
        ({"--guidance": "magic"}, "--guidance 'magic' is not allowed: guidance must be one of parallel_rescaled"),
        ({"--scheduler": "warp"}, "--scheduler 'warp' is not allowed: scheduler must be one of ddim"),
        ({"--guidance-scale": -1}, "--guidance-scale -1.0 is not allowed: guidance_scale must be a finite number in 0..30"),
        ({"--parallel-scale": -0.5}, "--parallel-scale -0.5 is not allowed: parallel_scale must be a finite number in 0..10"),
        ({"--lora": "MISSING"}, "no such folder"),
        ({"--lora": "EMPTY"}, "pytorch_lora_weights.safetensors is missing"),
        ({"--lora": None}, "--lora DIR is required for --guidance parallel_rescaled"),
        ({"--height": 30}, "--height 30 is not allowed: height must be a multiple of 8 in 32..4096"),
        ({"--model": "EMPTY"}, "has no model_index.json"),
    ],
)
def test_bad_input_one_message_exit_2(app, model_and_lora, tmp_path, change, message):
    model, lora = model_and_lora
    (tmp_path / "empty").mkdir()
    args = base_args(model, lora, tmp_path / "out")
    for flag, value in change.items():
        if flag not in args:
            args += [flag, None]
        i = args.index(flag)
        if value is None:
            del args[i : i + 2]
        else:
            args[i + 1] = {"MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty"}.get(value, value)
    result = invoke(app, *args)
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert "Traceback" not in result.output
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_real_entry_point_reports_bad_prompt(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from prcore.cli import main; main()", "sample", "--model", str(tmp_path), "--lora", str(tmp_path),
         "--prompt", "no placeholder", "--class-noun", "dog", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: prompt 'no placeholder' has no {subject} placeholder") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_takes_no_writes_is_refused_before_the_model_loads(app, model_and_lora, tmp_path):
    """--out under a file: a real probe write fails at once (one line, exit 2), not after sampling."""
    import time

    model, lora = model_and_lora
    afile = tmp_path / "a-file"
    afile.write_bytes(b"keep")
    started = time.monotonic()
    result = invoke(app, *base_args(model, lora, afile / "out"))
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith(f"error: --out {afile / 'out'}: cannot write") and "is a file, not a folder" in err and "\n" not in err
    assert "Traceback" not in result.output and time.monotonic() - started < 10 and afile.read_bytes() == b"keep"


_FULL_DISK_CHILD = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # the kernel then fails the write with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # a 'disk' that takes 2 KiB per file: the probe fits, a PNG does not
from prcore.cli import main
sys.argv = ["prcore", *sys.argv[1:]]
main()
"""


def test_a_disk_that_refuses_the_images_is_one_line_and_leaves_no_partial_file(model_and_lora, tmp_path):
    """A real refused write (RLIMIT_FSIZE: EFBIG past 2 KiB, as ENOSPC on a full disk) after sampling: one line,
    exit 2, no temporary or partial PNG, no sidecar."""
    model, lora = model_and_lora
    out = tmp_path / "out"
    args = [str(a) for a in base_args(model, lora, out)]
    done = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, "sample", *args, "--height", "64", "--width", "64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("error: cannot write 'parallel_rescaled-seed0-000.png'") and "too large" in err
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.rglob("*")) == []
