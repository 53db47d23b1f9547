"""A simulated night: the real flows on real local servers, only the model's GPU work replaced.

A local Prefect server (``prefect server start``; on PostgreSQL when ``initdb``/``pg_ctl`` are on
the PATH, else SQLite), moto's S3 server with a request counter (``night_standin/s3_counting.py``) as
the output root and the manifest's home, ``--workers`` process workers in the ``gpu`` pool, the
``gpu`` global concurrency limit, ``prefect deploy --all`` from prefect.yaml; the benchmark process
runs the real ``nightly-batch`` flow with ``fan_out.mode="deployment"`` (shards are
``personalize-subject/gpu`` runs on the workers).

The stand-in (``benchmarks/night_standin/``, on the workers' PYTHONPATH only, never in the
product's code path) replaces model loading, DCO training, LoRA activation and sampling by sleeps:
SDXL bf16 on an H200 from README's "Measured on an H200" table, 1.088 s per LoRA step (x 400 steps),
1,864 img/h = 1.931 s per image, 22 s per base-model load (the GPU suite's full-size SDXL draw), all
multiplied by ``--time-scale``. Everything else is the product: planning, image check, plan files,
leases, dirty markers, PNG + sidecar writes, LoRA upload and verification, contact sheets, catalogue
files and the snapshot, shard records, summaries. Every figure is **simulated**.

For each scale (``--subjects``, x ``--prompts`` x ``--images``): a night, then the rerun of the
unchanged manifest, then a full read of the catalogue snapshot from S3. Reported: wall vs the ideal
(scaled) GPU time (orchestration overhead), and extrapolated to full-length GPU work; per shard the
seconds from process start to first GPU work; S3 requests per image (all but the image's own 2
PUTs, counted at the server); Prefect API calls per image (the server's access log); the parent's
plan + image check + plan files + submit; the rerun (seconds, requests, GPU work); the catalogue read.
Shards are of the size the run chooses (``FanOut.subjects_per_shard=None``) unless ``--per-shard``.

``--probe`` sizes (e.g. ``10,2000,10000``): what does not need every image written. Per size a manifest
is uploaded (instance images 16 at a time) and the real night runs with ``max_subjects`` so that only
``--probe-shards`` shards of ``--probe-per-shard`` run: the parent loads, plans and image-checks the
whole manifest, writes the plan files and submits; reported are that parent time and those shards'
seconds from process start to first GPU work, compared with the first (smallest) size.

``--profile DIR``: every shard process is profiled (cProfile, written at exit).

    python benchmarks/night_scale.py --time-scale 0.01         # 8, 24, 64 subjects x 25 x 4: ~14 min on 2 shared cores
    python benchmarks/night_scale.py --subjects 2 --time-scale 0.002   # quick check
    python benchmarks/night_scale.py --subjects "" --probe 10,2000,10000   # the probes only

Last line: ``night_scale_overhead=<wall / ideal GPU time at the largest scale>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "night_standin"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
S_PER_STEP, S_PER_IMAGE, LOAD_S = 1.088, 3600 / 1864, 22.0  # SDXL bf16, H200 (README); labelled simulated


def start_postgres(folder: Path, port: int) -> str | None:
    """A PostgreSQL server on loopback run as user ``postgres`` (initdb refuses root); its URL, or None."""
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        return None
    data = folder / "pg"
    data.mkdir(parents=True)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        folder.parent.chmod(0o755)  # postgres must reach its data folder
        shutil.chown(folder, "postgres")
        shutil.chown(data, "postgres")
    run = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=folder)
    subprocess.run([*as_pg, "initdb", "-D", str(data), "-U", "postgres", "--auth=trust"], **run)
    subprocess.run([*as_pg, "pg_ctl", "-D", str(data), "-l", str(data / "log"), "-w", "-o",
                    f"-p {port} -h 127.0.0.1 -k {data} -c max_connections=200", "start"], **run)
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE prefect"], **run)
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"


def stop_postgres(folder: Path) -> None:
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_pg, "pg_ctl", "-D", str(folder / "pg"), "-m", "fast", "stop"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def start_prefect(home: Path, db_url: str | None):
    """``prefect server start`` (access log on: every API call is a line) with the harness's settings."""
    from prefect_harness import PREFECT_BIN, PrefectServer, _wait_healthy, free_port, prefect_env

    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = prefect_env(home, port)
    env["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"
    env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    if db_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = db_url
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([PREFECT_BIN, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=home,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = PrefectServer(port=port, home=home, proc=proc, env=env, log_path=log_path)
    _wait_healthy(server, 180)
    return server


def api_calls(server) -> int:
    return len(re.findall(r'"(?:GET|POST|PATCH|PUT|DELETE) /api/', server.log_path.read_text(errors="replace")))


def s3_counts(endpoint: str) -> dict[str, int]:
    return httpx.get(f"{endpoint}/__counts__", timeout=30).json()


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def read_events(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("events-*.jsonl")) for line in p.read_text().splitlines()]


def parent_phase_seconds(server, parent_id: str) -> float:
    """From the parent's start to the creation of its last shard run (plan + image check + plan files + submit)."""
    with server.api() as c:
        parent = c.get(f"/flow_runs/{parent_id}").json()
        kids = c.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}},
                                                  "limit": 200}).json()
    start = datetime.fromisoformat(parent["start_time"])
    created = [datetime.fromisoformat(k["created"]) for k in kids]
    return max((c - start).total_seconds() for c in created) if created else float("nan")


def upload_manifest_parallel(s3, bucket: str, prefix: str, subjects: int, prompts: int, images: int) -> str:
    """``prefect_harness.upload_manifest`` with the instance images put 16 at a time (20,000 at 10,000 subjects)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import polars as pl
    from prefect_harness import manifest_rows, subject_image

    def put(i: int) -> None:
        s, k = divmod(i, 2)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/subjects/s{s}/{k}.png", Body=subject_image(100 * s + k))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(2 * subjects)))
    buf = io.BytesIO()
    pl.DataFrame(manifest_rows(subjects, prompts=prompts, num_images=images, size=64)).write_parquet(buf)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/manifest.parquet", Body=buf.getvalue())
    return f"s3://{bucket}/{prefix}/manifest.parquet"


def probe(s3, endpoint: str, server, events_root: Path, settings: dict, n: int, args) -> dict:
    """What does not need every image of an ``n``-subject manifest written: the real parent (whole manifest
    loaded, planned, image-checked) with only ``--probe-shards`` shards of ``--probe-per-shard`` subjects
    run (``max_subjects``), and those shards' seconds from process start to first GPU work."""
    manifest = upload_manifest_parallel(s3, "night", f"probe{n}", n, args.prompts, args.images)
    shutil.rmtree(events_root, ignore_errors=True)
    events_root.mkdir(parents=True)
    c0, a0 = s3_counts(endpoint), api_calls(server)
    cap = min(n, args.probe_shards * args.probe_per_shard)
    result, wall, parent_id = night(manifest, f"s3://night/probe{n}-out", settings, args.probe_per_shard, cap)
    counts, api = delta(s3_counts(endpoint), c0), api_calls(server) - a0
    firsts = sorted(e["since_start"] for e in read_events(events_root) if e["event"] == "first_gpu")
    assert result["generated"] == cap * args.prompts * args.images and len(firsts) == result["shards"], (result, firsts)
    row = dict(subjects=n, shards=result["shards"], per_shard=args.probe_per_shard, wall=wall,
               parent=parent_phase_seconds(server, parent_id), first_gpu_median=firsts[len(firsts) // 2],
               first_gpu_max=firsts[-1], image_gets=counts.get("GET subjects", 0), image_lists=counts.get("GET list:images", 0),
               api=api)
    print(f"probe: {n:,}-subject manifest, {row['shards']} shards of {row['per_shard']} run (max_subjects {cap}): parent "
          f"plan + image check (all {n:,} subjects) + plan files + submit {row['parent']:.1f}s; shard start -> first GPU "
          f"work median {row['first_gpu_median']:.2f}s, max {row['first_gpu_max']:.2f}s; instance-image GETs "
          f"{row['image_gets']:,}, images/ LISTs {row['image_lists']}; night wall {wall:.1f}s; {counts}", flush=True)
    return row


class ParentCounter:
    """S3 requests made by this process (the parent flow runs here), and the run report's share of them
    (``prcore.pipeline.report.write_report`` timed and counted; its behaviour is unchanged)."""

    def __init__(self) -> None:
        import botocore.httpsession

        import prcore.pipeline.report as report

        self.requests, self.report_requests, self.report_s = 0, 0, 0.0
        send, write = botocore.httpsession.URLLib3Session.send, report.write_report

        def counted_send(session, request):
            self.requests += 1
            return send(session, request)

        def timed_write(*a, **k):
            n0, t0 = self.requests, time.perf_counter()
            try:
                return write(*a, **k)
            finally:
                self.report_requests += self.requests - n0
                self.report_s += time.perf_counter() - t0

        botocore.httpsession.URLLib3Session.send = counted_send
        report.write_report = timed_write

    def take(self) -> tuple[int, int, float]:
        out = (self.requests, self.report_requests, self.report_s)
        self.requests, self.report_requests, self.report_s = 0, 0, 0.0
        return out


def shard_window(server, parent_id: str) -> tuple[float, float]:
    """(seconds from the last shard's end to the parent's end, the shards' span: first start to last end)."""
    with server.api() as c:
        parent = c.get(f"/flow_runs/{parent_id}").json()
        kids = c.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}},
                                                  "limit": 200}).json()
    ends = [datetime.fromisoformat(k["end_time"]) for k in kids if k.get("end_time")]
    starts = [datetime.fromisoformat(k["start_time"]) for k in kids if k.get("start_time")]
    if not ends:
        return float("nan"), float("nan")
    return (datetime.fromisoformat(parent["end_time"]) - max(ends)).total_seconds(), (max(ends) - min(starts)).total_seconds()


def night(manifest: str, output: str, settings: dict, per_shard: int | None,
          max_subjects: int | None = None) -> tuple[dict, float, str]:
    """The real ``nightly-batch`` flow, deployment fan-out (``per_shard`` None: the run chooses)."""
    from flows.nightly import nightly_batch

    t0 = time.perf_counter()
    state = nightly_batch(manifest=manifest, output=output, settings=settings,
                          fan_out={"mode": "deployment", "subjects_per_shard": per_shard, "max_subjects": max_subjects},
                          return_state=True)
    wall = time.perf_counter() - t0
    return state.result(), wall, str(state.state_details.flow_run_id)


def print_table(rows_out: list[dict]) -> None:
    """The nights as a Markdown table, then the headline figures."""
    print("\n| subjects | images | shards | wall s | ideal GPU s | overhead | extrapolated, full-length GPU | "
          "shard start -> 1st GPU s (median/max) | parent s | S3 req/image (without run report) | run report s | "
          "API calls/image | rerun s / S3 req | catalogue read s |")
    print("| --- " * 14 + "|")
    for r in rows_out:
        print(f"| {r['subjects']} | {r['images']:,} | {r['shards']} x {r['per_shard']} | {r['wall']:.1f} | {r['ideal']:.1f} | {r['overhead']:.2f} | "
              f"{r['overhead_full']:.3f} | {r['first_gpu_median']:.1f} / {r['first_gpu_max']:.1f} | {r['parent']:.1f} | "
              f"{r['s3_per_image']:.2f} ({r['s3_per_image_no_report']:.2f}) | {r['report_s']:.1f} | {r['api_per_image']:.3f} | {r['rerun_s']:.1f} / {r['rerun_requests']} | "
              f"{r['catalog_s']:.2f} |")
    print(f"night_scale_overhead_full_length={rows_out[-1]['overhead_full']:.3f}")
    print(f"night_scale_overhead={rows_out[-1]['overhead']:.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", default="8,24,64", help="comma-separated scales (subjects in the manifest)")
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=None, help="subjects per shard (default: chosen by the run)")
    ap.add_argument("--probe", default="", help="comma-separated manifest sizes to probe (parent + a few shards only)")
    ap.add_argument("--probe-shards", type=int, default=2, help="shards run per probe")
    ap.add_argument("--probe-per-shard", type=int, default=2, help="subjects per shard in a probe")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--time-scale", type=float, default=0.01, help="multiplies every simulated GPU duration")
    ap.add_argument("--sqlite", action="store_true", help="Prefect on SQLite even when PostgreSQL is available")
    ap.add_argument("--profile", type=Path, help="a folder: cProfile every shard process and the parent into it")
    args = ap.parse_args(argv)
    scales = [int(s) for s in args.subjects.split(",") if s]
    probes = [int(s) for s in args.probe.split(",") if s]

    from prefect_harness import free_port, manifest_rows, stop_process_group, upload_manifest, wait_for_port

    tmp = Path(tempfile.mkdtemp(prefix="night-"))
    procs: list[subprocess.Popen] = []
    server = None
    pg = None
    try:
        s3_port = free_port()
        endpoint = f"http://127.0.0.1:{s3_port}"
        procs.append(subprocess.Popen([sys.executable, str(STANDIN / "s3_counting.py"), str(s3_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for_port(s3_port, timeout=60)
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint}
        os.environ.update(aws)
        pg = None if args.sqlite else start_postgres(tmp / "pgroot", free_port())
        server = start_prefect(tmp / "prefect", pg)
        os.environ.update(PREFECT_API_URL=server.api_url, PREFECT_LOGGING_LEVEL="WARNING",
                          PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        server.env.update(aws)
        server.create_process_pool("cpu")  # the nightly deployment's pool (no worker: the parent runs here)
        server.create_process_pool("gpu")
        server.create_global_concurrency_limit("gpu", args.workers)
        deployed = server.run_cli("--no-prompt", "deploy", "--all", timeout=600, log_name="deploy.log")
        assert deployed.returncode == 0, deployed.stdout[-3000:]

        from prcore.method.tiny import build_tiny_pipeline

        model = str(build_tiny_pipeline(tmp / "tiny-sd", "sd"))  # read for its layer names only; never loaded
        events_root = tmp / "events"
        standin = {"scale": args.time_scale, "s_per_step": S_PER_STEP, "s_per_image": S_PER_IMAGE, "load_s": LOAD_S}
        names = {f"g{k}" for k in range(args.workers)}
        for name in sorted(names):
            server.start_worker("gpu", name, extra_env={
                "PYTHONPATH": os.pathsep.join([str(STANDIN), str(ROOT)]), "PRCORE_WORKER_LABEL": name,
                "PRCORE_CACHE_DIR": str(tmp / "cache" / name), "PREFECT_LOGGING_LEVEL": "WARNING",
                "PRCORE_NIGHT_STANDIN": json.dumps({**standin, "out": str(events_root)}),
                **({"PRCORE_NIGHT_PROFILE": str(args.profile.resolve())} if args.profile else {})})
        server.wait_for_workers("gpu", names, timeout=180)

        import boto3
        import polars as pl

        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="night")
        settings = {"model": model, "train": {"steps": args.train_steps}, "placement": {"device": "cpu", "dtype": "float32"},
                    "generation": {"height": 64, "width": 64}}
        per_subject_gpu = args.train_steps * S_PER_STEP + args.prompts * args.images * S_PER_IMAGE
        print(f"# simulated GPU (SDXL bf16 on an H200, README): {S_PER_STEP} s/step x {args.train_steps} steps, "
              f"{S_PER_IMAGE:.3f} s/image, {LOAD_S} s/model load; x{args.time_scale} -> "
              f"{per_subject_gpu * args.time_scale:.2f} s of GPU per subject of {args.prompts * args.images} images")
        print(f"# Prefect server on {'PostgreSQL' if pg else 'SQLite'}; {args.workers} process workers in `gpu`; "
              f"moto S3 server; shards of {args.per_shard or 'the size the run chooses'}")
        rows_out = []
        parent_count = ParentCounter()
        for n in scales:
            manifest = upload_manifest(s3, "night", f"in{n}", manifest_rows(n, prompts=args.prompts, num_images=args.images,
                                                                            size=64), subjects=n)
            output = f"s3://night/out{n}"
            images = n * args.prompts * args.images
            shutil.rmtree(events_root, ignore_errors=True)
            events_root.mkdir(parents=True)
            c0, a0 = s3_counts(endpoint), api_calls(server)
            parent_count.take()
            result, wall, parent_id = night(manifest, output, settings, args.per_shard)
            c1, a1 = s3_counts(endpoint), api_calls(server)
            parent_requests, report_requests, report_s = parent_count.take()
            tail_s, shards_span = shard_window(server, parent_id)
            assert result["generated"] == images and result["failed"] == 0, result
            ev = read_events(events_root)
            gpu_s = sum(e["seconds"] for e in ev if e["event"] == "gpu" and e["what"] != "load")
            loads = sum(1 for e in ev if e["event"] == "gpu" and e["what"] == "load")
            firsts = sorted(e["since_start"] for e in ev if e["event"] == "first_gpu")
            ideal = gpu_s / args.workers
            night_counts = delta(c1, c0)
            other = sum(v for k, v in night_counts.items() if "image_put" not in k)
            parent_s = parent_phase_seconds(server, parent_id)
            # rerun of the unchanged manifest
            shutil.rmtree(events_root, ignore_errors=True)
            events_root.mkdir(parents=True)
            t0 = time.perf_counter()
            again, rerun_wall, _ = night(manifest, output, settings, args.per_shard)
            rerun_wall = time.perf_counter() - t0
            c2, a2 = s3_counts(endpoint), api_calls(server)
            rerun_gpu = len([e for e in read_events(events_root) if e["event"] == "gpu"])
            assert again["generated"] == 0 and again["shards"] == 0, again
            # the catalogue snapshot, read whole from the S3 server
            opts = {"aws_endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                    "aws_region": "us-east-1", "aws_allow_http": "true"}
            t0 = time.perf_counter()
            catalog = pl.read_parquet(f"s3://night/out{n}/catalog.parquet", storage_options=opts)
            catalog_s = time.perf_counter() - t0
            assert catalog.height == images, catalog.height
            non_gpu = wall - ideal
            full_ideal = n * per_subject_gpu / args.workers
            row = dict(subjects=n, images=images, shards=result["shards"], per_shard=result["subjects_per_shard"], wall=wall, ideal=ideal, overhead=wall / ideal,
                       non_gpu=non_gpu, overhead_full=(full_ideal + non_gpu) / full_ideal, loads=loads,
                       first_gpu_median=firsts[len(firsts) // 2], first_gpu_max=firsts[-1], parent=parent_s,
                       s3_other=other, s3_per_image=other / images, parent_requests=parent_requests,
                       report_requests=report_requests, report_s=report_s, tail_s=tail_s, shards_span=shards_span,
                       s3_per_image_no_report=(other - report_requests) / images, s3_image_puts=images and sum(
                           v for k, v in night_counts.items() if "image_put" in k) / images,
                       api=a1 - a0, api_per_image=(a1 - a0) / images, rerun_s=rerun_wall,
                       rerun_requests=sum(delta(c2, c1).values()), rerun_api=a2 - a1, rerun_gpu=rerun_gpu,
                       catalog_s=catalog_s)
            rows_out.append(row)
            print(f"{n} subjects x {args.prompts} x {args.images} = {images:,} images, {row['shards']} shards of "
                  f"{result['subjects_per_shard']} (simulated GPU): "
                  f"wall {wall:.1f}s vs ideal {ideal:.1f}s -> overhead {row['overhead']:.2f} "
                  f"(non-GPU wall {non_gpu:.1f}s; with full-length GPU work, extrapolated: {row['overhead_full']:.3f}); "
                  f"{loads} model loads; shard start -> first GPU work median {row['first_gpu_median']:.1f}s, max "
                  f"{row['first_gpu_max']:.1f}s; parent plan+check+plan files+submit {parent_s:.1f}s; S3 requests per "
                  f"image {row['s3_per_image']:.2f} (+{row['s3_image_puts']:.2f} image PUTs; {night_counts}), of which the parent "
                  f"{parent_requests} and its run report (index.html) {report_requests} in {report_s:.1f}s; without the "
                  f"report {row['s3_per_image_no_report']:.2f}/image; shards' span {shards_span:.1f}s, parent after the last "
                  f"shard {tail_s:.1f}s; "
                  f"Prefect API calls {row['api']} ({row['api_per_image']:.3f}/image); rerun {rerun_wall:.1f}s, "
                  f"{row['rerun_requests']} S3 requests, {row['rerun_api']} API calls, {rerun_gpu} GPU calls; "
                  f"catalog.parquet full read (polars, S3) {catalog_s:.2f}s", flush=True)
        if rows_out:
            print_table(rows_out)
        probe_rows = [probe(s3, endpoint, server, events_root, settings, n, args) for n in probes]
        for r in probe_rows[1:]:  # the first probe is the small manifest the others are compared with
            print(f"probe_first_gpu_ratio_{r['subjects']}={r['first_gpu_median'] / probe_rows[0]['first_gpu_median']:.2f} "
                  f"(median, vs the {probe_rows[0]['subjects']:,}-subject manifest)")
    finally:
        if server is not None:
            server.stop()
        for p in procs:
            stop_process_group(p)
        if pg:
            stop_postgres(tmp / "pgroot")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
