"""The batch's building blocks, free of Prefect: what the tasks in ``tasks/`` wrap.

Per subject: :func:`ensure_lora` (fingerprint the subject; reuse ``loras/{subject_id}/{lora_fp}/``
from the store when it is there, else train and upload it) and :func:`generate_request` (sample the
pending images of one request and write PNG + sidecar through :mod:`prcore.outputs.sidecar`). Per run:
contact sheets (reference images beside a grid of new images), per-subject result records, shard
records and the failure report under ``runs/{run_id}/``.

Everything here takes and returns small records (ids, keys, counts, seconds); image bytes go to
the Store, never back to the caller.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from prcore.outputs.sidecar import lora_prefix, run_key, sidecar_key_for

log = logging.getLogger("prcore.pipeline.runner")

LORA_MARKER = "training.json"  # uploaded last: a LoRA folder in the store counts only when it exists
CONTACT_SHEET_MAX_IMAGES = 16
_ADAPTER_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


# --------------------------------------------------------------------------------------------------
# Where things go and who ran them


def shard_record_key(run_id: str, shard_index: int) -> str:
    return run_key(run_id, f"shards/{shard_index:04d}.json")


def contact_sheet_key(run_id: str, subject_id: str) -> str:
    return run_key(run_id, f"contact_sheets/{subject_id}.png")


def new_run_id(now: datetime | None = None, suffix: str = "") -> str:
    """``YYYYMMDDTHHMMSSZ[-suffix]``: sortable, safe as a store key segment."""
    now = now or datetime.now(UTC)
    rid = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{rid}-{suffix}" if suffix else rid


def worker_identity() -> dict[str, Any]:
    """Who did the work: host, this process, its parent (a Prefect process worker), optional label."""
    ident: dict[str, Any] = {"hostname": socket.gethostname(), "pid": os.getpid(), "ppid": os.getppid()}
    label = os.environ.get("PRCORE_WORKER_LABEL")
    if label:
        ident["label"] = label
    return ident


def shard(items: Sequence[str], per_shard: int) -> list[list[str]]:
    """Consecutive groups of ``per_shard`` items (the last may be shorter)."""
    if per_shard < 1:
        raise ValueError(f"subjects_per_shard must be >= 1, not {per_shard}")
    return [list(items[i : i + per_shard]) for i in range(0, len(items), per_shard)]


def adapter_name_for(subject_id: str, lora_fp: str) -> str:
    """A peft adapter name (no dots or dashes) unique to one subject's LoRA."""
    return "s_" + _ADAPTER_UNSAFE.sub("_", f"{subject_id}_{lora_fp}")


EMBEDDED_TOYWORLD = "prcore:toyworld"
EMBEDDED_TINY = "prcore:tiny-sd"


def _toyworld_path() -> Path | None:
    try:
        from prcore import toyworld

        path = Path(toyworld.model_path())
    except (ImportError, AttributeError, FileNotFoundError, OSError, RuntimeError):
        return None
    return path if (path / "model_index.json").is_file() else None


def default_model_id() -> str:
    """The embedded model's id: ``prcore:toyworld`` when the toy-world package ships a trained
    pipeline, else ``prcore:tiny-sd`` (a tiny randomly initialised pipeline, built on first use).

    Ids, not paths, go into fingerprints and sidecars, so the same manifest gives the same keys and
    reuses the same LoRAs on every machine, whatever its cache folder.
    """
    return EMBEDDED_TOYWORLD if _toyworld_path() is not None else EMBEDDED_TINY


def resolve_model(model: str | None, cache_dir: str | Path | None = None) -> str:
    """What ``load_pipeline`` should open for ``model``: embedded ids become their local folder."""
    if model in (None, "", "embedded"):
        model = default_model_id()
    if model == EMBEDDED_TOYWORLD:
        path = _toyworld_path()
        if path is None:
            raise FileNotFoundError("the toy-world model is not installed (prcore.toyworld.model_path() has no pipeline)")
        return str(path)
    if model == EMBEDDED_TINY:
        return default_model(cache_dir)
    return str(model)


def default_model(cache_dir: str | Path | None = None) -> str:
    """The embedded model's folder: the toy-world pipeline when that package ships one, else a tiny
    randomly initialised pipeline built once into ``cache_dir`` (default ``~/.cache/prcore``)."""
    path = _toyworld_path()
    if path is not None:
        return str(path)
    from prcore.method.models import build_tiny_pipeline

    root = Path(cache_dir or os.environ.get("PRCORE_CACHE_DIR") or Path.home() / ".cache" / "prcore").expanduser()
    target = root / "models" / "tiny-sd"
    if not (target / "model_index.json").is_file():
        root.joinpath("models").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-sd-", dir=root / "models"))
        build_tiny_pipeline(tmp / "tiny-sd", "sd")
        try:
            os.replace(tmp / "tiny-sd", target)
        except OSError:  # another process won the race
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRCORE_CACHE_DIR") or Path.home() / ".cache" / "prcore").expanduser()


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class LoraInfo:
    """A subject's LoRA: where it is in the store and in the local cache, and how we got it."""

    subject_id: str
    lora_fp: str
    key_prefix: str
    local_dir: str
    source: str  # "trained" | "store" | "cache"
    seconds: float = 0.0  # wall time of this step
    train_seconds: float = 0.0  # time inside training steps (0 when reused)
    final_loss: float | None = None

    @property
    def trained(self) -> bool:
        return self.source == "trained"


@dataclass
class RequestResult:
    subject_id: str
    prompt_id: str
    generated: int = 0
    skipped: int = 0
    keys: list[str] = field(default_factory=list)  # PNG keys written now
    seconds: float = 0.0  # wall time of this step
    sample_seconds: float = 0.0  # time inside the sampler
    qc_failed: int = 0


@dataclass
class SubjectResult:
    """One row of the run table."""

    subject_id: str
    requests: int = 0
    images: int = 0  # images the manifest asks for
    generated: int = 0
    skipped: int = 0
    failed: int = 0  # images not produced because of an error
    seconds: float = 0.0
    model_seconds: float = 0.0  # training steps + sampling
    lora_fp: str | None = None
    lora_source: str | None = None
    contact_sheet: str | None = None
    qc_failed: int = 0
    error: str | None = None
    step: str | None = None
    worker: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Failure:
    subject_id: str
    step: str
    error: str
    error_type: str
    run_id: str = ""
    shard: int | None = None
    traceback: str = ""


@dataclass
class ShardRecord:
    run_id: str
    shard: int
    subjects: list[SubjectResult]
    worker: dict[str, Any]
    started: str
    finished: str
    seconds: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardRecord:
        raw = json.loads(data)
        raw["subjects"] = [SubjectResult(**s) for s in raw["subjects"]]
        return cls(**raw)


def failure_from(exc: BaseException, *, subject_id: str, step: str, run_id: str = "", shard: int | None = None) -> Failure:
    """A failure record: the error's one-line message (no credentials: messages come from our own
    error types or library exceptions, never from the environment) and a short traceback."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-4))
    return Failure(subject_id=subject_id, step=step, error=message[:2000], error_type=exc.__class__.__name__,
                   run_id=run_id, shard=shard, traceback=tb[-4000:])


def put_json(store, key: str, obj: Any) -> str:
    store.put(key, json.dumps(obj, indent=1, default=_json_default).encode(), content_type="application/json")
    return key


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def write_failure_report(store, run_id: str, failures: Sequence[Failure]) -> str:
    """``runs/{run_id}/failures.json``: one entry per failed subject (subject, step, error)."""
    return put_json(store, run_key(run_id, "failures.json"),
                    {"run_id": run_id, "failed_subjects": len(failures), "failures": [asdict(f) for f in failures]})


def write_summary(store, run_id: str, summary: Mapping[str, Any]) -> str:
    return put_json(store, run_key(run_id, "summary.json"), dict(summary))


def summarize(results: Sequence[SubjectResult]) -> dict[str, Any]:
    """Totals over a run's subject rows."""
    return {
        "subjects": len(results),
        "failed_subjects": sum(1 for r in results if not r.ok),
        "requests": sum(r.requests for r in results),
        "images": sum(r.images for r in results),
        "generated": sum(r.generated for r in results),
        "skipped": sum(r.skipped for r in results),
        "failed": sum(r.failed for r in results),
        "trained": sum(1 for r in results if r.lora_source == "trained"),
        "model_seconds": round(sum(r.model_seconds for r in results), 3),
        "qc_failed": sum(r.qc_failed for r in results),
    }


def table_rows(results: Sequence[SubjectResult]) -> list[dict[str, Any]]:
    """The run table: subject, requests, generated, skipped, failed, seconds (+ LoRA and error)."""
    return [
        {
            "subject": r.subject_id,
            "requests": r.requests,
            "generated": r.generated,
            "skipped": r.skipped,
            "failed": r.failed,
            "seconds": round(r.seconds, 2),
            "qc_failed": r.qc_failed,
            "lora": f"{r.lora_source or '-'} {r.lora_fp or ''}".strip(),
            "error": f"{r.step}: {r.error}" if r.error else "",
        }
        for r in results
    ]


# --------------------------------------------------------------------------------------------------
# Planning helpers


def plan_jobs(manifest_uri: str, store, *, model_id: str, defaults: Mapping[str, Any] | None = None,
              subject_ids: Iterable[str] | None = None, check_images: bool = False):
    """Load, validate and plan a manifest; keep only ``subject_ids`` when given (in that order).

    Raises ``prcore.data.manifest.ManifestInvalid`` (a ValueError listing every problem) on a bad manifest.
    ``check_images=True`` also opens every instance image before anything runs.
    """
    from prcore.data.manifest import ManifestInvalid, load_manifest, plan, validate

    manifest = load_manifest(manifest_uri)
    if check_images:
        errors = validate(manifest, check_images=True)
        if errors:
            raise ManifestInvalid(errors, manifest.source)
    jobs = plan(manifest, store=store, defaults=generation_defaults(defaults), base_model=model_id, check=not check_images)
    if subject_ids is not None:
        wanted = list(subject_ids)
        by_id = {j.subject_id: j for j in jobs}
        missing = [s for s in wanted if s not in by_id]
        if missing:
            raise ValueError(f"subjects {missing} are not in manifest {manifest_uri}")
        jobs = [by_id[s] for s in wanted]
    return jobs


def generation_defaults(defaults: Mapping[str, Any] | None):
    """``prcore.data.manifest.GenerationDefaults`` with the given non-None overrides (unknown names are an error)."""
    from dataclasses import fields as dc_fields

    from prcore.data.manifest import GenerationDefaults

    overrides = {k: v for k, v in (defaults or {}).items() if v is not None}
    known = {f.name for f in dc_fields(GenerationDefaults)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown generation default(s) {unknown}; known: {sorted(known)}")
    return GenerationDefaults(**overrides)


def pending_images(job) -> int:
    return int(job.n_images - job.n_done)


def total_images(job) -> int:
    return int(job.n_images)


def job_model(job, model: str) -> str:
    """The base model of a subject: its manifest ``base_model`` column, else the flow's model."""
    return getattr(job, "base_model", None) or model


# --------------------------------------------------------------------------------------------------
# LoRA: fingerprint, reuse or train


def _instance_bytes(job) -> list[bytes]:
    from prcore.store.uris import read_uri_bytes

    return [read_uri_bytes(uri) for uri in job.instance_images]


def train_config_for(job, train_defaults: Mapping[str, Any] | None = None):
    """``TrainConfig`` from flow-level defaults overlaid by the subject's manifest overrides."""
    from prcore.method.dco import TrainConfig

    values = {k: v for k, v in (train_defaults or {}).items() if v is not None}
    values.update({k: v for k, v in (getattr(job, "train_overrides", None) or {}).items() if v is not None})
    if "target_modules" in values and isinstance(values["target_modules"], list):
        values["target_modules"] = tuple(values["target_modules"])
    return TrainConfig(**values)


def subject_lora_fingerprint(job, *, base_model_id: str, train_defaults: Mapping[str, Any] | None = None,
                             images: Sequence[bytes] | None = None) -> str:
    from prcore.method.dco import lora_fingerprint

    images = list(images) if images is not None else _instance_bytes(job)
    return lora_fingerprint(base_model_id=base_model_id, images=images, class_noun=job.class_noun,
                            identifier=job.identifier, captions=_captions(job),
                            config=train_config_for(job, train_defaults))


def _captions(job) -> list[str] | None:
    captions = getattr(job, "instance_prompts", None)
    return list(captions) if captions else None


def _local_lora_dir(cache_dir: str | Path, subject_id: str, lora_fp: str) -> Path:
    return Path(cache_dir).expanduser() / "loras" / subject_id / lora_fp


def _download_lora(store, prefix: str, target: Path) -> None:
    """Copy every object under ``prefix`` into ``target`` (atomically: temp folder, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=target.parent))
    try:
        for key in store.list(prefix):
            rel = key[len(prefix):]
            if not rel or rel.startswith("/") or ".." in rel.split("/"):
                continue
            dest = tmp.joinpath(*rel.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.get(key))
        if not (tmp / LORA_MARKER).is_file():
            raise FileNotFoundError(f"LoRA {store.uri}/{prefix} is incomplete (no {LORA_MARKER})")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _upload_lora(store, local: Path, prefix: str) -> None:
    """Upload a LoRA folder, ``training.json`` last so a half-uploaded LoRA is never reused."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == LORA_MARKER)
    for path in files:
        rel = path.relative_to(local).as_posix()
        ctype = "application/json" if path.suffix == ".json" else "application/octet-stream"
        store.put(prefix + rel, path.read_bytes(), content_type=ctype)


def materialize_lora(store, subject_id: str, lora_fp: str, cache_dir: str | Path) -> Path:
    """The local folder of a LoRA that is in the store, downloading it into the cache if needed."""
    local = _local_lora_dir(cache_dir, subject_id, lora_fp)
    if (local / LORA_MARKER).is_file():
        return local
    prefix = lora_prefix(subject_id, lora_fp)
    if not store.exists(prefix + LORA_MARKER):
        raise FileNotFoundError(f"LoRA {lora_fp} of subject {subject_id!r} is neither in {local} nor in {store.uri}/{prefix}")
    _download_lora(store, prefix, local)
    return local


def ensure_lora(job, store, pipe, *, cache_dir: str | Path, train_defaults: Mapping[str, Any] | None = None,
                lora_fp: str | None = None, base_model_id: str | None = None, progress: bool = False) -> LoraInfo:
    """The subject's LoRA, reused when possible, trained and uploaded otherwise.

    The LoRA fingerprint covers base model, instance image bytes, class noun, identifier, captions
    and the training config, so an unchanged subject reuses ``loras/{subject_id}/{lora_fp}/`` from
    the store (on any machine); a changed one trains a new LoRA next to the old. ``base_model_id``
    is the model's id as the manifest/flow names it (default: the id the pipeline was loaded as).
    """
    started = time.perf_counter()
    base_model_id = base_model_id or getattr(pipe, "_prcore_model_id", None) or "unknown"
    images = _instance_bytes(job)
    fp = lora_fp or subject_lora_fingerprint(job, base_model_id=base_model_id, train_defaults=train_defaults, images=images)
    prefix = lora_prefix(job.subject_id, fp)
    local = _local_lora_dir(cache_dir, job.subject_id, fp)

    if store.exists(prefix + LORA_MARKER):
        source = "cache"
        if not (local / LORA_MARKER).is_file():
            _download_lora(store, prefix, local)
            source = "store"
        return LoraInfo(job.subject_id, fp, prefix, str(local), source, seconds=time.perf_counter() - started)

    from prcore.method.dco import train_subject_lora

    _check_instance_images(job, images)
    config = train_config_for(job, train_defaults)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=local.parent))
    try:
        result = train_subject_lora(pipe, images=images, class_noun=job.class_noun, identifier=job.identifier,
                                    out_dir=tmp, captions=_captions(job), config=config,
                                    base_model_id=base_model_id, progress=progress)
        if getattr(result, "fingerprint", fp) not in (fp, None):
            log.warning("training reported fingerprint %s, planned %s; storing under the planned one", result.fingerprint, fp)
        losses = list(getattr(result, "losses", []) or [])
        final_loss = float(losses[-1]) if losses else None
        if final_loss is not None and not math.isfinite(final_loss):
            raise FloatingPointError(f"training of subject {job.subject_id!r} diverged (final loss {final_loss}); "
                                     "lower train_learning_rate or check the instance images")
        _upload_lora(store, tmp, prefix)
        if local.exists():
            shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LoraInfo(job.subject_id, fp, prefix, str(local), "trained", seconds=time.perf_counter() - started,
                    train_seconds=float(getattr(result, "seconds_total", 0.0) or 0.0), final_loss=final_loss)


def _check_instance_images(job, images: Sequence[bytes]) -> None:
    """Decode every instance image; a broken one fails the subject with a message naming its URI."""
    from prcore.data.images import ImageInputError, decode_image

    for i, (uri, data) in enumerate(zip(job.instance_images, images, strict=True)):
        try:
            decode_image(data, i)
        except ImageInputError as exc:
            raise type(exc)(f"subject {job.subject_id}: instance image {uri} cannot be used: {exc}") from exc


def activate_lora(pipe, lora: LoraInfo | str | Path, adapter_name: str) -> None:
    from prcore.method.dco import load_subject_lora

    local = lora.local_dir if isinstance(lora, LoraInfo) else lora
    load_subject_lora(pipe, Path(local), adapter_name)


def deactivate_lora(pipe, adapter_name: str) -> None:
    from prcore.method.dco import unload_subject_lora

    try:
        unload_subject_lora(pipe, adapter_name)
    except Exception as exc:  # a failed unload must not hide the subject's own result
        log.warning("could not unload adapter %s: %s", adapter_name, exc)


# --------------------------------------------------------------------------------------------------
# Sampling one request


_SAMPLE_ALIASES = {"guidance_scale": "cfg_scale"}


def sample_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: D401
    """The subset of a request's params that :func:`prcore.method.sampler.sample` takes (aliases mapped)."""
    import inspect

    from prcore.method.sampler import sample

    accepted = set(inspect.signature(sample).parameters) - {"pipe", "prompt", "class_noun", "identifier", "adapter_name",
                                                            "seed", "num_images", "progress", "output_type"}
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = _SAMPLE_ALIASES.get(key, key)
        if name in accepted and value is not None:
            out[name] = value
    return out


def request_sampler_kwargs(request) -> dict[str, Any]:
    """``ImageRequest.sampler_kwargs()`` (None values dropped: the sampler's own defaults apply)."""
    kwargs = request.sampler_kwargs() if hasattr(request, "sampler_kwargs") else sample_kwargs(request.params)
    return {k: v for k, v in kwargs.items() if v is not None}


def pending_indices(request) -> list[int]:
    return [i for i, done in enumerate(request.done) if not done]


def generate_request(pipe, job, request, store, *, adapter_name: str | None, lora_fp: str | None,
                     record: Mapping[str, Any] | None = None, scorer=None, qc_thresholds=None,
                     references: Sequence[Any] | None = None, progress: bool = False) -> RequestResult:
    """Sample the pending images of one request and write each PNG + sidecar (sidecar last).

    Images already done (sidecar present when planned) are skipped. When ``scorer`` is given,
    CLIP/DINO scores and the QC verdict go into each image's sidecar record.
    """
    from prcore.outputs.sidecar import write_image
    from prcore.method.sampler import sample

    started = time.perf_counter()
    todo = pending_indices(request)
    result = RequestResult(job.subject_id, request.prompt_id, skipped=len(request.done) - len(todo))
    if not todo:
        result.seconds = time.perf_counter() - started
        return result
    seeds = [int(request.seeds[i]) for i in todo]
    out = sample(pipe, prompt=request.prompt, class_noun=job.class_noun, identifier=job.identifier,
                 adapter_name=adapter_name, seed=seeds, num_images=len(todo), progress=progress,
                 **request_sampler_kwargs(request))
    result.sample_seconds = float(out.seconds)
    scores: list[dict[str, Any]] = [{} for _ in todo]
    if scorer is not None:
        from prcore.quality.scorer import score_and_qc

        scores = score_and_qc(scorer, out.images, prompt=out.base_prompt, references=references, thresholds=qc_thresholds)
    for n, (i, image) in enumerate(zip(todo, out.images, strict=True)):
        rec = dict(record or {})
        rec.update(lora_fp=lora_fp, personal_prompt=out.personal_prompt, base_prompt=out.base_prompt,
                   sample_seconds=round(out.seconds / len(todo), 4), **scores[n])
        write_image(store, request, i, image, rec)
        result.keys.append(request.keys[i])
        if scores[n].get("qc_pass") is False:
            result.qc_failed += 1
    result.generated = len(todo)
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------------
# Catalogue and contact sheets


def subject_sidecars(store, job) -> list[dict[str, Any]]:
    """The sidecar records of every finished image of a subject's requests (in request order)."""
    rows = []
    for request in job.requests:
        for key in request.keys:
            skey = sidecar_key_for(key)
            if store.exists(skey):
                rows.append(json.loads(store.get(skey)))
    return rows


def write_subject_catalog(store, run_date: str, job, run_id: str, *, generated: int = 1) -> str | None:
    """Write ``catalog/run_date=D/{run_id}--{subject_id}.parquet`` when this run generated images of
    the subject: one row per finished image of its requests (read from the sidecars, so images an
    interrupted earlier run made, whose catalogue file was never written, are listed too; each
    row's ``run_id`` is the run that made the image). Nothing generated: nothing written."""
    from prcore.outputs.catalog import write_catalog

    if generated <= 0:
        return None
    rows = subject_sidecars(store, job)
    if not rows:
        return None
    return write_catalog(store, run_date, job.subject_id, rows, run_id=run_id)


def contact_sheet(references: Sequence[Image.Image], images: Sequence[Image.Image], *, cell: int = 128,
                  columns: int = 4, gap: int = 6, label: str | None = None,
                  notes: Sequence[tuple[str, bool | None]] | None = None) -> Image.Image:
    """Reference images stacked in a left column, the new images in a grid of ``columns`` beside it.

    Canvas: width = cell + gap + columns*cell + (columns+1)*gap, height = max(len(refs),
    ceil(len(images)/columns)) rows of ``cell``; a thin separator marks references vs generated.
    ``notes[k]`` = (text, qc_pass) is printed under image k (its scores); a QC failure gets a red frame.
    """
    columns = max(1, min(columns, max(1, len(images))))
    grid_rows = max(1, math.ceil(len(images) / columns))
    rows = max(len(references), grid_rows, 1)
    top = 18 if label else 0
    width = gap + cell + 3 * gap + columns * (cell + gap)
    height = top + gap + rows * (cell + gap)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if label:
        draw.text((gap, 3), label, fill=(0, 0, 0))
    for r, ref in enumerate(references):
        sheet.paste(_fit(ref, cell), (gap, top + gap + r * (cell + gap)))
    x_sep = gap + cell + gap
    draw.line([(x_sep, top), (x_sep, height)], fill=(160, 160, 160), width=2)
    x0 = x_sep + 2 * gap
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        x, y = x0 + c * (cell + gap), top + gap + r * (cell + gap)
        sheet.paste(_fit(img, cell), (x, y))
        text, passed = notes[k] if notes and k < len(notes) else ("", None)
        if text:
            draw.rectangle([(x, y + cell - 12), (x + cell - 1, y + cell - 1)], fill=(255, 255, 255))
            draw.text((x + 2, y + cell - 12), text, fill=(0, 0, 0))
        if passed is False:
            draw.rectangle([(x - 2, y - 2), (x + cell + 1, y + cell + 1)], outline=(220, 0, 0), width=3)
    return sheet


def score_note(sidecar: Mapping[str, Any]) -> tuple[str, bool | None]:
    """A contact-sheet caption from a sidecar's scores ("T.31 I.72 D.64 QC fail") and its QC verdict."""
    parts = [f"{tag}{sidecar[m]:.2f}".replace("0.", ".", 1) for tag, m in (("T", "clip_t"), ("I", "clip_i"), ("D", "dino"))
             if isinstance(sidecar.get(m), (int, float))]
    passed = sidecar.get("qc_pass")
    if passed is False:
        parts.append("QC fail")
    return " ".join(parts), passed


def _fit(img: Image.Image, cell: int) -> Image.Image:
    img = img.convert("RGB")
    side = min(img.size)
    left, upper = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, upper, left + side, upper + side)).resize((cell, cell), Image.Resampling.LANCZOS)


def write_contact_sheet(store, run_id: str, job, *, image_keys: Sequence[str] | None = None,
                        max_images: int = CONTACT_SHEET_MAX_IMAGES, cell: int = 128) -> str | None:
    """Write ``runs/{run_id}/contact_sheets/{subject_id}.png`` from the subject's reference images
    and its images (``image_keys``, default: every finished image, first ``max_images``)."""
    from prcore.store.storage import KeyNotFoundError
    from prcore.store.uris import read_uri_bytes

    # One read per shown image: its sidecar says it is finished (the commit marker) and carries its scores.
    candidates = image_keys if image_keys is not None else [k for r in job.requests for k in r.keys]
    shown: list[tuple[str, dict[str, Any]]] = []
    for k in candidates:
        if len(shown) == max_images:
            break
        try:
            shown.append((k, json.loads(store.get(sidecar_key_for(k)))))
        except KeyNotFoundError:
            if image_keys is not None:
                raise
    if not shown:
        return None
    refs = []
    for uri in job.instance_images[:6]:
        try:
            refs.append(Image.open(io.BytesIO(read_uri_bytes(uri))).convert("RGB"))
        except Exception:  # a broken reference does not stop the sheet
            continue
    images = [Image.open(io.BytesIO(store.get(k))).convert("RGB") for k, _ in shown]
    notes = [score_note(sidecar) for _, sidecar in shown]
    sheet = contact_sheet(refs, images, cell=cell, label=f"{job.subject_id}: references | generated", notes=notes)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    key = contact_sheet_key(run_id, job.subject_id)
    store.put(key, buf.getvalue(), content_type="image/png")
    return key


def contact_sheets_markdown(store, run_id: str, results: Sequence[SubjectResult]) -> str:
    """Markdown with one contact sheet per subject (S3 links presigned by ``store.url``)."""
    lines = [f"# Contact sheets, run `{run_id}`", "", f"Output: `{store.uri}`", ""]
    for r in results:
        lines.append(f"## {r.subject_id}")
        if r.contact_sheet:
            url = store.url(r.contact_sheet)
            lines.append(f"![{r.subject_id}]({url})")
            lines.append(f"[{r.contact_sheet}]({url})")
        else:
            lines.append("_no images_" + (f" (failed at {r.step}: {r.error})" if r.error else ""))
        lines.append("")
    return "\n".join(lines)


def failures_markdown(run_id: str, failures: Sequence[Failure]) -> str:
    lines = [f"# Failures, run `{run_id}`", "", "| subject | step | error |", "| --- | --- | --- |"]
    for f in failures:
        lines.append(f"| {f.subject_id} | {f.step} | {f.error_type}: {f.error.replace('|', '/')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Optional scoring


def make_scorer(clip_model: str | None, dino_model: str | None, device: str | None = None):
    """A :class:`prcore.quality.scorer.Scorer` when a metric model is configured, else None (one log line)."""
    if not clip_model and not dino_model:
        log.info("scoring skipped: no CLIP/DINO model configured (set clip_model / dino_model to score images)")
        return None
    from prcore.quality.scorer import Scorer

    return Scorer(clip_model=clip_model, dino_model=dino_model, device=device)


def qc_thresholds(values: Mapping[str, Any] | None):
    if not values or all(v is None for v in values.values()):
        return None
    from prcore.quality.scorer import QCThresholds

    return QCThresholds(**{k: v for k, v in values.items() if v is not None})


def reference_images(job) -> list[Image.Image]:
    from prcore.store.uris import read_uri_bytes

    return [Image.open(io.BytesIO(read_uri_bytes(u))).convert("RGB") for u in job.instance_images]
