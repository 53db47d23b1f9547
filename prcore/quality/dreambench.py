"""The DreamBench protocol (DreamBooth paper, Ruiz et al. 2023) over the product's guidance modes.

For each subject: fine-tune its LoRA (:func:`prcore.method.dco.train_subject_lora`), sample every
prompt template ``images_per_prompt`` times for each guidance mode, score each image with a
scorer (:class:`prcore.quality.scorer.Scorer`: DINO, CLIP-I, CLIP-T against the base prompt, or any
:class:`prcore.quality.scorer.ImageScorerProtocol`), and aggregate the paper-style table: per mode the
mean of each metric over all images of all subjects.

Data: ``data_dir`` is laid out like the google/dreambooth data set, one folder of reference
images per subject (``data_dir/{subject_id}/*.jpg``). Subjects, classes and prompt templates come
from ``dreambench_subjects.csv`` (subject_id, class_noun, kind) and
``dreambench_{object,live}_prompts.txt`` (one ``{subject}`` template per line): given explicitly,
else found in ``data_dir``, else the copies shipped in ``prcore/quality/protocols/`` or a checkout's ``manifests/``.

Output (a folder or ``s3://`` prefix, written through :mod:`prcore.store.storage`)::

    bench.json                       the configuration (a re-run must match it)
    images/{subject_id}/{mode}/{prompt_index:02d}_{i}.png
    results/{subject_id}.parquet     per-image scores of one subject (its commit marker)
    scores.parquet                   per-image scores of all subjects
    table.md, table.csv, table.parquet   per mode: mean DINO, CLIP-I, CLIP-T, images, subjects

A re-run with the same configuration skips subjects whose ``results/`` file exists.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from prcore.data.schema import GENERATION_PARAMS, GUIDANCE_MODES, IMAGE_SUFFIXES, SEED, GenerationDefaults
from prcore.quality.qc import ImageScorerProtocol
from prcore.store.keys import BENCH_RECORD_KEY, BENCH_SCORES_KEY, BENCH_TABLE_KEY, bench_image_key, bench_result_key

DEFAULT_MODES: tuple[str, ...] = tuple(m for m in GUIDANCE_MODES if m != "pretrained")  # the personalized modes
SUBJECTS_FILE = "dreambench_subjects.csv"
PROMPT_FILES = {"object": "dreambench_object_prompts.txt", "live": "dreambench_live_prompts.txt"}
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
PAPER_ORDER = ("dino", "clip_i", "clip_t")


class BenchError(ValueError):
    """A bad benchmark input (data folder, protocol files, options, conflicting output)."""


@dataclass(frozen=True)
class BenchSubject:
    subject_id: str
    class_noun: str
    kind: str  # "object" | "live"
    images: tuple[Path, ...]


@dataclass(frozen=True)
class BenchProtocol:
    subjects: tuple[BenchSubject, ...]
    prompts: Mapping[str, tuple[str, ...]]  # kind -> templates

    def prompts_for(self, subject: BenchSubject, limit: int | None = None) -> tuple[str, ...]:
        templates = self.prompts[subject.kind]
        return templates if limit is None else templates[:limit]


_G = GenerationDefaults()  # the product's sampling defaults (one owner: prcore.data.schema)
# BenchConfig fields checked by a parameter spec: field -> the Param (images_per_prompt is num_images)
_BENCH_PARAMS = {
    **{n: GENERATION_PARAMS[n] for n in ("num_inference_steps", "guidance_scale", "consistency_scale", "parallel_scale",
                                        "height", "width", "scheduler", "identifier")},
    "images_per_prompt": GENERATION_PARAMS["num_images"],
    "seed": SEED,
}


@dataclass(frozen=True)
class BenchConfig:
    """Everything that determines the benchmark's numbers (stored as bench.json)."""

    model: str
    modes: tuple[str, ...] = DEFAULT_MODES
    subjects: tuple[str, ...] | None = None
    prompts_per_subject: int | None = None
    images_per_prompt: int = _G.num_images
    num_inference_steps: int = _G.num_inference_steps
    guidance_scale: float = _G.guidance_scale
    consistency_scale: float = _G.consistency_scale
    parallel_scale: float = _G.parallel_scale
    height: int | None = _G.height
    width: int | None = _G.width
    scheduler: str | None = _G.scheduler
    identifier: str = _G.identifier
    seed: int = 0
    train_overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modes:
            raise BenchError("no guidance modes: give at least one of parallel_rescaled, consistency, cfg, pretrained")
        from prcore.data.schema import GUIDANCE_MODES

        unknown = [m for m in self.modes if m not in GUIDANCE_MODES]
        if unknown:
            raise BenchError(f"unknown guidance mode(s) {', '.join(unknown)}; choose from {', '.join(GUIDANCE_MODES)}")
        for name, spec in _BENCH_PARAMS.items():
            found = spec.spec.problem(spec.kind, getattr(self, name)) if getattr(self, name) is not None else None
            if found:
                raise BenchError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not allowed: {name} {found}")
        if self.prompts_per_subject is not None and self.prompts_per_subject < 1:
            raise BenchError(f"--prompts-per-subject must be >= 1, not {self.prompts_per_subject}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["modes"] = list(self.modes)
        d["subjects"] = list(self.subjects) if self.subjects is not None else None
        d["train_overrides"] = dict(self.train_overrides)
        return d


@dataclass
class BenchResult:
    table: pl.DataFrame  # one row per mode
    scores: pl.DataFrame  # one row per image
    markdown: str
    output_uri: str
    seconds: float
    skipped_subjects: list[str]


# --------------------------------------------------------------------------------------------
# protocol files and data


def _protocol_file(name: str, explicit: str | Path | None, data_dir: Path) -> str:
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise BenchError(f"{p} does not exist")
        return p.read_text()
    if (data_dir / name).is_file():
        return (data_dir / name).read_text()
    shipped = resources.files("prcore.quality").joinpath("protocols", name)
    if shipped.is_file():
        return shipped.read_text()
    checkout = Path(__file__).resolve().parent.parent / "manifests" / name  # a source checkout's copies
    if checkout.is_file():
        return checkout.read_text()
    raise BenchError(f"no {name}: put it in {data_dir}, or pass its path (see docs/metrics.md)")


def parse_subjects_csv(text: str) -> list[tuple[str, str, str]]:
    """(subject_id, class_noun, kind) rows of a dreambench_subjects.csv."""
    reader = csv.DictReader(io.StringIO(text))
    need = {"subject_id", "class_noun", "kind"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise BenchError(f"subjects CSV needs the columns {', '.join(sorted(need))}; it has {reader.fieldnames}")
    rows = []
    for n, row in enumerate(reader, start=2):
        sid, noun, kind = (row["subject_id"] or "").strip(), (row["class_noun"] or "").strip(), (row["kind"] or "").strip()
        if not sid or not noun or kind not in PROMPT_FILES:
            raise BenchError(f"subjects CSV line {n}: need subject_id, class_noun and kind (object or live), got {row}")
        if not SAFE_ID.fullmatch(sid) or ".." in sid:
            raise BenchError(f"subjects CSV line {n}: subject_id {sid!r} is not a safe id (letters, digits, '.', '_', '-')")
        rows.append((sid, noun, kind))
    return rows


def parse_prompts(text: str, kind: str) -> tuple[str, ...]:
    templates = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    bad = [t for t in templates if "{subject}" not in t]
    if bad:
        raise BenchError(f"{kind} prompt template {bad[0]!r} has no {{subject}} placeholder")
    if not templates:
        raise BenchError(f"no {kind} prompt templates")
    return templates


def load_protocol(
    data_dir: str | Path,
    *,
    subjects: Sequence[str] | None = None,
    subjects_csv: str | Path | None = None,
    object_prompts: str | Path | None = None,
    live_prompts: str | Path | None = None,
) -> BenchProtocol:
    """The subjects (with their reference image files) and prompt templates of a benchmark run."""
    data = Path(data_dir)
    if not data.is_dir():
        raise BenchError(f"--data {data} is not a folder (expected one sub-folder of images per subject, as in google/dreambooth)")
    rows = parse_subjects_csv(_protocol_file(SUBJECTS_FILE, subjects_csv, data))
    known = {sid: (noun, kind) for sid, noun, kind in rows}
    wanted = list(subjects) if subjects else [sid for sid, _, _ in rows]
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise BenchError(f"--subjects {', '.join(unknown)} not in the subjects CSV (known: {', '.join(known)})")
    out = []
    for sid in wanted:
        folder = data / sid
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise BenchError(f"subject {sid!r}: no reference images in {folder} ({', '.join(IMAGE_SUFFIXES)})")
        noun, kind = known[sid]
        out.append(BenchSubject(sid, noun, kind, tuple(files)))
    kinds = {s.kind for s in out}
    explicit = {"object": object_prompts, "live": live_prompts}
    prompts = {k: parse_prompts(_protocol_file(PROMPT_FILES[k], explicit[k], data), k) for k in sorted(kinds)}
    return BenchProtocol(tuple(out), prompts)


def load_reference_images(subject: BenchSubject) -> list[Image.Image]:
    from prcore.data.images import decode_image

    return [decode_image(p, i) for i, p in enumerate(subject.images)]


# --------------------------------------------------------------------------------------------
# table


def metric_columns(scores: pl.DataFrame) -> list[str]:
    """The metric columns present, paper order first (DINO, CLIP-I, CLIP-T), then any others."""
    reserved = set(_ROW_FIELDS)
    others = [c for c in scores.columns if c not in reserved and c not in PAPER_ORDER]
    return [m for m in PAPER_ORDER if m in scores.columns] + others


def summarize(scores: pl.DataFrame, modes: Sequence[str]) -> pl.DataFrame:
    """Per mode: mean of each metric over all images, number of images and subjects."""
    metrics = metric_columns(scores)
    order = {m: i for i, m in enumerate(modes)}
    table = (
        scores.group_by("mode")
        .agg(
            *[pl.col(m).mean().alias(m) for m in metrics],
            pl.len().alias("images"),
            pl.col("subject_id").n_unique().alias("subjects"),
        )
        .with_columns(pl.col("mode").replace_strict(order, default=len(order), return_dtype=pl.Int64).alias("_o"))
        .sort("_o")
        .drop("_o")
    )
    return table


def table_markdown(table: pl.DataFrame, *, title: str = "DreamBench") -> str:
    metrics = [c for c in table.columns if c not in ("mode", "images", "subjects")]
    head = ["guidance mode"] + [METRIC_LABELS.get(m, m) for m in metrics] + ["images", "subjects"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in table.iter_rows(named=True):
        cells = [row["mode"]] + [("n/a" if row[m] is None else f"{row[m]:.3f}") for m in metrics] + [str(row["images"]), str(row["subjects"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the runner


_ROW_FIELDS = (
    "subject_id", "class_noun", "kind", "mode", "prompt_index", "prompt", "personal_prompt",
    "base_prompt", "image_index", "seed", "key", "seconds",
)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _parquet(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def _train_config(overrides: Mapping[str, Any]):
    from prcore.data.schema import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise BenchError(f"unknown training option(s) {', '.join(unknown)}; TrainConfig fields: {', '.join(sorted(names))}")
    return TrainConfig(**overrides)


def _scorer_description(scorer: ImageScorerProtocol) -> dict[str, Any]:
    d: dict[str, Any] = {"class": type(scorer).__name__, "metrics": list(scorer.metrics)}
    for attr in ("clip_model", "dino_model"):
        if hasattr(scorer, attr):
            d[attr] = getattr(scorer, attr)
    return d


def run_dreambench(
    protocol: BenchProtocol,
    *,
    config: BenchConfig,
    scorer: ImageScorerProtocol,
    output: Any,
    pipe: Any = None,
    device: str | None = None,
    dtype: Any = None,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    progress: bool = False,
) -> BenchResult:
    """Run the protocol and write images, per-image scores and the table to ``output`` (URI or Store).

    ``pipe``: an already loaded pipeline (else ``config.model`` is loaded with
    :func:`prcore.method.models.load_pipeline`). ``work_dir``: where LoRAs are trained (a temporary
    folder by default; they are not part of the output).
    """
    from prcore.method.dco import train_subject_lora
    from prcore.method.lora_io import load_subject_lora, unload_subject_lora
    from prcore.method.models import load_pipeline
    from prcore.method.sampler import sample
    from prcore.store.storage import open_store

    started = time.perf_counter()
    store = open_store(output) if isinstance(output, (str, Path)) else output
    if not scorer.metrics:
        raise BenchError("the scorer produces no metric: configure --clip-model and/or --dino-model")
    train_config = _train_config(config.train_overrides)
    # JSON round trip: tuples become lists, as they will be when read back
    manifest = json.loads(json.dumps({"config": config.to_json(), "scorer": _scorer_description(scorer)}))
    if store.exists(BENCH_RECORD_KEY):
        previous = json.loads(store.get(BENCH_RECORD_KEY))
        if previous != manifest:
            raise BenchError(
                f"{store.uri} already holds a benchmark with a different configuration (bench.json); "
                "choose another --output, or delete it to start over"
            )
    else:
        store.put(BENCH_RECORD_KEY, json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode(), content_type="application/json")

    if pipe is None:
        pipe = load_pipeline(config.model, device=device, dtype=dtype)
    frames: list[pl.DataFrame] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="prcore-bench-") as tmp:
        lora_root = Path(work_dir) if work_dir is not None else Path(tmp)
        for subject in protocol.subjects:
            result_key = bench_result_key(subject.subject_id)
            if store.exists(result_key):
                frames.append(pl.read_parquet(io.BytesIO(store.get(result_key))))
                skipped.append(subject.subject_id)
                log(f"{subject.subject_id}: done in an earlier run, reused")
                continue
            frames.append(
                _run_subject(
                    subject, protocol, config, train_config, scorer, store, pipe, lora_root,
                    sample, train_subject_lora, load_subject_lora, unload_subject_lora, log, progress,
                )
            )
    scores = pl.concat(frames, how="diagonal_relaxed")
    table = summarize(scores, config.modes)
    title = f"DreamBench: {len(protocol.subjects)} subjects, {config.images_per_prompt} images per prompt, model {config.model}"
    markdown = table_markdown(table, title=title)
    store.put(BENCH_SCORES_KEY, _parquet(scores), content_type="application/vnd.apache.parquet")
    store.put(BENCH_TABLE_KEY, _parquet(table), content_type="application/vnd.apache.parquet")
    csv_buf = io.BytesIO()
    table.write_csv(csv_buf)
    store.put("table.csv", csv_buf.getvalue(), content_type="text/csv")
    store.put("table.md", markdown.encode(), content_type="text/markdown")
    return BenchResult(table, scores, markdown, store.uri, time.perf_counter() - started, skipped)


def _run_subject(
    subject, protocol, config, train_config, scorer, store, pipe, lora_root,
    sample, train_subject_lora, load_subject_lora, unload_subject_lora, log, progress,
) -> pl.DataFrame:
    t0 = time.perf_counter()
    references = load_reference_images(subject)
    adapter = None
    needs_lora = any(m != "pretrained" for m in config.modes)
    if needs_lora:
        lora_dir = lora_root / "loras" / subject.subject_id
        trained = train_subject_lora(
            pipe, images=references, class_noun=subject.class_noun, identifier=config.identifier,
            out_dir=lora_dir, config=train_config, base_model_id=config.model, progress=progress,
        )
        how = "reused from the work dir" if getattr(trained, "reused", False) else f"trained in {trained.seconds_total:.1f}s"
        log(f"{subject.subject_id}: LoRA on {len(references)} images {how}")
        adapter = f"bench_{trained.fingerprint}"  # one name per LoRA content: never a stale adapter
        load_subject_lora(pipe, lora_dir, adapter)
    refs = scorer.embed_references(references)
    rows: list[dict[str, Any]] = []
    try:
        for p_index, template in enumerate(protocol.prompts_for(subject, config.prompts_per_subject)):
            # The same seeds for every mode: the modes differ only in guidance.
            seed = config.seed + 1000 * p_index
            for mode in config.modes:
                out = sample(
                    pipe, prompt=template, class_noun=subject.class_noun, identifier=config.identifier,
                    adapter_name=adapter if mode != "pretrained" else None, guidance=mode,
                    guidance_scale=config.guidance_scale, consistency_scale=config.consistency_scale,
                    parallel_scale=config.parallel_scale, num_inference_steps=config.num_inference_steps,
                    height=config.height, width=config.width, seed=seed, num_images=config.images_per_prompt,
                    scheduler=config.scheduler, progress=progress,
                )
                scores = scorer.score(out.images, out.base_prompt, refs)
                for i, (image, image_scores) in enumerate(zip(out.images, scores, strict=True)):
                    key = bench_image_key(subject.subject_id, mode, p_index, i)
                    store.put(key, _png(image), content_type="image/png")
                    rows.append(
                        dict(
                            subject_id=subject.subject_id, class_noun=subject.class_noun, kind=subject.kind,
                            mode=mode, prompt_index=p_index, prompt=template, personal_prompt=out.personal_prompt,
                            base_prompt=out.base_prompt, image_index=i, seed=int(out.seeds[i]), key=key,
                            seconds=out.seconds / len(out.images), **image_scores,
                        )
                    )
    finally:
        if adapter is not None:
            unload_subject_lora(pipe, adapter)
    frame = pl.DataFrame(rows)
    store.put(bench_result_key(subject.subject_id), _parquet(frame), content_type="application/vnd.apache.parquet")
    log(f"{subject.subject_id}: {len(rows)} images scored in {time.perf_counter() - t0:.1f}s")
    return frame


def parse_train_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> TrainConfig overrides, each value parsed as JSON when it parses
    (numbers, true/false, null, lists), else kept as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise BenchError(f"--train {pair!r}: write KEY=VALUE, e.g. --train rank=16")
        key, value = pair.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


__all__ = [
    "DEFAULT_MODES", "BenchConfig", "BenchError", "BenchResult", "BenchSubject", "BenchProtocol",
    "load_protocol", "load_reference_images", "parse_train_overrides", "run_dreambench", "summarize",
    "table_markdown",
]
