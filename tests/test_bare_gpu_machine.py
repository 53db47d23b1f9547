"""The user's path on a bare GPU machine: `prcore train` and `prcore sample` need only the model side.

A GPU host (and the lent H200 the GPU check runs on) has torch, transformers, peft and friends, but
not polars, Prefect or boto3. Here that machine is emulated for real: a child Python started with
``-S`` whose only site-packages is a folder of links to this venv's packages minus those, so an
import of them fails exactly as it would there (not a patched ``sys.modules``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("polars", "prefect", "boto3", "botocore", "s3transfer", "moto", "duckdb")
CLI = "from prcore.cli import build_app; build_app('train', 'sample')()"


def bare_site(tmp: Path) -> Path:
    """A site-packages of links to every installed distribution except :data:`ABSENT_ON_GPU_MACHINE`."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir()))
    out = tmp / "site"
    out.mkdir()
    for entry in site.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower().lstrip("_")
        if top in ABSENT_ON_GPU_MACHINE or entry.suffix == ".pth":
            continue
        (out / entry.name).symlink_to(entry)
    return out


def prcore(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{site}", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-S", "-c", CLI, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_bare_site_really_lacks_the_orchestration_side(tmp_path):
    site = bare_site(tmp_path)
    probe = subprocess.run([sys.executable, "-S", "-c", "import polars"], capture_output=True, text=True,
                           env={"PYTHONPATH": str(site)}, timeout=60)
    assert probe.returncode != 0 and "No module named 'polars'" in probe.stderr


def test_train_and_sample_commands_run_without_polars_prefect_boto3(tiny_sd_path, tmp_path):
    site = bare_site(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    lora, out = tmp_path / "lora", tmp_path / "out"
    trained = prcore(site, "train", "--model", str(tiny_sd_path), "--images", str(images), "--class-noun", "dog",
                     "--out", str(lora), "--train-steps", "2", "--device", "cpu", "--no-progress")
    assert trained.returncode == 0, trained.stderr[-3000:]
    sampled = prcore(site, "sample", "--model", str(tiny_sd_path), "--lora", str(lora), "--prompt", "a {subject} in the snow",
                     "--class-noun", "dog", "--out", str(out), "--num-inference-steps", "2", "--height", "32", "--width", "32",
                     "--device", "cpu", "--no-progress")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    sidecar = json.loads((out / "parallel_rescaled-seed0-000.json").read_text())
    assert sidecar["device"] == "cpu" and sidecar["width"] == 32
    assert Image.open(out / "parallel_rescaled-seed0-000.png").size == (32, 32)
