"""How long a full read of the catalogue takes at 100, 1,000 and 10,000 subjects, per-subject files vs the snapshot.

    .venv/bin/python benchmarks/catalog_scale.py [--subjects 100,1000,10000] [--prompts 25] [--images 4] [--no-s3]

For each size it writes a realistic catalogue (``--prompts`` x ``--images`` rows per subject, the real
CATALOG_SCHEMA through ``catalog_frame``/``catalog_bytes``: random sha256/md5, prompts, scores,
``extra_json``) as ``catalog/{subject_id}.parquet`` to a folder and to a local S3 server (moto in
server mode, started here on 127.0.0.1), then builds the snapshot ``catalog.parquet`` with
``write_snapshot``. Timed (each once, after the setup): a full read with polars (``scan_parquet`` of
the per-subject glob and of the snapshot, on the folder and on S3), DuckDB (folder only: its
``httpfs`` extension is a download, unavailable offline, so DuckDB cannot reach the S3 server here)
and ``read_catalog(store)`` (snapshot used, and ``use_snapshot=False``), plus the writes and the
snapshot rebuild. The last line is ``catalog_scale_s3_snapshot_seconds=<x>``: polars' full read of the
snapshot from the S3 server at the largest size.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

from prcore.outputs.catalog import catalog_bytes, catalog_frame, read_catalog, write_snapshot  # noqa: E402
from prcore.outputs.sidecar import ImageRecord, code_version  # noqa: E402
from prcore.store.keys import CATALOG_SNAPSHOT_KEY, catalog_key, image_key  # noqa: E402
from prcore.store.storage import LocalStore, S3Store  # noqa: E402

SCENES = ["on a beach at sunset", "in a snowy forest", "on a marble kitchen counter", "floating in space", "in a Tokyo street at night"]


def subject_records(sid: str, n_prompts: int, n_images: int, rng: random.Random) -> list[ImageRecord]:
    """The catalogue rows of one subject as the flow writes them (values of realistic size and entropy)."""
    lora_fp, version = f"{rng.getrandbits(64):016x}", code_version()
    out = []
    for p in range(n_prompts):
        pid, req_fp = f"p{p:03d}", f"{rng.getrandbits(64):016x}"
        scene = SCENES[p % len(SCENES)] + f" variation {p}"
        for i in range(n_images):
            out.append(ImageRecord(
                subject_id=sid, prompt_id=pid, req_fp=req_fp, index=i, key=image_key(sid, pid, req_fp, i),
                seed=rng.getrandbits(31), prompt_template=f"a photo of {{subject}} {scene}",
                personal_prompt=f"a photo of sks handbag {scene}", base_prompt=f"a photo of handbag {scene}",
                negative_prompt="blurry, low quality", class_noun="handbag", identifier="sks", guidance="parallel_rescaled",
                guidance_scale=7.5, consistency_scale=3.0, parallel_scale=0.5, num_inference_steps=30, scheduler="DDIMScheduler",
                height=512, width=512, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", lora_fp=lora_fp, device="cuda:0",
                dtype="float16", peak_memory_bytes=rng.randrange(4 << 30, 6 << 30), unet_rows=75, run_id="2026-12-04T020000Z-ab12cd34",
                run_date="2026-12-04", seconds=round(rng.uniform(0.8, 1.2), 4), clip_t=rng.uniform(0.25, 0.35),
                clip_i=rng.uniform(0.7, 0.9), dino=rng.uniform(0.5, 0.8), qc_pass=rng.random() > 0.05,
                sha256=f"{rng.getrandbits(256):064x}", bytes=rng.randrange(350_000, 550_000), md5=f"{rng.getrandbits(128):032x}",
                worker={"host": "gpu-node-17", "pid": 4242, "gpu": "NVIDIA H200"}, qc_thresholds={"clip_t": 0.2, "dino": 0.4},
                score_models={"clip": "openai/clip-vit-large-patch14", "dino": "facebook/dinov2-base"},
                extra={"meta_sku": f"SKU-{sid}", "meta_brand": "Acme"}, code_version=version, created_at="2026-12-04T02:13:37+00:00"))
    return out


def catalog_files(n_subjects: int, n_prompts: int, n_images: int) -> Iterator[tuple[str, bytes]]:
    """(key, Parquet bytes) of every per-subject file, made by the product's own writer functions."""
    rng = random.Random(n_subjects)
    for s in range(n_subjects):
        sid = f"subj-{s:05d}"
        yield catalog_key(sid), catalog_bytes(catalog_frame(subject_records(sid, n_prompts, n_images, rng)))


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free port (as tests/conftest.py starts it); yields the endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline:
                raise TimeoutError("moto server did not start")
            time.sleep(0.1)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def timed(label: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t
    print(f"  {label}: {dt:.2f}s", flush=True)
    return dt, result


def reads(store: Any, root: str, opts: dict[str, str] | None, rows: int, duck: bool) -> dict[str, float]:
    """Time every full read of one store; each must return exactly ``rows`` rows."""
    res: dict[str, float] = {}

    def check(frame: Any) -> None:
        assert (frame.height if hasattr(frame, "height") else frame) == rows, (frame, rows)

    for name, fn in [
        ("polars glob catalog/*.parquet", lambda: pl.scan_parquet(f"{root}/catalog/*.parquet", storage_options=opts).collect()),
        ("polars snapshot catalog.parquet", lambda: pl.scan_parquet(f"{root}/{CATALOG_SNAPSHOT_KEY}", storage_options=opts).collect()),
        ("read_catalog(store) (snapshot)", lambda: read_catalog(store)),
        ("read_catalog(store, use_snapshot=False)", lambda: read_catalog(store, use_snapshot=False)),
    ]:
        res[name], frame = timed(name, fn)
        check(frame)
    if duck:
        import duckdb

        for name, src in [("duckdb glob", f"{root}/catalog/*.parquet"), ("duckdb snapshot", f"{root}/{CATALOG_SNAPSHOT_KEY}")]:
            res[name], frame = timed(name, lambda src=src: duckdb.sql(f"SELECT * FROM read_parquet('{src}')").to_arrow_table())
            check(frame.num_rows)
    return res


def snapshot_read_parts(store: Any) -> dict[str, float]:
    """Where ``read_catalog(store)``'s time goes when it uses the snapshot: the LIST of ``catalog/``, the GET of
    ``catalog.parquet``, pyarrow's decode with every page checksum verified, the conversion to polars."""
    import io

    import pyarrow.parquet as pq

    from prcore.outputs.catalog import catalog_sources

    res: dict[str, float] = {}
    res["LIST catalog/"], _ = timed("  part: LIST catalog/ (catalog_sources)", lambda: catalog_sources(store))
    res["GET catalog.parquet"], data = timed("  part: GET catalog.parquet", lambda: store.get(CATALOG_SNAPSHOT_KEY))
    res["decode, checksums verified"], table = timed("  part: pyarrow decode, page checksums verified",
                                                     lambda: pq.read_table(io.BytesIO(data), page_checksum_verification=True))
    res["decode, no checksums"], _ = timed("  part: pyarrow decode, no checksum", lambda: pq.read_table(io.BytesIO(data)))
    res["to polars"], _ = timed("  part: pl.from_arrow", lambda: pl.from_arrow(table))
    return res


def one_size(n: int, args: argparse.Namespace, tmp: Path, endpoint: str | None) -> dict[str, float]:
    rows = n * args.prompts * args.images
    print(f"== {n} subjects x {args.prompts} prompts x {args.images} images = {rows} rows", flush=True)
    t = time.perf_counter()
    files = list(catalog_files(n, args.prompts, args.images))
    size = sum(len(b) for _, b in files)
    print(f"  setup: {len(files)} files, {size / 1e6:.1f} MB, made in {time.perf_counter() - t:.1f}s (not timed)", flush=True)
    out: dict[str, float] = {}
    folder = LocalStore(tmp / f"out-{n}")
    out["folder: write files"], _ = timed("folder: write per-subject files", lambda: [folder.put(k, b) for k, b in files])
    out["folder: write_snapshot"], snap = timed("folder: write_snapshot", lambda: write_snapshot(folder))
    print(f"  snapshot: {snap.rows} rows, {(tmp / f'out-{n}' / CATALOG_SNAPSHOT_KEY).stat().st_size / 1e6:.1f} MB")
    out["folder: write_snapshot unchanged"], again = timed("folder: write_snapshot, nothing changed", lambda: write_snapshot(folder))
    assert not again.written
    out |= {f"folder: {k}": v for k, v in reads(folder, str(tmp / f"out-{n}"), None, rows, duck=True).items()}
    if endpoint:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        s3 = S3Store(f"s3://{bucket}", endpoint_url=endpoint)
        s3.put("probe", b"x")
        with ThreadPoolExecutor(16) as pool:
            out["s3: write files (16 threads)"], _ = timed("s3: write per-subject files (16 threads)",
                                                           lambda: list(pool.map(lambda kb: s3.put(*kb), files)))
        out["s3: write_snapshot"], _ = timed("s3: write_snapshot", lambda: write_snapshot(s3))
        out["s3: write_snapshot unchanged"], again = timed("s3: write_snapshot, nothing changed", lambda: write_snapshot(s3))
        assert not again.written
        opts = {"aws_endpoint_url": endpoint, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                "aws_region": "us-east-1", "aws_allow_http": "true"}
        out |= {f"s3: {k}": v for k, v in reads(s3, f"s3://{bucket}", opts, rows, duck=False).items()}
        out |= {f"s3: read_catalog part: {k}": v for k, v in snapshot_read_parts(s3).items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", default="100,1000,10000")
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.subjects.split(",")]
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, (contextlib.nullcontext(None) if args.no_s3 else moto_server()) as ep:
        for n in sizes:
            results[n] = one_size(n, args, Path(tmp), ep)
    load1, load5, _ = os.getloadavg()
    print(f"\nseconds (cpu cores: {os.cpu_count()}, load average 1/5 min: {load1:.1f}/{load5:.1f})")
    names = list(results[sizes[0]])
    print(f"{'':48s}" + "".join(f"{n:>10d}" for n in sizes))
    for name in names:
        print(f"{name:48s}" + "".join(f"{results[n].get(name, float('nan')):10.2f}" for n in sizes))
    key = "s3: polars snapshot catalog.parquet" if not args.no_s3 else "folder: polars snapshot catalog.parquet"
    print(f"catalog_scale_{'s3' if not args.no_s3 else 'folder'}_snapshot_seconds={results[sizes[-1]][key]:.2f}")


if __name__ == "__main__":
    main()
