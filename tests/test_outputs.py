"""Output keys, PNG + sidecar writing (sidecar last), plan/done interplay and the catalogue."""

from __future__ import annotations

import dataclasses
import json

import duckdb
import polars as pl
import pyarrow.dataset as pads
import pytest
from PIL import Image
from prcore_testing import record_for

from prcore.data.fingerprint import sha256_bytes
from prcore.data.load import load_manifest
from prcore.data.plan import plan
from prcore.data.schema import GenerationDefaults
from prcore.outputs.catalog import CATALOG_SCHEMA, read_catalog, write_catalog
from prcore.outputs.sidecar import ImageRecord, read_png_parameters, read_sidecar, write_image
from prcore.store.keys import catalog_key, image_key, lora_prefix, parse_image_key, run_key, sidecar_key
from prcore.store.storage import LocalStore, open_store

FP = "0123456789abcdef"


def test_keys_follow_the_layout():
    assert image_key("dog1", "beach", FP, 3) == f"images/dog1/beach/{FP}/3.png"
    assert sidecar_key("dog1", "beach", FP, 3) == f"images/dog1/beach/{FP}/3.json"
    assert lora_prefix("dog1", FP) == f"loras/dog1/{FP}/"
    assert run_key("20260101T000000Z", "summary.json") == "runs/20260101T000000Z/summary.json"
    assert catalog_key("dog1") == "catalog/dog1.parquet"


def test_every_image_key_parses_back_and_nothing_else_does():
    for ext, build in (("png", image_key), ("json", sidecar_key)):
        parsed = parse_image_key(build("dog1", "beach-1", FP, 12))
        assert (parsed.subject_id, parsed.prompt_id, parsed.req_fp, parsed.index, parsed.ext) == ("dog1", "beach-1", FP, 12, ext)
        assert parsed.png == image_key("dog1", "beach-1", FP, 12) and parsed.sidecar == sidecar_key("dog1", "beach-1", FP, 12)
    for key in (f"images/dog1/beach/{FP}/x.png", f"images/dog1/{FP}/0.png", f"loras/dog1/{FP}/training.json",
                f"images/../beach/{FP}/0.png", f"images/dog1/beach/{FP}/0.txt"):
        assert parse_image_key(key) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: image_key("../x", "p", FP, 0),
        lambda: image_key("a/b", "p", FP, 0),
        lambda: image_key("s", "..", FP, 0),
        lambda: image_key("s", "p", "../../etc", 0),
        lambda: image_key("s", "p", FP, -1),
        lambda: lora_prefix("s", "not-hex"),
        lambda: run_key("r", "../x"),
        lambda: catalog_key("../s"),
    ],
)
def test_unsafe_parts_never_become_keys(call):
    with pytest.raises(ValueError):
        call()


class RecordingStore(LocalStore):
    """A real LocalStore that also records the order of its puts."""

    def __init__(self, root):
        super().__init__(root)
        self.puts: list[str] = []

    def put(self, key, data, content_type=None, metadata=None):
        super().put(key, data, content_type, metadata)
        self.puts.append(key)


@pytest.fixture
def planned(tmp_path):
    img = tmp_path / "ref.png"
    Image.new("RGB", (8, 8), (0, 90, 0)).save(img)
    rows = [
        {"subject_id": "s1", "instance_images": ["ref.png"], "class_noun": "dog", "prompt": "a {subject} on the beach", "prompt_id": "beach"},
        {"subject_id": "s1", "instance_images": ["ref.png"], "class_noun": "dog", "prompt": "a {subject} in the snow", "prompt_id": "snow"},
        {"subject_id": "s2", "instance_images": ["ref.png"], "class_noun": "cat", "prompt": "a {subject} in the snow", "prompt_id": "snow"},
    ]
    path = tmp_path / "m.parquet"
    pl.DataFrame(rows).write_parquet(path)
    return load_manifest(path)


def test_write_image_png_chunk_and_sidecar_last(tmp_path, planned):
    store = RecordingStore(tmp_path / "out")
    req = plan(planned, store=store, defaults=GenerationDefaults(num_images=2))[0].requests[0]
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    side = write_image(store, record_for(req, 1, personal_prompt="a sks dog on the beach", lora_fp=FP, seconds=0.5,
                                         width=16, height=16), image)
    assert store.puts == [req.keys[1], req.keys[1][:-4] + ".json"]  # sidecar is the last write
    png = store.get(req.keys[1])
    assert side.sha256 == sha256_bytes(png) and side.bytes == len(png)
    assert side.seed == req.seeds[1] and side.req_fp == req.req_fp and side.index == 1
    assert (side.width, side.height) == (16, 16)
    embedded = read_png_parameters(png)
    assert embedded["seed"] == req.seeds[1] and embedded["guidance_scale"] == 7.5
    assert embedded["personal_prompt"] == "a sks dog on the beach" and (embedded["width"], embedded["height"]) == (16, 16)
    assert "sha256" not in embedded and read_sidecar(store, req.keys[1]) == side
    assert ImageRecord.from_dict(json.loads(store.get(req.keys[1][:-4] + ".json"))) == side
    with Image.open(tmp_path / "out" / req.keys[1]) as im:
        assert im.size == (16, 16)


def test_write_image_refuses_credentials(tmp_path, planned):
    store = LocalStore(tmp_path / "out")
    req = plan(planned, store=store)[0].requests[0]
    with pytest.raises(ValueError, match="credential"):
        write_image(store, record_for(req, 0, extra={"aws_secret_access_key": "x"}), Image.new("RGB", (8, 8)))
    assert list(store.list("")) == []


def test_rerun_skips_done_and_half_written_is_redone(tmp_path, planned):
    store = LocalStore(tmp_path / "out")
    defaults = GenerationDefaults(num_images=2)
    jobs = plan(planned, store=store, defaults=defaults)
    assert sum(j.n_done for j in jobs) == 0
    req = jobs[0].requests[0]
    write_image(store, record_for(req, 0), Image.new("RGB", (8, 8)))
    store.put(req.keys[1], b"crashed before the sidecar")  # half-written: PNG only
    again = plan(planned, store=store, defaults=defaults)
    assert again[0].requests[0].done == [True, False]
    assert [sum(r.done) for r in again[0].requests[1:]] == [0] and again[1].n_done == 0
    assert sum(j.n_done for j in again) == 1 and sum(j.n_todo for j in again) == 5
    # raising num_images keeps the finished image: num_images is not part of req_fp
    more = plan(planned, store=store, defaults=GenerationDefaults(num_images=3))
    assert more[0].requests[0].req_fp == req.req_fp and more[0].requests[0].done == [True, False, False]


def test_write_image_on_s3(s3_bucket, planned):
    store = open_store(f"s3://{s3_bucket}/run")
    req = plan(planned, store=store)[1].requests[0]
    side = write_image(store, record_for(req, 0), Image.new("RGB", (8, 8), (255, 0, 0)))
    assert store.exists(req.keys[0][:-4] + ".json")
    assert sha256_bytes(store.get(req.keys[0])) == side.sha256
    assert plan(planned, store=store)[1].requests[0].done[0] is True


def _rows(subject, n, run_date):
    from types import SimpleNamespace

    request = SimpleNamespace(subject_id=subject, prompt_id="beach", req_fp=FP, prompt="a {subject} on the beach",
                              keys=[image_key(subject, "beach", FP, i) for i in range(n)], seeds=[10 + i for i in range(n)],
                              params={**{k: getattr(GenerationDefaults(), k) for k in ("guidance", "guidance_scale",
                                      "consistency_scale", "parallel_scale", "num_inference_steps", "negative_prompt")},
                                      "scheduler": None})
    return [record_for(request, i, sha256="ab" * 32, bytes=100 + i, width=64, height=64, seconds=1.5, clip_t=0.3,
                       run_date=run_date, extra={"meta_sku": "x"}) for i in range(n)]


def test_catalog_readable_by_polars_pyarrow_duckdb(tmp_path):
    store = LocalStore(tmp_path / "out")
    k1 = write_catalog(store, "s1", _rows("s1", 2, "2026-01-01"))
    write_catalog(store, "s2", _rows("s2", 3, "2026-01-02"))
    assert k1 == "catalog/s1.parquet"
    root = tmp_path / "out" / "catalog"

    df = pl.scan_parquet(str(root / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert df.height == 5 and set(df["run_date"].cast(pl.String)) == {"2026-01-01", "2026-01-02"}
    assert set(CATALOG_SCHEMA) <= set(df.columns)
    s2 = df.filter(pl.col("subject_id") == "s2")
    assert json.loads(s2["extra_json"][0])["meta_sku"] == "x" and s2["seconds"].to_list() == [1.5] * 3
    assert s2["clip_t"].to_list() == [0.3] * 3 and s2["dino"].null_count() == 3  # scores are columns

    table = pads.dataset(str(root), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 5 and "run_date" in table.column_names

    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true) WHERE run_date = '2026-01-02'").fetchall()[0][0]
    assert n == 3

    whole = read_catalog(store)
    assert whole.height == 5 and whole["key"].n_unique() == 5


def test_catalog_rewrite_replaces_never_appends(tmp_path):
    """Rewriting a subject (a rerun, a second run) leaves one row per key, the last record's sha256;
    a file of the old one-file-per-run layout for the subject is removed when its current file is written."""
    store = LocalStore(tmp_path / "out")
    legacy = "catalog/run_date=2026-01-01/r0--s1.parquet"
    store.put(legacy, b"old layout")
    store.put("catalog/run_date=2026-01-01/r0--s10.parquet", b"another subject's")
    first = _rows("s1", 3, "2026-01-01")
    write_catalog(store, "s1", first)
    redone = [dataclasses.replace(r, sha256="cd" * 32) if r.index == 1 else r for r in first]
    write_catalog(store, "s1", first + redone)  # a key given twice: the last record wins
    write_catalog(store, "s1", redone + _rows("s1", 4, "2026-01-02")[3:])  # manifest growth: one more image
    df = pl.scan_parquet(str(tmp_path / "out" / "catalog" / "*.parquet")).collect()
    assert df.height == 4 and df["key"].n_unique() == 4
    assert df.filter(pl.col("index") == 1)["sha256"].to_list() == ["cd" * 32]
    assert not store.exists(legacy) and store.exists("catalog/run_date=2026-01-01/r0--s10.parquet")
    with pytest.raises(ValueError, match="subject"):
        write_catalog(store, "s2", first)


def test_catalog_on_s3(s3_bucket):
    store = open_store(f"s3://{s3_bucket}/out")
    write_catalog(store, "s1", _rows("s1", 2, "2026-01-01"))
    write_catalog(store, "s1", _rows("s1", 2, "2026-01-01"))
    df = read_catalog(store)
    assert df.height == 2 and df["run_date"].unique().to_list() == ["2026-01-01"]


def test_contact_sheet_artifact_carries_no_credentials(s3_bucket, monkeypatch):
    """By default the artifact names the object (s3://...) and embeds no presigned link; presigning is an
    explicit, short-lived choice; a public base URL gives plain links."""
    from prcore.outputs.reports import SubjectResult, contact_sheets_markdown

    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLESESSIONTOKEN")
    monkeypatch.delenv("PRCORE_PUBLIC_BASE_URL", raising=False)
    monkeypatch.delenv("PRCORE_ARTIFACT_PRESIGN_S", raising=False)
    store = open_store(f"s3://{s3_bucket}/out")
    results = [SubjectResult("s0", contact_sheet="runs/r1/contact_sheets/s0.png"), SubjectResult("s1", error="boom", step="train")]
    md = contact_sheets_markdown(store, "r1", results, report_key="runs/r1/index.html")
    assert f"s3://{s3_bucket}/out/runs/r1/contact_sheets/s0.png" in md and "runs/r1/index.html" in md
    for secret in ("X-Amz-Credential", "X-Amz-Security-Token", "Signature", "testing", "FwoGZXIv"):
        assert secret not in md
    monkeypatch.setenv("PRCORE_ARTIFACT_PRESIGN_S", "600")
    import re
    import time

    md = contact_sheets_markdown(store, "r1", results)
    v4, v2 = re.search(r"X-Amz-Expires=(\d+)", md), re.search(r"[?&]Expires=(\d+)", md)
    assert (v4 and int(v4[1]) == 600) or (v2 and int(v2[1]) <= time.time() + 660), md  # SigV4 or SigV2 form
    monkeypatch.delenv("PRCORE_ARTIFACT_PRESIGN_S")
    monkeypatch.setenv("PRCORE_PUBLIC_BASE_URL", "https://review.example.com/nightly/")
    md = contact_sheets_markdown(store, "r1", results)
    assert "![s0](https://review.example.com/nightly/runs/r1/contact_sheets/s0.png)" in md and "X-Amz" not in md


def _catalogue_of_three(tmp_path):
    store = LocalStore(tmp_path / "out")
    for sid, n in (("s1", 2), ("s2", 3), ("s3", 1)):
        write_catalog(store, sid, _rows(sid, n, "2026-01-01"))
    return store


def test_readme_read_commands_on_both_layouts(tmp_path):
    """README's read commands: the per-subject glob keeps reading each row once with the snapshot beside it,
    and the snapshot (one file) reads the same rows."""
    from prcore.outputs.catalog import write_snapshot

    store = _catalogue_of_three(tmp_path)
    snap = write_snapshot(store)
    assert (snap.key, snap.files, snap.rows, snap.written) == ("catalog.parquet", 3, 6, True)
    out = tmp_path / "out"
    per_subject = [pl.scan_parquet(f"{out}/catalog/*.parquet").collect(),
                   pl.from_arrow(pads.dataset(str(out / "catalog"), format="parquet").to_table()),
                   duckdb.sql(f"SELECT * FROM read_parquet('{out}/catalog/*.parquet')").pl()]
    snapshot = [pl.scan_parquet(f"{out}/catalog.parquet").collect(), duckdb.sql(f"SELECT * FROM read_parquet('{out}/catalog.parquet')").pl()]
    for frame in per_subject + snapshot:
        assert frame.height == 6 and frame["key"].n_unique() == 6 and frame.schema == pl.Schema(CATALOG_SCHEMA)
        assert frame.sort("key").equals(per_subject[0].sort("key"))


def test_snapshot_is_exactly_the_per_subject_files_and_never_trusted_stale(tmp_path):
    """The snapshot holds the rows of the per-subject files (same rows, order, schema); once a subject's file
    changes, read_catalog no longer uses it until it is rebuilt; rebuilt only when something changed."""
    from prcore.outputs.catalog import catalog_sources, read_snapshot, sources_fingerprint, write_snapshot

    store = _catalogue_of_three(tmp_path)
    files = read_catalog(store, use_snapshot=False)
    write_snapshot(store)
    assert pl.read_parquet(tmp_path / "out" / "catalog.parquet").equals(files)
    assert read_snapshot(store, sources_fingerprint(catalog_sources(store))).equals(files)
    assert read_catalog(store).equals(files)
    assert not write_snapshot(store).written  # nothing changed: not rewritten

    rows = _rows("s2", 3, "2026-01-01")
    rows[1] = dataclasses.replace(rows[1], sha256="cd" * 32)  # a rerun redid one image of s2
    write_catalog(store, "s2", rows)
    assert read_snapshot(store, sources_fingerprint(catalog_sources(store))) is None  # stale: not trusted
    whole = read_catalog(store)
    assert whole.height == 6 and whole.filter(pl.col("key") == rows[1].key)["sha256"].to_list() == ["cd" * 32]
    snap = write_snapshot(store)
    assert snap.written and pl.read_parquet(tmp_path / "out" / "catalog.parquet").equals(read_catalog(store, use_snapshot=False))
    (tmp_path / "out" / "catalog" / "s3.parquet").unlink()  # a subject's file removed: the snapshot no longer matches
    assert read_catalog(store).height == 5 and write_snapshot(store).rows == 5


def test_damaged_snapshot_is_rebuilt_and_a_failed_rebuild_keeps_the_old_one(tmp_path, caplog):
    """A snapshot whose page checksum fails is neither read nor counted as current; a per-subject file that
    fails its checksum stops the rebuild with its name and leaves the old snapshot's bytes as they were,
    and read_catalog names that file instead of returning the stale snapshot."""
    from prcore.outputs.catalog import CatalogCorruptError, write_snapshot
    from prcore.pipeline.catalog import refresh_catalog_snapshot

    store = _catalogue_of_three(tmp_path)
    write_snapshot(store)
    path = tmp_path / "out" / "catalog.parquet"
    good = path.read_bytes()
    data = bytearray(good)
    data[len(data) // 3] ^= 0xFF  # inside a data page: the footer (and its fingerprint) still read
    path.write_bytes(bytes(data))
    assert read_catalog(store).equals(read_catalog(store, use_snapshot=False))  # the files, not the damaged snapshot
    assert write_snapshot(store).written and path.read_bytes() == good  # rebuilt, byte for byte what it was

    (tmp_path / "out" / "catalog" / "s2.parquet").write_bytes(b"PAR1 not a catalogue PAR1")
    with pytest.raises(CatalogCorruptError, match="catalog/s2.parquet"):
        write_snapshot(store)
    with pytest.raises(CatalogCorruptError, match="catalog/s2.parquet"):
        read_catalog(store)
    with caplog.at_level("WARNING", logger="prcore.pipeline"):
        assert refresh_catalog_snapshot(store) is None
    assert "catalog/s2.parquet" in caplog.text and path.read_bytes() == good


def test_snapshot_replaced_in_one_put(tmp_path):
    """The snapshot is written with one put of the whole file (atomic on both stores): a put that fails
    leaves the old snapshot whole, and no partial file is ever visible under its key."""
    from prcore.outputs.catalog import write_snapshot
    from prcore.store.storage import StoreWriteError

    store = _catalogue_of_three(tmp_path)
    write_snapshot(store)
    old = (tmp_path / "out" / "catalog.parquet").read_bytes()
    write_catalog(store, "s4", _rows("s4", 2, "2026-01-02"))
    puts: list[str] = []

    class FailingStore(LocalStore):
        def put(self, key, data, content_type=None, metadata=None):
            puts.append(key)
            raise StoreWriteError(f"cannot write {key!r}: disk full")

    with pytest.raises(StoreWriteError):
        write_snapshot(FailingStore(tmp_path / "out"))
    assert puts == ["catalog.parquet"] and (tmp_path / "out" / "catalog.parquet").read_bytes() == old
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["catalog", "catalog.parquet"]  # no temporary file left
    assert read_catalog(store).height == 8  # the stale snapshot is not used


def test_snapshot_on_s3_read_by_polars_and_read_catalog(tmp_path, s3_server, s3_bucket):
    """On the S3 server: polars reads the per-subject glob and the snapshot alike; read_catalog uses the
    snapshot (S3 ETags in its fingerprint) and notices a rewritten subject."""
    from prcore.outputs.catalog import catalog_sources, read_snapshot, sources_fingerprint, write_snapshot

    store = open_store(f"s3://{s3_bucket}/root", endpoint_url=s3_server)
    for sid, n in (("s1", 2), ("s2", 3)):
        write_catalog(store, sid, _rows(sid, n, "2026-01-01"))
    write_snapshot(store)
    opts = {"aws_endpoint_url": s3_server, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
            "aws_region": "us-east-1", "aws_allow_http": "true"}
    glob = pl.scan_parquet(f"s3://{s3_bucket}/root/catalog/*.parquet", storage_options=opts).collect()
    snap = pl.scan_parquet(f"s3://{s3_bucket}/root/catalog.parquet", storage_options=opts).collect()
    assert glob.height == 5 and snap.equals(glob) and read_catalog(store).equals(glob)
    assert read_snapshot(store, sources_fingerprint(catalog_sources(store))) is not None
    write_catalog(store, "s1", _rows("s1", 1, "2026-01-01"))
    assert read_snapshot(store, sources_fingerprint(catalog_sources(store))) is None and read_catalog(store).height == 4
