"""The Parquet manifest: schema, loading, validation and planning into per-subject jobs.

One row per generation request; a subject's columns (instance images, class noun, identifier,
captions, base model, training overrides) repeat on each of its rows and must agree. The schema is
documented column by column in ``manifests/README.md`` and enforced here with polars dtypes.

Everything runs column-wise in polars/numpy so that a 1,000,000-row manifest loads, validates and
plans in a few seconds; Python-level work is per distinct subject or distinct request spec, never
per row. :class:`SubjectJob` keeps its requests in columnar form and builds the
:class:`ImageRequest` objects when ``job.requests`` is first read (per subject, by whoever
processes it).

Fingerprints (see ``prcore.data.fingerprint`` for ``mix64``)::

    subject_fp = fingerprint("subject-spec", 1, {base_model, instance_images (URIs), class_noun,
                                                 identifier, instance_prompts, train_overrides})
    spec_fp    = fingerprint("request-spec", 1, {prompt template, guidance, guidance_scale,
                                                 consistency_scale, parallel_scale, num_inference_steps,
                                                 height, width, negative_prompt, scheduler})
    req_fp     = hex(mix64(mix64(u64(subject_fp), u64(spec_fp)), seed if given else 2**64-1))

Image bytes are not read at plan time: replacing an image's bytes under the same URI does not
change ``req_fp``. The LoRA fingerprint (``prcore.method.dco.lora_fingerprint``) hashes the bytes at
training time. ``num_images`` is not part of ``req_fp``: raising it adds images, keeping the done ones.
"""

from __future__ import annotations

import glob as _glob
import io
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from prcore.data.fingerprint import SEED_MASK, fingerprint, image_seed, mix64, sha256_u64
from prcore.store.uris import resolve_uri

__all__ = [
    "COLUMNS",
    "REQUIRED_COLUMNS",
    "SUBJECT_COLUMNS",
    "TRAIN_FIELDS",
    "GUIDANCE_MODES",
    "ColumnSpec",
    "GenerationDefaults",
    "ImageRequest",
    "Manifest",
    "ManifestError",
    "ManifestInvalid",
    "SubjectJob",
    "default_prompt_id",
    "is_safe_id",
    "load_manifest",
    "plan",
    "validate",
]

# Kept equal to prcore.method.guidance.GUIDANCE_MODES (a test checks); not imported, so that reading a
# manifest does not import torch.
GUIDANCE_MODES: tuple[str, ...] = ("parallel_rescaled", "consistency", "cfg", "pretrained")

SAFE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_SAFE_ID = re.compile(SAFE_ID_PATTERN)
MAX_SIZE = 4096
MAX_STEPS = 1000
MAX_NUM_IMAGES = 64
MIXED_PRECISION = ("no", "fp16", "bf16")
_SCHEME = r"^([A-Za-z][A-Za-z0-9+.-]+)://"


def is_safe_id(value: object) -> bool:
    """1-128 chars of letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit; no ``..``."""
    return isinstance(value, str) and bool(_SAFE_ID.match(value)) and ".." not in value


# --------------------------------------------------------------------------------------------------
# Schema

STR, INT, FLOAT, BOOL, LIST_STR = "str", "int", "float", "bool", "list[str]"
_POLARS = {STR: pl.String, INT: pl.Int64, FLOAT: pl.Float64, BOOL: pl.Boolean, LIST_STR: pl.List(pl.String)}


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str  # str | int | float | bool | list[str]
    required: bool
    subject: bool  # subject-level: must agree across the subject's rows
    doc: str


COLUMNS: dict[str, ColumnSpec] = {
    c.name: c
    for c in (
        ColumnSpec("subject_id", STR, True, True, "safe id: letters, digits, '.', '_', '-'"),
        ColumnSpec("instance_images", LIST_STR, True, True, "reference image URIs"),
        ColumnSpec("class_noun", STR, True, True, "the subject's class, e.g. 'dog'"),
        ColumnSpec("prompt", STR, True, False, "template with {subject}"),
        ColumnSpec("identifier", STR, False, True, "rare token, e.g. 'sks'"),
        ColumnSpec("instance_prompts", LIST_STR, False, True, "training captions with {subject}"),
        ColumnSpec("base_model", STR, False, True, "base model id or folder"),
        ColumnSpec("prompt_id", STR, False, False, "safe id of the prompt"),
        ColumnSpec("num_images", INT, False, False, "images per prompt"),
        ColumnSpec("seed", INT, False, False, "base seed"),
        ColumnSpec("guidance", STR, False, False, "guidance mode"),
        ColumnSpec("guidance_scale", FLOAT, False, False, "w_cfg"),
        ColumnSpec("consistency_scale", FLOAT, False, False, "w_cg"),
        ColumnSpec("parallel_scale", FLOAT, False, False, "eta"),
        ColumnSpec("num_inference_steps", INT, False, False, "denoising steps"),
        ColumnSpec("height", INT, False, False, "pixels, multiple of 8"),
        ColumnSpec("width", INT, False, False, "pixels, multiple of 8"),
        ColumnSpec("negative_prompt", STR, False, False, "negative prompt"),
        ColumnSpec("scheduler", STR, False, False, "diffusers scheduler class name"),
        ColumnSpec("qc_clip_t", FLOAT, False, True, "QC threshold on CLIP-T (overrides the flow's)"),
        ColumnSpec("qc_clip_i", FLOAT, False, True, "QC threshold on CLIP-I (overrides the flow's)"),
        ColumnSpec("qc_dino", FLOAT, False, True, "QC threshold on DINO (overrides the flow's)"),
    )
}
QC_COLUMNS = ("qc_clip_t", "qc_clip_i", "qc_dino")

# TrainConfig fields (docs/INTERFACES.md, prcore.method.dco) that a manifest may override as
# ``train_<field>`` columns, with their kinds.
TRAIN_FIELDS: dict[str, str] = {
    "steps": INT,
    "learning_rate": FLOAT,
    "rank": INT,
    "alpha": FLOAT,
    "target_modules": LIST_STR,
    "resolution": INT,
    "batch_size": INT,
    "dco_beta": FLOAT,
    "seed": INT,
    "mixed_precision": STR,
    "gradient_checkpointing": BOOL,
    "train_text_embeddings": BOOL,
    "prior_preservation": BOOL,
    "num_class_images": INT,
    "prior_loss_weight": FLOAT,
    "offset_noise": FLOAT,
    "snr_gamma": FLOAT,
    "random_flip": BOOL,
}
for _f, _k in TRAIN_FIELDS.items():
    COLUMNS[f"train_{_f}"] = ColumnSpec(f"train_{_f}", _k, False, True, f"TrainConfig.{_f}")

REQUIRED_COLUMNS = tuple(c.name for c in COLUMNS.values() if c.required)
SUBJECT_COLUMNS = tuple(c.name for c in COLUMNS.values() if c.subject and c.name != "subject_id")
REQUEST_PARAM_COLUMNS = (
    "guidance",
    "guidance_scale",
    "consistency_scale",
    "parallel_scale",
    "num_inference_steps",
    "height",
    "width",
    "negative_prompt",
    "scheduler",
)
USER_COLUMN_PREFIX = "meta_"


@dataclass(frozen=True)
class GenerationDefaults:
    """What a null (or absent) optional column means: the flow's defaults."""

    identifier: str = "sks"
    num_images: int = 4
    guidance: str = "parallel_rescaled"
    guidance_scale: float = 7.5
    consistency_scale: float = 3.0
    parallel_scale: float = 0.5
    num_inference_steps: int = 50
    height: int | None = None  # None: the model's default size
    width: int | None = None
    negative_prompt: str = ""
    scheduler: str | None = None


# --------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ManifestError:
    """One problem: ``row`` is 0-based (None for a whole-column problem)."""

    row: int | None
    subject_id: str | None
    column: str | None
    message: str

    def __str__(self) -> str:
        parts = []
        if self.row is not None:
            parts.append(f"row {self.row}" + (f" (subject {self.subject_id})" if self.subject_id is not None else ""))
        if self.column is not None:
            parts.append(f"column {self.column}")
        return (", ".join(parts) + ": " if parts else "") + self.message


class ManifestInvalid(ValueError):
    """Raised by :func:`plan` on an invalid manifest; ``errors`` holds every problem."""

    def __init__(self, errors: Sequence[ManifestError], source: str = "manifest"):
        self.errors = list(errors)
        shown = "\n".join(str(e) for e in self.errors[:20])
        more = f"\n... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(f"{source} has {len(self.errors)} error(s); run `prcore manifest validate` for all:\n{shown}{more}")


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Manifest:
    """A manifest as loaded: the polars frame (instance image URIs already resolved) and its origin."""

    df: pl.DataFrame
    source: str = "<memory>"
    files: list[str] = field(default_factory=list)
    bases: list[str] = field(default_factory=lambda: [os.getcwd()])  # folder of each file, for relative URIs

    def __len__(self) -> int:
        return self.df.height

    def resolve(self, uri: str, file_index: int = 0) -> str:
        """An instance image URI made absolute against the folder of the file that holds it."""
        return resolve_uri(uri, self.bases[file_index])

    def instance_images(self, row: int) -> list[str]:
        """The resolved instance image URIs of ``row`` (0-based)."""
        images = self.df["instance_images"][row]
        images = [images] if isinstance(images, str) else ([] if images is None else images.to_list())
        file_index = int(self.df["__file"][row]) if "__file" in self.df.columns else 0
        return [self.resolve(u, file_index) for u in images]

    @cached_property
    def normalized(self) -> tuple[pl.DataFrame, list[ManifestError]]:
        return _normalize(self.df)


def _list_manifest_files(uri: str) -> list[str]:
    if uri.startswith("s3://"):
        from prcore.store.storage import S3Store

        store = S3Store(uri)
        if uri.endswith(".parquet"):
            return [uri]
        prefix = ""
        keys = sorted(k for k in store.list(prefix) if k.endswith(".parquet"))
        if not keys:
            raise FileNotFoundError(f"no .parquet files under {uri}")
        return [f"{store.uri}/{k}" for k in keys]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    path = Path(uri).expanduser()
    if any(ch in uri for ch in "*?["):
        files = sorted(_glob.glob(str(path), recursive=True))
        if not files:
            raise FileNotFoundError(f"no Parquet files match {uri}")
        return files
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files in folder {uri}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {uri}")
    return [str(path)]


def _read_parquet(uri: str) -> pl.DataFrame:
    if uri.startswith("s3://"):
        from prcore.store.uris import read_uri_bytes

        data = read_uri_bytes(uri)
        return pl.read_parquet(io.BytesIO(data))
    try:
        return pl.read_parquet(uri)
    except Exception as exc:  # polars raises ComputeError/OSError flavours for non-Parquet files
        raise ValueError(f"{uri} is not a readable Parquet file ({type(exc).__name__}); write it with polars/pandas/pyarrow .to_parquet") from None


def load_manifest(uri: str | os.PathLike[str]) -> Manifest:
    """Read a Parquet file, a folder or glob of Parquet files, or an ``s3://`` prefix (or object).

    Relative instance image paths resolve against the folder of the Parquet file that holds them
    (:meth:`Manifest.resolve`; ``df`` keeps them as written). Rows are numbered 0.. across the files in sorted order.
    """
    text = os.fspath(uri)
    files = _list_manifest_files(text)
    frames = []
    bases = []
    for i, f in enumerate(files):
        df = _read_parquet(f)
        bases.append(f.rsplit("/", 1)[0] if f.startswith("s3://") else str(Path(f).resolve().parent))
        frames.append(df if len(files) == 1 else df.with_columns(pl.lit(i, pl.Int32).alias("__file")))
    df = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
    return Manifest(df=df, source=text, files=files, bases=bases)


def _frame(manifest: Manifest | pl.DataFrame) -> Manifest:
    if isinstance(manifest, Manifest):
        return manifest
    return Manifest(df=manifest)


# --------------------------------------------------------------------------------------------------
# Normalisation: accepted dtypes -> canonical dtypes


def _kind_ok(series: pl.Series, kind: str) -> tuple[pl.Series | None, str]:
    """Cast ``series`` to the canonical dtype of ``kind``; None + reason when its dtype does not fit."""
    dt = series.dtype
    target = _POLARS[kind]
    if dt == pl.Null:
        return series.cast(target), ""
    if kind == STR:
        if dt in (pl.String, pl.Categorical) or isinstance(dt, pl.Enum):
            return series.cast(pl.String), ""
        return None, "text (string)"
    if kind == INT:
        if dt.is_integer():
            if dt == pl.UInt64 and series.max() is not None and series.max() > 2**63 - 1:  # type: ignore[operator]
                return None, "64-bit signed integers (values up to 2**63-1)"
            return series.cast(pl.Int64), ""
        if dt.is_float():
            finite = series.drop_nulls().drop_nans()
            if finite.len() == series.drop_nulls().len() and (finite == finite.round(0)).all():
                return series.cast(pl.Int64), ""  # e.g. pandas wrote an int column with NaN as float
        return None, "integers"
    if kind == FLOAT:
        if dt.is_float() or dt.is_integer():
            return series.cast(pl.Float64), ""
        return None, "numbers"
    if kind == BOOL:
        if dt == pl.Boolean:
            return series, ""
        return None, "booleans (true/false)"
    # list[str]: a list of strings, or one string meaning a one-element list
    if isinstance(dt, (pl.List, pl.Array)) and dt.inner in (pl.String, pl.Null):  # type: ignore[union-attr]
        return series.cast(pl.List(pl.String)), ""
    if dt == pl.String:
        return series.to_frame().select(pl.concat_list(pl.col(series.name))).to_series(), ""
    return None, "lists of strings"


def _normalize(df: pl.DataFrame) -> tuple[pl.DataFrame, list[ManifestError]]:
    """Canonical dtypes, every known column present (nulls where absent), plus ``__row``.

    Returns column-level errors (missing required column, wrong dtype, unknown column); a column
    with a wrong dtype is replaced by nulls so that row rules can still run on the rest.
    """
    errors: list[ManifestError] = []
    if df.height == 0:
        errors.append(ManifestError(None, None, None, "the manifest has no rows; add one row per (subject, prompt)"))
    for name in REQUIRED_COLUMNS:
        if name not in df.columns:
            spec = COLUMNS[name]
            errors.append(ManifestError(None, None, name, f"required column is missing: add a column '{name}' of {spec.kind} ({spec.doc}); see manifests/README.md"))
    for name in df.columns:
        if name in COLUMNS or name.startswith(USER_COLUMN_PREFIX) or name.startswith("__"):
            continue
        if name.startswith("train_"):
            allowed = ", ".join(f"train_{f}" for f in TRAIN_FIELDS)
            errors.append(ManifestError(None, None, name, f"unknown training override; allowed train_ columns: {allowed}"))
        else:
            import difflib

            close = difflib.get_close_matches(name, list(COLUMNS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            errors.append(
                ManifestError(None, None, name, f"unknown column; {hint}rename it to a known column, or prefix your own columns with '{USER_COLUMN_PREFIX}'")
            )
    cols: list[pl.Series | pl.Expr] = []
    for name, spec in COLUMNS.items():
        if name not in df.columns:
            cols.append(pl.lit(None, _POLARS[spec.kind]).alias(name))
            continue
        cast, expected = _kind_ok(df[name], spec.kind)
        if cast is None:
            errors.append(
                ManifestError(None, None, name, f"has dtype {df[name].dtype} but must hold {expected}; convert the column (e.g. polars .cast) and rewrite the file")
            )
            cols.append(pl.lit(None, _POLARS[spec.kind]).alias(name))
        else:
            cols.append(cast.alias(name))
    file_col = pl.col("__file") if "__file" in df.columns else pl.lit(0, pl.Int32).alias("__file")
    out = df.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("__row"), file_col, *cols)
    # an integer code per subject (grouping and joining on ints beats strings at a million rows)
    out = out.with_columns(pl.col("subject_id").cast(pl.Categorical).to_physical().cast(pl.Int64).fill_null(-1).alias("__sidx"))
    return _with_prompt_ids(out), errors


# --------------------------------------------------------------------------------------------------
# Validation

_PLACEHOLDER = r"\{[^{}]*\}|[{}]"


def default_prompt_id(template: str) -> str:
    """A stable id for a prompt template: a slug of it plus 8 hex chars of its sha256.

    ``"a {subject} in the snow"`` -> ``"a-subject-in-the-snow-<8 hex>"``.
    """
    import hashlib

    slug = re.sub(r"[^a-z0-9]+", "-", template.lower()).strip("-")[:40].strip("-") or "prompt"
    return f"{slug}-{hashlib.sha256(template.encode()).hexdigest()[:8]}"


def _with_prompt_ids(df: pl.DataFrame) -> pl.DataFrame:
    """Adds ``__pid``: the row's prompt_id, or :func:`default_prompt_id` of its template."""
    templates = df.filter(pl.col("prompt_id").is_null() & pl.col("prompt").is_not_null())["prompt"].unique()
    mapping = {t: default_prompt_id(t) for t in templates.to_list()}
    derived = pl.col("prompt").replace_strict(mapping, default=None, return_dtype=pl.String) if mapping else pl.lit(None, pl.String)
    return df.with_columns(pl.coalesce(pl.col("prompt_id"), derived).alias("__pid"))


class _Collector:
    """Runs rules and collects errors.

    Request-level rules run on every row (value rules on the distinct values of a column first);
    subject-level rules (``per_subject=True``) run on each subject's first row, since the
    consistency rule already reports any row that differs from it.
    """

    def __init__(self, df: pl.DataFrame):
        self.df = df
        self.errors: list[ManifestError] = []
        self._subjects: pl.DataFrame | None = None

    @property
    def subject_codes(self) -> pl.Series:
        return self.df["__sidx"]

    @property
    def subjects(self) -> pl.DataFrame:
        """Each subject's first row, plus ``__n``: how many rows the subject has."""
        if self._subjects is None:
            self._subjects = _first_rows(self.df)
        return self._subjects

    def rows(
        self,
        mask: pl.Expr,
        column: str,
        message: str | Callable[[dict[str, Any]], str],
        *,
        extra: Iterable[pl.Expr] = (),
        per_subject: bool = False,
    ) -> None:
        """An error for each row where ``mask`` is true (``per_subject``: each subject's first row)."""
        frame = self.subjects if per_subject else self.df
        mask = mask.fill_null(False)
        if not frame.select(mask.any()).item():
            return
        # extras (e.g. a window over the subject) are evaluated on the whole frame, then filtered
        n_col = pl.col("__n") if per_subject else pl.lit(1).alias("__n")
        hits = frame.select(
            pl.col("__row"), pl.col("subject_id"), pl.col(column).alias("__value"), n_col, *extra, mask.alias("__hit")
        ).filter(pl.col("__hit"))
        for rec in hits.iter_rows(named=True):
            text = message(rec) if callable(message) else message
            if per_subject and rec["__n"] > 1:
                text += f" (a subject column: fix it on all {rec['__n']} rows of this subject)"
            self.errors.append(ManifestError(int(rec["__row"]), rec["subject_id"], column, text))

    def values(self, column: str, bad: pl.Expr, message: str | Callable[[dict[str, Any]], str], *, extra: Iterable[pl.Expr] = ()) -> None:
        """A request-level rule on the distinct values of ``column`` (prompts repeat across subjects)."""
        uniq = self.df.select(pl.col(column).unique().drop_nulls())
        found = uniq.filter(bad.fill_null(False))[column]
        if found.len():
            self.rows(pl.col(column).is_in(found), column, message, extra=extra)


def _first_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Each subject's first row (in order of first appearance) plus ``__n``, its number of rows."""
    firsts = df.select("__sidx", "__row").group_by("__sidx").agg(pl.col("__row").first(), pl.len().alias("__n")).sort("__row")
    return df[firsts["__row"]].with_columns(firsts["__n"])


def validate(manifest: Manifest | pl.DataFrame, *, check_images: bool = True, image_workers: int = 8) -> list[ManifestError]:
    """Every problem in the manifest (all collected, not just the first), sorted by row.

    ``check_images=False`` skips opening instance images (existence + decodability); every other
    rule is checked column-wise.
    """
    m = _frame(manifest)
    df, errors = m.normalized
    present = set(m.df.columns)
    c = _Collector(df)
    bad_dtype = {e.column for e in errors}

    def usable(name: str) -> bool:
        return name in present and name not in bad_dtype

    # -- required values --------------------------------------------------------------------------
    for name in ("subject_id", "class_noun", "prompt"):
        if usable(name):
            c.rows(pl.col(name).is_null(), name, f"is null; every row needs a {name}", per_subject=name == "class_noun")
    if usable("subject_id"):
        ok = pl.col("subject_id").str.contains(SAFE_ID_PATTERN) & ~pl.col("subject_id").str.contains("..", literal=True)
        c.rows(
            pl.col("subject_id").is_not_null() & ~ok,
            "subject_id",
            lambda r: f"{r['__value']!r} is not a safe id: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..' or '/'",
            per_subject=True,
        )
    if usable("class_noun"):
        c.rows(pl.col("class_noun").str.strip_chars() == "", "class_noun", "is empty; give the subject's class, e.g. 'dog'", per_subject=True)
        c.rows(pl.col("class_noun").str.contains(r"[{}]"), "class_noun", lambda r: f"{r['__value']!r} contains braces; give a plain noun like 'dog'", per_subject=True)

    # -- prompt templates -------------------------------------------------------------------------
    if usable("prompt"):
        p = pl.col("prompt")
        blank = p.str.strip_chars() == ""
        c.values("prompt", blank, "is empty; write a template like 'a {subject} on the beach'")
        c.values("prompt", ~blank & ~p.str.contains("{subject}", literal=True), lambda r: f"{r['__value']!r} has no {{subject}} placeholder; write e.g. 'a {{subject}} on the beach'")
        rest = p.str.replace_all("{subject}", "", literal=True)
        c.values(
            "prompt",
            ~blank & rest.str.contains(r"[{}]"),
            lambda r: f"unknown placeholder(s) {r['__bad']} in {r['__value']!r}; the only placeholder is {{subject}} (write literal braces nowhere)",
            extra=[rest.str.extract_all(_PLACEHOLDER).list.join(", ").alias("__bad")],
        )
    if usable("instance_prompts"):
        caps = pl.col("instance_prompts")
        c.rows(caps.list.len() == 0, "instance_prompts", "is an empty list; leave it null for the default captions or give captions with {subject}", per_subject=True)
        no_subject = caps.list.eval(pl.element().is_null() | ~pl.element().str.contains("{subject}", literal=True)).list.any()
        c.rows(no_subject, "instance_prompts", "has a caption without the {subject} placeholder; write e.g. 'a photo of {subject}'", per_subject=True)
        stray = caps.list.eval(pl.element().str.replace_all("{subject}", "", literal=True).str.contains(r"[{}]")).list.any()
        c.rows(stray, "instance_prompts", "has a caption with an unknown placeholder or stray brace; the only placeholder is {subject}", per_subject=True)

    # -- ids ---------------------------------------------------------------------------------------
    if usable("prompt_id"):
        ok = pl.col("prompt_id").str.contains(SAFE_ID_PATTERN) & ~pl.col("prompt_id").str.contains("..", literal=True)
        c.values(
            "prompt_id",
            ~ok,
            lambda r: f"{r['__value']!r} is not a safe id: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, or leave it null",
        )
    if usable("identifier"):
        c.rows(
            pl.col("identifier").is_not_null() & ~pl.col("identifier").str.contains(r"^[^\s{}]+$"),
            "identifier",
            lambda r: f"{r['__value']!r} must be one word without spaces or braces (e.g. 'sks'), or null for the default",
            per_subject=True,
        )
    if usable("base_model"):
        c.rows(pl.col("base_model").str.strip_chars() == "", "base_model", "is empty; give a model id or folder, or null for the run's model", per_subject=True)

    # -- numbers and modes --------------------------------------------------------------------------
    for name in ("guidance_scale", "consistency_scale", "parallel_scale"):
        if usable(name):
            v = pl.col(name)
            c.rows(v.is_not_null() & (~v.is_finite() | (v < 0)), name, lambda r, n=name: f"{r['__value']} is out of range: {n} must be a finite number >= 0")
    for name in QC_COLUMNS:
        if usable(name):
            v = pl.col(name)
            c.rows(
                v.is_not_null() & (~v.is_finite() | (v < -1) | (v > 1)),
                name,
                lambda r, n=name: f"{r['__value']} is out of range: {n} is a cosine-similarity threshold in [-1, 1], or null for the flow's",
                per_subject=True,
            )
    if usable("num_inference_steps"):
        v = pl.col("num_inference_steps")
        c.rows((v < 1) | (v > MAX_STEPS), "num_inference_steps", lambda r: f"{r['__value']} is out of range: use 1..{MAX_STEPS}")
    if usable("num_images"):
        v = pl.col("num_images")
        c.rows((v < 1) | (v > MAX_NUM_IMAGES), "num_images", lambda r: f"{r['__value']} is out of range: use 1..{MAX_NUM_IMAGES}")
    if usable("seed"):
        c.rows(pl.col("seed") < 0, "seed", lambda r: f"{r['__value']} is negative: use an integer 0..2**63-1, or null for a derived seed")
    for name in ("height", "width"):
        if usable(name):
            v = pl.col(name)
            c.rows(
                (v % 8 != 0) | (v < 64) | (v > MAX_SIZE),
                name,
                lambda r, n=name: f"{r['__value']} is not allowed: {n} must be a multiple of 8 in 64..{MAX_SIZE}, or null for the model's default",
            )
    if usable("guidance"):
        c.values(
            "guidance",
            ~pl.col("guidance").is_in(list(GUIDANCE_MODES)),
            lambda r: f"unknown guidance mode {r['__value']!r}; use one of {', '.join(GUIDANCE_MODES)}",
        )
    _validate_train(c, usable)

    # -- instance images -----------------------------------------------------------------------------
    if usable("instance_images"):
        imgs = pl.col("instance_images")
        c.rows(imgs.is_null() | (imgs.list.len() == 0), "instance_images", "has no instance images; give a list of 3-5 image paths or URIs of the subject", per_subject=True)
        c.rows(
            imgs.list.eval(pl.element().is_null() | (pl.element().str.strip_chars() == "")).list.any(),
            "instance_images",
            "contains an empty URI; remove it or give the image's path",
            per_subject=True,
        )
        _validate_uris(c, m, check_images=check_images, workers=image_workers)

    # -- duplicates and subject consistency (need the ids) --------------------------------------------
    if usable("subject_id") and usable("prompt"):
        _validate_duplicates(c)
    if usable("subject_id"):
        _validate_subject_consistency(c, [n for n in SUBJECT_COLUMNS if usable(n)])

    out = errors + c.errors
    out.sort(key=lambda e: (-1 if e.row is None else e.row, e.column or ""))
    return out


def _validate_train(c: _Collector, usable: Callable[[str], bool]) -> None:
    positive_int = ("steps", "rank", "batch_size", "num_class_images")
    for f in positive_int:
        name = f"train_{f}"
        if usable(name):
            c.rows(pl.col(name) < 1, name, lambda r, n=name: f"{r['__value']} is out of range: {n} must be >= 1", per_subject=True)
    for f, strict in (("learning_rate", True), ("alpha", True), ("snr_gamma", True), ("prior_loss_weight", False), ("offset_noise", False)):
        name = f"train_{f}"
        if usable(name):
            v = pl.col(name)
            bad = v.is_not_null() & (~v.is_finite() | ((v <= 0) if strict else (v < 0)))
            cmp = "> 0" if strict else ">= 0"
            c.rows(bad, name, lambda r, n=name, cmp=cmp: f"{r['__value']} is out of range: {n} must be a finite number {cmp}", per_subject=True)
    if usable("train_dco_beta"):
        v = pl.col("train_dco_beta")
        c.rows(v.is_not_null() & ~v.is_finite(), "train_dco_beta", "must be finite (<= 0 selects the plain DreamBooth loss)", per_subject=True)
    if usable("train_seed"):
        c.rows(pl.col("train_seed") < 0, "train_seed", lambda r: f"{r['__value']} is negative; use 0..2**63-1", per_subject=True)
    if usable("train_resolution"):
        v = pl.col("train_resolution")
        c.rows((v % 8 != 0) | (v < 64) | (v > MAX_SIZE), "train_resolution", lambda r: f"{r['__value']} must be a multiple of 8 in 64..{MAX_SIZE}", per_subject=True)
    if usable("train_mixed_precision"):
        v = pl.col("train_mixed_precision")
        c.rows(v.is_not_null() & ~v.is_in(list(MIXED_PRECISION)), "train_mixed_precision", lambda r: f"{r['__value']!r} is not one of {', '.join(MIXED_PRECISION)}", per_subject=True)
    if usable("train_target_modules"):
        c.rows(pl.col("train_target_modules").list.len() == 0, "train_target_modules", "is an empty list; name the modules (e.g. to_q, to_k) or leave it null", per_subject=True)


def _validate_uris(c: _Collector, m: Manifest, *, check_images: bool, workers: int) -> None:
    """Scheme (and, with ``check_images``, existence + decodability) of each distinct URI, once."""
    lists = c.subjects.select("instance_images", "__file").unique()
    pairs = lists.explode("instance_images").rename({"instance_images": "uri"}).unique().drop_nulls()
    pairs = pairs.filter(pl.col("uri").str.strip_chars() != "")
    schemes = pairs["uri"].str.extract(_SCHEME, 1).str.to_lowercase()
    problems: dict[tuple[str, int], str] = {
        (u, f): f"{u!r} has an unsupported URI scheme; use a path (relative to the manifest or absolute), file:// or s3://bucket/key"
        for u, f in pairs.filter(schemes.is_not_null() & ~schemes.is_in(["file", "s3"])).iter_rows()
    }
    if check_images:
        to_check = [(u, f) for u, f in pairs.iter_rows() if (u, f) not in problems]
        resolved = [m.resolve(u, f) for u, f in to_check]
        client = None
        if any(u.startswith("s3://") for u in resolved):  # one client (thread-safe) for all S3 reads
            from prcore.store.storage import make_s3_client

            client = make_s3_client()
        with ThreadPoolExecutor(max(1, workers)) as pool:
            checks = pool.map(lambda u: _image_problem(u, client), resolved)
            for pair, problem in zip(to_check, checks, strict=True):
                if problem:
                    problems[pair] = problem
    if not problems:
        return
    for file_index in sorted({f for _, f in problems}):
        bad = pl.Series([u for u, f in problems if f == file_index], dtype=pl.String)
        first_bad = pl.col("instance_images").list.eval(pl.element().filter(pl.element().is_in(bad))).list.first()
        c.rows(
            (pl.col("__file") == file_index) & pl.col("instance_images").list.eval(pl.element().is_in(bad)).list.any(),
            "instance_images",
            lambda r, f=file_index: problems[(r["__bad"], f)],
            extra=[first_bad.alias("__bad")],
            per_subject=True,
        )


def _image_problem(uri: str, client: Any = None) -> str | None:
    """None when ``uri`` holds a decodable image, else what is wrong."""
    from PIL import Image

    from prcore.store.storage import StoreError
    from prcore.store.uris import read_uri_bytes

    try:
        data = read_uri_bytes(uri, client=client)
    except FileNotFoundError:
        return f"{uri!r} does not exist; fix the path (relative paths resolve against the manifest's folder)"
    except (StoreError, ValueError) as exc:
        return f"{uri!r} cannot be read: {exc}"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception:
        return f"{uri!r} is not a readable image; give a PNG/JPEG/WebP file"
    return None


def _validate_duplicates(c: _Collector) -> None:
    pid_codes = c.df["__pid"].cast(pl.Categorical).to_physical().cast(pl.Int64)
    pair = (c.subject_codes * (1 << 32) + pid_codes).filter(c.df["subject_id"].is_not_null() & pid_codes.is_not_null())
    if pair.n_unique() == pair.len():
        return
    first = pl.col("__row").first().over("subject_id", "__pid")
    c.rows(
        pl.col("subject_id").is_not_null() & pl.col("__pid").is_not_null() & (first != pl.col("__row")),
        "prompt_id",
        lambda r: f"duplicate of row {r['__first']}: same subject_id and prompt_id {r['__pid']!r}; give each row its own prompt_id or remove the duplicate",
        extra=[first.alias("__first"), pl.col("__pid")],
    )


def _validate_subject_consistency(c: _Collector, columns: list[str]) -> None:
    columns = [n for n in columns if c.df[n].null_count() < c.df.height]  # an all-null column agrees
    if not columns:
        return
    # One hash of the subject columns per row; a subject whose rows all share it agrees (an
    # in-process 64-bit hash: a collision could only hide a conflict, at odds of 2**-64).
    hashed = pl.DataFrame([c.subject_codes, c.df.select(pl.struct(columns).hash().alias("__h"))["__h"]])
    suspects = hashed.group_by("__sidx").agg(pl.col("__h").n_unique()).filter((pl.col("__h") > 1) & (pl.col("__sidx") >= 0))["__sidx"]
    if suspects.len() == 0:
        return
    df = c.df.filter(c.subject_codes.is_in(suspects.implode()))
    counts = df.group_by("subject_id").agg([pl.col(n).n_unique() for n in columns])
    for name in columns:
        conflicted = counts.filter(pl.col(name) > 1)["subject_id"]
        if conflicted.len() == 0:
            continue
        sub = df.filter(pl.col("subject_id").is_in(conflicted.implode())).with_columns(
            pl.col("__row").first().over("subject_id").alias("__first"),
            pl.col(name).ne_missing(pl.col(name).first().over("subject_id")).alias("__differs"),
        )
        differing = sub.filter(pl.col("__differs"))
        n_per_subject = dict(differing.group_by("subject_id").len().iter_rows())
        for r in differing.unique(subset=["subject_id"], keep="first", maintain_order=True).iter_rows(named=True):
            more = n_per_subject[r["subject_id"]] - 1
            text = f"{r[name]!r} differs from row {r['__first']} of the same subject; a subject's {name} must be identical on all its rows"
            if more:
                text += f" ({more} more row(s) of this subject differ too)"
            c.errors.append(ManifestError(int(r["__row"]), r["subject_id"], name, text))


# --------------------------------------------------------------------------------------------------
# Planning


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

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def todo(self) -> list[int]:
        """Indices of the images still to make."""
        return [i for i, d in enumerate(self.done) if not d]

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``prcore.method.sampler.sample`` (guidance_scale -> cfg_scale)."""
        p = self.params
        return {
            "guidance": p["guidance"],
            "cfg_scale": p["guidance_scale"],
            "consistency_scale": p["consistency_scale"],
            "parallel_scale": p["parallel_scale"],
            "num_inference_steps": p["num_inference_steps"],
            "height": p["height"],
            "width": p["width"],
            "negative_prompt": p["negative_prompt"],
            "scheduler": p["scheduler"],
        }


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


def _build_requests(job: SubjectJob) -> list[ImageRequest]:
    """ImageRequest objects from the job's planned columns (ids were validated by :func:`plan`)."""
    from prcore.outputs.sidecar import IMAGES_PREFIX

    if job._rows is None or job.n_requests == 0:
        return []
    cols = job._rows.slice(job._offset, job.n_requests).to_dict(as_series=False)
    out = []
    sid = job.subject_id
    for row, pid, prompt, n, base, fp_u64, done_idx, spec in zip(
        cols["__row"], cols["__pid"], cols["prompt"], cols["num_images"], cols["__base_seed"],
        cols["__req_u64"], cols["__done_idx"], cols["__spec"], strict=True,
    ):
        fp = f"{fp_u64:016x}"
        prefix = f"{IMAGES_PREFIX}/{sid}/{pid}/{fp}/"
        done_set = set(done_idx) if done_idx else ()
        out.append(
            ImageRequest(
                subject_id=sid,
                prompt_id=pid,
                prompt=prompt,
                params=job._params[spec],
                req_fp=fp,
                seeds=[image_seed(base, i) for i in range(n)],
                done=[i in done_set for i in range(n)],
                keys=[f"{prefix}{i}.png" for i in range(n)],
                row=row,
            )
        )
    return out


def list_done(store: Any, subject_ids: Sequence[str], *, per_subject_limit: int = 64) -> pl.DataFrame:
    """Done images in ``store``: (subject_id, prompt_id, req_fp, index) for every sidecar found.

    Lists ``images/{subject_id}/`` per subject when there are few subjects, else ``images/`` once;
    a PNG without its JSON sidecar is not done.
    """
    from prcore.outputs.sidecar import IMAGES_PREFIX

    if len(subject_ids) <= per_subject_limit:
        keys: list[str] = []
        for sid in subject_ids:
            keys.extend(store.list(f"{IMAGES_PREFIX}/{sid}/"))
    else:
        keys = list(store.list(f"{IMAGES_PREFIX}/"))
    s = pl.Series("key", keys, dtype=pl.String)
    s = s.filter(s.str.ends_with(".json"))
    parts = s.str.strip_suffix(".json").str.split("/")
    frame = pl.DataFrame({"p": parts}).filter(pl.col("p").list.len() == 5)
    return frame.select(
        pl.col("p").list.get(1).alias("subject_id"),
        pl.col("p").list.get(2).alias("__pid"),
        pl.col("p").list.get(3).alias("__req_fp"),
        pl.col("p").list.get(4).cast(pl.Int64, strict=False).alias("__index"),
    ).drop_nulls()


def plan(
    manifest: Manifest | pl.DataFrame,
    *,
    store: Any = None,
    defaults: GenerationDefaults = GenerationDefaults(),
    base_model: str | None = None,
    check: bool = True,
) -> list[SubjectJob]:
    """Expand rows into per-subject jobs: defaults applied, seeds and fingerprints computed, and the
    images whose sidecar already exists in ``store`` marked done.

    ``check=True`` runs :func:`validate` (images not opened) and raises :class:`ManifestInvalid`;
    with ``check=False`` (the caller validated already) ids are still checked before any key is built.
    """
    m = _frame(manifest)
    if check:
        errors = validate(m, check_images=False)
        if errors:
            raise ManifestInvalid(errors, m.source)
    df, col_errors = m.normalized
    if col_errors:
        raise ManifestInvalid(col_errors, m.source)
    # Ids become key segments: check every distinct one before anything else happens.
    firsts = _first_rows(df)
    pids = df.select(pl.col("__pid").unique())
    for name, ids in (("subject_id", firsts["subject_id"]), ("prompt_id", pids["__pid"])):
        bad = [v for v in ids.to_list() if not is_safe_id(v)]
        if bad:
            raise ManifestInvalid([ManifestError(None, None, name, f"{bad[0]!r} is not a safe id; no keys were built")], m.source)

    d = defaults
    df = df.with_columns(
        pl.col("identifier").fill_null(d.identifier),
        pl.col("base_model").fill_null(pl.lit(base_model, pl.String)),
        pl.col("num_images").fill_null(d.num_images),
        pl.col("guidance").fill_null(d.guidance),
        pl.col("guidance_scale").fill_null(d.guidance_scale),
        pl.col("consistency_scale").fill_null(d.consistency_scale),
        pl.col("parallel_scale").fill_null(d.parallel_scale),
        pl.col("num_inference_steps").fill_null(d.num_inference_steps),
        pl.col("height").fill_null(pl.lit(d.height, pl.Int64)),
        pl.col("width").fill_null(pl.lit(d.width, pl.Int64)),
        pl.col("negative_prompt").fill_null(d.negative_prompt),
        pl.col("scheduler").fill_null(pl.lit(d.scheduler, pl.String)),
    )

    # Subjects, in order of first appearance: one fingerprint each.
    train_cols = [f"train_{f}" for f in TRAIN_FIELDS]
    subj_cols = ["subject_id", "__sidx", "__file", "class_noun", "identifier", "instance_images", "instance_prompts", "base_model", *QC_COLUMNS, *train_cols]
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

    # Distinct request specs: one fingerprint each. Columns constant over the manifest (often all
    # but the prompt) are left out of the join key.
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
        spec_u64.append(int(fingerprint("request-spec", 1, {"prompt": s["prompt"], **params}), 16))
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
    base_seed = np.where(seed_given, seed_vals, derived & np.uint64(SEED_MASK)).astype(np.int64)
    # req_fp stays a UInt64 here; it becomes 16 hex chars per request when requests are built.
    df = df.with_columns(pl.Series("__req_u64", req_u64, dtype=pl.UInt64), pl.Series("__base_seed", base_seed))

    # What is done: one listing, joined on (subject, prompt_id, req_fp).
    if store is not None:
        done = list_done(store, subjects["subject_id"].to_list())
        done = done.join(subjects.select("subject_id", "__sidx"), on="subject_id", how="inner").with_columns(
            pl.col("__req_fp").str.to_integer(base=16, dtype=pl.UInt64, strict=False).alias("__req_u64")
        )
        candidates = df.filter(pl.col("__sidx").is_in(done["__sidx"].unique().implode()))
        keys = ["__sidx", "__pid", "__req_u64"]
        done = (
            done.join(candidates.select(*keys, "num_images"), on=keys, how="inner")
            .filter((pl.col("__index") >= 0) & (pl.col("__index") < pl.col("num_images")))
            .group_by(keys)
            .agg(pl.col("__index").unique().alias("__done_idx"))
        )
        df = df.join(done, on=keys, how="left", maintain_order="left")
    else:
        df = df.with_columns(pl.lit(None, pl.List(pl.Int64)).alias("__done_idx"))

    df = df.sort("__subj_idx", "__row", maintain_order=True) if not df["__subj_idx"].is_sorted() else df
    row_cols = ["__row", "__pid", "prompt", "num_images", "__base_seed", "__req_u64", "__done_idx", "__spec"]
    counts = df.group_by("__subj_idx", maintain_order=True).agg(
        pl.len().alias("n"), pl.col("num_images").sum().alias("images"), pl.col("__done_idx").list.len().fill_null(0).sum().alias("done")
    )
    rows = df.select(row_cols)
    jobs: list[SubjectJob] = []
    offset = 0
    for (s, overrides, fp), (n, images, n_done) in zip(subject_info, counts.select("n", "images", "done").iter_rows(), strict=True):
        jobs.append(
            SubjectJob(
                subject_id=s["subject_id"],
                class_noun=s["class_noun"],
                identifier=s["identifier"],
                instance_images=s["instance_images"],
                instance_prompts=list(s["instance_prompts"]) if s["instance_prompts"] is not None else None,
                train_overrides=overrides,
                base_model=s["base_model"],
                qc_thresholds={c.removeprefix("qc_"): s[c] for c in QC_COLUMNS if s[c] is not None},
                subject_fp=fp,
                n_requests=int(n),
                n_images=int(images),
                n_done=int(n_done),
                _rows=rows,
                _offset=offset,
                _params=params_list,
            )
        )
        offset += n
    return jobs
