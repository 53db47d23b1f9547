"""Automatic QC: per-metric thresholds, the pass rule, and the scorer interface the flows use.

QC: an image passes iff every configured threshold ``t_m`` has ``score_m >= t_m``. Torch-free:
the settings value (``prcore.pipeline.settings``) carries :class:`QCThresholds` without loading
any model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

from prcore.data.schema import QC_COLUMNS, QC_METRICS

METRICS = QC_METRICS
"""Every metric name a scorer can produce (and the catalogue/sidecar field names)."""


class QCConfigError(ValueError):
    """A QC threshold that cannot be applied (metric not scored, value out of range)."""

# the pluggable interface

@runtime_checkable
class ImageScorerProtocol(Protocol):
    """What the eval command, the DreamBench runner and the flows need from a scorer.

    ``score`` returns one dict per image mapping metric names (a subset of ``metrics``) to floats;
    ``prompt`` is the base prompt (one string, or one per image); ``references`` the subject's
    reference images (or whatever the scorer's own ``embed_references`` returned for them).
    """

    @property
    def metrics(self) -> tuple[str, ...]: ...

    def score(self, images: Sequence[Any], prompt: str | Sequence[str] | None, references: Any) -> list[dict[str, float]]: ...

    def embed_references(self, references: Sequence[Any]) -> Any:
        """The subject's reference images prepared once for many ``score`` calls."""
        ...

# QC

@dataclass(frozen=True)
class QCThresholds:
    """Per-metric minimum scores; None means no check on that metric."""

    clip_t: float | None = None
    clip_i: float | None = None
    dino: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise QCConfigError(f"QC threshold {f.name}={value!r} is not a finite number")
            if not -1.0 <= float(value) <= 1.0:
                raise QCConfigError(f"QC threshold {f.name}={value} is outside [-1, 1], the range of a cosine similarity")

    def configured(self) -> dict[str, float]:
        """{metric: threshold} for the thresholds that are set."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    def __bool__(self) -> bool:
        return bool(self.configured())

    def check_metrics(self, metrics: Sequence[str]) -> None:
        """Raise QCConfigError when a threshold is set for a metric that is not scored."""
        missing = [m for m in self.configured() if m not in metrics]
        if missing:
            raise QCConfigError(
                f"QC threshold set for {', '.join(missing)} but that metric is not scored (scored: "
                f"{', '.join(metrics) or 'none'}); configure its model (--clip-model for clip_t/clip_i, "
                "--dino-model for dino) or drop the threshold"
            )

    @classmethod
    def from_columns(cls, row: Mapping[str, Any], defaults: QCThresholds | None = None) -> QCThresholds:
        """Thresholds from manifest columns ``qc_clip_t``/``qc_clip_i``/``qc_dino`` (or flow
        parameters of the same names); a missing or null column falls back to ``defaults``."""
        base = defaults or cls()
        values: dict[str, float | None] = {}
        for metric, column in QC_COLUMNS.items():
            value = row.get(column)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                values[metric] = getattr(base, metric)
            else:
                values[metric] = value
        return cls(**values)

def failed_metrics(scores: Mapping[str, float], thresholds: QCThresholds) -> list[str]:
    """The metrics whose score is below its threshold (NaN counts as below)."""
    configured = thresholds.configured()
    thresholds.check_metrics(tuple(scores))
    return [m for m, t in configured.items() if not scores[m] >= t]

def qc_pass(scores: Mapping[str, float], thresholds: QCThresholds) -> bool:
    """True iff ``scores[m] >= t_m`` for every configured threshold ``t_m``.

    A threshold for a metric missing from ``scores`` raises :class:`QCConfigError`.
    """
    return not failed_metrics(scores, thresholds)

def score_and_qc(
    scorer: ImageScorerProtocol,
    images: Sequence[Any],
    *,
    prompt: str | Sequence[str] | None,
    references: Any,
    thresholds: QCThresholds | None = None,
) -> list[dict[str, Any]]:
    """The flow stage's hook: scores plus ``qc_pass`` per image, ready to merge into a sidecar
    record / catalogue row; with thresholds set, also ``qc_thresholds`` ({metric: threshold}, so
    ``prcore eval`` re-applies them). ``qc_pass`` is None when no threshold is set. Thresholds
    naming a metric the scorer does not produce fail before any model runs."""
    thresholds = thresholds or QCThresholds()
    thresholds.check_metrics(scorer.metrics)
    records: list[dict[str, Any]] = []
    for scores in scorer.score(images, prompt, references):
        record: dict[str, Any] = dict(scores)
        record["qc_pass"] = qc_pass(scores, thresholds) if thresholds else None
        if thresholds:
            record["qc_thresholds"] = thresholds.configured()
        records.append(record)
    return records

