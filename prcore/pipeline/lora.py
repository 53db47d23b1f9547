"""A subject's LoRA: fingerprint, reuse from the local cache or the store, or train and upload.

The LoRA fingerprint covers base model, instance image bytes, class noun, identifier, captions
and the training config, so an unchanged subject reuses ``loras/{subject_id}/{lora_fp}/`` from
the store (on any machine); a changed one trains a new LoRA next to the old. The record
(``training.json``) is uploaded last: a LoRA folder in the store counts only when it is there.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prcore.data.schema import TrainConfig
from prcore.pipeline.subject import SubjectInputs
from prcore.store.keys import LORA_RECORD_FILE, LORA_WEIGHTS_FILE, lora_prefix, lora_record_key

log = logging.getLogger("prcore.pipeline")
_ADAPTER_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


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
    damaged: str | None = None  # what was wrong with the stored copy, when it was replaced (retrained or re-uploaded)
    record_sha256: str | None = None  # sha256 of the training.json verified here: the local copy sampled with

    def local_copy(self) -> Path | None:
        """``local_dir`` while it still holds the copy :func:`ensure_lora` verified in this process (its
        ``training.json`` hashes to ``record_sha256``, the weights file is there); else None. Reads two local
        files, asks the store nothing."""
        local = Path(self.local_dir)
        try:
            same = _sha256_file(local / LORA_RECORD_FILE) == self.record_sha256
        except OSError:
            return None
        return local if same and self.record_sha256 and (local / LORA_WEIGHTS_FILE).is_file() else None

    @property
    def trained(self) -> bool:
        return self.source == "trained"

    @property
    def adapter_name(self) -> str:
        """A peft adapter name (no dots or dashes) unique to this subject's LoRA."""
        return "s_" + _ADAPTER_UNSAFE.sub("_", f"{self.subject_id}_{self.lora_fp}")


def lora_fingerprint(inputs: SubjectInputs, *, base_model_id: str, config: TrainConfig) -> str:
    from prcore.method.dco import lora_fingerprint as fingerprint

    job = inputs.job
    return fingerprint(base_model_id=base_model_id, images=inputs.images, class_noun=job.class_noun,
                       identifier=job.identifier, captions=job.instance_prompts, config=config)


def _local_lora_dir(cache_dir: Path, subject_id: str, lora_fp: str) -> Path:
    return cache_dir / "loras" / subject_id / lora_fp


def _clean_stale_dirs(folder: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove ``.train-*`` / ``.dl-*`` folders a killed run left in the cache (older than ``max_age_s``)."""
    cutoff = time.time() - max_age_s
    for path in [*folder.glob(".train-*"), *folder.glob(".dl-*")]:
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


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
        if not (tmp / LORA_RECORD_FILE).is_file():
            raise FileNotFoundError(f"LoRA {store.uri}/{prefix} is incomplete (no {LORA_RECORD_FILE})")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256_file(path: Path) -> str:
    import hashlib

    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _md5_file(path: Path) -> str:
    import hashlib

    with path.open("rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def store_listing_problem(store, prefix: str, record: bytes) -> str | None:
    """What the store's listing of a LoRA folder (one LIST: sizes; on S3 the ETag, the MD5 of a single-part
    upload) says differs from the files ``training.json`` recorded, or None. No download."""
    import json

    from prcore.store.storage import list_info

    try:
        files = json.loads(record).get("files")
    except ValueError:
        return f"{LORA_RECORD_FILE} does not read"
    if not isinstance(files, dict):
        return None
    listed = {info.key[len(prefix):]: info for info in list_info(store, prefix)}
    for rel, want in sorted(files.items()):
        info = listed.get(rel)
        if info is None:
            return f"{rel} is missing in the store"
        if not info.matches(want.get("bytes"), want.get("md5")):
            return f"{rel} in the store is not the file {LORA_RECORD_FILE} recorded (size or MD5 differs)"
    return None


def record_file_hashes(local: Path) -> None:
    """Write into the folder's ``training.json`` the sha256 and size of every other file of the LoRA
    (``files``): what a machine checks before it samples with a copy (:func:`lora_problem`)."""
    import json

    record_path = local / LORA_RECORD_FILE
    record = json.loads(record_path.read_text())
    record["files"] = {p.relative_to(local).as_posix(): {"sha256": _sha256_file(p), "bytes": p.stat().st_size,
                                                         "md5": _md5_file(p)}
                       for p in sorted(local.rglob("*")) if p.is_file() and p.name != LORA_RECORD_FILE}
    record_path.write_text(json.dumps(record, indent=2, sort_keys=True))


def lora_problem(local: Path) -> str | None:
    """None when every file ``training.json`` lists (``files``) is in ``local`` with its recorded size and
    sha256, else what differs. A record of an earlier version (no ``files``) has no hashes to check;
    its weights file must still load whole (earlier versions mixed two key layouts for non-attention
    targets: such a LoRA counts as damaged and is trained again once)."""
    import json

    from prcore.method.lora_io import weights_file_problem

    try:
        files = json.loads((local / LORA_RECORD_FILE).read_text()).get("files")
    except (OSError, ValueError) as exc:
        return f"{LORA_RECORD_FILE} does not read ({type(exc).__name__})"
    if not isinstance(files, dict):
        weights = local / LORA_WEIGHTS_FILE
        return weights_file_problem(weights) if weights.is_file() else f"{LORA_WEIGHTS_FILE} is missing"
    for rel, want in sorted(files.items()):
        path = local.joinpath(*str(rel).split("/"))
        if ".." in str(rel).split("/") or not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want.get("bytes") or _sha256_file(path) != want.get("sha256"):
            return f"{rel} is not the file {LORA_RECORD_FILE} recorded (sha256 differs)"
    return None


def _upload_lora(store, local: Path, prefix: str) -> None:
    """Upload a LoRA folder, the record last so a half-uploaded LoRA is never reused."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == LORA_RECORD_FILE)
    for path in files:
        rel = path.relative_to(local).as_posix()
        ctype = "application/json" if path.suffix == ".json" else "application/octet-stream"
        store.put(prefix + rel, path.read_bytes(), content_type=ctype)


def store_has_lora(store, subject_id: str, lora_fp: str) -> bytes | None:
    """The LoRA's record when the store holds a complete LoRA (record and weights), else None. A folder
    marked complete whose weights are gone counts as absent: it is trained again."""
    from prcore.store.storage import KeyNotFoundError

    prefix = lora_prefix(subject_id, lora_fp)
    try:
        record = store.get(lora_record_key(subject_id, lora_fp))
    except KeyNotFoundError:
        return None
    if not store.exists(prefix + LORA_WEIGHTS_FILE):
        log.warning("LoRA %s of subject %s has a record but no %s in %s: training it again", lora_fp, subject_id,
                    LORA_WEIGHTS_FILE, store.uri)
        return None
    return record


def _local_matches(local: Path, record: bytes) -> bool:
    """This machine's copy is usable only when it is the store's LoRA: same record bytes, weights present."""
    try:
        return (local / LORA_RECORD_FILE).read_bytes() == record and (local / LORA_WEIGHTS_FILE).is_file()
    except OSError:
        return False


def ready_lora(store, lora: LoraInfo, cache_dir: Path) -> Path:
    """The local folder to sample ``lora`` from: the copy :func:`ensure_lora` verified in this process (store
    listing against the record, every file's sha256), when it is still in place (:meth:`LoraInfo.local_copy`,
    no store request: a subject's batches do not re-check it each); else :func:`materialize_lora`."""
    local = lora.local_copy()
    return local if local is not None else materialize_lora(store, lora.subject_id, lora.lora_fp, cache_dir)


def materialize_lora(store, subject_id: str, lora_fp: str, cache_dir: Path) -> Path:
    """The local folder of a LoRA that is in the store, downloading it into the cache if this machine
    lacks it or holds a copy that differs from the store's."""
    local = _local_lora_dir(cache_dir, subject_id, lora_fp)
    record = store_has_lora(store, subject_id, lora_fp)
    if record is None:
        raise FileNotFoundError(f"LoRA {lora_fp} of subject {subject_id!r} is not (complete) in {store.uri}/{lora_prefix(subject_id, lora_fp)}")
    problem = _verified_copy(store, subject_id, lora_fp, local, record)[1]
    if problem is not None:
        raise ValueError(f"LoRA {lora_fp} of subject {subject_id!r} in {store.uri} is damaged: {problem}; "
                         "prcore run trains it again")
    return local


def _verified_copy(store, subject_id: str, lora_fp: str, local: Path, record: bytes) -> tuple[str, str | None, str | None]:
    """Make ``local`` the store's LoRA, checked against its record before use: the cached copy when it
    is the store's and its files hash as recorded, else a fresh download. Returns (source, problem,
    repaired): ``problem`` is None when the copy is whole, else what differs in the store's own bytes;
    ``repaired`` says what was re-uploaded from this machine's verified copy."""
    if _local_matches(local, record) and lora_problem(local) is None:
        prefix = lora_prefix(subject_id, lora_fp)
        if (problem := store_listing_problem(store, prefix, record)) is not None:  # the store's copy is damaged:
            log.warning("LoRA %s of subject %s in %s: %s; uploading this machine's verified copy again", lora_fp,
                        subject_id, store.uri, problem)  # repaired from this machine's copy, whose bytes match the record
            store.delete(prefix + LORA_RECORD_FILE)
            _upload_lora(store, local, prefix)
        return "cache", None, problem
    _download_lora(store, lora_prefix(subject_id, lora_fp), local)
    problem = lora_problem(local)
    if problem is not None:
        shutil.rmtree(local, ignore_errors=True)  # never sampled with
    return "store", problem, None


def ensure_lora(inputs: SubjectInputs, store, pipe, *, config: TrainConfig, lora_fp: str, base_model_id: str,
                cache_dir: Path, progress: bool = False) -> LoraInfo:
    """The subject's LoRA ``lora_fp``: reused from the store (downloaded into the cache if this
    machine lacks it or its copy differs), else trained and uploaded. The store decides, never the cache."""
    started = time.perf_counter()
    job = inputs.job
    prefix = lora_prefix(job.subject_id, lora_fp)
    local = _local_lora_dir(cache_dir, job.subject_id, lora_fp)

    record = store_has_lora(store, job.subject_id, lora_fp)
    problem = None
    if record is not None:
        source, problem, repaired = _verified_copy(store, job.subject_id, lora_fp, local, record)
        if problem is None:
            return LoraInfo(job.subject_id, lora_fp, prefix, str(local), source, seconds=time.perf_counter() - started,
                            damaged=repaired, record_sha256=_sha256_file(local / LORA_RECORD_FILE))
        log.warning("LoRA %s of subject %s in %s is damaged (%s): training it again and replacing it", lora_fp,
                    job.subject_id, store.uri, problem)
        store.delete(lora_record_key(job.subject_id, lora_fp))  # the folder is incomplete until the new upload ends

    from prcore.method.dco import train_subject_lora

    inputs.check_images()
    local.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_dirs(local.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=local.parent))
    try:
        result = train_subject_lora(pipe, images=inputs.images, class_noun=job.class_noun, identifier=job.identifier,
                                    out_dir=tmp, captions=job.instance_prompts, config=config,
                                    base_model_id=base_model_id, progress=progress)
        if result.fingerprint != lora_fp:  # both come from prcore.method.dco.lora_fingerprint on the same inputs
            raise RuntimeError(f"subject {job.subject_id}: trained LoRA fingerprint {result.fingerprint} != planned {lora_fp}")
        final_loss = float(result.losses[-1]) if result.losses else None
        if final_loss is not None and not math.isfinite(final_loss):
            raise FloatingPointError(f"training of subject {job.subject_id!r} diverged (final loss {final_loss}); "
                                     "lower train_learning_rate or check the instance images")
        record_file_hashes(tmp)  # what every later use checks the bytes against
        record_sha256 = _sha256_file(tmp / LORA_RECORD_FILE)
        _upload_lora(store, tmp, prefix)
        if local.exists():
            shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LoraInfo(job.subject_id, lora_fp, prefix, str(local), "trained", seconds=time.perf_counter() - started,
                    train_seconds=float(result.seconds_total), final_loss=final_loss, damaged=problem,
                    record_sha256=record_sha256)


def activate_lora(pipe, lora: LoraInfo) -> None:
    from prcore.method.lora_io import load_subject_lora

    load_subject_lora(pipe, Path(lora.local_dir), lora.adapter_name)


def deactivate_lora(pipe, adapter_name: str) -> None:
    from prcore.method.lora_io import unload_subject_lora

    try:
        unload_subject_lora(pipe, adapter_name)
    except Exception as exc:  # a failed unload must not hide the subject's own result
        log.warning("could not unload adapter %s: %s", adapter_name, exc)
