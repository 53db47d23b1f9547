"""The nightly flow's fan-out at catalogue scale, on a real local Prefect server (Prefect's own
temporary server: ``prefect.testing.utilities.prefect_test_harness``).

1. Waiting: ``--pending`` shard flow runs (default 1000) that no worker picks up; the nightly
   flow's wait (``flows.common.wait_for_flow_runs``: one filtered query per poll, with backoff)
   runs for ``--wait-seconds``; every HTTP request its client makes is counted. For comparison the
   previous loop (one ``read_flow_run`` per pending run, every second) runs for
   ``--old-seconds``. Then every run is set Completed and the time until the wait returns is timed.
2. Submitting: planning a ``--subjects`` x ``--prompts`` manifest (default 10,000 x 25) and
   submitting one ``run_deployment`` per shard of ``--per-shard`` subjects, as the nightly flow does.

    python benchmarks/fanout_scale.py                      # ~3-5 min on 2 cores
    python benchmarks/fanout_scale.py --pending 100 --subjects 400 --wait-seconds 20   # quick
    python benchmarks/fanout_scale.py --api-url http://127.0.0.1:4200/api   # a server on PostgreSQL

Last lines: ``api_calls_per_minute_waiting=<x>`` and ``plan_and_submit_seconds=<y>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, request) -> None:
        with self.lock:
            self.n += 1


def counted_client(counter: Counter):
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True, httpx_settings={"event_hooks": {"request": [counter]}})


def old_wait(client, ids, seconds: float) -> None:
    """The loop this replaced: read every pending run, every second."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for fr_id in ids:
            client.read_flow_run(fr_id)
            if time.monotonic() >= deadline:
                return
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pending", type=int, default=1000)
    ap.add_argument("--wait-seconds", type=float, default=60.0)
    ap.add_argument("--old-seconds", type=float, default=10.0)
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--per-shard", type=int, default=4)
    ap.add_argument("--submit-workers", type=int, default=16)
    ap.add_argument("--api-url", default=None,
                    help="an existing Prefect server (e.g. `prefect server start` on PostgreSQL, as in production); "
                         "default: Prefect's temporary SQLite server")
    args = ap.parse_args(argv)

    from prefect import flow
    from prefect.states import Completed, Scheduled
    from prefect.testing.utilities import prefect_test_harness

    from flows.common import wait_for_flow_runs
    from flows.nightly import submit_shards

    @flow(name="bench-shard")
    def shard(subject_ids: list[str] | None = None, shard_index: int = 0) -> None:  # never runs: no worker
        return None

    if args.api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        server = temporary_settings({PREFECT_API_URL: args.api_url})
    else:
        server = prefect_test_harness(server_startup_timeout=180)
    with server:
        counter = Counter()
        with counted_client(counter) as client:
            t0 = time.perf_counter()
            ids = [client.create_flow_run(shard, state=Scheduled()).id for _ in range(args.pending)]
            print(f"created {len(ids)} pending shard runs in {time.perf_counter() - t0:.1f}s")

            counter.n = 0
            t0 = time.perf_counter()
            old_wait(client, ids, args.old_seconds)
            old_rate = counter.n / (time.perf_counter() - t0) * 60
            print(f"old wait (one read per pending run per second): {counter.n} calls in {args.old_seconds:.0f}s -> {old_rate:,.0f} calls/min")

            counter.n = 0
            t0 = time.perf_counter()
            done = wait_for_flow_runs(client, ids, timeout_s=args.wait_seconds)
            elapsed = time.perf_counter() - t0
            assert not done, "no run can finish: nothing executes them"
            new_rate = counter.n / elapsed * 60
            print(f"new wait (one filtered query per poll, backoff): {counter.n} calls in {elapsed:.0f}s -> {new_rate:.1f} calls/min")

            for fr_id in ids:
                client.set_flow_run_state(fr_id, Completed(), force=True)
            counter.n = 0
            t0 = time.perf_counter()
            done = wait_for_flow_runs(client, ids, timeout_s=120)
            print(f"all {len(done)} completed: seen in {time.perf_counter() - t0:.2f}s with {counter.n} calls")

            deployment_id = client.create_deployment(flow_id=client.read_flow_by_name("bench-shard").id, name="gpu",
                                                     entrypoint="bench:shard")
            del deployment_id
        # planning + submission of the nightly flow, at catalogue scale
        import polars as pl

        from prcore.data.load import load_manifest
        from prcore.data.plan import plan
        from prcore.data.validate import validate
        from prcore.pipeline.subject import shard as make_shards

        with tempfile.TemporaryDirectory() as tmp:
            n = args.subjects * args.prompts
            sid = [f"s{i // args.prompts:05d}" for i in range(n)]
            frame = pl.DataFrame({"subject_id": sid, "instance_images": [[f"img/{s}/0.png", f"img/{s}/1.png"] for s in sid],
                                  "class_noun": ["dog"] * n, "prompt": [f"a {{subject}} in scene {i % args.prompts}" for i in range(n)]})
            path = Path(tmp) / "m.parquet"
            frame.write_parquet(path)
            t0 = time.perf_counter()
            manifest = load_manifest(path)
            errors = validate(manifest, check_images=False)
            assert not errors, errors[:3]
            jobs = plan(manifest, check=False)
            shards = make_shards([j.subject_id for j in jobs], args.per_shard)
            planned = time.perf_counter() - t0
            t1 = time.perf_counter()
            runs = submit_shards(shards, {"manifest": str(path), "output": "out"}, "bench-shard/gpu", None, f"bench-{uuid.uuid4().hex[:8]}",
                                 workers=args.submit_workers)
            submitted = time.perf_counter() - t1
            assert len(set(runs.values())) == len(shards)
            print(f"{n:,} rows, {len(jobs):,} subjects: load+validate+plan {planned:.1f}s; {len(shards):,} shard runs "
                  f"submitted in {submitted:.1f}s ({args.submit_workers} threads)")
    print(f"api_calls_per_minute_old={old_rate:.0f}")
    print(f"api_calls_per_minute_waiting={new_rate:.1f}")
    print(f"plan_and_submit_seconds={planned + submitted:.1f}")


if __name__ == "__main__":
    main()
