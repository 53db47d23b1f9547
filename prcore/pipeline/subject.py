"""The per-subject steps the Prefect tasks wrap (Prefect-free): plan, read inputs once, sample and
write a request's images, and the subject's derived outputs (catalogue file, contact sheet).

Everything takes and returns small records (ids, keys, counts, seconds, :class:`ImageRecord`);
image bytes go to the Store, never back to the caller.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image

from prcore.data.plan import ImageRequest, SubjectJob
from prcore.outputs.sidecar import ImageRecord, read_sidecar

# -- runs ---------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class RunContext:
    """The run a subject's work belongs to, as recorded with every image."""

    run_id: str
    run_date: str
    worker: dict[str, Any] = field(default_factory=worker_identity)


def open_output(uri: str):
    """The output root's Store, checked before any work: reachable (S3: one HeadBucket) and writable (a
    real probe write, read back and deleted). Raises ``StoreError`` with one line otherwise."""
    from prcore.store.storage import open_store, probe_write

    store = open_store(uri)
    if hasattr(store, "check"):
        store.check()
    probe_write(store)
    return store


# -- planning -----------------------------------------------------------------------------------------


def _run_settings_refused(rules, defaults) -> list[str]:
    """The run's default scheduler (for null cells), when the run model's family cannot step it."""
    scheduler = getattr(defaults, "scheduler", None)
    if rules is None or scheduler is None or scheduler in rules.schedulers:
        return []
    return [f"default scheduler {scheduler!r} cannot sample the run's base model ({rules.label}); "
            f"choose one of: {', '.join(rules.schedulers)}"]


def plan_jobs(manifest_uri: str, store, *, model_id: str, defaults, subject_ids: Iterable[str] | None = None,
              check_images: bool = False, cache_dir: Path | None = None,
              target_modules: Sequence[str] | None = None) -> list[SubjectJob]:
    """Load, validate and plan a manifest once; with ``subject_ids`` (a shard started by hand), only the
    rows of those subjects are validated and planned (in that order), only their ``images/{subject_id}/``
    prefixes are listed and only their instance images are opened.

    Raises ``prcore.data.schema.ManifestInvalid`` (a ValueError listing every problem, rows numbered as
    in the whole manifest) on a bad manifest, ``train_target_modules`` checked against each base model's
    denoiser layers (:func:`prcore.pipeline.models.layer_names`; ``cache_dir``: the run's, where the
    tiny model lives), and so is the run's own ``target_modules`` setting (``settings.train``) when
    given. ``check_images=True`` also decodes every instance image of a subject with work left before
    anything runs. ``ValueError`` names requested subjects the manifest does not have.
    """
    from prcore.data.load import load_manifest
    from prcore.data.plan import plan
    from prcore.data.schema import ManifestError, ManifestInvalid
    from prcore.data.validate import target_modules_problem, validate, validate_defaults
    from prcore.pipeline.models import layer_names, model_rules

    manifest = load_manifest(manifest_uri)
    rows = None
    wanted = None if subject_ids is None else list(subject_ids)
    if wanted is not None:
        manifest, rows = manifest.only_subjects(wanted)
    try:
        errors = validate(manifest, check_images=False, module_names=lambda base: layer_names(base, model_id, cache_dir),
                          model_rules=lambda base: model_rules(base, model_id, cache_dir))
        if errors:
            raise ManifestInvalid(errors, manifest.source)
        bad_defaults = validate_defaults(defaults)
        if target_modules is not None and (layers := layer_names(None, model_id, cache_dir)):
            problem = target_modules_problem(target_modules, layers, "the run's base model")
            bad_defaults += [f"settings.train.target_modules: {problem}"] if problem else []
        bad_defaults += _run_settings_refused(model_rules(None, model_id, cache_dir), defaults)
        if bad_defaults:
            raise ManifestInvalid([ManifestError(None, None, None, m) for m in bad_defaults], "the run's settings")
        jobs = plan(manifest, store=store, defaults=defaults, base_model=model_id, check=False, list_per_subject=wanted is not None)
        if check_images:
            check_pending_images(jobs, manifest.source)
    except ManifestInvalid as exc:
        if rows is None or all(e.row is None for e in exc.errors):
            raise
        raise ManifestInvalid([_renumbered(e, rows) for e in exc.errors], manifest.source) from None
    if wanted is not None:
        by_id = {j.subject_id: j for j in jobs}
        jobs = [by_id[s] for s in wanted]
    return jobs


def _renumbered(error, rows: Sequence[int]):
    """``error`` of a subset of a manifest, its row numbered as in the whole manifest."""
    from dataclasses import replace

    ok = error.row is not None and 0 <= error.row < len(rows)
    return replace(error, row=rows[error.row]) if ok else error


def check_pending_images(jobs: Sequence[SubjectJob], source: str, *, workers: int = 8) -> None:
    """Raise ManifestInvalid naming every unusable instance image of a subject with work left."""
    from concurrent.futures import ThreadPoolExecutor

    from prcore.data.schema import ManifestError, ManifestInvalid
    from prcore.data.validate import _image_problem

    pending = [j for j in jobs if j.n_todo > 0]
    uris = sorted({u for j in pending for u in j.instance_images})
    if not uris:
        return
    client = None
    if any(u.startswith("s3://") for u in uris):
        from prcore.store.storage import make_s3_client

        client = make_s3_client()
    with ThreadPoolExecutor(max(1, min(workers, len(uris)))) as pool:
        problems = dict(zip(uris, pool.map(lambda u: _image_problem(u, client), uris), strict=True))
    errors = []
    for j in pending:
        bad = [problems[u] for u in j.instance_images if problems.get(u)]
        if bad:
            row = j.requests[0].row if j.requests else None
            errors.append(ManifestError(row, j.subject_id, "instance_images", bad[0]))
    if errors:
        raise ManifestInvalid(errors, source)


# -- a subject's inputs, read once ----------------------------------------------------------------------


@dataclass
class SubjectInputs:
    """A subject's job and its instance images, read once per shard (fingerprint, training,
    references for scoring and the contact sheet all use these bytes)."""

    job: SubjectJob
    images: list[bytes]

    @cached_property
    def references(self) -> list[Image.Image]:
        """The instance images as a viewer shows them (oriented, 8-bit RGB, alpha on white), as trained on."""
        from prcore.data.images import decode_image

        return [decode_image(b, i, label=uri) for i, (uri, b) in enumerate(zip(self.job.instance_images, self.images, strict=True))]

    def check_images(self) -> None:
        """Decode every instance image; a broken one fails the subject with a message naming its URI."""
        from prcore.data.images import ImageInputError, decode_image

        for i, (uri, data) in enumerate(zip(self.job.instance_images, self.images, strict=True)):
            try:
                decode_image(data, i)
            except ImageInputError as exc:
                raise type(exc)(f"subject {self.job.subject_id}: instance image {uri} cannot be used: {exc}") from exc


def read_subject_inputs(job: SubjectJob) -> SubjectInputs:
    from prcore.store.uris import read_uri_bytes

    return SubjectInputs(job, [read_uri_bytes(uri) for uri in job.instance_images])


# -- sampling one request -------------------------------------------------------------------------------


@dataclass
class RequestResult:
    subject_id: str
    prompt_id: str
    generated: int = 0
    skipped: int = 0
    records: list[ImageRecord] = field(default_factory=list)  # images written now
    seconds: float = 0.0  # wall time of this step
    sample_seconds: float = 0.0  # time inside the sampler
    qc_failed: int = 0


def batches(requests: Sequence[ImageRequest], max_images: int) -> list[list[ImageRequest]]:
    """A subject's pending requests packed into denoising loops: requests whose sampling parameters
    agree (everything but the prompt and seeds) share a loop of at most ``max_images`` images (a
    request with more pending images than that gets a loop of its own)."""
    groups: dict[tuple, list[ImageRequest]] = {}
    for r in requests:
        if r.todo:
            groups.setdefault(tuple(sorted(r.params.items(), key=lambda kv: kv[0])), []).append(r)
    out: list[list[ImageRequest]] = []
    for group in groups.values():
        current: list[ImageRequest] = []
        images = 0
        for r in group:
            if current and images + len(r.todo) > max_images:
                out.append(current)
                current, images = [], 0
            current.append(r)
            images += len(r.todo)
        out.append(current)
    return out


def generate_requests(pipe, inputs: SubjectInputs, requests: Sequence[ImageRequest], store, *, adapter_name: str | None,
                      lora_fp: str | None, base_model: str, run: RunContext | None = None, scorer=None,
                      qc_thresholds=None, max_batch_rows: int | None = None, vae_tiling: bool = False,
                      progress: bool = False) -> list[RequestResult]:
    """Sample the pending images of several requests of one subject in ONE denoising loop
    (``prcore.method.sampler.sample_batch``; their sampling parameters must agree: see
    :func:`batches`) and write each PNG + sidecar (sidecar last). Each image is what its request
    alone would draw for its seed. Done images are skipped; with ``scorer``, CLIP/DINO scores and
    the QC verdict go into each record."""
    from prcore.method.accel import options_in_use
    from prcore.method.models import placement
    from prcore.method.sampler import Request, sample_batch
    from prcore.outputs.sidecar import write_image

    started = time.perf_counter()
    job = inputs.job
    results = [RequestResult(job.subject_id, r.prompt_id, skipped=r.num_images - len(r.todo)) for r in requests]
    pending = [(r, res) for r, res in zip(requests, results, strict=True) if r.todo]
    if not pending:
        for res in results:
            res.seconds = time.perf_counter() - started
        return results
    params = pending[0][0].params
    if any(r.params != params for r, _ in pending):
        raise ValueError("generate_requests: the requests of one loop must share their sampling parameters (use batches())")
    outs = sample_batch(pipe, [Request(r.prompt, job.class_noun, job.identifier, adapter_name, [r.seeds[i] for i in r.todo])
                               for r, _ in pending],
                        progress=progress, max_batch_rows=max_batch_rows, vae_tiling=vae_tiling,
                        **{k: v for k, v in params.items() if v is not None})
    device, dtype = placement(pipe)
    accel = {"unet_options": used} if (used := options_in_use(pipe)) else {}  # GPU speed options, when any is on
    for (request, result), out in zip(pending, outs, strict=True):
        todo = request.todo
        result.sample_seconds = float(out.seconds)
        scores: list[dict[str, Any]] = [{} for _ in todo]
        if scorer is not None:
            from prcore.quality.qc import score_and_qc

            scores = score_and_qc(scorer, out.images, prompt=out.base_prompt, references=inputs.references, thresholds=qc_thresholds)
        for i, image, image_scores in zip(todo, out.images, scores, strict=True):
            record = ImageRecord(
                subject_id=job.subject_id, prompt_id=request.prompt_id, req_fp=request.req_fp, index=i,
                key=request.keys[i], seed=request.seeds[i], prompt_template=request.prompt,
                personal_prompt=out.personal_prompt, base_prompt=out.base_prompt, class_noun=job.class_noun,
                identifier=job.identifier, **{k: v for k, v in request.params.items() if k not in ("height", "width", "scheduler")},
                scheduler=out.scheduler, width=image.width, height=image.height, base_model=base_model,
                lora_fp=lora_fp, device=device, dtype=dtype, peak_memory_bytes=out.peak_memory_bytes, unet_rows=out.unet_rows,
                seconds=round(out.seconds / len(todo), 4),
                run_id=run.run_id if run else None, run_date=run.run_date if run else None,
                worker=run.worker if run else None, extra={**request.meta, **accel},
            ).with_scores(image_scores)
            result.records.append(write_image(store, record, image))
            result.qc_failed += record.qc_pass is False
        result.generated = len(todo)
    for res in results:
        res.seconds = time.perf_counter() - started
    return results


def generate_request(pipe, inputs: SubjectInputs, request: ImageRequest, store, **kwargs: Any) -> RequestResult:
    """One request's pending images (:func:`generate_requests` with a loop of one)."""
    return generate_requests(pipe, inputs, [request], store, **kwargs)[0]


# -- derived outputs --------------------------------------------------------------------------------------


def finished_records(store, job: SubjectJob, made_now: Sequence[ImageRecord] = ()) -> list[ImageRecord]:
    """The record of every finished image of the subject's requests, in request order: the ones
    made now as returned, the others (done earlier) read from their sidecars."""
    now = {r.key: r for r in made_now}
    out = []
    for request in job.requests:
        for key, done in zip(request.keys, request.done, strict=True):
            if key in now:
                out.append(now[key])
            elif done:
                out.append(read_sidecar(store, key))
    return out


def stored_pngs(store, subject_id: str) -> dict[str, Any]:
    """{PNG key: its ObjectInfo (size, S3 ETag)} for every image of the subject whose sidecar is in the
    store too (one listing): the candidates for "done"."""
    from prcore.store.keys import parse_image_key, subject_images_prefix
    from prcore.store.storage import list_info

    pngs, sidecars = {}, set()
    for info in list_info(store, subject_images_prefix(subject_id)):
        parsed = parse_image_key(info.key)
        if parsed is None:
            continue
        if parsed.ext == "png":
            pngs[info.key] = info
        else:
            sidecars.add(parsed.png)
    return {k: v for k, v in pngs.items() if k in sidecars}


def _catalog_facts(store, subject_id: str) -> dict[str, tuple[int | None, str | None]]:
    """{key: (bytes, md5)} as the subject's catalogue recorded them; {} when it has none or it is damaged."""
    from prcore.outputs.catalog import CatalogCorruptError, read_subject_catalog

    try:
        cat = read_subject_catalog(store, subject_id)
    except CatalogCorruptError:
        return {}
    return {} if cat is None else _catalog_facts_from(cat)


def verified_images(store, subject_id: str) -> tuple[set[str], list[str]]:
    """(PNG keys that count as done, problems found). An image is done when its sidecar reads and its
    PNG, as the listing describes it (size; on S3 the ETag's MD5), is the file the sidecar recorded.
    The catalogue's copy of those facts is used where it agrees with the listing (one GET for the
    subject); a sidecar is read only for images the catalogue lacks or disagrees with."""
    facts = _catalog_facts(store, subject_id)
    done, problems = set(), []
    for key, info in stored_pngs(store, subject_id).items():
        size, md5 = facts.get(key, (None, None))
        if size is not None and info.matches(size, md5):
            done.add(key)
            continue
        record, problem = _stored_record(store, key, info)
        if record is not None:
            done.add(key)
        else:
            problems.append(problem)
    return done, problems


def _stored_record(store, png: str, info: Any) -> tuple[ImageRecord | None, str | None]:
    """The sidecar's record of a stored PNG when the PNG, as listed (``info``), is the file it recorded;
    else (None, what is wrong)."""
    try:
        record = read_sidecar(store, png)
    except Exception as exc:  # unreadable sidecar: the image is not done; it is made again
        return None, f"{png}: its sidecar does not read ({type(exc).__name__})"
    if not info.matches(record.bytes, record.md5):
        return None, f"{png}: the stored PNG ({info.size} bytes) is not the {record.bytes} bytes its sidecar recorded"
    return record, None


def refresh_done(store, job: SubjectJob) -> SubjectJob:
    """Re-mark which of the job's images are done from one listing of the store (a run that waited
    for another, or was planned long ago, must not redo what the other finished meanwhile), verifying
    each against its record (:func:`verified_images`): a damaged image is logged and made again."""
    import logging

    done, problems = verified_images(store, job.subject_id)
    wanted = {key for request in job.requests for key in request.keys}
    job.damaged = [p for p in problems if p.split(":", 1)[0] in wanted]
    for problem in job.damaged:
        logging.getLogger("prcore.pipeline").warning("subject %s: %s: making it again", job.subject_id, problem)
    n_done = 0
    for request in job.requests:
        request.done = [key in done for key in request.keys]
        n_done += sum(request.done)
    job.n_done = n_done
    return job


def write_subject_catalog(store, job: SubjectJob, made_now: Sequence[ImageRecord] = ()) -> str:
    """Rewrite ``catalog/{subject_id}.parquet`` from the store: one row per image of the subject that is
    done (sidecar readable, PNG as recorded: the records made now as returned, every other one read from
    its sidecar), so the file matches the store exactly after any sequence of crashes, reruns, manifest
    edits and damaged files (whatever the old catalogue file held, even unreadable bytes)."""
    import logging

    from prcore.outputs.catalog import write_catalog

    now = {r.key: r for r in made_now}
    records = []
    for png, info in stored_pngs(store, job.subject_id).items():
        record, problem = (now[png], None) if png in now else _stored_record(store, png, info)
        if record is not None:
            records.append(record)
        else:
            logging.getLogger("prcore.pipeline").warning("subject %s: left out of the catalogue: %s", job.subject_id, problem)
    return write_catalog(store, job.subject_id, records)


def catalog_is_current(store, subject_id: str) -> bool:
    """True when the subject's derived outputs need nothing: no dirty marker (no run wrote images of it
    without finishing its contact sheet and catalogue), its catalogue file reads (page checksums) and
    lists exactly the images in the store, each PNG as the listing describes it (size; on S3 the
    ETag's MD5) as the catalogue recorded it. Cheap: one HEAD, one GET and one LIST."""
    from prcore.outputs.catalog import CatalogCorruptError, read_subject_catalog
    from prcore.store.keys import dirty_key

    if store.exists(dirty_key(subject_id)):
        return False
    try:
        cat = read_subject_catalog(store, subject_id)
    except CatalogCorruptError as exc:
        import logging

        logging.getLogger("prcore.pipeline").warning("%s", exc)
        return False
    stored = stored_pngs(store, subject_id)
    if cat is None:
        return not stored
    return _rows_match_listing(_catalog_rows(cat), stored)


def subjects_with_work(store, jobs: Sequence[SubjectJob], *, workers: int = 16) -> list[SubjectJob]:
    """The jobs with images to make, or whose catalogue is not current, in order.

    The subjects with nothing to make are checked together (:func:`stale_catalogs`: one LIST of
    ``state/dirty/``, one of ``catalog/``, one GET of the snapshot, and the planning listing of their
    images): a rerun of an unchanged manifest costs a fixed number of requests, not three per subject.
    Only a subject the snapshot cannot vouch for (its catalogue file rewritten or added since the
    snapshot, no snapshot, a job planned without a listing) gets the per-subject check
    (:func:`catalog_is_current`: a HEAD, a GET and a LIST), ``workers`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    idle = [j for j in jobs if j.n_todo == 0]
    stale, unsure = stale_catalogs(store, idle) if idle else (set(), [])
    with ThreadPoolExecutor(max(1, min(workers, len(unsure) or 1))) as pool:
        checked = dict(zip(unsure, pool.map(lambda sid: catalog_is_current(store, sid), unsure), strict=True))
    stale |= {sid for sid, current in checked.items() if not current}
    return [j for j in jobs if j.n_todo > 0 or j.subject_id in stale]


def stale_catalogs(store, jobs: Sequence[SubjectJob]) -> tuple[set[str], list[str]]:
    """``(stale, unsure)`` for jobs with nothing to make: the subjects whose derived outputs need work (a
    dirty marker; a catalogue file that is not the one the snapshot holds rows of, or whose rows are not
    exactly the images the planning listing found, each PNG's listed size and MD5 as recorded; no file
    while images are stored), and the subjects this cannot decide (checked one by one by the caller).

    Requests: one LIST of ``state/dirty/``, one of ``catalog/`` (both paginated, 1,000 keys a page), one
    GET of ``catalog.parquet``. A catalogue file whose listed version (S3: size and ETag, the MD5 of its
    bytes; a folder: size, mtime, inode) is the one the snapshot recorded when it read and verified it
    (page checksums) holds exactly the snapshot's rows, so it is not read again."""
    from prcore.outputs.catalog import catalog_sources, snapshot_facts
    from prcore.store.keys import DIRTY_PREFIX, catalog_key, dirty_key
    from prcore.store.storage import ObjectInfo

    dirty = set(store.list(DIRTY_PREFIX))
    files = dict(catalog_sources(store))
    facts = snapshot_facts(store) if files else None
    stale: set[str] = set()
    unsure: list[str] = []
    for job in jobs:
        sid, listed, key = job.subject_id, getattr(job, "listed", None), catalog_key(job.subject_id)
        if dirty_key(sid) in dirty:
            stale.add(sid)
        elif listed is None:
            unsure.append(sid)
        elif key not in files:
            if listed:  # images without a catalogue file: a rerun writes it
                stale.add(sid)
        elif facts is None or files[key] is None or facts.versions.get(key) != files[key]:
            unsure.append(sid)
        elif not _rows_match_listing(facts.rows.get(sid, []), {k: ObjectInfo(k, size, md5) for k, (size, md5) in listed.items()}):
            stale.add(sid)
    return stale, unsure


def _rows_match_listing(rows: Sequence[tuple[str, int | None, str | None]], listed: Mapping[str, Any]) -> bool:
    """Whether catalogue rows ``(key, bytes, md5)`` are exactly the listed PNGs (one row each), each PNG as
    listed (``listed``: key -> ``ObjectInfo``; size, on S3 the ETag's MD5) the file its row recorded."""
    keys = [k for k, _, _ in rows]
    if len(keys) != len(set(keys)) or set(keys) != set(listed):
        return False
    return all(size is not None and listed[k].matches(size, md5) for k, size, md5 in rows)


def _catalog_rows(cat) -> list[tuple[str, int | None, str | None]]:
    """``(key, bytes, md5)`` of each row of a subject's catalogue frame (md5 None in files written before it)."""
    md5 = cat["md5"].to_list() if "md5" in cat.columns else [None] * cat.height
    return list(zip(cat["key"].to_list(), cat["bytes"].to_list(), md5, strict=True))


def _catalog_facts_from(cat) -> dict[str, tuple[int | None, str | None]]:
    return {k: (b, m) for k, b, m in _catalog_rows(cat)}


def mark_dirty(store, run: RunContext, subject_id: str) -> None:
    import json

    from prcore.store.keys import dirty_key

    store.put(dirty_key(subject_id), json.dumps({"run_id": run.run_id, "worker": run.worker}).encode(),
              content_type="application/json")


def clear_dirty(store, subject_id: str) -> None:
    from prcore.store.keys import dirty_key

    store.delete(dirty_key(subject_id))


def write_subject_contact_sheet(store, run: RunContext, inputs: SubjectInputs, records: Sequence[ImageRecord]) -> str | None:
    from prcore.outputs.contact_sheet import write_contact_sheet

    return write_contact_sheet(store, run.run_id, inputs.job.subject_id, inputs.references, records)


def make_scorer(settings) -> Any:
    """A :class:`prcore.quality.scorer.Scorer` when a metric model is configured, else None."""
    if not settings.scoring.enabled:
        return None
    from prcore.quality.scorer import Scorer

    return Scorer(clip_model=settings.scoring.clip_model, dino_model=settings.scoring.dino_model, device=settings.placement.device)
