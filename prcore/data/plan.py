"""Planning a manifest into per-subject jobs: defaults applied, seeds and fingerprints computed,
and the images whose sidecar already exists in the store marked done.

Python-level work is per distinct subject or distinct request spec, never per row.
:class:`SubjectJob` keeps its requests in columnar form and builds the :class:`ImageRequest`
objects when ``job.requests`` is first read (per subject, by whoever processes it).

Fingerprints (see ``prcore.data.fingerprint`` for ``mix64``)::

    subject_fp = fingerprint("subject-spec", 1, {base_model, instance_images (URIs), class_noun,
                                                 identifier, instance_prompts, train_overrides})
    spec_fp    = fingerprint("request-spec", 1, {prompt template, every REQUEST_PARAM_COLUMNS value})
    req_fp     = hex(mix64(mix64(u64(subject_fp), u64(spec_fp)), seed if given else 2**64-1))

Image bytes are not read at plan time: replacing an image's bytes under the same URI does not
change ``req_fp``. The LoRA fingerprint (``prcore.method.dco.lora_fingerprint``) hashes the bytes at
training time. ``num_images`` is not part of ``req_fp``: raising it adds images, keeping the done ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import polars as pl

from prcore.data.fingerprint import fingerprint, image_seed, mix64, sha256_u64
from prcore.data.load import Manifest, as_manifest, first_rows
from prcore.data.schema import (
    FINGERPRINT_NEUTRAL,
    QC_COLUMNS,
    REQUEST_PARAM_COLUMNS,
    SEED_MAX,
    TRAIN_FIELDS,
    USER_COLUMN_PREFIX,
    GenerationDefaults,
    ManifestError,
    ManifestInvalid,
)
from prcore.data.validate import validate
from prcore.store import keys


@dataclass
class ImageRequest:
    """One manifest row after defaults: ``num_images`` images sharing ``req_fp``.

    ``seeds[i]``, ``done[i]`` and ``keys[i]`` (the PNG key) describe image ``i``.
    """

    subject_id: str
    prompt_id: str
    prompt: str
    params: dict[str, Any]
    req_fp: str
    seeds: list[int]
    done: list[bool]
    keys: list[str]
    row: int = -1
    meta: dict[str, Any] = field(default_factory=dict)  # the row's meta_* cells (non-null), carried into every record
    base_seed: int | None = None  # the row's seed (given or derived): seeds[i] is image_seed(base_seed, i)

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def todo(self) -> list[int]:
        """Indices of the images still to make."""
        return [i for i, d in enumerate(self.done) if not d]


@dataclass
class SubjectJob:
    """Everything one subject needs: its training spec and its requests.

    ``requests`` is built on first access from the planned columns (cheap per subject; planning a
    million rows never creates a million objects up front).
    """

    subject_id: str
    class_noun: str
    identifier: str
    instance_images: list[str]
    instance_prompts: list[str] | None
    train_overrides: dict[str, Any]
    base_model: str | None
    subject_fp: str
    n_requests: int
    n_images: int
    n_done: int
    # QC thresholds from the manifest's qc_* columns ({"clip_t": 0.2, ...}); not part of any fingerprint
    qc_thresholds: dict[str, float] = field(default_factory=dict)
    _rows: pl.DataFrame | None = field(default=None, repr=False, compare=False)  # all planned rows, shared
    _offset: int = field(default=0, repr=False, compare=False)
    _params: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)
    _requests: list[ImageRequest] | None = field(default=None, repr=False, compare=False)
    _meta: pl.DataFrame | None = field(default=None, repr=False, compare=False)  # meta_* columns by row, shared
    # finished images found damaged when the store was checked before the subject's work (made again)
    damaged: list[str] = field(default_factory=list, compare=False)
    # {PNG key: (size, MD5)} of the subject's images with sidecars as the planning listing described them
    # (every one under images/{subject_id}/, in the manifest or not); None when not planned against a store.
    # Not in the plan file: a shard re-lists its subjects before their work.
    listed: dict[str, tuple[int, str | None]] | None = field(default=None, repr=False, compare=False)

    @property
    def n_todo(self) -> int:
        return self.n_images - self.n_done

    @property
    def requests(self) -> list[ImageRequest]:
        if self._requests is None:
            self._requests = _build_requests(self)
        return self._requests

    @property
    def todo_requests(self) -> list[ImageRequest]:
        return [r for r in self.requests if not all(r.done)]

    def to_record(self) -> dict[str, Any]:
        """The job as JSON values (a shard's plan file): its subject spec and every request (its seed, size
        and the indices of the images done when it was planned). Read from the planned columns while
        the requests are not built (no objects, no keys: thousands of subjects a second)."""
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in self.train_overrides.items()}
        planned = _planned_requests(self) if self._requests is None else [
            (r.row, r.prompt_id, r.prompt, r.num_images, r.base_seed, r.req_fp, {i for i, d in enumerate(r.done) if d}, r.params, r.meta)
            for r in self.requests]
        requests = [{"prompt_id": pid, "prompt": prompt, "params": params, "req_fp": fp, "base_seed": base, "num_images": n,
                     "done": sorted(done), "row": row, "meta": meta}
                    for row, pid, prompt, n, base, fp, done, params, meta in planned]
        return {
            "subject_id": self.subject_id, "class_noun": self.class_noun, "identifier": self.identifier,
            "instance_images": self.instance_images, "instance_prompts": self.instance_prompts,
            "train_overrides": overrides, "base_model": self.base_model, "subject_fp": self.subject_fp,
            "qc_thresholds": self.qc_thresholds, "requests": requests,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SubjectJob:
        """The job :meth:`to_record` wrote; seeds and keys are derived again (ids and fingerprints checked)."""
        sid = record["subject_id"]
        requests = []
        for r in record["requests"]:
            done, n, base = set(r["done"]), int(r["num_images"]), int(r["base_seed"])
            requests.append(ImageRequest(
                subject_id=sid, prompt_id=r["prompt_id"], prompt=r["prompt"], params=dict(r["params"]), req_fp=r["req_fp"],
                seeds=[image_seed(base, i) for i in range(n)], done=[i in done for i in range(n)],
                keys=[keys.image_key(sid, r["prompt_id"], r["req_fp"], i) for i in range(n)],
                row=int(r["row"]), meta=dict(r["meta"]), base_seed=base))
        overrides = dict(record["train_overrides"])
        if "target_modules" in overrides:
            overrides["target_modules"] = tuple(overrides["target_modules"])
        return cls(
            subject_id=sid, class_noun=record["class_noun"], identifier=record["identifier"],
            instance_images=list(record["instance_images"]), instance_prompts=record["instance_prompts"],
            train_overrides=overrides, base_model=record["base_model"], subject_fp=record["subject_fp"],
            n_requests=len(requests), n_images=sum(r.num_images for r in requests),
            n_done=sum(sum(r.done) for r in requests), qc_thresholds=dict(record["qc_thresholds"]), _requests=requests,
        )


def _planned_requests(job: SubjectJob) -> list[tuple]:
    """(row, prompt_id, prompt, num_images, base seed, req_fp, done indices, params, meta) of each request,
    from the job's planned columns (ids were validated by :func:`plan`)."""
    if job._rows is None or job.n_requests == 0:
        return []
    cols = job._rows.slice(job._offset, job.n_requests).to_dict(as_series=False)
    meta_rows = None
    if job._meta is not None and job._meta.width:
        meta_rows = job._meta[cols["__row"]].to_dicts()
    return [
        (row, pid, prompt, n, base, f"{fp_u64:016x}", set(done_idx) if done_idx else set(), job._params[spec],
         {k: _plain(v) for k, v in meta_rows[j].items() if v is not None} if meta_rows else {})
        for j, (row, pid, prompt, n, base, fp_u64, done_idx, spec) in enumerate(zip(
            cols["__row"], cols["__pid"], cols["prompt"], cols["num_images"], cols["__base_seed"],
            cols["__req_u64"], cols["__done_idx"], cols["__spec"], strict=True,
        ))
    ]


def _build_requests(job: SubjectJob) -> list[ImageRequest]:
    """ImageRequest objects from the job's planned columns."""
    sid = job.subject_id
    return [
        ImageRequest(
            subject_id=sid, prompt_id=pid, prompt=prompt, params=params, req_fp=fp,
            seeds=[image_seed(base, i) for i in range(n)], done=[i in done for i in range(n)],
            keys=[keys.image_key(sid, pid, fp, i) for i in range(n)], row=row, meta=meta, base_seed=base,
        )
        for row, pid, prompt, n, base, fp, done, params, meta in _planned_requests(job)
    ]


def list_images(store: Any, subject_ids: Sequence[str], *, per_subject_limit: int | None = 64) -> pl.DataFrame:
    """Every image key of the subjects in ``store``, parsed, with what the listing says of the object:
    ``size`` and ``md5`` (an S3 single-part upload's ETag; null on a folder). Lists ``images/{subject_id}/``
    per subject when there are at most ``per_subject_limit`` subjects (None: always; a shard lists its own
    subjects only), else ``images/`` once (paginated: one request per 1,000 keys on S3)."""
    from prcore.store.storage import list_info

    if per_subject_limit is None or len(subject_ids) <= per_subject_limit:
        prefixes = [keys.subject_images_prefix(sid) for sid in subject_ids]
    else:
        prefixes = [f"{keys.IMAGES_PREFIX}/"]
    columns: dict[str, list[Any]] = {"key": [], "size": [], "md5": []}
    for prefix in prefixes:  # three flat columns, not an object per key (2,000,000 keys at catalogue scale)
        for info in list_info(store, prefix):
            columns["key"].append(info.key)
            columns["size"].append(info.size)
            columns["md5"].append(info.md5)
    listed = pl.DataFrame(columns, schema={"key": pl.String, "size": pl.Int64, "md5": pl.String})
    return pl.concat([listed, listed["key"].str.extract_groups(keys.IMAGE_KEY_PATTERN).struct.unnest()], how="horizontal")


def list_done(store: Any, subject_ids: Sequence[str], *, per_subject_limit: int | None = 64,
              listed: pl.DataFrame | None = None) -> pl.DataFrame:
    """Done images in ``store``: (subject_id, prompt_id, req_fp, index) for every sidecar found, with the
    PNG's key and its listed size and MD5 (``__key``, ``__size``, ``__md5``).

    ``listed``: :func:`list_images` of these subjects, when the caller has it (else it is listed here).
    A PNG without its JSON sidecar is not done, nor is a sidecar whose PNG is gone. Whether a listed PNG
    is the file its sidecar recorded is checked per subject before its work (``prcore.pipeline.subject``).
    """
    parts = list_images(store, subject_ids, per_subject_limit=per_subject_limit) if listed is None else listed
    image = ["subject_id", "prompt_id", "req_fp", "index"]
    pngs = parts.filter(pl.col("ext") == "png").select(*image, "key", "size", "md5")
    return parts.filter(pl.col("ext") == "json").select(image).join(pngs, on=image, how="inner").select(
        pl.col("subject_id"),
        pl.col("prompt_id").alias("__pid"),
        pl.col("req_fp").alias("__req_fp"),
        pl.col("index").cast(pl.Int64, strict=False).alias("__index"),
        pl.col("key").alias("__key"),
        pl.col("size").alias("__size"),
        pl.col("md5").alias("__md5"),
    ).drop_nulls(["subject_id", "__pid", "__req_fp", "__index"])


def _listings(done: pl.DataFrame) -> dict[str, dict[str, tuple[int, str | None]]]:
    """{subject_id: {PNG key: (listed size, listed MD5)}} of every PNG with its sidecar (:func:`list_done`)."""
    out: dict[str, dict[str, tuple[int, str | None]]] = {}
    for sid, key, size, md5 in done.select("subject_id", "__key", "__size", "__md5").iter_rows():
        out.setdefault(sid, {})[key] = (size, md5)
    return out


def _plain(value: Any) -> Any:
    """A meta_ cell as a JSON value (dates, decimals, ... become text; lists stay lists)."""
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _captions(captions: Any, n_images: int) -> list[str] | None:
    """The subject's training captions: one given for all images is repeated per image."""
    if captions is None:
        return None
    captions = list(captions)
    return captions * n_images if len(captions) == 1 and n_images > 1 else captions


def plan(
    manifest: Manifest | pl.DataFrame,
    *,
    store: Any = None,
    defaults: GenerationDefaults = GenerationDefaults(),
    base_model: str | None = None,
    check: bool = True,
    list_per_subject: bool = False,
) -> list[SubjectJob]:
    """Expand rows into per-subject jobs: defaults applied, seeds and fingerprints computed, and the
    images whose sidecar already exists in ``store`` marked done.

    ``check=True`` runs :func:`validate` (images not opened) and raises :class:`ManifestInvalid`;
    with ``check=False`` (the caller validated already) ids are still checked before any key is built.
    ``list_per_subject=True`` lists ``images/{subject_id}/`` of each subject planned, never ``images/``.
    """
    m = as_manifest(manifest)
    df, firsts = _checked_rows(m, check)
    df = df.with_columns(  # what a null cell means: the run's defaults (every field of GenerationDefaults)
        pl.col("base_model").fill_null(pl.lit(base_model, pl.String)),
        *(pl.col(f.name).fill_null(pl.lit(getattr(defaults, f.name), df.schema[f.name])) for f in fields(GenerationDefaults)),
    )
    subjects, subject_info, subj_table = _subjects(m, firsts, defaults, base_model)
    df, params_list = _request_specs(df, subj_table)
    df, listings = _mark_done(df, store, subjects, list_per_subject)
    jobs = _jobs(m, df, subject_info, params_list)
    if listings is not None:
        for job in jobs:
            job.listed = listings.get(job.subject_id, {})
    return jobs


def _checked_rows(m: Manifest, check: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The normalized rows and each subject's first row, after validation (``check``) and the id check:
    ids become key segments, so every distinct one is checked before anything else happens."""
    if check:
        errors = validate(m, check_images=False)
        if errors:
            raise ManifestInvalid(errors, m.source)
    df, col_errors = m.normalized
    if col_errors:
        raise ManifestInvalid(col_errors, m.source)
    firsts = first_rows(df)
    pids = df.select(pl.col("__pid").unique())
    for name, ids in (("subject_id", firsts["subject_id"]), ("prompt_id", pids["__pid"])):
        bad = [v for v in ids.to_list() if not keys.is_safe_id(v)]
        if bad:
            raise ManifestInvalid([ManifestError(None, None, name, f"{bad[0]!r} is not a safe id; no keys were built")], m.source)
    return df, firsts


def _subjects(m: Manifest, firsts: pl.DataFrame, d: GenerationDefaults, base_model: str | None):
    """Subjects, in order of first appearance: one fingerprint each. Returns the subjects' columns, one
    ``(row, train overrides, subject_fp)`` per subject, and the table of their fingerprints and seeds."""
    train_cols = [f"train_{f}" for f in TRAIN_FIELDS]
    subj_cols = ["subject_id", "__sidx", "__file", "class_noun", "identifier", "instance_images", "instance_prompts", "base_model", *QC_COLUMNS.values(), *train_cols]
    subjects = firsts.select(subj_cols).with_columns(
        pl.col("identifier").fill_null(d.identifier), pl.col("base_model").fill_null(pl.lit(base_model, pl.String))
    )
    used_train = [f for f in TRAIN_FIELDS if subjects[f"train_{f}"].null_count() < subjects.height]
    subjects = subjects.drop([f"train_{f}" for f in TRAIN_FIELDS if f not in used_train])
    subject_info = []
    subj_fp_u64 = []
    for s in subjects.iter_rows(named=True):
        overrides = {f: s[f"train_{f}"] for f in used_train if s[f"train_{f}"] is not None}
        if "target_modules" in overrides:
            overrides["target_modules"] = tuple(overrides["target_modules"])
        s["instance_images"] = [m.resolve(u, s["__file"]) for u in s["instance_images"] or []]
        payload = {
            "base_model": s["base_model"],
            "instance_images": s["instance_images"],
            "class_noun": s["class_noun"],
            "identifier": s["identifier"],
            "instance_prompts": s["instance_prompts"],
            "train_overrides": overrides,
        }
        fp = fingerprint("subject-spec", 1, payload)
        subject_info.append((s, overrides, fp))
        subj_fp_u64.append(int(fp, 16))
    subj_table = pl.DataFrame(
        {
            "__sidx": subjects["__sidx"],
            "__subj_u64": pl.Series(subj_fp_u64, dtype=pl.UInt64),
            "__subj_seed_u64": pl.Series([sha256_u64("subject:" + sid) for sid in subjects["subject_id"]], dtype=pl.UInt64),
            "__subj_idx": pl.int_range(subjects.height, eager=True),
        }
    )
    return subjects, subject_info, subj_table


def _request_specs(df: pl.DataFrame, subj_table: pl.DataFrame) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    """Distinct request specs, one fingerprint each, and every row's ``req_fp`` (UInt64 here; 16 hex chars
    per request when requests are built) and base seed. Columns constant over the manifest (often all
    but the prompt) are left out of the join key."""
    spec_cols = ["prompt", *REQUEST_PARAM_COLUMNS]
    df = df.select("__row", "__sidx", "subject_id", "__pid", "num_images", "seed", *spec_cols)
    varying = [c for c in spec_cols if c == "prompt" or df[c].n_unique() > 1]
    constant = {c: df[c][0] for c in spec_cols if c not in varying}
    key_cols = [*varying, "__pid"]  # the prompt id rides along: it seeds the derived seeds
    specs = df.select(key_cols).unique(maintain_order=True).with_row_index("__spec")
    params_list: list[dict[str, Any]] = []
    spec_u64 = []
    pid_u64 = []
    for s in specs.iter_rows(named=True):
        s = {**constant, **s}
        params = {k: s[k] for k in REQUEST_PARAM_COLUMNS}
        fingerprinted = {k: v for k, v in params.items() if not (k in FINGERPRINT_NEUTRAL and v == FINGERPRINT_NEUTRAL[k])}
        spec_u64.append(int(fingerprint("request-spec", 1, {"prompt": s["prompt"], **fingerprinted}), 16))
        pid_u64.append(sha256_u64("prompt:" + s["__pid"]))
        params_list.append(params)
    specs = specs.with_columns(
        pl.Series("__spec_u64", spec_u64, dtype=pl.UInt64), pl.Series("__pid_u64", pid_u64, dtype=pl.UInt64), pl.col("__spec").cast(pl.Int64)
    )

    df = df.select("__row", "__sidx", "num_images", "seed", *key_cols).join(
        subj_table, on="__sidx", how="left", maintain_order="left"
    ).join(specs, on=key_cols, how="left", nulls_equal=True, maintain_order="left")
    seed_given = df["seed"].is_not_null().to_numpy()
    seed_vals = df["seed"].fill_null(0).cast(pl.UInt64).to_numpy()
    seed_part = np.where(seed_given, seed_vals, np.uint64(2**64 - 1))
    req_u64 = mix64(mix64(df["__subj_u64"].to_numpy(), df["__spec_u64"].to_numpy()), seed_part)
    derived = mix64(df["__subj_seed_u64"].to_numpy(), df["__pid_u64"].to_numpy())
    base_seed = np.where(seed_given, seed_vals, derived & np.uint64(SEED_MAX)).astype(np.int64)
    df = df.with_columns(pl.Series("__req_u64", req_u64, dtype=pl.UInt64), pl.Series("__base_seed", base_seed))
    return df, params_list


def _mark_done(df: pl.DataFrame, store: Any, subjects: pl.DataFrame, list_per_subject: bool
               ) -> tuple[pl.DataFrame, dict[str, dict[str, tuple[int, str | None]]] | None]:
    """``__done_idx``: each row's image indices already in ``store`` (one listing, joined on subject,
    prompt_id and req_fp); and what that listing said of each subject's PNGs with sidecars (:func:`_listings`)."""
    if store is None:
        return df.with_columns(pl.lit(None, pl.List(pl.Int64)).alias("__done_idx")), None
    done = list_done(store, subjects["subject_id"].to_list(), per_subject_limit=None if list_per_subject else 64)
    wanted = subjects.select("subject_id", "__sidx")
    listings = _listings(done.join(wanted, on="subject_id", how="semi"))
    done = done.join(subjects.select("subject_id", "__sidx"), on="subject_id", how="inner").with_columns(
        pl.col("__req_fp").str.to_integer(base=16, dtype=pl.UInt64, strict=False).alias("__req_u64")
    )
    candidates = df.filter(pl.col("__sidx").is_in(done["__sidx"].unique().implode()))
    join_on = ["__sidx", "__pid", "__req_u64"]
    done = (
        done.join(candidates.select(*join_on, "num_images"), on=join_on, how="inner")
        .filter((pl.col("__index") >= 0) & (pl.col("__index") < pl.col("num_images")))
        .group_by(join_on)
        .agg(pl.col("__index").unique().alias("__done_idx"))
    )
    return df.join(done, on=join_on, how="left", maintain_order="left"), listings


def _jobs(m: Manifest, df: pl.DataFrame, subject_info: list, params_list: list[dict[str, Any]]) -> list[SubjectJob]:
    """One :class:`SubjectJob` per subject, its requests kept as a slice of the shared row table."""
    df = df.sort("__subj_idx", "__row", maintain_order=True) if not df["__subj_idx"].is_sorted() else df
    row_cols = ["__row", "__pid", "prompt", "num_images", "__base_seed", "__req_u64", "__done_idx", "__spec"]
    counts = df.group_by("__subj_idx", maintain_order=True).agg(
        pl.len().alias("n"), pl.col("num_images").sum().alias("images"), pl.col("__done_idx").list.len().fill_null(0).sum().alias("done")
    )
    rows = df.select(row_cols)
    meta_cols = [c for c in m.df.columns if c.startswith(USER_COLUMN_PREFIX)]
    meta = m.df.select(meta_cols) if meta_cols else None
    jobs: list[SubjectJob] = []
    offset = 0
    for (s, overrides, fp), (n, images, n_done) in zip(subject_info, counts.select("n", "images", "done").iter_rows(), strict=True):
        jobs.append(
            SubjectJob(
                subject_id=s["subject_id"],
                class_noun=s["class_noun"],
                identifier=s["identifier"],
                instance_images=s["instance_images"],
                instance_prompts=_captions(s["instance_prompts"], len(s["instance_images"])),
                train_overrides=overrides,
                base_model=s["base_model"],
                qc_thresholds={m: s[c] for m, c in QC_COLUMNS.items() if s[c] is not None},
                subject_fp=fp,
                n_requests=int(n),
                n_images=int(images),
                n_done=int(n_done),
                _rows=rows,
                _offset=offset,
                _params=params_list,
                _meta=meta,
            )
        )
        offset += n
    return jobs
