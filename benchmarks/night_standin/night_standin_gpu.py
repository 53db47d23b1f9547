"""The stand-in for the model's GPU work (see ``sitecustomize.py`` next to it). Benchmark only."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

_STATE: dict[str, Any] = {"first_gpu": None, "slept": 0.0, "pipe": None}
_LOCK = threading.Lock()


class _Unet:
    device = "simulated-gpu"
    dtype = "bfloat16"


class StandinPipe:
    """What the product holds as its pipeline: it is matched to the SD family (``unet`` and
    ``text_encoder`` set, no ``text_encoder_2``), then only ``unet.device`` / ``unet.dtype`` are read."""

    unet = _Unet()
    text_encoder = "simulated"
    text_encoder_2 = None


def _event(kind: str, **fields: Any) -> None:
    out = Path(_CFG["out"])
    line = json.dumps({"event": kind, "pid": os.getpid(), "flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID"),
                       "t": time.time(), **fields})
    with open(out / f"events-{os.getpid()}.jsonl", "a") as fh:
        fh.write(line + "\n")


def _gpu(seconds: float, what: str) -> None:
    """Simulated GPU work: sleep; the first call of the process is recorded."""
    with _LOCK:
        if _STATE["first_gpu"] is None:
            _STATE["first_gpu"] = time.time()
            _event("first_gpu", what=what, since_start=_STATE["first_gpu"] - _CFG["started"])
    time.sleep(seconds)
    _STATE["slept"] += seconds
    _event("gpu", what=what, seconds=seconds)


def load_run_pipeline(model: str | None, settings: Any) -> StandinPipe:
    if _STATE["pipe"] is None:
        _gpu(_CFG["load_s"] * _CFG["scale"], "load")
        _STATE["pipe"] = StandinPipe()
    return _STATE["pipe"]


def train_subject_lora(pipe: Any, *, images, class_noun: str, identifier: str, out_dir, captions=None, config=None,
                       base_model_id: str | None = None, progress: bool = True):
    from prcore.method.dco import TrainResult, fingerprint_bytes, lora_fingerprint, resolve_captions
    from prcore.store.keys import LORA_RECORD_FILE, LORA_WEIGHTS_FILE

    templates = resolve_captions(captions, len(images))
    fp = lora_fingerprint(base_model_id=base_model_id, images=[fingerprint_bytes(s, i) for i, s in enumerate(images)],
                          class_noun=class_noun, identifier=identifier, captions=templates, config=config)
    seconds = config.steps * _CFG["s_per_step"] * _CFG["scale"]
    _gpu(seconds, "train")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / LORA_WEIGHTS_FILE).write_bytes(hashlib.sha256(fp.encode()).digest() * 64)  # 2 KB stand-in weights
    record = {"fingerprint": fp, "base_model": base_model_id, "steps": config.steps, "simulated": True}
    (out / LORA_RECORD_FILE).write_text(json.dumps(record))
    return TrainResult(out_dir=out, fingerprint=fp, losses=[0.1], seconds_total=seconds,
                       seconds_per_step=seconds / max(config.steps, 1), record=record)


def sample_batch(pipe: Any, requests, **params: Any):
    from PIL import Image

    from prcore.method.sampler import SampleOutput

    n = sum(len(r.seeds) for r in requests)
    seconds = n * _CFG["s_per_image"] * _CFG["scale"]
    _gpu(seconds, "sample")
    size = (int(params.get("width") or 64), int(params.get("height") or 64))
    outs = []
    for r in requests:
        subject = f"{r.identifier} {r.class_noun}"
        images = [Image.new("RGB", size, ((s * 37) % 256, (s * 91) % 256, (s * 53) % 256)) for s in r.seeds]
        outs.append(SampleOutput(images=images, seeds=list(r.seeds), personal_prompt=r.prompt.replace("{subject}", subject),
                                 base_prompt=r.prompt.replace("{subject}", r.class_noun),
                                 seconds=seconds * len(r.seeds) / max(n, 1), scheduler="simulated"))
    return outs


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


_CFG: dict[str, Any] = {}


def install(config: str, started: float) -> None:
    """Replace the four GPU entry points (module attributes, before the flows import them by name)."""
    _CFG.update(json.loads(config), started=started)
    import prcore.method.dco as dco
    import prcore.method.lora_io as lora_io
    import prcore.method.sampler as sampler
    import prcore.pipeline.models as models

    models.load_run_pipeline = load_run_pipeline
    dco.train_subject_lora = train_subject_lora
    sampler.sample_batch = sample_batch
    lora_io.load_subject_lora = _noop
    lora_io.unload_subject_lora = _noop
    _event("start", import_s=time.time() - started)
