"""The catalogue snapshot at the end of a run (Prefect-free; the nightly flow calls it once, after every shard)."""

from __future__ import annotations

import logging
from typing import Any

from prcore.outputs.catalog import CatalogCorruptError, Snapshot, write_snapshot

log = logging.getLogger("prcore.pipeline")


def refresh_catalog_snapshot(store: Any) -> Snapshot | None:
    """Rebuild ``catalog.parquet`` from the per-subject catalogue files when they changed since it was written
    (one listing and one GET of the snapshot when nothing did). Never raises for a damaged per-subject file
    or a store error: the night's images and per-subject files stand, the old snapshot is no longer trusted
    by ``read_catalog`` (its fingerprint does not match), and the next run rebuilds it; returns None then."""
    from prcore.store.storage import StoreError

    try:
        snap = write_snapshot(store)
    except (CatalogCorruptError, StoreError, ValueError) as exc:
        log.warning("catalogue snapshot not rewritten: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if snap.written:
        log.info("catalogue snapshot %s: %d row(s) from %d file(s)", snap.key, snap.rows, snap.files)
    return snap
