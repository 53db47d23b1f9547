"""Scoring an existing output root (``prcore eval``): every committed image against its base prompt
and its subject's reference images; sidecars updated atomically, a score table per run."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prcore.data.schema import IMAGE_SUFFIXES
from prcore.outputs.sidecar import ImageRecord, update_sidecar
from prcore.quality.qc import METRICS, QC_COLUMNS, ImageScorerProtocol, QCConfigError, QCThresholds, qc_pass
from prcore.store.keys import IMAGES_PREFIX, ImageKey, parse_image_key, scores_key


@dataclass
class EvalResult:
    """What :func:`evaluate_outputs` did: one row per scored image, and what it could not score."""

    rows: list[dict[str, Any]]
    scores_key: str | None
    skipped: list[str]  # "key: reason"

    def summary(self) -> list[dict[str, Any]]:
        """Per subject: images, mean of each metric, QC failures."""
        by_subject: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            by_subject.setdefault(row["subject_id"], []).append(row)
        out = []
        for subject_id, rows in sorted(by_subject.items()):
            entry: dict[str, Any] = {"subject_id": subject_id, "images": len(rows)}
            for m in METRICS:
                values = [r[m] for r in rows if r.get(m) is not None]
                if values:
                    entry[m] = sum(values) / len(values)
            checked = [r for r in rows if r.get("qc_pass") is not None]
            entry["qc_failed"] = sum(1 for r in checked if not r["qc_pass"]) if checked else None
            out.append(entry)
        return out


def _sidecar_thresholds(sidecar: Mapping[str, Any]) -> dict[str, float]:
    """QC thresholds recorded with an image: its ``qc_thresholds`` dict (written by
    :func:`score_and_qc`), else the manifest columns ``qc_*`` (top level or under ``params``)."""
    recorded = sidecar.get("qc_thresholds")
    if isinstance(recorded, Mapping):
        return {m: v for m, v in recorded.items() if m in METRICS and v is not None}
    params = sidecar.get("params") if isinstance(sidecar.get("params"), Mapping) else {}
    found: dict[str, float] = {}
    for metric, column in QC_COLUMNS.items():
        value = sidecar.get(column, params.get(column))
        if value is not None:
            found[metric] = value
    return found


def _base_prompt(sidecar: Mapping[str, Any]) -> str | None:
    if sidecar.get("base_prompt"):
        return str(sidecar["base_prompt"])
    template, noun = sidecar.get("prompt"), sidecar.get("class_noun")
    if template and noun and "{subject}" in str(template):
        return str(template).replace("{subject}", str(noun))
    return None


def _reference_images(subject_id: str, sidecar: Mapping[str, Any], reference_uris: Mapping[str, Sequence[str]] | None) -> list[bytes] | None:
    """A subject's reference image bytes: ``reference_uris[subject_id]`` when given, else the
    sidecar's ``instance_images`` URIs (file paths, file://, s3://)."""
    from prcore.store.uris import read_uri_bytes

    uris = (reference_uris or {}).get(subject_id) or sidecar.get("instance_images")
    if not uris:
        return None
    return [read_uri_bytes(str(u)) for u in uris]


def reference_uris_from_folder(folder: str | Path) -> dict[str, list[str]]:
    """``{subject_id: [image paths]}`` from a folder with one sub-folder of images per subject."""
    root = Path(folder)
    out: dict[str, list[str]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(str(f) for f in sub.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            out[sub.name] = files
    return out


def reference_uris_from_manifest(uri: str | Path) -> dict[str, list[str]]:
    """``{subject_id: [resolved instance image URIs]}`` from a manifest (file, folder or s3 prefix)."""
    from prcore.data.load import load_manifest  # polars: only for --manifest

    manifest = load_manifest(str(uri))
    out: dict[str, list[str]] = {}
    for row, subject_id in enumerate(manifest.df["subject_id"].to_list()):
        if subject_id is not None and subject_id not in out:
            out[subject_id] = manifest.instance_images(row)
    return out




def evaluate_outputs(
    store: Any,
    scorer: ImageScorerProtocol,
    *,
    run_id: str | None = None,
    thresholds: QCThresholds | None = None,
    reference_uris: Mapping[str, Sequence[str]] | None = None,
    write: bool = True,
    now: datetime | None = None,
) -> EvalResult:
    """Score every committed image under ``images/`` of an output root (or only ``run_id``'s).

    Each image (a PNG whose sidecar exists) is scored against its base prompt and its subject's
    reference images (``reference_uris[subject_id]`` when given, else the sidecar's
    ``instance_images`` URIs; see :func:`reference_uris_from_folder`,
    :func:`reference_uris_from_manifest`). A subject without reference images gets CLIP-T only.
    QC thresholds: ``thresholds`` (explicit) win per metric over the ``qc_*`` values recorded in
    the sidecar by the run. Everything is read, checked and scored before anything is written;
    then each sidecar gets the scores, ``qc_pass``, ``qc_thresholds`` and ``score_models``, and all
    rows go to ``runs/{run_id or eval-<UTC time>}/scores.parquet``.
    """
    import polars as pl

    thresholds = thresholds or QCThresholds()
    thresholds.check_metrics(scorer.metrics)
    skipped: list[str] = []

    # 1. read the committed images' sidecars, grouped by (subject, base prompt)
    groups: dict[tuple[str, str | None], list[tuple[str, dict[str, Any], ImageKey]]] = {}
    for key in sorted(store.list(f"{IMAGES_PREFIX}/")):
        match = parse_image_key(key)
        if match is None or match.ext != "json":
            continue
        sidecar = json.loads(store.get(key))
        if run_id is not None and sidecar.get("run_id") != run_id:
            continue
        groups.setdefault((match.subject_id, _base_prompt(sidecar)), []).append((key, sidecar, match))
    if run_id is not None and not groups:
        raise ValueError(f"no image in {store.uri} records run_id {run_id!r}; check the run id (see runs/ in the output root)")

    # 2. references per subject, and every image's thresholds checked against what can be scored
    references: dict[str, list[bytes] | None] = {}
    effective: dict[str, QCThresholds] = {}
    for (subject_id, _), items in groups.items():
        if subject_id not in references:
            references[subject_id] = _reference_images(subject_id, items[0][1], reference_uris)
            if references[subject_id] is None and any(m in scorer.metrics for m in ("clip_i", "dino")):
                skipped.append(f"subject {subject_id}: no reference images known (CLIP-I/DINO not scored); pass --references or --manifest")
        scorable = [m for m in scorer.metrics if references[subject_id] is not None or m not in ("clip_i", "dino")]
        for key, sidecar, _ in items:
            recorded = _sidecar_thresholds(sidecar)
            t = QCThresholds(**{m: getattr(thresholds, m) if getattr(thresholds, m) is not None else recorded.get(m) for m in METRICS})
            try:
                t.check_metrics(scorable)
            except QCConfigError as exc:
                raise QCConfigError(f"{key} (thresholds recorded by its run: {recorded or 'none'}): {exc}") from None
            effective[key] = t

    # 3. score (nothing written yet)
    scored: list[tuple[str, dict[str, Any], ImageKey, str | None, str, dict[str, float]]] = []
    for (subject_id, base_prompt), items in groups.items():
        raw = references[subject_id]
        refs = scorer.embed_references(raw) if raw else None
        present = []
        for key, sidecar, match in items:
            png_key = match.png
            try:
                present.append((key, sidecar, match, store.get(png_key), png_key))
            except FileNotFoundError:
                skipped.append(f"{key}: its PNG {png_key} is missing")
        if present:
            scores = scorer.score([p[3] for p in present], base_prompt, refs)
            for (key, sidecar, match, _png, png_key), image_scores in zip(present, scores, strict=True):
                scored.append((key, sidecar, match, base_prompt, png_key, image_scores))

    # 4. write sidecars, then the run's score table
    models = {k: v for k, v in (("clip_model", getattr(scorer, "clip_model", None)), ("dino_model", getattr(scorer, "dino_model", None))) if v}
    rows: list[dict[str, Any]] = []
    for key, sidecar, match, base_prompt, png_key, image_scores in scored:
        t = effective[key]
        passed = qc_pass(image_scores, t) if t else None
        if write:
            update_sidecar(store, ImageRecord.from_dict(sidecar), **image_scores, qc_pass=passed, qc_thresholds=t.configured(), score_models=models)
        rows.append(
            {
                "subject_id": match.subject_id, "prompt_id": match.prompt_id, "req_fp": match.req_fp,
                "index": match.index, "key": png_key, "run_id": sidecar.get("run_id"), "base_prompt": base_prompt,
                **{m: image_scores.get(m) for m in scorer.metrics}, "qc_pass": passed,
            }
        )
    if write:  # the catalogue rows of these subjects are stale now: the next run rewrites them
        import json as _json

        from prcore.store.keys import dirty_key

        for sid in sorted({r["subject_id"] for r in rows}):
            store.put(dirty_key(sid), _json.dumps({"reason": "scores updated by prcore eval"}).encode(),
                      content_type="application/json")
    table_key = None
    if write and rows:
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        table_key = scores_key(run_id or f"eval-{stamp}")
        buf = io.BytesIO()
        pl.DataFrame(rows, infer_schema_length=None).write_parquet(buf)
        store.put(table_key, buf.getvalue(), content_type="application/vnd.apache.parquet")
    return EvalResult(rows, table_key, skipped)
