"""No orphans after ``prcore run`` is killed.

Prefect's ephemeral API is a subprocess of ``prcore run``; a normal exit stops it (atexit), but a
SIGKILL or an unhandled SIGTERM of ``prcore run`` leaves it running for ever. :func:`start_watchdog`
starts a small process (its own session, so a signal to the run's process group does not reach it)
that records the descendants of ``prcore run`` every half second and, once that process is gone,
also finds the processes carrying this run's ``PRCORE_RUN_TOKEN`` in their environment (started
since its last look), and sends SIGTERM to every one still alive (the same process: pid and start time
checked, so a reused pid is never hit), SIGKILL after 5 s, then exits. Linux (``/proc``) only; a
no-op elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = r"""
import os, signal, sys, time
from pathlib import Path

parent, token, me = int(sys.argv[1]), sys.argv[2].encode(), os.getpid()

def start_time(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None

def children(pid):
    out = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in f.read_text().split()]
        except OSError:
            pass
    return out

parent_start = start_time(parent)
seen = {}
while parent_start is not None and start_time(parent) == parent_start:
    stack = [parent]
    while stack:
        for kid in children(stack.pop()):
            if kid != me and kid not in seen:
                seen[kid] = start_time(kid)
            stack.append(kid)
    time.sleep(0.5)

# processes started after our last look carry the run's token in their environment
for d in Path("/proc").iterdir():
    if d.name.isdigit() and int(d.name) != me and int(d.name) not in seen:
        try:
            if b"PRCORE_RUN_TOKEN=" + token in (d / "environ").read_bytes():
                seen[int(d.name)] = start_time(int(d.name))
        except OSError:
            pass

alive = lambda: [p for p, st in seen.items() if st is not None and start_time(p) == st]
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
    for pid in alive():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
"""


_started: dict[int, subprocess.Popen] = {}


def start_watchdog() -> subprocess.Popen | None:
    """Watch this process (one watchdog per process, however many runs it makes); clean up its
    descendants when it dies. None where /proc is missing or PRCORE_NO_WATCHDOG is set."""
    if not os.path.isdir(f"/proc/{os.getpid()}/task") or os.environ.get("PRCORE_NO_WATCHDOG"):
        return None
    if os.getpid() in _started and _started[os.getpid()].poll() is None:
        return _started[os.getpid()]
    import uuid

    token = uuid.uuid4().hex
    watchdog = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(os.getpid()), token], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    os.environ["PRCORE_RUN_TOKEN"] = token  # inherited by everything this run starts from now on
    _started[os.getpid()] = watchdog
    return watchdog
