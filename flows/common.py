"""What both flows share, kept light (no torch import): the ``gpu`` slot, progress events, the failure type."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prefect.concurrency.sync import concurrency

GPU_LIMIT = "gpu"


class SubjectsFailed(RuntimeError):
    """Some subjects of the shard/run failed; the others finished."""


@contextlib.contextmanager
def gpu_slot(enabled: bool = True) -> Iterator[None]:
    """Hold one slot of the ``gpu`` global concurrency limit around model work.

    ``strict=False``: when the limit is not defined on the server the block just runs (the
    per-GPU worker with ``--limit 1`` is the first safeguard; this is the second).
    """
    if not enabled:
        yield
        return
    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        yield


def progress_event(**fields: Any) -> None:
    """Structured progress for live displays (``prcore run``): a record on logger ``prcore.progress``."""
    logging.getLogger("prcore.progress").info(fields.get("event", "progress"), extra={"prcore_event": fields})
