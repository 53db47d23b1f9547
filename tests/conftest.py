"""Shared fixtures: tiny diffusers pipelines written to disk, and a real local S3-compatible server.

Only fixtures more than one area needs live here; an area's own fixtures stay in its test files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402
from prefect_harness import free_port, wait_for_port  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

# Tiny models: one intra-op thread is faster than two fighting over the cores with the test's
# own servers and workers (measured up to 75x on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    from prcore.method.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", "sd")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    from prcore.method.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl")


FULL_SIZE_ORDER = ("sd15", "sd21", "sdxl", "sd35m")
# What each full-size folder carries: sd15 both files (the fp16-variant test), sd21 fp32 only (its test
# runs bf16, cast from fp32), sdxl and sd35m only the fp16 variant (an fp16-only folder, as some hub repos
# ship: 7 GB / 6.3 GB instead of 14 GB / 12.6 GB of fp32; sd35m without T5). SD 3.5 Large is not built
# here: its transformer is 32.6 GB in fp32, more than this machine's memory.
FULL_SIZE_FILES = {"sd15": {}, "sd21": {"fp16_variant": False}, "sdxl": {"fp32": False}, "sd35m": {"fp32": False}}


def full_size_name(item: pytest.Item) -> str | None:
    """The full-size architecture a test uses: its ``name`` parameter or its ``full_size`` mark."""
    if "full_size_model" not in getattr(item, "fixturenames", ()):
        return None
    mark = item.get_closest_marker("full_size")
    return mark.args[0] if mark else item.callspec.params["name"]


def pytest_collection_modifyitems(config, items):
    """Full-size tests run last, grouped by architecture, so that each folder is built once and only
    one is on disk at a time (together they are ~40 GB; a CI disk may hold far less)."""
    def key(item: pytest.Item) -> int:
        name = full_size_name(item)
        return 0 if name is None else 1 + FULL_SIZE_ORDER.index(name)

    items.sort(key=key)  # stable: the order within each group is kept


@pytest.fixture(scope="session")
def full_size_model(tmp_path_factory):
    """``get(name)``: the full-size ``name`` folder ("sd15", "sd21", "sdxl", "sd35m"; random weights), built on
    first use. Asking for another architecture deletes the previous one: one on disk at a time."""
    from prcore.method.full_size import build_full_size

    root = tmp_path_factory.mktemp("full-size")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            for other in list(built):
                shutil.rmtree(built.pop(other))
            built[name] = build_full_size(root / name, name, **FULL_SIZE_FILES[name])
        return built[name]

    yield get
    for folder in built.values():
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_path):
    """The tiny SD pipeline loaded through the product's path (cached per process)."""
    from prcore.method.models import load_pipeline

    return load_pipeline(tiny_sd_path, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_path):
    from prcore.method.models import load_pipeline

    return load_pipeline(tiny_sdxl_path, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> Path:
    """A tiny SD3 folder with all three text encoders (T5 included)."""
    from prcore.method.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", "sd3")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_path):
    from prcore.method.models import load_pipeline

    return load_pipeline(tiny_sd3_path, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server in its own process on 127.0.0.1; yields its endpoint URL.

    Sets dummy credentials and AWS_ENDPOINT_URL for the session so boto3 talks HTTP to it.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint
        )
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in locals().get("saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
