"""Single-file checkpoints (the A1111 / civitai ``model.safetensors`` layout, and SD 3 / 3.5 files as
Stability and ComfyUI publish them), loaded offline.

A single file holds the UNet, VAE and text encoders in the original LDM key names, and nothing else:
no configs, no tokenizer, no scheduler. prcore reads the architecture from the file's keys
(:func:`prcore.data.model_source.check_single_file`: SD 1.x, SD 2.x, SDXL, SD 3 Medium, SD 3.5 Medium /
Large), writes the
matching configs and the real CLIP tokenizers to a temporary folder
(:func:`prcore.method.architectures.write_config_folder`), and hands both to diffusers'
``from_single_file(..., config=folder, local_files_only=True)``, which converts the keys. Nothing is
downloaded, and nothing is guessed from the file's name.

Prediction type: SD 2.x comes as a 768 px v-prediction model (2.0-v / 2.1, the default) and a 512 px
epsilon model (2.x-base), with identical keys. As in A1111, a ``<name>.yaml`` beside the checkpoint
decides (``parameterization: "v"`` means v-prediction, absent means epsilon); without one SD 2.x is
read as v-prediction and SD 1.x / SDXL as epsilon. SD 3 / 3.5 are flow-matching models (no prediction
type: ``describe`` gives ``"flow_matching"``).

SD 3 / 3.5: the transformer's depth and width are checked against the published architecture the keys
name before anything loads. T5-XXL is optional: a file without it (``text_encoder_3=None``) runs on the
CLIP encoders alone. A file with it still loads without it unless a T5 tokenizer is at hand, because a
single file carries no tokenizer and prcore carries no T5 vocabulary (a config folder beside the file can
bring one, below); the message says so. CLIP-L's projection loads as the identity (SD3 conditions on the
unprojected pooled output, as diffusers' loader and ComfyUI read it).

A diffusers config folder beside the file, named ``<file stem>.config`` (``model_index.json``, component
configs, tokenizers, no weights), replaces the published configs: for a checkpoint of an architecture
prcore does not know (the tests' tiny models), or to bring SD3's T5 tokenizer (``tokenizer_3/``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from prcore.data.model_source import (
    ARCHITECTURE_NAMES,
    CONFIG_FOLDER_SUFFIX,
    LDM_UNET_PREFIX,
    ModelSourceError,
    check_single_file,
    safetensors_keys,
    sd3_depth,
)
from prcore.method.architectures import SD3_ARCHITECTURES, architecture, write_config_folder
from prcore.method.families import ModelFamily, family_for_index

DEFAULT_PREDICTION = {"sd15": "epsilon", "sd21": "v_prediction", "sdxl": "epsilon", **dict.fromkeys(SD3_ARCHITECTURES, "flow_matching")}
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
    """``(architecture, prediction_type)`` of a single-file checkpoint, from its header and yaml
    (``"flow_matching"`` for SD 3 / 3.5)."""
    path = Path(path)
    arch = check_single_file(path)
    if arch in SD3_ARCHITECTURES:
        return arch, DEFAULT_PREDICTION[arch]
    return arch, yaml_prediction_type(path) or DEFAULT_PREDICTION[arch]


def config_folder_beside(path: Path) -> Path | None:
    """The diffusers config folder ``<stem>.config`` beside a checkpoint, or None when there is none."""
    folder = path.with_name(path.stem + CONFIG_FOLDER_SUFFIX)
    if not folder.is_dir():
        return None
    if not (folder / "model_index.json").is_file():
        raise ModelSourceError(f"{folder} has no model_index.json: a config folder beside a checkpoint is a diffusers "
                               "pipeline folder (configs and tokenizers); fix it or remove it")
    return folder


def check_sd3_shape(path: Path, arch: str, entries: dict[str, dict]) -> None:
    """Refuse an SD 3 / 3.5 file whose transformer is not the published one its keys name (depth, width)."""
    config = architecture(arch)["transformer"]
    depth = sd3_depth(entries)
    context = entries.get(LDM_UNET_PREFIX + "context_embedder.weight", {}).get("shape")
    width = int(context[0]) if context else None
    if (depth, width) != (config["num_layers"], config["caption_projection_dim"]):
        raise ModelSourceError(
            f"{path}: its transformer has {depth} blocks of width {width}; {ARCHITECTURE_NAMES[arch]} has "
            f"{config['num_layers']} of {config['caption_projection_dim']}. For another architecture put its diffusers "
            f"config folder beside the file as {path.stem}{CONFIG_FOLDER_SUFFIX}/")


def load_single_file(path: str | Path, *, torch_dtype: torch.dtype) -> tuple[Any, ModelFamily]:
    """The pipeline in a single-file checkpoint (weights in ``torch_dtype``) and its family."""
    path = Path(path).expanduser()
    arch, prediction_type = describe(path)
    entries = safetensors_keys(path)
    beside = config_folder_beside(path)
    if arch in SD3_ARCHITECTURES and beside is None:
        check_sd3_shape(path, arch, entries)
    with tempfile.TemporaryDirectory(prefix="prcore-single-file-") as tmp:
        folder = beside or write_config_folder(arch, tmp, prediction_type=None if arch in SD3_ARCHITECTURES else prediction_type)
        index = json.loads((Path(folder) / "model_index.json").read_text())
        family = family_for_index(index)
        pipe = family.pipeline_class().from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=torch_dtype,
                                                         **family.single_file_kwargs(path, entries, index))
    family.finish_single_file(pipe)
    pipe._prcore_single_file = {"architecture": arch, "prediction_type": prediction_type}
    return pipe, family
