"""What every task shares: retry only transient storage errors, with exponential backoff."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from prcore.store.storage import is_transient

STORAGE_RETRIES = 4
STORAGE_BACKOFF = exponential_backoff(backoff_factor=2)  # 2, 4, 8, 16 s
RETRY_JITTER = 0.5


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry throttling/5xx/connection errors, never user errors."""
    try:
        state.result()
    except Exception as exc:  # the task's exception, re-raised by state.result()
        return is_transient(exc)
    return False


RETRY_OPTIONS: dict[str, Any] = {
    "retries": STORAGE_RETRIES,
    "retry_delay_seconds": STORAGE_BACKOFF,
    "retry_jitter_factor": RETRY_JITTER,
    "retry_condition_fn": retry_if_transient,
}
