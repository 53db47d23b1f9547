"""The base model of a run: embedded model ids and the folder ``load_pipeline`` opens for them.

The embedded models are recorded as ids (``prcore:toyworld``, ``prcore:tiny-sd``), not paths, in
fingerprints and sidecars, so the same manifest gives the same keys and reuses the same LoRAs on
every machine, whatever its cache folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_TOYWORLD = "prcore:toyworld"
EMBEDDED_TINY = "prcore:tiny-sd"


def _toyworld_path() -> Path | None:
    try:
        from prcore import toyworld

        path = Path(toyworld.model_path())
    except (ImportError, AttributeError, FileNotFoundError, OSError, RuntimeError):
        return None
    return path if (path / "model_index.json").is_file() else None


def default_model_id() -> str:
    """``prcore:toyworld`` when the toy-world package ships a trained pipeline, else ``prcore:tiny-sd``
    (a tiny randomly initialised pipeline, built on first use)."""
    return EMBEDDED_TOYWORLD if _toyworld_path() is not None else EMBEDDED_TINY


def resolve_model(model: str | None, cache_dir: Path) -> str:
    """What ``load_pipeline`` should open for ``model``: embedded ids become their local folder."""
    model = model or default_model_id()
    if model == EMBEDDED_TOYWORLD:
        path = _toyworld_path()
        if path is None:
            raise FileNotFoundError("the toy-world model is not installed (prcore.toyworld.model_path() has no pipeline)")
        return str(path)
    if model == EMBEDDED_TINY:
        return _tiny_model(cache_dir)
    return str(model)


def _tiny_model(cache_dir: Path) -> str:
    """A tiny randomly initialised pipeline, built once into ``cache_dir/models/tiny-sd``."""
    from prcore.method.tiny import build_tiny_pipeline

    target = cache_dir / "models" / "tiny-sd"
    if not (target / "model_index.json").is_file():
        (cache_dir / "models").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-sd-", dir=cache_dir / "models"))
        build_tiny_pipeline(tmp / "tiny-sd", "sd")
        try:
            os.replace(tmp / "tiny-sd", target)
        except OSError:  # another process won the race
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_run_pipeline(model: str | None, settings):
    """The cached pipeline for ``model`` (an id or folder, embedded ids resolved) with the run's placement."""
    from prcore.method.accel import configure_denoiser
    from prcore.method.models import load_pipeline

    p = settings.placement
    pipe = load_pipeline(resolve_model(model, settings.cache_path()), device=p.device, dtype=p.dtype)
    configure_denoiser(pipe, p.denoiser_options())
    return pipe


def _local_source(model: str | None, run_model: str, cache_dir: Path | None) -> str | Path | None:
    """Where a subject's base model (``model``, or the run's ``run_model``) can be read without
    weights: the model itself, the embedded models' folders once built; None when not here yet."""
    model = model or run_model
    if model == EMBEDDED_TOYWORLD:
        return _toyworld_path()
    if model == EMBEDDED_TINY:
        tiny = cache_dir / "models" / "tiny-sd" if cache_dir is not None else None  # where resolve_model builds it
        return tiny if tiny is not None and (tiny / "model_index.json").is_file() else None
    return model


def layer_names(model: str | None, run_model: str, cache_dir: Path | None = None) -> tuple[str, ...] | None:
    """The LoRA-targetable denoiser layer names of a subject's base model (``model``, or the run's
    ``run_model`` for a row without one), read without weights (:func:`prcore.method.targets.lora_layer_names`);
    None when they cannot be known here (a hub model not in the local cache; the tiny model
    without the run's ``cache_dir`` or not built there yet).
    What ``validate(module_names=...)`` asks to check ``train_target_modules`` before any training."""
    from prcore.method.targets import lora_layer_names

    source = _local_source(model, run_model, cache_dir)
    return lora_layer_names(source) if source is not None else None


def model_rules(model: str | None, run_model: str, cache_dir: Path | None = None):
    """What a subject's base model's family accepts (:class:`prcore.data.schema.ModelRules`), read
    without weights; None when unknown here. What ``validate(model_rules=...)`` asks."""
    from prcore.method.targets import model_rules as rules

    source = _local_source(model, run_model, cache_dir)
    return rules(source) if source is not None else None
