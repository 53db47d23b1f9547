"""Per-subject leases in the store: at most one run works on a subject at a time.

``state/leases/{subject_id}.json`` holds the run id, host, pid and an expiry. A run takes it with a
conditional create (S3 ``If-None-Match: *``; on a folder an ``flock``-guarded create), renews it
from a heartbeat thread every ``ttl/3`` with a conditional replace (``If-Match`` on the version it
wrote) and deletes it at the end with a conditional delete, so a run never removes or extends a
lease it no longer holds. A run that finds a live lease of another run skips the subject (the
holder does the work; nothing is counted or catalogued twice). A lease is taken over when it has
expired (its holder stopped renewing: killed, machine gone), when its holder is a process on this
machine that no longer exists, or when it belongs to the same run id (a retry of the same flow run).

The TTL (default 600 s) is ``PRCORE_LEASE_TTL_S``. Expiry compares wall clocks of different
machines: keep them NTP-synchronised (a skew well under the TTL is harmless).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prcore.store.keys import lease_key

log = logging.getLogger("prcore.pipeline")
DEFAULT_LEASE_TTL_S = 600.0


class LeaseLost(RuntimeError):
    """Another run took the subject's lease over (ours was not renewed in time); stop writing."""


def lease_ttl_s() -> float:
    raw = os.environ.get("PRCORE_LEASE_TTL_S")
    try:
        ttl = float(raw) if raw else DEFAULT_LEASE_TTL_S
    except ValueError:
        raise ValueError(f"PRCORE_LEASE_TTL_S must be a number of seconds, not {raw!r}") from None
    if not ttl > 0:
        raise ValueError(f"PRCORE_LEASE_TTL_S must be > 0, not {raw!r}")
    return ttl


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    store: Any
    subject_id: str
    run_id: str
    ttl_s: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    etag: str | None = None
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def key(self) -> str:
        return lease_key(self.subject_id)

    def body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s}).encode()

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is no longer ours (call before each write step)."""
        if self.lost:
            raise LeaseLost(f"subject {self.subject_id}: another run took over the lease of run {self.run_id}")

    def renew(self) -> bool:
        with self._lock:
            if self.lost or self.etag is None:
                return False
            etag = self.store.put_if(self.key, self.body(), if_match=self.etag)
            if etag is None:
                self.lost = True
                log.warning("subject %s: lease lost (taken over by another run)", self.subject_id)
                return False
            self.etag = etag
            return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # a store hiccup: try again at the next beat (the TTL leaves two more)
                log.warning("subject %s: lease renewal failed: %s", self.subject_id, exc)

    def release(self) -> None:
        self._stop.set()
        with self._lock:
            if self.etag is not None and not self.lost:
                try:
                    self.store.delete_if(self.key, self.etag)
                except Exception as exc:  # it expires by itself
                    log.warning("subject %s: could not release the lease: %s", self.subject_id, exc)
            self.etag = None


def read_lease(store: Any, subject_id: str) -> tuple[dict[str, Any], str] | None:
    from prcore.store.storage import KeyNotFoundError

    try:
        data, etag = store.get_versioned(lease_key(subject_id))
    except KeyNotFoundError:
        return None
    try:
        return json.loads(data), etag
    except ValueError:
        return {}, etag  # unreadable: treated as expired


def leased_by(store: Any, subject_id: str) -> str | None:
    found = read_lease(store, subject_id)
    return str(found[0].get("run_id")) if found else None


def _stale(holder: dict[str, Any], run_id: str) -> bool:
    if holder.get("run_id") == run_id:
        return True
    if float(holder.get("expires", 0)) < time.time():
        return True
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def try_acquire(store: Any, subject_id: str, run_id: str, ttl_s: float | None = None) -> Lease | None:
    """The subject's lease, or None when another live run holds it."""
    lease = Lease(store, subject_id, run_id, ttl_s or lease_ttl_s())
    for _ in range(3):
        etag = store.put_if(lease.key, lease.body(), if_none_match=True)
        if etag is None:
            found = read_lease(store, subject_id)
            if found is None:
                continue  # released between our two calls: try again
            holder, held_etag = found
            if holder.get("token") == lease.token:  # our own write, whose reply was lost and retried
                etag = held_etag
            elif not _stale(holder, run_id):
                return None
            else:
                etag = store.put_if(lease.key, lease.body(), if_match=held_etag)  # take over that exact version
                if etag is None:
                    continue  # someone else renewed or took it: look again
                log.info("subject %s: took over the lease of run %s", subject_id, holder.get("run_id"))
        lease.etag = etag
        threading.Thread(target=lease._heartbeat, name=f"lease-{subject_id}", daemon=True).start()
        return lease
    return None


@contextlib.contextmanager
def subject_lease(store: Any, subject_id: str, run: Any, ttl_s: float | None = None) -> Iterator[Lease | None]:
    """Hold the subject's lease for the block (None: another run holds it; the block should skip)."""
    lease = try_acquire(store, subject_id, run.run_id, ttl_s)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()
