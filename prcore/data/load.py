"""Reading a manifest: a Parquet file, a folder or glob of files, or an ``s3://`` prefix.

:func:`load_manifest` reads the files (rows numbered 0.. across the files in sorted order);
:attr:`Manifest.normalized` casts every known column to its canonical polars dtype
(``prcore.data.schema.COLUMNS``), adds the absent ones as nulls and derives each row's prompt id.
Everything is column-wise, so a 1,000,000-row manifest loads in a few seconds.
"""

from __future__ import annotations

import glob as _glob
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import polars as pl

from prcore.data.fingerprint import default_prompt_id
from prcore.data.schema import (
    BOOL,
    COLUMNS,
    CREDENTIAL_LIKE,
    FLOAT,
    INT,
    LIST_STR,
    REQUIRED_COLUMNS,
    STR,
    TRAIN_FIELDS,
    USER_COLUMN_PREFIX,
    ManifestError,
)
from prcore.store.uris import refuse_special_file, resolve_uri

_POLARS = {STR: pl.String, INT: pl.Int64, FLOAT: pl.Float64, BOOL: pl.Boolean, LIST_STR: pl.List(pl.String)}


@dataclass
class Manifest:
    """A manifest as loaded: the polars frame (instance image URIs already resolved) and its origin."""

    df: pl.DataFrame
    source: str = "<memory>"
    files: list[str] = field(default_factory=list)
    bases: list[str] = field(default_factory=lambda: [os.getcwd()])  # folder of each file, for relative URIs
    load_errors: list[ManifestError] = field(default_factory=list)  # problems found while reading the files

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
        df, errors = _normalize(self.df)
        return df, [*self.load_errors, *errors]

    def only_subjects(self, subject_ids: Sequence[str]) -> tuple[Manifest, list[int]]:
        """The rows of ``subject_ids`` as a manifest of their own (same files, same relative-URI bases),
        and the row number in this manifest of each of its rows (for messages: ``rows[i]`` is row ``i``).

        A manifest without a text ``subject_id`` column comes back whole (its validation names the problem).
        Raises ``ValueError`` naming the subjects this manifest does not have."""
        wanted = list(subject_ids)
        if "subject_id" not in self.df.columns or self.df.schema["subject_id"] != pl.String:
            return self, list(range(self.df.height))  # validating it names the column's problem
        indexed = self.df.with_row_index("__at").filter(pl.col("subject_id").is_in(wanted))
        missing = sorted(set(wanted) - set(indexed["subject_id"].to_list()))
        if missing:
            raise ValueError(f"subjects {missing} are not in manifest {self.source}")
        sub = Manifest(df=indexed.drop("__at"), source=self.source, files=self.files, bases=self.bases, load_errors=self.load_errors)
        return sub, [int(r) for r in indexed["__at"].to_list()]


def _list_manifest_files(uri: str) -> list[str]:
    if uri.startswith("s3://"):
        from prcore.store.storage import S3Store

        store = S3Store(uri)
        if uri.endswith(".parquet"):
            return [uri]
        prefix = ""
        listed = list(store.list(prefix))
        folders = {k.rsplit("/", i)[0] for k in listed for i in range(1, k.count("/") + 1)}
        keys = sorted(k for k in listed if k.endswith(".parquet") and not _in_output_root_key(k, folders))
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
        files = sorted(str(p) for p in path.rglob("*.parquet") if not _in_output_root(p, path))
        if not files:
            raise FileNotFoundError(f"no .parquet files in folder {uri}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {uri}")
    return [str(path)]


MAX_MANIFEST_BYTES = 4 * 1024**3  # an S3 manifest object is read into memory: bounded, but far above any image

_OUTPUT_DIRS = ("images", "loras", "catalog", "runs", "state")


def _in_output_root(file: Path, top: Path) -> bool:
    """True for a Parquet file of a prcore output root (its catalogue, run scores) kept inside a folder
    of manifests: a ``catalog/`` or ``runs/`` folder beside another output-root folder."""
    for parent in file.relative_to(top).parents:
        if parent.name in ("catalog", "runs"):
            siblings = [d for d in _OUTPUT_DIRS if d != parent.name and (top / parent.parent / d).is_dir()]
            if siblings:
                return True
    return False


def _in_output_root_key(key: str, folders: set[str]) -> bool:
    """:func:`_in_output_root` for a key of an S3 prefix (``folders``: every folder prefix listed)."""
    parts = key.split("/")[:-1]
    for i, name in enumerate(parts):
        if name in ("catalog", "runs"):
            parent = "/".join(parts[:i])
            if any((f"{parent}/{d}" if parent else d) in folders for d in _OUTPUT_DIRS if d != name):
                return True
    return False


def _as_list_columns(df: pl.DataFrame) -> pl.DataFrame:
    """A list[str] column written as one string per row in this file becomes one-element lists, so files
    that store it differently (both valid alone) concatenate."""
    fix = [pl.concat_list(pl.col(n)).alias(n) for n, spec in COLUMNS.items()
           if spec.kind == LIST_STR and n in df.columns and df[n].dtype == pl.String]
    return df.with_columns(fix) if fix else df


def _read_parquet(uri: str) -> pl.DataFrame:
    if uri.startswith("s3://"):
        from prcore.store.uris import read_uri_bytes

        data = read_uri_bytes(uri, max_bytes=MAX_MANIFEST_BYTES)  # a manifest file, not an image
        return pl.read_parquet(io.BytesIO(data))
    refuse_special_file(uri, "manifest file")  # a FIFO would block polars' read forever
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
    load_errors: list[ManifestError] = []
    frames = []
    bases = []
    for i, f in enumerate(files):
        df = _read_parquet(f)
        bases.append(f.rsplit("/", 1)[0] if f.startswith("s3://") else str(Path(f).resolve().parent))
        reserved = [c for c in df.columns if c.startswith("__")]
        for name in reserved:  # prcore's own working columns start with "__": a user's would collide
            load_errors.append(ManifestError(None, None, name, f"column name {name!r} (in {f}) starts with '__', which prcore reserves "
                                             f"for its internal columns; rename it (your own columns: prefix '{USER_COLUMN_PREFIX}')"))
        df = _as_list_columns(df.drop(reserved))
        frames.append(df if len(files) == 1 else df.with_columns(pl.lit(i, pl.Int32).alias("__file")))
    try:
        df = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
    except Exception as exc:  # columns whose types cannot be reconciled across the files
        raise ValueError(f"the files of manifest {text} do not agree on their column types ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}); write every file with the same dtype per column") from None
    return Manifest(df=df, source=text, files=files, bases=bases, load_errors=load_errors)


def manifest_identity(uri: str | os.PathLike[str]) -> str:
    """A fingerprint of the manifest's files as they are now, without reading them: each file's URI, size
    and modification time (a folder) or ETag (S3: the MD5 of its bytes for a single-part upload).

    An edit, an added or a removed file changes it. Costs a ``stat`` per file, or on S3 one LIST of the
    manifest's prefix (plus the one :func:`load_manifest` makes to find the files): nothing grows with the
    number of rows. Take it before loading: a manifest edited in between is then seen as edited."""
    from prcore.data.fingerprint import fingerprint

    text = os.fspath(uri)
    files = _list_manifest_files(text)
    if text.startswith("s3://"):
        from prcore.store.storage import S3Store

        root = text.rsplit("/", 1)[0] if text.endswith(".parquet") else text
        store = S3Store(root)
        name = text.rsplit("/", 1)[1] if text.endswith(".parquet") else ""
        infos = {f"{store.uri}/{i.key}": (i.size, i.etag) for i in store.list_info(name)}
        described = [(f, *infos.get(f, (-1, None))) for f in files]
    else:
        described = [(f, (st := os.stat(f)).st_size, st.st_mtime_ns) for f in files]
    return fingerprint("manifest-files", 1, {"files": described})


def as_manifest(manifest: Manifest | pl.DataFrame) -> Manifest:
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
                if finite.len() and not ((finite >= -(2.0**63)) & (finite < 2.0**63)).all():
                    return None, "integers in the 64-bit range (-2**63..2**63-1); a float this large is not an exact integer"
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


def _first_bad_int(df: pl.DataFrame, name: str) -> tuple[int | None, str | None, float | None]:
    """The first row of float column ``name`` that is not an integer in the 64-bit range."""
    v = pl.col(name)
    bad = v.is_not_null() & (v.is_nan() | (v != v.round(0)) | (v < -(2.0**63)) | (v >= 2.0**63))
    hits = df.with_row_index("__i").filter(bad).head(1)
    if hits.height == 0:
        return None, None, None
    sid = hits["subject_id"][0] if "subject_id" in hits.columns and hits["subject_id"].dtype == pl.String else None
    return int(hits["__i"][0]), sid, float(hits[name][0])


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
        if name.startswith(USER_COLUMN_PREFIX) and re.search(CREDENTIAL_LIKE, name, re.IGNORECASE):
            errors.append(ManifestError(None, None, name, "looks like a credential (secret, password, token, credential, access_key), "
                                        "which is never written to sidecars or the catalogue; rename the column or drop it"))
            continue
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
            row, sid, value = _first_bad_int(df, name) if spec.kind == INT and df[name].dtype.is_float() else (None, None, None)
            what = f"value {value!r} of a column with dtype {df[name].dtype}" if row is not None else f"has dtype {df[name].dtype} but"
            errors.append(
                ManifestError(row, sid, name, f"{what} must hold {expected}; convert the column (e.g. polars .cast) and rewrite the file")
            )
            cols.append(pl.lit(None, _POLARS[spec.kind]).alias(name))
        else:
            cols.append(cast.alias(name))
    file_col = pl.col("__file") if "__file" in df.columns else pl.lit(0, pl.Int32).alias("__file")
    out = df.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("__row"), file_col, *cols)
    # an integer code per subject (grouping and joining on ints beats strings at a million rows)
    out = out.with_columns(pl.col("subject_id").cast(pl.Categorical).to_physical().cast(pl.Int64).fill_null(-1).alias("__sidx"))
    return _with_prompt_ids(out), errors



_PLACEHOLDER = r"\{[^{}]*\}|[{}]"


def _with_prompt_ids(df: pl.DataFrame) -> pl.DataFrame:
    """Adds ``__pid``: the row's prompt_id, or :func:`default_prompt_id` of its template."""
    templates = df.filter(pl.col("prompt_id").is_null() & pl.col("prompt").is_not_null())["prompt"].unique()
    mapping = {t: default_prompt_id(t) for t in templates.to_list()}
    derived = pl.col("prompt").replace_strict(mapping, default=None, return_dtype=pl.String) if mapping else pl.lit(None, pl.String)
    return df.with_columns(pl.coalesce(pl.col("prompt_id"), derived).alias("__pid"))


def first_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Each subject's first row (in order of first appearance) plus ``__n``, its number of rows."""
    firsts = df.select("__sidx", "__row").group_by("__sidx").agg(pl.col("__row").first(), pl.len().alias("__n")).sort("__row")
    return df[firsts["__row"]].with_columns(firsts["__n"])
