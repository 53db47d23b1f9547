"""Single-file checkpoints (the A1111 / civitai ``model.safetensors`` layout), loaded offline.

A single file holds the UNet, VAE and text encoders in the original LDM key names, and nothing else:
no configs, no tokenizer, no scheduler. prcore reads the architecture from the file's keys
(:func:`prcore.data.model_source.check_single_file`: SD 1.x, SD 2.x, SDXL), writes the
matching configs and the real CLIP tokenizers to a temporary folder
(:func:`prcore.method.architectures.write_config_folder`), and hands both to diffusers'
``from_single_file(..., config=folder, local_files_only=True)``, which converts the keys. Nothing is
downloaded, and nothing is guessed from the file's name.

Prediction type: SD 2.x comes as a 768 px v-prediction model (2.0-v / 2.1, the default) and a 512 px
epsilon model (2.x-base), with identical keys. As in A1111, a ``<name>.yaml`` beside the checkpoint
decides (``parameterization: "v"`` means v-prediction, absent means epsilon); without one SD 2.x is
read as v-prediction and SD 1.x / SDXL as epsilon.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from prcore.data.model_source import ModelSourceError, check_single_file
from prcore.method.architectures import write_config_folder
from prcore.method.families import ModelFamily, family_for_index

DEFAULT_PREDICTION = {"sd15": "epsilon", "sd21": "v_prediction", "sdxl": "epsilon"}
_MAX_YAML_BYTES = 1_000_000


def _find_key(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        if key in node:
            return node[key]
        for value in node.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def yaml_prediction_type(checkpoint: Path) -> str | None:
    """The prediction type an A1111-style ``<name>.yaml`` beside the checkpoint states, or None
    when there is no such file. ``model.params.parameterization: "v"`` -> ``"v_prediction"``."""
    import yaml

    path = checkpoint.with_suffix(".yaml")
    if not path.is_file():
        return None
    if path.stat().st_size > _MAX_YAML_BYTES:
        raise ModelSourceError(f"{path}: larger than {_MAX_YAML_BYTES} bytes; not a model config")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as exc:
        raise ModelSourceError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix it or remove it") from None
    return "v_prediction" if _find_key(config, "parameterization") == "v" else "epsilon"


def describe(path: str | Path) -> tuple[str, str]:
    """``(architecture, prediction_type)`` of a single-file checkpoint, from its header and yaml."""
    path = Path(path)
    arch = check_single_file(path)
    return arch, yaml_prediction_type(path) or DEFAULT_PREDICTION[arch]


def load_single_file(path: str | Path, *, torch_dtype: torch.dtype) -> tuple[Any, ModelFamily]:
    """The pipeline in a single-file checkpoint (weights in ``torch_dtype``) and its family."""
    path = Path(path).expanduser()
    arch, prediction_type = describe(path)
    with tempfile.TemporaryDirectory(prefix="prcore-single-file-") as folder:
        write_config_folder(arch, folder, prediction_type=prediction_type)
        family = family_for_index(json.loads((Path(folder) / "model_index.json").read_text()))
        pipe = family.pipeline_class().from_single_file(str(path), config=folder, local_files_only=True,
                                                         torch_dtype=torch_dtype, **family.load_kwargs())
    pipe._prcore_single_file = {"architecture": arch, "prediction_type": prediction_type}
    return pipe, family
