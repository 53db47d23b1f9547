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

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

# -- names ------------------------------------------------------------------------------------------

GUIDANCE_MODES: tuple[str, ...] = ("parallel_rescaled", "consistency", "cfg", "pretrained")
# The scheduler names the sampler knows (prcore.method.schedulers keys its diffusers mapping by the
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

MAX_SIZE = 4096
MAX_STEPS = 1000
MAX_NUM_IMAGES = 64
SEED_MAX = 2**63 - 1
# Instance images: a read stops past MAX_INPUT_BYTES (a device file or a huge upload never fills
# memory) and a decode refuses more than MAX_IMAGE_PIXELS (a decompression bomb). Both overridable
# by the environment (PRCORE_MAX_INPUT_BYTES, PRCORE_MAX_IMAGE_PIXELS); the read cap is enforced in
# prcore.store.uris, which owns reads and has the same default.
MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000


# -- defaults -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationDefaults:
    """What a null (or absent) optional request column means: the run's defaults.

    Every field but ``identifier`` and ``num_images`` is a sampling parameter: a manifest column of
    the same name, part of ``req_fp``, and a keyword argument of ``prcore.method.sampler.sample``.
    """

    identifier: str = DEFAULT_IDENTIFIER
    num_images: int = 4
    guidance: str = "parallel_rescaled"
    guidance_scale: float = 7.5  # w_cfg
    consistency_scale: float = 3.0  # w_cg
    parallel_scale: float = 0.5  # eta
    num_inference_steps: int = 50
    height: int | None = None  # None: the model's default size
    width: int | None = None
    negative_prompt: str = ""
    scheduler: str | None = None  # None: the model's own scheduler
    consistency_start: float = 0.0  # the consistency window, fractions of the schedule: three UNet
    consistency_stop: float = 0.5  # rows per image inside it, two outside (0, 1: the whole trajectory);
    # [0, 0.5) from the toy-world sweep (docs/sampling.md): 2.5 rows per step, alignment unchanged, fidelity up


REQUEST_PARAM_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(GenerationDefaults) if f.name not in ("identifier", "num_images"))
# Request parameters added after req_fp version 1, with their neutral value: while a request leaves
# them there they stay out of req_fp, so adding a parameter re-renders nothing already made.
FINGERPRINT_NEUTRAL: dict[str, Any] = {"consistency_start": 0.0, "consistency_stop": 1.0}


NOT_IN_FINGERPRINT = ("gradient_checkpointing",)  # TrainConfig fields that change memory, not the result


class TrainingInputError(ValueError):
    """A training input the user can fix (config, identifier, captions, output folder)."""


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters. Field names are fixed: manifest columns ``train_<field>`` map onto them."""

    steps: int = 400
    learning_rate: float = 1e-4
    rank: int = 8
    alpha: float = 8.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    resolution: int | None = None  # None: the model's default (unet sample_size * vae scale factor)
    batch_size: int = 1
    dco_beta: float = 1000.0  # <= 0: plain DreamBooth loss
    seed: int = 0
    # auto: bf16 autocast on CUDA devices that have it, else fp16 autocast + GradScaler; on the CPU,
    # bf16 autocast for bf16 weights, else fp32. "no": only what the weights' dtype needs.
    mixed_precision: str = "auto"
    gradient_checkpointing: bool | None = None  # None: the family's default (on for SDXL)
    optimizer: str = "adamw"
    train_text_embeddings: bool = False  # also learn an embedding for the identifier token
    prior_preservation: bool = False
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    offset_noise: float = 0.0
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (e.g. 5.0); None: off
    random_flip: bool = True

    def __post_init__(self) -> None:
        tm = self.target_modules
        if isinstance(tm, str):
            tm = tuple(m.strip() for m in tm.split(",") if m.strip())
        object.__setattr__(self, "target_modules", tuple(str(m) for m in tm))
        problems = self._coerce_numbers()
        if not isinstance(self.steps, (int, np.integer)) or self.steps <= 0:
            problems.append(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        if not self.target_modules:
            problems.append("target_modules must name at least one module (e.g. to_q,to_k,to_v,to_out.0)")
        if self.resolution is not None and (not isinstance(self.resolution, (int, np.integer)) or self.resolution < 8):
            problems.append(f"resolution must be None or an integer >= 8, got {self.resolution!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            problems.append(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.prior_preservation and self.num_class_images < 1:
            problems.append(f"num_class_images must be >= 1 with prior_preservation, got {self.num_class_images!r}")
        if self.offset_noise < 0:
            problems.append(f"offset_noise must be >= 0, got {self.offset_noise!r}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            problems.append(f"snr_gamma must be None or > 0, got {self.snr_gamma!r}")
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


# -- columns ----------------------------------------------------------------------------------------

STR, INT, FLOAT, BOOL, LIST_STR = "str", "int", "float", "bool", "list[str]"
_KIND_OF_TYPE = {"str": STR, "int": INT, "float": FLOAT, "bool": BOOL, "tuple[str, ...]": LIST_STR}


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str  # str | int | float | bool | list[str]
    required: bool
    subject: bool  # subject-level: must agree across the subject's rows
    doc: str


def _kind(annotation: Any) -> str:
    """The column kind of a dataclass field annotation (``int | None`` -> int)."""
    return _KIND_OF_TYPE[str(annotation).replace(" | None", "")]


_REQUEST_DOCS = {
    "guidance": "guidance mode: " + " | ".join(GUIDANCE_MODES),
    "guidance_scale": "w_cfg",
    "consistency_scale": "w_cg",
    "parallel_scale": "eta",
    "num_inference_steps": "denoising steps",
    "height": "pixels, multiple of 8",
    "width": "pixels, multiple of 8",
    "negative_prompt": "negative prompt",
    "scheduler": "scheduler name: " + " | ".join(SCHEDULER_NAMES),
    "consistency_start": "start of the consistency window, fraction of the schedule (0..1)",
    "consistency_stop": "end of the consistency window, fraction of the schedule (0..1)",
}

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
        *(
            ColumnSpec(f.name, _kind(f.type), False, False, _REQUEST_DOCS[f.name])
            for f in fields(GenerationDefaults)
            if f.name in REQUEST_PARAM_COLUMNS
        ),
        *(ColumnSpec(c, FLOAT, False, True, f"QC threshold on {m} (overrides the run's)") for m, c in QC_COLUMNS.items()),
        *(ColumnSpec(f"train_{f.name}", _kind(f.type), False, True, f"TrainConfig.{f.name}") for f in fields(TrainConfig)),
    )
}
TRAIN_FIELDS: dict[str, str] = {f.name: COLUMNS[f"train_{f.name}"].kind for f in fields(TrainConfig)}
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
            parts.append(f"row {self.row}" + (f" (subject {self.subject_id})" if self.subject_id is not None else ""))
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
