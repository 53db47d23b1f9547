"""The manifest's schema and the one copy of every constant more than one part of prcore uses.

Pure Python (no polars, torch or pydantic), so the model side (``prcore.method``) and the
orchestration side read the same facts on any machine:

- the columns (:data:`COLUMNS`: kind, required, subject- or request-level), documented column by
  column in ``manifests/README.md``;
- what a null optional column means (:class:`GenerationDefaults`) and the training parameters
  (:class:`TrainConfig`, whose fields are the ``train_<field>`` columns);
- the names a manifest may use (guidance modes, mixed precision, QC metrics, image suffixes) and
  the ranges validation enforces.

A new request column is one :class:`GenerationDefaults` field plus its :class:`ColumnSpec`
(kind and documentation); planning, fingerprints, the sampler's keyword arguments and the sidecar
take it from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

# -- names ------------------------------------------------------------------------------------------

GUIDANCE_MODES: tuple[str, ...] = ("parallel_rescaled", "consistency", "cfg", "pretrained")
# The scheduler names the sampler knows (prcore.method.families.noise keys its diffusers mapping by the
# same names; tests/test_manifest.py checks that they agree). Manifests, CLI options and flow
# settings are validated against this list, spelled as make_scheduler normalises it.
SCHEDULER_NAMES: tuple[str, ...] = ("ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "pndm")


def scheduler_key(name: str) -> str:
    """A scheduler name as the sampler looks it up ("DPM++-2M" -> "dpmpp_2m")."""
    return name.strip().lower().replace("-", "_").replace("+", "p")


MIXED_PRECISION: tuple[str, ...] = ("auto", "no", "fp16", "bf16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit")  # adamw8bit: bitsandbytes' AdamW8bit (install bitsandbytes)
QC_METRICS: tuple[str, ...] = ("clip_t", "clip_i", "dino")
QC_COLUMNS: dict[str, str] = {m: f"qc_{m}" for m in QC_METRICS}  # metric -> manifest column / flow setting
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SUBJECT_PLACEHOLDER = "{subject}"
DEFAULT_CAPTION = "a photo of a {subject}"
DEFAULT_IDENTIFIER = "sks"
USER_COLUMN_PREFIX = "meta_"
# Field names never stored in a sidecar or the catalogue (a meta_ column so named is refused up front)
CREDENTIAL_LIKE = r"(secret|password|token|credential|access_key)"

# -- ranges -----------------------------------------------------------------------------------------

# Upper bounds a night can afford (one subject's work stays minutes, not hours), documented in
# docs/manifest_and_storage.md ("Parameter ranges"):
MAX_SIZE = 4096  # pixels per side of a generated image (SDXL's 1024 x 4; use vae_tiling near it)
MAX_TRAIN_RESOLUTION = 2048  # pixels per side of a training image
MAX_STEPS = 200  # denoising steps per image (samplers converge by 50; DDPM-style 1000 is a night per subject)
MAX_TRAIN_STEPS = 10_000  # optimizer steps per LoRA (DreamBooth-style LoRAs converge in 400-2000)
MAX_NUM_IMAGES = 64
MAX_GUIDANCE_SCALE = 30.0  # w_cfg / w_cg: images saturate well before this
MAX_PARALLEL_SCALE = 10.0  # eta (1 = DCO's plain consistency guidance)
# A prompt is cut by CLIP's text encoder at 77 tokens (about 4 characters each in English, so
# ~300 characters); 1000 characters leaves a generous margin for long words and non-Latin scripts
# while refusing pastes that only slow planning, fingerprints and contact sheets down.
MAX_PROMPT_CHARS = 1000
SEED_MAX = 2**63 - 1
# Instance images: a read stops past MAX_INPUT_BYTES (a device file or a huge upload never fills
# memory) and a decode refuses more than MAX_IMAGE_PIXELS (a decompression bomb). Both overridable
# by the environment (PRCORE_MAX_INPUT_BYTES, PRCORE_MAX_IMAGE_PIXELS); the read cap is enforced in
# prcore.store.uris, which owns reads and has the same default.
MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000


STR, INT, FLOAT, BOOL, LIST_STR = "str", "int", "float", "bool", "list[str]"
_KIND_OF_TYPE = {"str": STR, "int": INT, "float": FLOAT, "bool": BOOL, "tuple[str, ...]": LIST_STR}


def _kind(annotation: Any) -> str:
    """The column kind of a dataclass field annotation (``int | None`` -> int)."""
    return _KIND_OF_TYPE[str(annotation).replace(" | None", "")]


# -- parameter specs --------------------------------------------------------------------------------
#
# Every request (sampling) and training parameter is declared once, as a dataclass field of
# GenerationDefaults or TrainConfig whose metadata holds its ParamSpec (help text, unit, range,
# choices, length); ``prompt`` and ``seed`` are columns without a run default (PROMPT, SEED below).
# Manifest validation, the ``prcore sample`` / ``prcore train`` options, the flow settings (pydantic
# validates both dataclasses through __post_init__), the DreamBench config and the docs derive from
# it (:func:`params_of`, :data:`COLUMN_PARAMS`).

SPEC_KEY = "prcore_spec"
EXCERPT_CHARS = 60


def excerpt(value: Any, limit: int = EXCERPT_CHARS, *, quote: bool = True) -> str:
    """``repr(value)`` (``str`` with ``quote=False``) for an error message, cut to ``limit``
    characters with the full length named, so a 20,000-character prompt never fills a terminal or
    a log line. Every error that quotes a user's value goes through here."""
    text = repr(value) if quote else str(value)
    if len(text) <= limit:
        return text
    length = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({length})"


@dataclass(frozen=True)
class ParamSpec:
    """What a parameter may be: the one place its range, unit and help text stand.

    ``ge``/``gt``/``le`` bound numbers (floats must also be finite), ``multiple_of`` integers,
    ``max_chars`` strings, ``choices`` names (compared after ``normalize``), ``min_items`` lists.
    ``flags`` are the CLI option names when not ``--<name>`` (dashes for underscores).
    """

    help: str
    unit: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    max_chars: int | None = None
    choices: tuple[str, ...] | None = None
    normalize: Callable[[str], str] | None = None
    min_items: int | None = None
    flags: tuple[str, ...] = ()

    def rule(self, kind: str) -> str:
        """The rule in words, e.g. "an integer in 1..200 (denoising steps)"."""
        if self.choices is not None:
            text = "one of " + ", ".join(self.choices)
        elif kind in (INT, FLOAT):
            noun = "an integer" if kind == INT else "a finite number"
            if self.multiple_of:
                noun = f"a multiple of {self.multiple_of}"
            lo = f"> {_num(self.gt)}" if self.gt is not None else (f">= {_num(self.ge)}" if self.ge is not None else "")
            if lo and self.le is not None:
                text = f"{noun} in {_num(self.ge)}..{_num(self.le)}" if self.ge is not None else f"{noun} {lo} and <= {_num(self.le)}"
            else:
                text = " ".join(p for p in (noun, lo or (f"<= {_num(self.le)}" if self.le is not None else "")) if p)
        elif kind == STR:
            text = "text" + (f" of at most {self.max_chars} characters" if self.max_chars else "")
        elif kind == LIST_STR:
            text = "a list of names" + (f" with at least {self.min_items}" if self.min_items else "")
        else:
            text = "true or false"
        return text + (f" ({self.unit})" if self.unit else "")

    def problem(self, kind: str, value: Any) -> str | None:
        """None when ``value`` (not None) satisfies the spec, else what is wrong in words."""
        if kind == BOOL:
            return None if isinstance(value, (bool, np.bool_)) else "must be true or false"
        if kind == LIST_STR:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                return "must be a list of names"
            return f"must name at least {self.min_items}" if self.min_items and len(value) < self.min_items else None
        if kind == STR:
            return self._str_problem(value)
        return self._number_problem(kind, value)

    def _str_problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return "must be text"
        if self.max_chars is not None and len(value) > self.max_chars:
            return f"has {len(value)} characters; the limit is {self.max_chars}"
        if self.choices is not None and (self.normalize(value) if self.normalize else value) not in self.choices:
            return "must be one of " + ", ".join(self.choices)
        return None

    def _number_problem(self, kind: str, value: Any) -> str | None:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            return f"must be {self.rule(kind)}"
        if kind == INT and not float(value).is_integer():
            return f"must be {self.rule(kind)}"
        v = int(value) if kind == INT else float(value)  # ints compare exactly (seeds up to 2**63-1)
        bad = (
            not math.isfinite(v)
            or (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.multiple_of is not None and int(v) % self.multiple_of != 0)
        )
        return f"must be {self.rule(kind)}" if bad else None


def _num(x: float | None) -> str:
    if x is None:
        return ""
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:g}"


def param(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field whose metadata holds its :class:`ParamSpec`."""
    return field(default=default, metadata={SPEC_KEY: ParamSpec(help=help, **spec)})


@dataclass(frozen=True)
class Param:
    """One declared parameter: name, column kind, default (None: optional), its spec."""

    name: str
    kind: str
    default: Any
    nullable: bool
    spec: ParamSpec

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is allowed, else "<name> <what is wrong>, got <excerpt>"."""
        if value is None:
            return None if self.nullable else f"{self.name} is required"
        found = self.spec.problem(self.kind, value)
        return None if found is None else f"{self.name} {found}, got {excerpt(value)}"

    @property
    def flags(self) -> tuple[str, ...]:
        return self.spec.flags or ("--" + self.name.replace("_", "-"),)


def params_of(cls: type) -> dict[str, Param]:
    """The :class:`Param` of every field of a spec'd dataclass, in field order."""
    out = {}
    for f in fields(cls):
        annotation = str(f.type)
        out[f.name] = Param(f.name, _kind(annotation), f.default, annotation.endswith("| None"), f.metadata[SPEC_KEY])
    return out


def check_params(cls: type, obj: Any) -> list[str]:
    """Every spec problem of a spec'd dataclass instance, one line each."""
    return [p for name, spec in params_of(cls).items() if (p := spec.problem(getattr(obj, name)))]


# -- defaults -------------------------------------------------------------------------------------


_SCALE = dict(ge=0.0, le=MAX_GUIDANCE_SCALE)
_FRACTION = dict(ge=0.0, le=1.0, unit="fraction of the schedule")
MIN_SIZE = 32  # the smallest image side (the tiny test models draw 32x32; SD latents are then 4x4)
_SIZE = dict(ge=MIN_SIZE, le=MAX_SIZE, multiple_of=8, unit="pixels")


@dataclass(frozen=True)
class GenerationDefaults:
    """What a null (or absent) optional request column means: the run's defaults.

    Every field but ``identifier`` and ``num_images`` is a sampling parameter: a manifest column of
    the same name, part of ``req_fp``, and a keyword argument of ``prcore.method.sampler.sample``.
    Each field's metadata is its :class:`ParamSpec`; constructing one checks every value against it.
    """

    identifier: str = param(DEFAULT_IDENTIFIER, "The subject's rare identifier token.")
    num_images: int = param(4, "Images per prompt.", ge=1, le=MAX_NUM_IMAGES, unit="images")
    guidance: str = param("parallel_rescaled", "Guidance mode.", choices=GUIDANCE_MODES)
    guidance_scale: float = param(7.5, "w_cfg: classifier-free guidance weight.", **_SCALE)
    consistency_scale: float = param(3.0, "w_cg: consistency guidance weight.", **_SCALE)
    parallel_scale: float = param(0.5, "eta: weight of the part of g_cg parallel to g_cfg (1 = DCO).", ge=0.0, le=MAX_PARALLEL_SCALE)
    num_inference_steps: int = param(50, "Denoising steps.", ge=1, le=MAX_STEPS, unit="steps")
    height: int | None = param(None, "Image height (default: the model's).", **_SIZE)
    width: int | None = param(None, "Image width (default: the model's).", **_SIZE)
    negative_prompt: str = param("", "Negative prompt (empty by default).", max_chars=MAX_PROMPT_CHARS)
    scheduler: str | None = param(None, "Scheduler name (default: the model's own).", choices=SCHEDULER_NAMES, normalize=scheduler_key)
    # the consistency window, fractions of the schedule: three UNet rows per image inside it, two
    # outside (0, 1: the whole trajectory); [0, 0.5) from the toy-world sweep (docs/sampling.md):
    # 2.5 rows per step, alignment unchanged, fidelity up
    consistency_start: float = param(0.0, "Start of the consistency window.", **_FRACTION)
    consistency_stop: float = param(0.5, "End of the consistency window; outside it two UNet rows per image instead of three.", **_FRACTION)

    def __post_init__(self) -> None:
        problems = check_params(GenerationDefaults, self)
        if self.consistency_start > self.consistency_stop:
            problems.append(f"consistency_start {self.consistency_start} is after consistency_stop {self.consistency_stop}")
        if problems:
            raise ValueError("invalid generation defaults: " + "; ".join(problems))


# Columns without a run default: the prompt template and the request seed.
PROMPT = Param("prompt", STR, None, False, ParamSpec("Prompt template with {subject}.", max_chars=MAX_PROMPT_CHARS))
SEED = Param("seed", INT, None, True, ParamSpec("Request seed; image i uses a generator seeded from (seed, i).", ge=0, le=SEED_MAX))
GENERATION_PARAMS: dict[str, Param] = params_of(GenerationDefaults)

REQUEST_PARAM_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(GenerationDefaults) if f.name not in ("identifier", "num_images"))
# Request parameters added after req_fp version 1, with their neutral value: while a request leaves
# them there they stay out of req_fp, so adding a parameter re-renders nothing already made.
FINGERPRINT_NEUTRAL: dict[str, Any] = {"consistency_start": 0.0, "consistency_stop": 1.0}


NOT_IN_FINGERPRINT = ("gradient_checkpointing",)  # TrainConfig fields that change memory, not the result


class TrainingInputError(ValueError):
    """A training input the user can fix (config, identifier, captions, output folder)."""


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters. Field names are fixed: manifest columns ``train_<field>`` map onto them.
    Each field's metadata is its :class:`ParamSpec`; constructing one checks every value against it."""

    steps: int = param(400, "Optimizer steps.", ge=1, le=MAX_TRAIN_STEPS, unit="steps", flags=("--train-steps",))
    learning_rate: float = param(1e-4, "AdamW learning rate.", gt=0.0, le=1.0, flags=("--learning-rate", "--lr"))
    rank: int = param(8, "LoRA rank r.", ge=1, le=256)
    alpha: float = param(8.0, "LoRA alpha (scaling alpha/r).", gt=0.0, le=1024.0)
    target_modules: tuple[str, ...] = param(("to_q", "to_k", "to_v", "to_out.0"), "Comma-separated UNet module names to adapt.", min_items=1)
    resolution: int | None = param(None, "Training resolution (default: the model's).", ge=MIN_SIZE, le=MAX_TRAIN_RESOLUTION, multiple_of=8, unit="pixels")
    batch_size: int = param(1, "Instance images per step.", ge=1, le=64, unit="images")
    dco_beta: float = param(1000.0, "DCO beta; <= 0 trains with the plain DreamBooth loss.", ge=-1e6, le=1e6)
    seed: int = param(0, "Seed of LoRA init, noise, timesteps, flips.", ge=0, le=SEED_MAX)
    # auto: bf16 autocast on CUDA devices that have it, else fp16 autocast + GradScaler; on the CPU,
    # bf16 autocast for bf16 weights, else fp32. "no": only what the weights' dtype needs.
    mixed_precision: str = param("auto", "auto: bf16 on GPUs that have it, else fp16; on the CPU bf16 for bf16 weights, else fp32.", choices=MIXED_PRECISION)
    gradient_checkpointing: bool | None = param(None, "Trade compute for memory (default: on for SDXL).")
    optimizer: str = param("adamw", "adamw8bit: bitsandbytes' AdamW8bit (CUDA).", choices=OPTIMIZERS)
    train_text_embeddings: bool = param(False, "Also learn an embedding for the identifier (a new token, e.g. '<sks>').")
    prior_preservation: bool = param(False, "Add a prior loss on class images the base model generates.")
    num_class_images: int = param(50, "Class images for prior preservation.", ge=1, le=1000, unit="images")
    prior_loss_weight: float = param(1.0, "Weight of the prior-preservation loss.", ge=0.0, le=100.0)
    offset_noise: float = param(0.0, "Offset-noise strength (0 = off).", ge=0.0, le=1.0)
    snr_gamma: float | None = param(None, "Min-SNR-gamma loss weighting, e.g. 5 (default off).", gt=0.0, le=100.0)
    random_flip: bool = param(True, "Random horizontal flips.")

    def __post_init__(self) -> None:
        tm = self.target_modules
        if isinstance(tm, str):
            tm = tuple(m.strip() for m in tm.split(",") if m.strip())
        object.__setattr__(self, "target_modules", tuple(str(m) for m in tm))
        problems = self._coerce_numbers()
        bad_type = {p.split(" ", 1)[0] for p in problems}
        problems += [p for name, spec in TRAIN_PARAMS.items() if name not in bad_type and (p := spec.problem(getattr(self, name)))]
        if problems:
            raise TrainingInputError("invalid training config: " + "; ".join(problems))

    def _coerce_numbers(self) -> list[str]:
        """Canonical Python types (8 and 8.0 must fingerprint alike; manifests give numpy/float values)."""
        problems = []
        for name in ("learning_rate", "alpha", "dco_beta", "prior_loss_weight", "offset_noise", "snr_gamma"):
            value = getattr(self, name)
            if value is None and name == "snr_gamma":
                continue
            try:
                object.__setattr__(self, name, float(value))
            except (TypeError, ValueError):
                problems.append(f"{name} must be a number, got {value!r}")
        for name in ("steps", "rank", "batch_size", "seed", "num_class_images", "resolution"):
            value = getattr(self, name)
            if value is None and name == "resolution":
                continue
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
            elif isinstance(value, (float, np.floating)) and float(value).is_integer():
                object.__setattr__(self, name, int(value))
            else:
                problems.append(f"{name} must be an integer, got {value!r}")
        for name in ("train_text_embeddings", "prior_preservation", "random_flip"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.gradient_checkpointing is not None:
            object.__setattr__(self, "gradient_checkpointing", bool(self.gradient_checkpointing))
        return problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    def fingerprint_dict(self) -> dict[str, Any]:
        """What determines the trained weights: every field but the memory knobs (NOT_IN_FINGERPRINT)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IN_FINGERPRINT}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def identifier_problem(identifier: str | None, class_noun: str | None) -> str | None:
    """What is wrong with ``identifier`` for a subject of ``class_noun``, or None. The one owner of the
    rule: manifest validation and training (``prcore.method.dco.check_subject``) both ask it. The
    identifier is one word (no spaces, no braces) that differs, case-insensitively, from the class
    noun and from each of its words, so the personal and the base captions differ."""
    ident = identifier or ""
    if not ident or any(c.isspace() for c in ident):
        return f"{identifier!r} must be one non-empty word without spaces (e.g. 'sks')"
    if "{" in ident or "}" in ident:
        return f"{identifier!r} contains '{{' or '}}'; give a plain word (e.g. 'sks')"
    noun = (class_noun or "").strip().lower()
    if noun and (ident.lower() == noun or ident.lower() in noun.split()):
        return (f"{identifier!r} collides with the class noun {class_noun!r}: the identifier must be a separate rare "
                "word (e.g. 'sks') so personal and base captions differ")
    return None


TRAIN_PARAMS: dict[str, Param] = params_of(TrainConfig)


# -- columns ----------------------------------------------------------------------------------------



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
        ColumnSpec("prompt", STR, True, False, f"template with {{subject}}, at most {MAX_PROMPT_CHARS} characters"),
        ColumnSpec("identifier", STR, False, True, "rare token, e.g. 'sks'"),
        ColumnSpec("instance_prompts", LIST_STR, False, True, "training captions with {subject}"),
        ColumnSpec("base_model", STR, False, True, "base model id or folder"),
        ColumnSpec("prompt_id", STR, False, False, "safe id of the prompt"),
        ColumnSpec("num_images", INT, False, False, GENERATION_PARAMS["num_images"].spec.rule(INT)),
        ColumnSpec("seed", INT, False, False, "base seed"),
        *(ColumnSpec(n, p.kind, False, False, f"{p.spec.help} {p.spec.rule(p.kind)}") for n, p in GENERATION_PARAMS.items() if n in REQUEST_PARAM_COLUMNS),
        *(ColumnSpec(c, FLOAT, False, True, f"QC threshold on {m} (overrides the run's)") for m, c in QC_COLUMNS.items()),
        *(ColumnSpec(f"train_{n}", p.kind, False, True, f"TrainConfig.{n}: {p.spec.rule(p.kind)}") for n, p in TRAIN_PARAMS.items()),
    )
}
TRAIN_FIELDS: dict[str, str] = {n: p.kind for n, p in TRAIN_PARAMS.items()}
# Every manifest column a Param governs (its kind, range and help): validation checks each cell by it.
COLUMN_PARAMS: dict[str, Param] = {
    "prompt": PROMPT,
    "seed": SEED,
    **{n: p for n, p in GENERATION_PARAMS.items() if n != "identifier"},  # identifier: its own rules (validate)
    **{f"train_{n}": p for n, p in TRAIN_PARAMS.items()},
}
REQUIRED_COLUMNS = tuple(c.name for c in COLUMNS.values() if c.required)
SUBJECT_COLUMNS = tuple(c.name for c in COLUMNS.values() if c.subject and c.name != "subject_id")


# -- errors -----------------------------------------------------------------------------------------


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
            parts.append(f"row {self.row}" + (f" (subject {excerpt(self.subject_id, quote=False)})" if self.subject_id is not None else ""))
        if self.column is not None:
            parts.append(f"column {self.column}")
        return (", ".join(parts) + ": " if parts else "") + self.message


class ManifestInvalid(ValueError):
    """An invalid manifest; ``errors`` holds every problem."""

    def __init__(self, errors: Sequence[ManifestError], source: str = "manifest"):
        self.errors = list(errors)
        shown = "\n".join(str(e) for e in self.errors[:20])
        more = f"\n... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(f"{source} has {len(self.errors)} error(s); run `prcore manifest validate` for all:\n{shown}{more}")


@dataclass(frozen=True)
class ModelRules:
    """What a base model's family accepts, for validation before any work (the family owns the facts:
    ``prcore.pipeline.models.model_rules`` reads them without loading weights)."""

    label: str  # e.g. "SD 3 / 3.5"
    schedulers: tuple[str, ...]  # scheduler names its noise process can step
    text_embeddings: bool  # train_text_embeddings possible
    snr_weighting: bool  # snr_gamma meaningful (noise-predicting models)
