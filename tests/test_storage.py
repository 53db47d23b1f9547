"""Store round trips on a local folder and on a real S3-compatible server (moto, over HTTP)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.request

import boto3
import polars as pl
import pytest
from PIL import Image

from prcore.data.load import load_manifest
from prcore.data.plan import plan
from prcore.data.validate import validate
from prcore.store.storage import (
    KeyNotFoundError,
    LocalStore,
    S3Store,
    StoreError,
    TransientStoreError,
    check_key,
    is_transient,
    open_store,
)
from prcore.store.uris import read_uri_bytes


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/prefix")


def test_open_store_kinds(tmp_path, s3_bucket):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store(f"s3://{s3_bucket}/p/q/")
    assert isinstance(s3, S3Store) and s3.uri == f"s3://{s3_bucket}/p/q"
    with pytest.raises(StoreError, match="unsupported output URI scheme"):
        open_store("gs://bucket/x")


def test_round_trip_every_operation(store):
    assert list(store.list("")) == []
    store.put("images/a/p1/0123456789abcdef/0.png", b"png-bytes", content_type="image/png", metadata={"seed": "1"})
    store.put("images/a/p1/0123456789abcdef/0.json", b"{}")
    store.put("images/b/p1/0123456789abcdef/0.json", b"{}")
    store.put("runs/r1/summary.json", b'{"ok": true}')
    assert store.get("images/a/p1/0123456789abcdef/0.png") == b"png-bytes"
    assert store.exists("runs/r1/summary.json") and not store.exists("runs/r1/nope.json")
    assert sorted(store.list("images/a/")) == ["images/a/p1/0123456789abcdef/0.json", "images/a/p1/0123456789abcdef/0.png"]
    assert len(list(store.list("images/"))) == 3 and len(list(store.list(""))) == 4
    assert list(store.list("images/c/")) == []
    store.put("runs/r1/summary.json", b"v2")  # overwrite
    assert store.get("runs/r1/summary.json") == b"v2"
    with urllib.request.urlopen(store.url("runs/r1/summary.json")) as fh:  # file:// or presigned http
        assert fh.read() == b"v2"
    store.delete("runs/r1/summary.json")
    assert not store.exists("runs/r1/summary.json")
    store.delete("runs/r1/summary.json")  # deleting a missing key is fine
    with pytest.raises(KeyNotFoundError, match="no such key"):
        store.get("runs/r1/summary.json")
    with pytest.raises(FileNotFoundError):
        store.get("runs/r1/summary.json")


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/etc/passwd", "a//b", "a\\b", "", "./a", "a/./b", "a b"])
def test_unsafe_keys_rejected(store, key):
    for op in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key), lambda: store.delete(key)):
        with pytest.raises(StoreError, match="invalid store key"):
            op()


def test_check_key_accepts_layout_keys():
    for key in ("images/s1/p-1/0123abcd/0.png", "catalog/run_date=2026-01-02/r--s.parquet", "loras/s/fp/training.json"):
        assert check_key(key) == key


def test_local_writes_are_atomic(tmp_path):
    store = LocalStore(tmp_path)
    store.put("a/b.bin", b"x" * 1000)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]  # no temp file left behind
    (tmp_path / "a" / ".tmp-stale").write_bytes(b"half")  # a crashed writer's temp file
    assert list(store.list("a/")) == ["a/b.bin"]


def test_s3_prefix_scoping_and_metadata(s3_server, s3_bucket):
    one = open_store(f"s3://{s3_bucket}/one")
    two = open_store(f"s3://{s3_bucket}/two")
    one.put("k/x.png", b"1", content_type="image/png", metadata={"req_fp": "abc"})
    two.put("k/x.png", b"2")
    assert one.get("k/x.png") == b"1" and two.get("k/x.png") == b"2"
    assert list(one.list("")) == ["k/x.png"]
    head = boto3.client("s3", endpoint_url=s3_server).head_object(Bucket=s3_bucket, Key="one/k/x.png")
    assert head["ContentType"] == "image/png" and head["Metadata"] == {"req_fp": "abc"}


def test_s3_large_put_uses_transfer_manager(s3_bucket):
    store = open_store(f"s3://{s3_bucket}", multipart_threshold=5 * 1024 * 1024)
    data = os.urandom(6 * 1024 * 1024)
    store.put("loras/s/fp/pytorch_lora_weights.safetensors", data)
    assert store.get("loras/s/fp/pytorch_lora_weights.safetensors") == data


def test_s3_no_such_bucket_fails_fast(s3_server):
    store = open_store("s3://no-such-bucket-here/x")
    t = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.put("a.txt", b"x")
    assert "no-such-bucket-here" in str(info.value) and "does not exist" in str(info.value)
    assert not is_transient(info.value)
    with pytest.raises(StoreError, match="no-such-bucket-here"):
        store.check()
    assert time.monotonic() - t < 10


def test_s3_no_credentials_message(s3_bucket, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no AWS credentials found") as info:
        open_store(f"s3://{s3_bucket}").put("a.txt", b"x")
    assert s3_bucket in str(info.value) and not is_transient(info.value)


@pytest.fixture(scope="module")
def s3_auth_server():
    """A second moto server that enforces IAM authentication, so bad keys are refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"moto server did not start on port {port}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_s3_bad_credentials_message_names_bucket_not_secret(s3_auth_server, monkeypatch):
    secret = "sEcReT-do-not-print-1234567890"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = open_store("s3://guarded-bucket/p", endpoint_url=s3_auth_server, max_attempts=2)
    with pytest.raises(StoreError) as info:
        store.put("a.txt", b"x")
    text = str(info.value)
    assert "guarded-bucket" in text and "AWS_ACCESS_KEY_ID" in text
    assert secret not in text and "AKIAWRONGWRONGWRONG" not in text
    assert not is_transient(info.value)


def test_a_refused_endpoint_fails_in_seconds_before_any_call_succeeded(monkeypatch):
    """A typo'd port (connection refused at the very start) is a configuration error: one StoreError naming
    the endpoint in seconds, not the retry budget meant for outages after the first successful call
    (that case: test_s3_outage_mid_call_is_retried_until_the_endpoint_returns)."""
    import socket
    import time

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_store("s3://bucket/p", endpoint_url=f"http://127.0.0.1:{port}", retry_budget_s=20)  # default retries
    for call in (store.check, lambda: store.exists("a.txt"), lambda: store.put("a.txt", b"x")):
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"endpoint http://127.0.0.1:{port}.*AWS_ENDPOINT_URL") as info:
            call()
        assert time.monotonic() - started < 5
        assert not is_transient(info.value) and str(info.value).count("\n") == 0


def test_read_uri_bytes_local_file_and_s3(tmp_path, s3_server, s3_bucket):
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert read_uri_bytes(str(tmp_path / "a.bin")) == b"abc"
    assert read_uri_bytes((tmp_path / "a.bin").as_uri()) == b"abc"
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="x/y.bin", Body=b"xyz")
    assert read_uri_bytes(f"s3://{s3_bucket}/x/y.bin") == b"xyz"
    with pytest.raises(FileNotFoundError):
        read_uri_bytes(f"s3://{s3_bucket}/x/missing.bin")
    with pytest.raises(FileNotFoundError):
        read_uri_bytes(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        read_uri_bytes("ftp://host/a.png")


def test_manifest_and_images_on_s3(s3_server, s3_bucket, tmp_path):
    """An s3:// manifest prefix whose relative image paths resolve to the same prefix; plan lists S3."""
    client = boto3.client("s3", endpoint_url=s3_server)
    img = tmp_path / "i.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(img)
    client.put_object(Bucket=s3_bucket, Key="in/refs/0.png", Body=img.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="in/refs/bad.png", Body=b"not an image")
    rows = [{"subject_id": "s1", "instance_images": ["refs/0.png"], "class_noun": "dog", "prompt": "a {subject}"}]
    local = tmp_path / "m.parquet"
    pl.DataFrame(rows).write_parquet(local)
    client.put_object(Bucket=s3_bucket, Key="in/manifest.parquet", Body=local.read_bytes())
    m = load_manifest(f"s3://{s3_bucket}/in")
    assert validate(m) == []
    store = open_store(f"s3://{s3_bucket}/out")
    jobs = plan(m, store=store)
    assert jobs[0].instance_images == [f"s3://{s3_bucket}/in/refs/0.png"]
    key = jobs[0].requests[0].keys[0]
    store.put(key, b"png")
    store.put(key[:-4] + ".json", b"{}")
    assert plan(m, store=store)[0].requests[0].done[0] is True
    pl.DataFrame([dict(rows[0], instance_images=["refs/bad.png", "refs/none.png"])]).write_parquet(local)
    client.put_object(Bucket=s3_bucket, Key="in/manifest.parquet", Body=local.read_bytes())
    errors = validate(load_manifest(f"s3://{s3_bucket}/in/manifest.parquet"))
    assert len(errors) == 1 and "not a readable image" in str(errors[0]) and "row 0" in str(errors[0])


class _Gate:
    """A TCP proxy in front of the S3 server: ``close()`` makes the endpoint go away (connections
    refused), ``open()`` brings it back, while the server and its buckets stay as they were."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target, self.server, self.live = port, target, None, []

    def open(self) -> None:
        import socket
        import threading

        srv = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server = srv

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (a, b):
                    try:
                        sock.close()
                    except OSError:
                        pass

        def serve():
            while True:
                try:
                    client, _ = srv.accept()
                except OSError:
                    return
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self.live += [client, upstream]
                threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:  # refuse new connections and cut the open ones (boto3 keeps them alive)
        import socket

        if self.server is not None:
            try:
                self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() and stops listening (Linux)
            except OSError:
                pass
            self.server.close()
            self.server = None
        for sock in self.live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        self.live.clear()


def test_s3_endpoint_away_then_back_is_retried_within_the_budget(s3_server, s3_bucket):
    """The S3 endpoint goes away mid-run and comes back: a call made meanwhile waits (backoff) and succeeds;
    with it gone for longer than the budget, the call fails with a TransientStoreError in time."""
    import threading
    import time
    from urllib.parse import urlparse

    from prefect_harness import free_port


    port = free_port()
    gate = _Gate(port, urlparse(s3_server).port)
    gate.open()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        store = open_store(f"s3://{s3_bucket}/out", endpoint_url=endpoint, max_attempts=2, retry_budget_s=60, retry_max_delay_s=2)
        store.put("a.json", b"1")
        gate.close()
        reopen = threading.Timer(4.0, gate.open)
        reopen.start()
        started = time.monotonic()
        store.put("b.json", b"2")  # the endpoint is away for ~4 s: retried, then written
        waited = time.monotonic() - started
        reopen.join()
        assert waited >= 3.5 and store.get("b.json") == b"2"

        short = open_store(f"s3://{s3_bucket}/out", endpoint_url=endpoint, max_attempts=2, retry_budget_s=3, retry_max_delay_s=1)
        assert short.exists("b.json")  # a first call succeeded: from now on an endpoint away is an outage
        gate.close()
        started = time.monotonic()
        with pytest.raises(TransientStoreError, match="cannot connect"):
            short.get("b.json")
        assert time.monotonic() - started < 15
    finally:
        gate.close()


def test_stale_temporary_files_are_ignored_then_cleaned(tmp_path):
    store = LocalStore(tmp_path / "out")
    store.put("images/s/p/0.json", b"{}")
    old = tmp_path / "out" / "images" / "s" / "p" / ".tmp-abc123"
    fresh = tmp_path / "out" / "images" / "s" / "p" / ".tmp-def456"
    old.write_bytes(b"half a file")
    fresh.write_bytes(b"a write in progress")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert list(store.list("images/")) == ["images/s/p/0.json"]  # ignored by every reader
    assert store.clean_stale_tmp() == 1
    assert not old.exists() and fresh.exists()


def test_output_root_inside_an_s3_manifest_prefix_is_not_read_as_manifests(s3_server, s3_bucket, tmp_path):
    from prcore.data.load import load_manifest

    client = boto3.client("s3", endpoint_url=s3_server)
    buf = io.BytesIO()
    pl.DataFrame({"subject_id": ["s"], "instance_images": [["x.png"]], "class_noun": ["dog"], "prompt": ["a {subject}"]}).write_parquet(buf)
    client.put_object(Bucket=s3_bucket, Key="in/m.parquet", Body=buf.getvalue())
    for key in ("in/out/catalog/s.parquet", "in/out/runs/r1/scores.parquet", "in/out/images/s/p/0123456789abcdef/0.json"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"not a manifest")
    assert load_manifest(f"s3://{s3_bucket}/in").files == [f"s3://{s3_bucket}/in/m.parquet"]


def test_probe_write_refuses_an_output_root_that_takes_no_writes_and_leaves_nothing(tmp_path, s3_server, s3_bucket):
    """The output root is checked with a real write, read back and delete: a root that is a file, or lies
    under one, is one StoreWriteError; a good root (folder, S3) keeps nothing of the probe."""
    from prcore.store.storage import StoreWriteError, probe_write

    afile = tmp_path / "out.txt"
    afile.write_bytes(b"not a folder")
    for root in (afile, afile / "sub"):
        with pytest.raises(StoreWriteError, match="is a file, not a folder") as info:
            probe_write(open_store(str(root)))
        assert str(info.value).count("\n") == 0
    assert afile.read_bytes() == b"not a folder"

    probe_write(open_store(str(tmp_path / "new" / "root")))  # folders the probe made are removed again
    assert not (tmp_path / "new").exists()
    (tmp_path / "good" / "images").mkdir(parents=True)
    good = open_store(str(tmp_path / "good"))
    probe_write(good)
    assert list(good.list()) == [] and [p.name for p in (tmp_path / "good").iterdir()] == ["images"]
    s3 = open_store(f"s3://{s3_bucket}/out")
    probe_write(s3)
    assert list(s3.list()) == []


_FSIZE_CHILD = r"""
import resource, signal, sys
from prcore.store.storage import StoreWriteError, open_store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # the kernel then fails the write with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a 'disk' that takes 4 KiB per file
store = open_store(sys.argv[1])
store.put("images/s/ok.png", b"x" * 100)
try:
    store.put("images/s/big.png", b"y" * 100_000)
except StoreWriteError as exc:
    print("REFUSED", exc)
"""


def test_a_write_the_disk_refuses_is_one_line_and_leaves_no_partial_file(tmp_path):
    """A real write failure from the kernel (RLIMIT_FSIZE: EFBIG past 4 KiB, as ENOSPC on a full disk):
    one StoreWriteError line, no temporary or partial file left, the object written before kept."""
    done = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith("REFUSED cannot write 'images/s/big.png'") and "too large" in line and "\n" not in line
    files = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["ok.png"]


def test_reads_without_a_client_share_one_per_process(s3_server, s3_bucket, monkeypatch):
    """Instance-image reads (``read_uri_bytes`` with no client) make one boto3 client per process, not one
    per image (each costs a session and a credential-chain read); a changed endpoint makes a new one."""
    import boto3

    from prcore.store import storage

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="img/0.png", Body=b"p0")
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="img/1.png", Body=b"p1")
    made = []
    real = storage.make_s3_client
    monkeypatch.setattr(storage, "make_s3_client", lambda options=None: made.append(options) or real(options))
    monkeypatch.setattr(storage, "_SHARED_CLIENTS", {})
    for _ in range(3):
        assert [read_uri_bytes(f"s3://{s3_bucket}/img/{i}.png") for i in range(2)] == [b"p0", b"p1"]
    assert len(made) == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server + "/")  # the same server under another spelling: a new client
    assert read_uri_bytes(f"s3://{s3_bucket}/img/0.png") == b"p0" and len(made) == 2
