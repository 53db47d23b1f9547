"""What both flows share, kept light (no torch import): the ``gpu`` slot, progress events, the failure type."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

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


FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@dataclass(frozen=True)
class Backoff:
    """Poll interval: ``first`` seconds, times ``factor`` after every poll that found nothing new,
    at most ``most``; back to ``first`` when a poll found runs finished."""

    first: float = 2.0
    factor: float = 1.5
    most: float = 30.0


def wait_for_flow_runs(client: Any, ids: Sequence[UUID], *, timeout_s: float, backoff: Backoff = Backoff(),
                       on_final: Callable[[UUID, Any], None] | None = None, page: int = 200,
                       sleep: Callable[[float], None] = time.sleep) -> dict[UUID, str]:
    """Wait until every flow run of ``ids`` is in a final state, or ``timeout_s`` passes.

    One filtered query per poll (the runs still pending whose state is final, ``page`` per
    request), with :class:`Backoff` between polls: a thousand pending shards cost a few API
    calls a minute, not one call per run per second. Returns {id: final state type}; runs still
    pending at the deadline are absent. ``on_final(id, flow_run)`` is called once per finished run.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    pending = set(ids)
    done: dict[UUID, str] = {}
    deadline = time.monotonic() + timeout_s
    interval = backoff.first
    final = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in FINAL_STATES]))
    while pending:
        found = []
        batch = sorted(pending, key=str)
        for start in range(0, len(batch), page * 5):  # the filter's id list stays a few hundred KB at most
            chunk = batch[start : start + page * 5]
            offset = 0
            while True:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk), state=final),
                                             limit=page, offset=offset)
                found.extend(runs)
                if len(runs) < page:
                    break
                offset += page
        for fr in found:
            if fr.id in pending:
                pending.discard(fr.id)
                done[fr.id] = fr.state.type.value
                if on_final is not None:
                    on_final(fr.id, fr)
        if not pending or time.monotonic() >= deadline:
            break
        interval = backoff.first if found else min(backoff.most, interval * backoff.factor)
        sleep(min(interval, max(0.0, deadline - time.monotonic())))
    return done
