"""Every key of an output root, built and parsed here and nowhere else.

Layout under one root (a folder or ``s3://bucket/prefix``)::

    loras/{subject_id}/{lora_fp}/                      LORA_WEIGHTS_FILE, LORA_EMBEDDINGS_FILE, LORA_RECORD_FILE (last)
    images/{subject_id}/{prompt_id}/{req_fp}/{i}.png   + {i}.json sidecar (written last: the commit marker)
    catalog/{subject_id}.parquet                       one row per finished image of the subject (rewritten whole)
    catalog.parquet                                    the snapshot: every catalogue file in one (rewritten at the end of a run)
    runs/{run_id}/                                     summary.json, failures.json, shards/, contact_sheets/
    runs/{run_id}/shard_plans/{i}.json                 shard i's jobs as the parent planned them (deployment fan-out)
    state/leases/{subject_id}.json                     who works on the subject now (a lease with an expiry)
    state/dirty/{subject_id}.json                      images written since the subject's catalogue was last rewritten

Keys are built only from safe ids (:func:`is_safe_id`) and hex fingerprints; anything else raises
``ValueError`` before a key exists, so an id can never become a path outside the root. Pure Python:
the model side (``prcore.method``) imports the LoRA file names from here on a bare GPU machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGES_PREFIX = "images"
LORAS_PREFIX = "loras"
CATALOG_PREFIX = "catalog"
RUNS_PREFIX = "runs"
STATE_PREFIX = "state"
DIRTY_PREFIX = f"{STATE_PREFIX}/dirty/"  # the dirty markers, listed at once by a rerun

# The files of a LoRA folder (local cache and store alike). The record is written last: a LoRA
# folder counts only when it is there and names its weights.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers key layout
LORA_KOHYA_FILE = "lora_kohya.safetensors"  # the same LoRA in kohya key layout (ComfyUI, A1111)
LORA_EMBEDDINGS_FILE = "learned_embeds.safetensors"
LORA_WEBUI_EMBEDDING_FILE = "embedding_webui.safetensors"  # the learned identifier for ComfyUI / A1111
LORA_RECORD_FILE = "training.json"

SAFE_ID_MAX_LENGTH = 128
SAFE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0," + str(SAFE_ID_MAX_LENGTH - 1) + r"}$"
# The rule in words, for every message that refuses an id (manifest validation, the CLI).
SAFE_ID_RULE = f"1-{SAFE_ID_MAX_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit, without '..' or '/'"
_SAFE_ID = re.compile(SAFE_ID_PATTERN)
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# images/{subject_id}/{prompt_id}/{req_fp}/{index}.{png|json}; polars' str.extract_groups takes it too
IMAGE_KEY_PATTERN = (
    r"^" + IMAGES_PREFIX + r"/(?P<subject_id>[^/]+)/(?P<prompt_id>[^/]+)/(?P<req_fp>[0-9a-f]+)/(?P<index>\d+)\.(?P<ext>png|json)$"
)
_IMAGE_KEY = re.compile(IMAGE_KEY_PATTERN)


def is_safe_id(value: object) -> bool:
    """1-128 chars of letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit; no ``..``."""
    return isinstance(value, str) and bool(_SAFE_ID.match(value)) and ".." not in value


def safe_id(kind: str, value: str) -> str:
    """``value`` if it is a safe id, else ``ValueError`` naming ``kind``."""
    if not is_safe_id(value):
        raise ValueError(f"{kind} {value!r} is not a safe id (letters, digits, '.', '_', '-'; no '..'); no key was built")
    return value


def _fp(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _HEX.match(value):
        raise ValueError(f"{kind} {value!r} is not a hex fingerprint; no key was built")
    return value


def _index(index: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"image index {index!r} must be an int >= 0")
    return index


# -- images -----------------------------------------------------------------------------------------


def subject_images_prefix(subject_id: str) -> str:
    """``images/{subject_id}/``"""
    return f"{IMAGES_PREFIX}/{safe_id('subject_id', subject_id)}/"


def request_prefix(subject_id: str, prompt_id: str, req_fp: str) -> str:
    """``images/{subject_id}/{prompt_id}/{req_fp}/``"""
    return f"{subject_images_prefix(subject_id)}{safe_id('prompt_id', prompt_id)}/{_fp('req_fp', req_fp)}/"


def image_key(subject_id: str, prompt_id: str, req_fp: str, index: int) -> str:
    """``images/{subject_id}/{prompt_id}/{req_fp}/{index}.png``"""
    return f"{request_prefix(subject_id, prompt_id, req_fp)}{_index(index)}.png"


def sidecar_key(subject_id: str, prompt_id: str, req_fp: str, index: int) -> str:
    """``images/{subject_id}/{prompt_id}/{req_fp}/{index}.json`` (the commit marker)."""
    return f"{request_prefix(subject_id, prompt_id, req_fp)}{_index(index)}.json"


def sidecar_key_for(png_key: str) -> str:
    """The sidecar key of an image key."""
    if not png_key.endswith(".png"):
        raise ValueError(f"{png_key!r} is not a PNG key")
    return png_key[: -len(".png")] + ".json"


def png_key_for(sidecar: str) -> str:
    """The image key of a sidecar key."""
    if not sidecar.endswith(".json"):
        raise ValueError(f"{sidecar!r} is not a sidecar key")
    return sidecar[: -len(".json")] + ".png"


@dataclass(frozen=True)
class ImageKey:
    """The parts of an image or sidecar key."""

    subject_id: str
    prompt_id: str
    req_fp: str
    index: int
    ext: str  # "png" | "json"

    @property
    def png(self) -> str:
        return image_key(self.subject_id, self.prompt_id, self.req_fp, self.index)

    @property
    def sidecar(self) -> str:
        return sidecar_key(self.subject_id, self.prompt_id, self.req_fp, self.index)


def parse_image_key(key: str) -> ImageKey | None:
    """The parts of ``images/{subject_id}/{prompt_id}/{req_fp}/{i}.png|json``, or None for any other key."""
    m = _IMAGE_KEY.match(key)
    if m is None or not is_safe_id(m["subject_id"]) or not is_safe_id(m["prompt_id"]):
        return None
    return ImageKey(m["subject_id"], m["prompt_id"], m["req_fp"], int(m["index"]), m["ext"])


# -- LoRAs ------------------------------------------------------------------------------------------


def lora_prefix(subject_id: str, lora_fp: str) -> str:
    """``loras/{subject_id}/{lora_fp}/``"""
    return f"{LORAS_PREFIX}/{safe_id('subject_id', subject_id)}/{_fp('lora_fp', lora_fp)}/"


def lora_record_key(subject_id: str, lora_fp: str) -> str:
    """``loras/{subject_id}/{lora_fp}/training.json``: written last, the LoRA's commit marker."""
    return lora_prefix(subject_id, lora_fp) + LORA_RECORD_FILE


# -- runs and catalogue -----------------------------------------------------------------------------


_FILE_SUFFIXES = (".png", ".json", ".parquet", ".md", ".csv", ".html")


def _safe_file_name(part: str) -> str:
    """A key segment: a safe id, or a safe id plus a known suffix (so every safe id, even one of
    the full 128 characters, names its own file)."""
    stem = next((part[: -len(s)] for s in _FILE_SUFFIXES if part.endswith(s) and len(part) > len(s)), part)
    if not is_safe_id(stem):
        raise ValueError(f"file name {part!r} is not a safe id (letters, digits, '.', '_', '-'; no '..'); no key was built")
    return part


def run_key(run_id: str, name: str) -> str:
    """``runs/{run_id}/{name}`` (``name`` may contain ``/``-separated segments: safe ids, each
    with an optional file suffix)."""
    for part in name.split("/"):
        _safe_file_name(part)
    return f"{RUNS_PREFIX}/{safe_id('run_id', run_id)}/{name}"


def probe_key(token: str) -> str:
    """``runs/.probe-{token}``: the small object a run writes and deletes before planning, to learn that
    the output root takes writes (``token``: hex, unique per probe)."""
    return f"{RUNS_PREFIX}/.probe-{_fp('probe token', token)}"


def summary_key(run_id: str) -> str:
    return run_key(run_id, "summary.json")


def failures_key(run_id: str) -> str:
    return run_key(run_id, "failures.json")


def scores_key(run_id: str) -> str:
    return run_key(run_id, "scores.parquet")


def shard_record_key(run_id: str, shard_index: int) -> str:
    return run_key(run_id, f"shards/{shard_index:04d}.json")


def shard_plan_key(run_id: str, shard_index: int) -> str:
    """``runs/{run_id}/shard_plans/{i:04d}.json``: the jobs of shard ``i`` as the parent planned them."""
    return run_key(run_id, f"shard_plans/{_index(shard_index):04d}.json")


def contact_sheet_key(run_id: str, subject_id: str) -> str:
    return run_key(run_id, f"contact_sheets/{safe_id('subject_id', subject_id)}.png")


def catalog_key(subject_id: str) -> str:
    """``catalog/{subject_id}.parquet``: the subject's whole catalogue, one row per finished image,
    rewritten in one put (atomic on both stores) whenever it changes."""
    return f"{CATALOG_PREFIX}/{safe_id('subject_id', subject_id)}.parquet"


def catalog_subject(key: str) -> str | None:
    """The subject of a catalogue key (``catalog/{subject_id}.parquet``), or None for any other key."""
    parts = key.split("/")
    if len(parts) == 2 and parts[0] == CATALOG_PREFIX and parts[1].endswith(".parquet"):
        sid = parts[1][: -len(".parquet")]
        return sid if is_safe_id(sid) else None
    return None


# The compacted snapshot of the whole catalogue: every ``catalog/{subject_id}.parquet`` in one file, beside
# (not inside) catalog/, so the per-subject glob ``catalog/*.parquet`` never reads a row twice.
CATALOG_SNAPSHOT_KEY = "catalog.parquet"


def legacy_catalog_key(key: str) -> str | None:
    """The subject of a catalogue file of the old layout (``catalog/run_date=D/{run_id}--{subject}.parquet``,
    one file per subject per run; removed when the subject's current file is written), else None."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == CATALOG_PREFIX and parts[1].startswith("run_date=") and parts[2].endswith(".parquet"):
        _, sep, sid = parts[2][: -len(".parquet")].rpartition("--")
        return sid if sep and is_safe_id(sid) else None
    return None


def lease_key(subject_id: str) -> str:
    """``state/leases/{subject_id}.json``: the lease of the run working on the subject."""
    return f"{STATE_PREFIX}/leases/{safe_id('subject_id', subject_id)}.json"


def dirty_key(subject_id: str) -> str:
    """``state/dirty/{subject_id}.json``: put before a run writes images of the subject, removed once the
    subject's contact sheet and catalogue file match them (a crash in between leaves it: the rerun reconciles)."""
    return f"{DIRTY_PREFIX}{safe_id('subject_id', subject_id)}.json"


# -- a DreamBench output root (``prcore bench dreambench``) ---------------------------------------------

BENCH_RECORD_KEY = "bench.json"
BENCH_SCORES_KEY = "scores.parquet"
BENCH_TABLE_KEY = "table.parquet"


def bench_result_key(subject_id: str) -> str:
    """``results/{subject_id}.parquet``: one subject's scores (the resume marker)."""
    return f"results/{safe_id('subject_id', subject_id)}.parquet"


def bench_image_key(subject_id: str, mode: str, prompt_index: int, index: int) -> str:
    """``images/{subject_id}/{mode}/{prompt_index:02d}_{index}.png``"""
    return f"{IMAGES_PREFIX}/{safe_id('subject_id', subject_id)}/{safe_id('mode', mode)}/{_index(prompt_index):02d}_{_index(index)}.png"
