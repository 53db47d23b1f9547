"""Validating a manifest: every problem at once, each naming its row, column and what to do.

Rules run column-wise in polars (value rules on the distinct values of a column, subject rules on
each subject's first row), so a 1,000,000-row manifest validates in seconds. With
``check_images=True`` every distinct instance image URI is opened once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import polars as pl

from prcore.data.load import Manifest, as_manifest, first_rows
from prcore.data.model_source import local_model_problem, looks_local
from prcore.data.schema import (
    COLUMN_PARAMS,
    COLUMNS,
    LIST_STR,
    QC_COLUMNS,
    SUBJECT_COLUMNS,
    USER_COLUMN_PREFIX,
    ManifestError,
    ModelRules,
    excerpt,
    identifier_problem,
)
from prcore.store.keys import SAFE_ID_RULE, is_safe_id

_PLACEHOLDER = r"\{[^{}]*\}|[{}]"
# the layer names of a base model's denoiser (None: the run's model), or None when they cannot be known
ModuleNames = Callable[[str | None], Collection[str] | None]


RulesOf = Callable[[str | None], "ModelRules | None"]
_SCHEME = r"^([A-Za-z][A-Za-z0-9+.-]+)://"


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
            self._subjects = first_rows(self.df)
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



def validate(manifest: Manifest | pl.DataFrame, *, check_images: bool = True, image_workers: int = 8,
             module_names: ModuleNames | None = None, model_rules: RulesOf | None = None) -> list[ManifestError]:
    """Every problem in the manifest (all collected, not just the first), sorted by row.

    ``check_images=False`` skips opening instance images (existence + full decode); every other
    rule is checked column-wise. ``module_names(base_model)`` (base_model None: the run's model)
    gives the layer names of a model's UNet, or None when unknown; with it, ``train_target_modules``
    names that match no layer are refused (the CLI and the pipeline pass it: they know the model).
    ``model_rules(base_model)`` (:class:`ModelRules`, or None when unknown) refuses what the model's
    family cannot do: a scheduler its noise process cannot step, learned text embeddings, min-SNR.
    """
    m = as_manifest(manifest)
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
        c.rows(_unsafe_ids(c.subjects["subject_id"]), "subject_id",
               lambda r: f"{excerpt(r['__value'])} is not a safe id: use {SAFE_ID_RULE}", per_subject=True)
    if usable("class_noun"):
        c.rows(pl.col("class_noun").str.strip_chars() == "", "class_noun", "is empty; give the subject's class, e.g. 'dog'", per_subject=True)
        c.rows(pl.col("class_noun").str.contains(r"[{}]"), "class_noun", lambda r: f"{excerpt(r['__value'])} contains braces; give a plain noun like 'dog'", per_subject=True)

    # -- prompt templates -------------------------------------------------------------------------
    if usable("prompt"):
        p = pl.col("prompt")
        blank = p.str.strip_chars() == ""
        c.values("prompt", blank, "is empty; write a template like 'a {subject} on the beach'")
        c.values("prompt", ~blank & ~p.str.contains("{subject}", literal=True), lambda r: f"{excerpt(r['__value'])} has no {{subject}} placeholder; write e.g. 'a {{subject}} on the beach'")
        rest = p.str.replace_all("{subject}", "", literal=True)
        c.values(
            "prompt",
            ~blank & rest.str.contains(r"[{}]"),
            lambda r: f"unknown placeholder(s) {excerpt(r['__bad'])} in {excerpt(r['__value'])}; the only placeholder is {{subject}} (write literal braces nowhere)",
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
        c.rows(_unsafe_ids(c.df["prompt_id"]), "prompt_id",
               lambda r: f"{excerpt(r['__value'])} is not a safe id: use {SAFE_ID_RULE}, or leave it null")
    if usable("identifier"):
        _validate_identifiers(c, with_noun=usable("class_noun"))
    if usable("base_model"):
        c.rows(pl.col("base_model").str.strip_chars() == "", "base_model", "is empty; give a model id or folder, or null for the run's model", per_subject=True)

    # -- numbers, names and lengths: each column's Param spec (schema.COLUMN_PARAMS) -----------------
    _validate_params(c, usable)
    _validate_meta(c, m.df)
    if usable("consistency_start") and usable("consistency_stop"):
        c.rows(pl.col("consistency_start") > pl.col("consistency_stop"), "consistency_stop",
               lambda r: f"{r['__value']} is before consistency_start on this row: the window is [start, stop) with start <= stop")
    for name in QC_COLUMNS.values():
        if usable(name):
            v = pl.col(name)
            c.rows(
                v.is_not_null() & (~v.is_finite() | (v < -1) | (v > 1)),
                name,
                lambda r, n=name: f"{r['__value']} is out of range: {n} is a cosine-similarity threshold in [-1, 1], or null for the flow's",
                per_subject=True,
            )
    if usable("instance_prompts") and usable("instance_images"):
        n_caps, n_imgs = pl.col("instance_prompts").list.len(), pl.col("instance_images").list.len()
        c.rows(
            pl.col("instance_prompts").is_not_null() & (n_caps > 1) & (n_caps != n_imgs),
            "instance_prompts",
            lambda r: f"has {r['__caps']} captions for {r['__imgs']} instance images; give one caption for all, one per image, or null",
            extra=[n_caps.alias("__caps"), n_imgs.alias("__imgs")],
            per_subject=True,
        )
    if usable("base_model"):
        problems = {v: p for v in c.df["base_model"].drop_nulls().unique().to_list() if (p := base_model_problem(v))}
        if problems:
            c.rows(pl.col("base_model").is_in(list(problems)), "base_model", lambda r: problems[r["__value"]], per_subject=True)
    _validate_train(c, usable)
    if module_names is not None and usable("train_target_modules"):
        _validate_target_modules(c, module_names, with_model=usable("base_model"))
    if model_rules is not None:
        _validate_model_rules(c, model_rules, usable)

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


def _validate_identifiers(c: _Collector, *, with_noun: bool) -> None:
    """Each subject's identifier by :func:`prcore.data.schema.identifier_problem` (one word, no braces,
    not the class noun nor a word of it), checked once per distinct (identifier, class noun) pair."""
    noun = pl.col("class_noun") if with_noun else pl.lit(None, pl.String)
    pairs = c.subjects.select(pl.col("identifier"), noun.alias("__noun")).filter(pl.col("identifier").is_not_null()).unique()
    problems = {(i, n): p for i, n in pairs.iter_rows() if (p := identifier_problem(i, n))}
    if not problems:
        return
    bad = pl.DataFrame([{"identifier": i, "__noun": n, "__bad": True} for i, n in problems],
                       schema={"identifier": pl.String, "__noun": pl.String, "__bad": pl.Boolean})
    flagged = c.subjects.with_columns(noun.alias("__noun")).join(bad, on=["identifier", "__noun"], how="left", nulls_equal=True)
    rows = flagged.filter(pl.col("__bad").fill_null(False))["__row"]
    c.rows(pl.col("__row").is_in(rows.implode()), "identifier",
           lambda r: f"{problems[(r['__value'], r['__noun'])]}; or leave it null for the default",
           extra=[noun.alias("__noun")], per_subject=True)


def validate_defaults(defaults: Any, *, base_model: str | None = None) -> list[str]:
    """The run's defaults for null manifest cells (``GenerationDefaults``; CLI options, flow settings)
    checked by the same rules as manifest cells: one message per bad value, naming the setting."""
    from dataclasses import asdict

    cells = {k: v for k, v in asdict(defaults).items() if v is not None}
    if base_model:
        cells["base_model"] = base_model
    row = {"subject_id": "defaults", "instance_images": ["unused.png"], "class_noun": "thing", "prompt": "a {subject}", **cells}
    errors = validate(pl.DataFrame([row]), check_images=False)
    out = []
    for e in errors:
        text = e.message if hasattr(e, "message") else str(e)
        out.append(f"default {e.column} (a run setting, e.g. --{(e.column or '').replace('_', '-')}): {text}")
    return out


def base_model_problem(value: str) -> str | None:
    """What is wrong with a ``base_model`` that names a local path (absolute, ``./``, ``../``, ``~``,
    ``file://`` or a ``.safetensors`` file): a diffusers folder or a single-file checkpoint
    (:mod:`prcore.data.model_source`). Hub ids and ``prcore:`` ids are checked when the run resolves the model."""
    text = value.strip()
    if not text or text.startswith("prcore:") or not looks_local(text):
        return None
    return local_model_problem(text.removeprefix("file://"))


def _unsafe_ids(ids: pl.Series) -> pl.Expr:
    """Rows whose id fails :func:`prcore.store.keys.is_safe_id`, the rule every key is built with
    (checked once per distinct id)."""
    bad = [v for v in ids.drop_nulls().unique().to_list() if not is_safe_id(v)]
    return pl.col(ids.name).is_in(pl.Series(bad, dtype=pl.String).implode())


def _validate_params(c: _Collector, usable: Callable[[str], bool]) -> None:
    """Every cell of a column a :class:`~prcore.data.schema.Param` governs, checked by that Param's
    own rule (the one the CLI options and the flow settings use), once per distinct value; subject
    columns on each subject's first row. List columns have their own rules (below)."""
    for name, spec in COLUMN_PARAMS.items():
        if not usable(name) or spec.kind == LIST_STR:
            continue
        per_subject = COLUMNS[name].subject
        values = (c.subjects if per_subject else c.df)[name].drop_nulls().unique()
        bad = [v for v in values.to_list() if spec.spec.problem(spec.kind, v)]
        if not bad:
            continue
        default = "" if name in ("prompt", "seed") else "; or leave it null for the run's default"
        c.rows(
            pl.col(name).is_in(pl.Series(bad, dtype=values.dtype).implode()),
            name,
            lambda r, p=spec, d=default: f"{excerpt(r['__value'])} is out of range: {p.name} {p.spec.problem(p.kind, r['__value'])}{d}",
            per_subject=per_subject,
        )


def _validate_meta(c: _Collector, raw: pl.DataFrame) -> None:
    """``meta_`` cells travel into every sidecar and catalogue row as JSON, which has no NaN or
    infinity: such a cell is refused here (null it, or give a finite number), never written.
    ``raw`` is the manifest as read (normalisation keeps only prcore's columns), in row order."""
    for name in (n for n in raw.columns if n.startswith(USER_COLUMN_PREFIX)):
        dtype, v = raw.schema[name], pl.col(name)
        if dtype.is_float():
            bad = v.is_not_null() & ~v.is_finite()
        elif isinstance(dtype, pl.List) and dtype.inner.is_float():
            bad = v.list.eval(pl.element().is_not_null() & ~pl.element().is_finite()).list.any()
        else:
            continue
        hits = raw.select(pl.int_range(pl.len()).alias("row"), pl.col("subject_id") if "subject_id" in raw.columns else pl.lit(None).alias("subject_id"),
                          v.alias("value"), bad.fill_null(False).alias("bad")).filter(pl.col("bad"))
        for r in hits.iter_rows(named=True):
            c.errors.append(ManifestError(r["row"], r["subject_id"], name, f"{excerpt(r['value'])} is not a JSON number (sidecars and the "
                                          "catalogue store meta_ cells as JSON); leave the cell null or give finite numbers"))


def _validate_train(c: _Collector, usable: Callable[[str], bool]) -> None:
    if usable("train_target_modules"):
        c.rows(pl.col("train_target_modules").list.len() == 0, "train_target_modules", "is an empty list; name the modules (e.g. to_q, to_k) or leave it null", per_subject=True)


def target_suffixes(layer_names: Iterable[str]) -> frozenset[str]:
    """Every name peft's ``target_modules`` list accepts for these layers: each layer's dotted name
    and each of its dotted suffixes (``to_out.0`` matches ``...attn1.to_out.0``)."""
    out: set[str] = set()
    for name in layer_names:
        parts = name.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return frozenset(out)


def short_target_names(layer_names: Iterable[str]) -> list[str]:
    """The short names of these layers (from the last part that is not a block index:
    ``to_q``, ``to_out.0``, ``conv1``, ``proj``), sorted: what an error message lists."""
    out = set()
    for name in layer_names:
        parts = name.split(".")
        i = max((j for j, part in enumerate(parts) if not part.isdigit()), default=0)
        out.add(".".join(parts[i:]))
    return sorted(out)


def target_modules_problem(names: Iterable[str], layer_names: Iterable[str], which: str) -> str | None:
    """Why LoRA ``target_modules`` ``names`` cannot train on a UNet with ``layer_names`` (``which``: the model,
    for the message), or None: the one rule for the manifest column and the run's setting."""
    layers = list(layer_names)
    accepted = target_suffixes(layers)
    unknown = [n for n in names if n not in accepted]
    if not unknown:
        return None
    return (f"{', '.join(map(repr, unknown))} match(es) no layer of the UNet of {which}; name layers by "
            f"their dotted names or suffixes, e.g. {', '.join(short_target_names(layers))}")


def _validate_target_modules(c: _Collector, module_names: ModuleNames, *, with_model: bool) -> None:
    """``train_target_modules`` names against the layers of each subject's base model (``module_names``)."""
    model = pl.col("base_model") if with_model else pl.lit(None, pl.String)
    subjects = c.subjects.with_columns(model.alias("__model")).filter(pl.col("train_target_modules").is_not_null())
    known: dict[str | None, Collection[str] | None] = {}
    messages: dict[int, str] = {}
    for row, base, names in subjects.select("__row", "__model", "train_target_modules").iter_rows():
        if base not in known:
            known[base] = module_names(base) or None
        if known[base] is None:
            continue
        problem = target_modules_problem(names, known[base], f"base model {base!r}" if base else "the run's base model")
        if problem:
            messages[row] = problem
    if messages:
        c.rows(pl.col("__row").is_in(list(messages)), "train_target_modules", lambda r: messages[r["__row"]], per_subject=True)


def _validate_model_rules(c: _Collector, rules_of: RulesOf, usable: Callable[[str], bool]) -> None:
    """Per base model, the cells its family refuses (:class:`ModelRules`): one message per cell."""
    model = pl.col("base_model") if usable("base_model") else pl.lit(None, pl.String)
    bases = c.df.select(model.alias("m"))["m"].unique().to_list()
    for base in bases:
        rules = rules_of(base)
        if rules is None:
            continue
        mine = (pl.col("base_model") == base if base is not None else pl.col("base_model").is_null()) if usable("base_model") else pl.lit(True)
        which = f"base model {base!r}" if base else "the run's base model"
        if usable("scheduler"):
            c.rows(mine & pl.col("scheduler").is_not_null() & ~pl.col("scheduler").is_in(list(rules.schedulers)), "scheduler",
                   f"cannot sample {which} ({rules.label}); choose one of: {', '.join(rules.schedulers)} (or leave it empty)")
        if not rules.text_embeddings and usable("train_train_text_embeddings"):
            c.rows(mine & pl.col("train_train_text_embeddings").fill_null(False), "train_train_text_embeddings",
                   f"is not supported for {which} ({rules.label}); set it false", per_subject=True)
        if not rules.snr_weighting and usable("train_snr_gamma"):
            c.rows(mine & pl.col("train_snr_gamma").is_not_null(), "train_snr_gamma",
                   f"min-SNR weighting is for noise-predicting models, not {which} ({rules.label}, flow matching); leave it empty",
                   per_subject=True)


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


MIN_INSTANCE_SIDE = 32  # = min_image_side(64), the smallest train_resolution allowed


def _image_problem(uri: str, client: Any = None) -> str | None:
    """None when ``uri`` holds a usable image, else what is wrong. Reads the file once (regular
    files only, size-capped), checks the pixel count from the header, then decodes every pixel
    (:func:`prcore.data.images.open_image`): a JPEG or PNG cut short is refused here, not in training."""
    from prcore.data.images import ImageInputError, ImageTooLargeError, open_image
    from prcore.store.storage import StoreError
    from prcore.store.uris import read_uri_bytes

    try:
        data = read_uri_bytes(uri, client=client)
    except FileNotFoundError:
        return f"{uri!r} does not exist; fix the path (relative paths resolve against the manifest's folder)"
    except (StoreError, ValueError) as exc:
        return f"{uri!r} cannot be read: {exc}"
    try:
        img = open_image(data, label=repr(uri))
    except ImageTooLargeError as exc:
        return f"{exc}".removeprefix("instance image ")
    except ImageInputError as exc:
        cause = exc.__cause__
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return f"{uri!r} is not a readable image or is truncated/corrupt{why}; replace it with a complete PNG/JPEG/WebP file"
    w, h = img.size
    img.close()
    if min(w, h) < MIN_INSTANCE_SIDE:
        return f"{uri!r} is {w}x{h} pixels, too small to train on; give images at least {MIN_INSTANCE_SIDE} pixels on the shorter side"
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

