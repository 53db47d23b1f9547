"""Orchestration overhead of the nightly batch: wall time of the whole flow / time inside model work.

    .venv/bin/python benchmarks/orchestration_overhead.py [--subjects 8 --prompts 4 --images 2]

8 subjects x 4 prompts x 2 images with the tiny test pipeline (64x64, 10 training steps, 4
denoising steps), local fan-out (2 subjects per shard), output to a local moto S3 server started
here. Model work = training steps (TrainResult.seconds_total) + sampling (SampleOutput.seconds),
summed from the same run's records. Imports are warmed first; the ephemeral Prefect API's startup
is timed and reported on its own, outside the ratio. Last line: ``orchestration_overhead_ratio=<x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    return proc, endpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--subjects-per-shard", type=int, default=2)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="prcore-bench-"))
    os.environ.update(PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                      PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
                      TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    os.environ.pop("PREFECT_API_URL", None)
    moto, endpoint = start_moto()
    try:
        t0 = time.perf_counter()
        import boto3
        import diffusers  # noqa: F401  (warm imports)
        from diffusers.utils import logging as dlogging
        from prefect_harness import manifest_rows, upload_manifest

        from flows.nightly import nightly_batch
        from prcore.method.tiny import build_tiny_pipeline

        dlogging.set_verbosity_error()
        t_imports = time.perf_counter() - t0
        model = str(build_tiny_pipeline(tmp / "tiny-sd", "sd"))
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        rows = manifest_rows(args.subjects, prompts=args.prompts, num_images=args.images, steps=args.steps)
        manifest = upload_manifest(s3, "bench", "in", rows, subjects=args.subjects)

        t0 = time.perf_counter()
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.hello()
        t_api = time.perf_counter() - t0

        t0 = time.perf_counter()
        from prcore.pipeline.settings import FanOut, RunSettings

        settings = RunSettings.model_validate({"model": model, "train": {"steps": args.train_steps}, "cache_dir": str(tmp / "cache"),
                                               "placement": {"device": "cpu", "dtype": "float32"}})
        state = nightly_batch(manifest=manifest, output="s3://bench/out", settings=settings,
                              fan_out=FanOut(subjects_per_shard=args.subjects_per_shard, use_gpu_limit=False), return_state=True)
        wall = time.perf_counter() - t0
        if not state.is_completed():
            raise SystemExit(f"the flow did not complete: {state}")
        run_id = state.result()["run_id"]
        summary = json.loads(s3.get_object(Bucket="bench", Key=f"out/runs/{run_id}/summary.json")["Body"].read())
        model_seconds = float(summary["model_seconds"])
        images = summary["generated"]
        print(f"subjects={args.subjects} prompts={args.prompts} images_per_prompt={args.images} "
              f"train_steps={args.train_steps} inference_steps={args.steps} shards={summary['shards']}")
        print(f"warm_imports_s={t_imports:.2f}")
        print(f"ephemeral_api_startup_s={t_api:.2f}  (not in the ratio)")
        print(f"generated_images={images} trained_loras={summary['trained']}")
        print(f"flow_wall_s={wall:.2f}")
        print(f"model_work_s={model_seconds:.2f}  (training steps + sampling)")
        print(f"overhead_s={wall - model_seconds:.2f}")
        print(f"orchestration_overhead_ratio={wall / model_seconds:.3f}")
    finally:
        moto.terminate()
        try:
            moto.wait(10)
        except subprocess.TimeoutExpired:
            moto.kill()


if __name__ == "__main__":
    main()
