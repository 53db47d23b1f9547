"""A real local Prefect server, work pools and process workers for end-to-end tests.

Everything started here runs in its own process group (``start_new_session=True``) and is stopped
by its PID's group in teardown, so a worker's flow-run subprocesses go down with it. Each server
gets its own PREFECT_HOME and sqlite database under a temporary folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_BIN = str(Path(sys.executable).with_name("prefect"))

# Settings that keep a test server quiet, offline and quick to react.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
    # SQLite under a loaded CI runner: wait longer for the write lock instead of failing requests.
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
    "PREFECT_CLI_COLORS": "false",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Return once something listens on 127.0.0.1:``port``; TimeoutError after ``timeout`` seconds."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (from /proc/<pid>/task/*/children), depth first."""
    out: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                kids = [int(c) for c in children.read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            stack.extend(kids)
    return out


def stop_process_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process we started with its own session: SIGTERM its group, then SIGKILL the group
    and every descendant by PID (Prefect starts each flow run in a session of its own)."""
    kids = descendants(proc.pid)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _reap_group(proc.pid)
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def kill_now(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants at once (a crash, not a shutdown)."""
    kids = descendants(proc.pid)
    for pid in [proc.pid, *kids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _reap_group(proc.pid)
    proc.wait(10)


def _reap_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class PrefectServer:
    """A running ``prefect server start`` and the environment its clients need."""

    port: int
    home: Path
    proc: subprocess.Popen
    env: dict[str, str]
    log_path: Path
    children: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=30)

    def create_process_pool(self, name: str) -> None:
        """Create a process work pool through the REST API (quicker than the CLI's 4 s start-up)."""
        with self.api() as c:
            r = c.post("/work_pools/", json={"name": name, "type": "process"})
            if r.status_code == 409:
                return
            r.raise_for_status()
            # Fill the pool's base job template from the process worker's default.
            template = _process_base_job_template()
            c.patch(f"/work_pools/{name}", json={"base_job_template": template}).raise_for_status()

    def create_global_concurrency_limit(self, name: str, limit: int) -> None:
        with self.api() as c:
            r = c.post("/v2/concurrency_limits/", json={"name": name, "limit": limit, "active": True})
            if r.status_code not in (200, 201, 409):
                r.raise_for_status()

    def run_cli(self, *args: str, cwd: Path = REPO_ROOT, timeout: float = 300, extra_env: Mapping[str, str] | None = None,
                log_name: str | None = None) -> subprocess.CompletedProcess:
        """Run ``prefect ARGS`` against this server; output goes to a log file (never echoed: env holds keys)."""
        env = {**self.env, **(extra_env or {})}
        log = self.home / (log_name or f"cli-{int(time.time() * 1000)}.log")
        with open(log, "w") as fh:
            proc = subprocess.Popen([PREFECT_BIN, *args], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                raise
        return subprocess.CompletedProcess(args, rc, stdout=log.read_text(errors="replace"), stderr="")

    def start_worker(self, pool: str, name: str, *, limit: int = 1, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen:
        env = {**self.env, **(extra_env or {})}
        log = open(self.home / f"worker-{name}.log", "w")
        proc = subprocess.Popen(
            [PREFECT_BIN, "worker", "start", "--pool", pool, "--limit", str(limit), "--name", name, "--type", "process"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.children.append(proc)
        return proc

    def wait_for_workers(self, pool: str, names: set[str], timeout: float = 60) -> None:
        """Block until every named worker has sent a heartbeat for ``pool``."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        with self.api() as c:
            while time.monotonic() < deadline:
                r = c.post(f"/work_pools/{pool}/workers/filter", json={})
                if r.status_code == 200:
                    seen = {w["name"] for w in r.json()}
                    if names <= seen:
                        return
                time.sleep(0.5)
        raise TimeoutError(f"workers {sorted(names - seen)} did not connect to pool {pool!r} in {timeout}s")

    def worker_log(self, name: str) -> str:
        path = self.home / f"worker-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for child in reversed(self.children):
            stop_process_group(child)
        stop_process_group(self.proc)


def _process_base_job_template() -> dict:
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def prefect_env(home: Path, port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(QUIET_ENV)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")])),
    )
    env.pop("PREFECT_PROFILE", None)
    return env


@contextmanager
def prefect_server(home: Path, *, startup_timeout: float = 120) -> Iterator[PrefectServer]:
    """``prefect server start --host 127.0.0.1 --port P`` with its own home and DB; waits for /api/health."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = prefect_env(home, port)
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [PREFECT_BIN, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = PrefectServer(port=port, home=home, proc=proc, env=env, log_path=log_path)
    try:
        _wait_healthy(server, startup_timeout)
        yield server
    finally:
        server.stop()


def _wait_healthy(server: PrefectServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.proc.returncode}:\n{server.log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{server.log_path.read_text()[-3000:]}")


# --------------------------------------------------------------------------------------------------
# Small manifests for orchestration tests


def subject_image(seed: int, size: int = 64) -> bytes:
    """A deterministic little PNG (coloured blocks) standing in for a subject photo."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), tuple(rng.randint(150, 250) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rng.randint(0, size // 2), rng.randint(0, size // 2)
        d.rectangle((x, y, x + size // 3, y + size // 3), fill=tuple(rng.randint(0, 200) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def manifest_rows(subjects: int, prompts: int = 2, num_images: int = 2, *, images_per_subject: int = 2,
                  image_uri=lambda s, k: f"subjects/s{s}/{k}.png", steps: int = 3, size: int | None = None,
                  train_steps: int | None = None) -> list[dict]:
    """Rows of a manifest: ``subjects`` x ``prompts`` requests of ``num_images`` small images each."""
    templates = ["a {subject} on the beach", "a {subject} in the snow", "a {subject} in the jungle",
                 "a red {subject}", "a {subject} wearing a hat"]
    rows = []
    for s in range(subjects):
        for p in range(prompts):
            row = {
                "subject_id": f"s{s}", "instance_images": [image_uri(s, k) for k in range(images_per_subject)],
                "class_noun": "dog" if s % 2 == 0 else "toy", "prompt": templates[p % len(templates)],
                "prompt_id": f"p{p}", "num_images": num_images, "num_inference_steps": steps,
            }
            if size is not None:
                row.update(height=size, width=size)
            if train_steps is not None:
                row["train_steps"] = train_steps
            rows.append(row)
    return rows


def write_local_manifest(folder: Path, rows: list[dict], subjects: int, images_per_subject: int = 2) -> Path:
    """Write ``manifest.parquet`` and its subject images (relative URIs) into ``folder``."""
    import polars as pl

    for s in range(subjects):
        for k in range(images_per_subject):
            path = folder / "subjects" / f"s{s}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(subject_image(100 * s + k))
    path = folder / "manifest.parquet"
    pl.DataFrame(rows).write_parquet(path)
    return path


def upload_manifest(s3, bucket: str, prefix: str, rows: list[dict], subjects: int, images_per_subject: int = 2,
                    corrupt: set[str] = frozenset()) -> str:
    """Put ``{prefix}/manifest.parquet`` and the subject images (relative URIs) in S3; returns the URI.

    Subjects in ``corrupt`` get a truncated PNG (found only when training decodes it).
    """
    import io

    import polars as pl

    for s in range(subjects):
        for k in range(images_per_subject):
            data = subject_image(100 * s + k)
            if f"s{s}" in corrupt:
                data = data[: len(data) // 3]
            s3.put_object(Bucket=bucket, Key=f"{prefix}/subjects/s{s}/{k}.png", Body=data)
    buf = io.BytesIO()
    pl.DataFrame(rows).write_parquet(buf)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/manifest.parquet", Body=buf.getvalue())
    return f"s3://{bucket}/{prefix}/manifest.parquet"
