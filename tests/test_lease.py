"""Per-subject leases on both stores: one holder at a time, conditional renew/release, takeover of dead holders."""

from __future__ import annotations

import json
import threading
import time

import pytest

from prcore.pipeline import lease as L
from prcore.store.keys import lease_key
from prcore.store.storage import open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/out")


def test_conditional_writes(store):
    """The primitives: create-if-absent, replace-if-version, delete-if-version (moto honours them too)."""
    v1 = store.put_if("state/x.json", b"1", if_none_match=True)
    assert v1 and store.put_if("state/x.json", b"2", if_none_match=True) is None
    v2 = store.put_if("state/x.json", b"2", if_match=v1)
    assert v2 and store.put_if("state/x.json", b"3", if_match=v1) is None
    assert store.get("state/x.json") == b"2" and store.get_versioned("state/x.json") == (b"2", v2)
    assert not store.delete_if("state/x.json", v1) and store.delete_if("state/x.json", v2)
    assert not store.exists("state/x.json") and list(store.list("state/")) == []  # no lock files listed


def test_one_holder_among_racing_runs(store):
    won: list[str] = []

    def contend(i: int) -> None:
        got = L.try_acquire(store, "s0", f"run-{i}", ttl_s=60)
        if got is not None:
            won.append(got.run_id)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert L.leased_by(store, "s0") == won[0]


def test_release_renew_and_takeover(store):
    a = L.try_acquire(store, "s0", "run-a", ttl_s=60)
    assert a is not None and L.try_acquire(store, "s0", "run-b", ttl_s=60) is None
    assert a.renew() and L.leased_by(store, "s0") == "run-a"
    a.release()
    assert not store.exists(lease_key("s0"))
    b = L.try_acquire(store, "s0", "run-b", ttl_s=60)
    assert b is not None

    # b's holder stops renewing (killed on another machine): once expired, c takes it over; b then finds it lost
    b._stop.set()
    body = json.loads(store.get(lease_key("s0")))
    store.put_if(lease_key("s0"), json.dumps({**body, "expires": time.time() - 1, "host": "elsewhere"}).encode(),
                 if_match=b.etag)
    b.etag = store.get_versioned(lease_key("s0"))[1]  # (what b last wrote, as if the expiry were its own)
    c = L.try_acquire(store, "s0", "run-c", ttl_s=60)
    assert c is not None and L.leased_by(store, "s0") == "run-c"
    assert not b.renew() and b.lost
    with pytest.raises(L.LeaseLost):
        b.check()
    b.release()  # a lost lease is not deleted: c still holds it
    assert L.leased_by(store, "s0") == "run-c"
    c.release()


def test_dead_local_holder_is_taken_over_at_once(store):
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer exists
    store.put(lease_key("s1"), json.dumps({"run_id": "killed", "host": socket.gethostname(), "pid": proc.pid,
                                           "expires": time.time() + 3600}).encode())
    got = L.try_acquire(store, "s1", "rerun", ttl_s=60)
    assert got is not None and L.leased_by(store, "s1") == "rerun"
    got.release()


def test_heartbeat_keeps_a_short_lease_alive(store):
    a = L.try_acquire(store, "s2", "run-a", ttl_s=0.9)
    try:
        time.sleep(1.5)  # longer than the TTL: the heartbeat (every 0.3 s) renewed it
        assert L.try_acquire(store, "s2", "run-b", ttl_s=0.9) is None and not a.lost
    finally:
        a.release()
