"""A subject's LoRA folder: save, load, unload (training and sampling share this module).

The folder (file names: ``prcore.store.keys``) holds the denoiser's adapter in diffusers' file layout
(``pytorch_lora_weights.safetensors``: peft's own keys under the denoiser's component prefix,
``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``transformer.`` for SD3), exactly as
diffusers' ``save_lora_weights`` writes a peft adapter, with the peft LoRA config in its metadata so
alpha != rank reloads exactly), the same LoRA in the layout ComfyUI and A1111 load
(``lora_kohya.safetensors``: for SD ``lora_unet_<module path>.lora_down/lora_up/alpha``, with the
kohya metadata A1111 reads; for SD3 the family's layout), an optional learned identifier embedding in the family's textual-inversion
layout (``learned_embeds.safetensors``) and in the web UIs' embedding layout
(``embedding_webui.safetensors``), and ``training.json`` (the record, written last).

One key layout for every ``target_modules`` set: diffusers' ``convert_state_dict_to_diffusers``
renames only the attention projections (``to_q.lora.down``), and a file mixing both layouts loses
every attention module on reload (diffusers picks one layout from the first key). Files of earlier
prcore versions (attention targets only, all keys ``.lora.down`` / ``.lora.up``) still load whole.
:func:`load_subject_lora` checks that every module of the file received the adapter and refuses the
file otherwise. Weights load from safetensors only; nothing is read from outside the folder.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prcore.method.adapters import has_adapter, loaded_adapters, lora_layers
from prcore.method.families import ModelFamily, family_named, family_of
from prcore.store.keys import (
    LORA_EMBEDDINGS_FILE,
    LORA_KOHYA_FILE,
    LORA_RECORD_FILE,
    LORA_WEBUI_EMBEDDING_FILE,
    LORA_WEIGHTS_FILE,
)


def read_training_record(lora_dir: str | Path) -> dict[str, Any] | None:
    """The folder's ``training.json``, or None when there is none."""
    path = Path(lora_dir) / LORA_RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class LoraMismatchError(ValueError):
    """A LoRA file whose modules do not all apply to the pipeline (e.g. trained for another base model)."""


def lora_state_dict(denoiser, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's keys (``<module path>.lora_A.weight``; fp32, CPU, contiguous):
    one layout for every target module, which ``save_lora_weights`` prefixes with the denoiser's
    component name (``unet.``, ``transformer.``)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_lora(pipe, folder: str | Path, adapter_name: str) -> None:
    """Write the denoiser's adapter as ``pytorch_lora_weights.safetensors`` (diffusers layout, its LoRA
    config as metadata) and as ``lora_kohya.safetensors`` (the layout ComfyUI / A1111 load for the
    family: :meth:`prcore.method.families.ModelFamily.webui_lora`)."""
    from safetensors.torch import save_file

    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    config = denoiser.peft_config[adapter_name]
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata.get("target_modules") or [])
    state = lora_state_dict(denoiser, adapter_name)
    type(pipe).save_lora_weights(folder, **family.save_lora_kwargs(state, metadata), weight_name=LORA_WEIGHTS_FILE,
                                 safe_serialization=True)
    save_file(family.webui_lora(state, float(config.lora_alpha)), str(Path(folder) / LORA_KOHYA_FILE),
              metadata=kohya_metadata(pipe, config))


def kohya_metadata(pipe, config) -> dict[str, str]:
    """The kohya file's metadata as kohya's sd-scripts write it: network module, dim (rank), alpha,
    and the base model (``ss_base_model_version``, ``ss_v2``; decided by the model family)."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(int(config.r)), "ss_network_alpha": str(float(config.lora_alpha)),
            **family_of(pipe).kohya_base_metadata(pipe)}


def save_embeddings(family: ModelFamily, folder: Path, rows: Sequence[torch.Tensor], token: str) -> dict[str, Any]:
    """A learned token's embedding rows (one per text encoder) in the family's textual-inversion
    layout (SD: ``{token: (1, d)}``, loadable by ``pipe.load_textual_inversion(file)``; SDXL:
    ``{"clip_l": (1, d1), "clip_g": (1, d2)}``); returns the record's ``learned_embeddings`` entry."""
    from safetensors.torch import save_file

    rows = [r.detach().to("cpu", torch.float32).reshape(1, -1).contiguous() for r in rows]
    layout, tensors = family.embedding_layout(rows, token)
    save_file(tensors, str(folder / LORA_EMBEDDINGS_FILE), metadata={"token": token})
    save_file(family.webui_embedding(rows), str(folder / LORA_WEBUI_EMBEDDING_FILE), metadata={"token": token})
    return {"file": LORA_EMBEDDINGS_FILE, "webui_file": LORA_WEBUI_EMBEDDING_FILE, "tokens": [token], "layout": layout}


def _loaded_tokens(pipe) -> dict[str, list[str]]:
    registry = getattr(pipe, "_prcore_lora_tokens", None)
    if registry is None:
        registry = {}
        pipe._prcore_lora_tokens = registry
    return registry


def mixes_key_layouts(keys) -> bool:
    """Whether LoRA tensor ``keys`` mix peft's (``lora_A``/``lora_B``) and diffusers' (``lora.down``/``lora.up``)
    layouts, as prcore wrote non-attention targets before: diffusers then drops one of them on load."""
    keys = list(keys)
    return any(".lora_A." in k for k in keys) and any(".lora.down." in k for k in keys)


def weights_file_problem(path: str | Path) -> str | None:
    """Why a diffusers-layout LoRA file cannot load whole, from its header alone (no tensor read), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        return f"{Path(path).name} does not read as safetensors ({type(exc).__name__})"
    if mixes_key_layouts(keys):
        return f"{Path(path).name} mixes two LoRA key layouts (written by an earlier prcore): it cannot load whole"
    return None


def _mismatch_hint(keys) -> str:
    """What to do about a file whose modules do not all apply: a file mixing peft's and diffusers' key
    layouts (earlier prcore versions, non-attention targets) is rewritten by training again."""
    if mixes_key_layouts(keys):
        return ("the file mixes two key layouts (peft's lora_A/lora_B and diffusers' lora.down/lora.up, as prcore wrote "
                "LoRAs with non-attention target modules before), which diffusers cannot load whole: delete the LoRA "
                "folder and train the subject again")
    return _MISMATCH_HINT


def _load_weights(pipe, lora_dir: Path, adapter_name: str) -> tuple[dict[str, set[str]], str]:
    """Load the folder's diffusers-layout file as ``adapter_name``; return the modules the file holds
    (what diffusers reads from it, by component) and what to do if they do not all apply."""
    from diffusers.utils import logging as diffusers_logging

    weights = lora_dir / LORA_WEIGHTS_FILE
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # silence "no LoRA keys for the text encoder": we train the denoiser only
    try:
        with warnings.catch_warnings():  # peft's config / state-dict "inconsistency": _check_applied refuses it as one error
            warnings.filterwarnings("ignore", message="While injecting the PEFT adapters", category=RuntimeWarning)
            state = pipe.lora_state_dict(str(lora_dir), weight_name=LORA_WEIGHTS_FILE, use_safetensors=True)
            state = state[0] if isinstance(state, tuple) else state  # (state, alphas) for UNet pipelines; SD3: the state
            expected, hint = file_lora_modules(state, family_of(pipe).lora_components), _mismatch_hint(state)
            try:
                pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS_FILE, adapter_name=adapter_name, use_safetensors=True)
            except RuntimeError as exc:
                if "size mismatch" not in str(exc):
                    raise
                raise LoraMismatchError(f"{weights}: its LoRA shapes do not fit this pipeline's modules; {hint}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return expected, hint


def load_subject_lora(pipe, lora_dir: str | Path, adapter_name: str) -> None:
    """Load a trained subject LoRA (and its learned token embedding, if any) as ``adapter_name``.

    Does nothing if an adapter of that name is already loaded. Weights load from safetensors only.
    Raises :class:`LoraMismatchError` (nothing left loaded) unless every LoRA module of the file
    applies to the pipeline.
    """
    lora_dir = Path(lora_dir)
    denoiser = family_of(pipe).denoiser(pipe)
    if has_adapter(denoiser, adapter_name):
        return
    weights = lora_dir / LORA_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no LoRA at {lora_dir}: {LORA_WEIGHTS_FILE} is missing (train the subject first)")
    record = read_training_record(lora_dir) or {}
    learned = record.get("learned_embeddings")
    if learned and learned.get("file") != LORA_EMBEDDINGS_FILE:
        raise ValueError(f"{lora_dir / LORA_RECORD_FILE} names embedding file {learned.get('file')!r}; only {LORA_EMBEDDINGS_FILE} inside the folder is read")
    expected, hint = _load_weights(pipe, lora_dir, adapter_name)
    _check_applied(pipe, weights, expected, adapter_name, hint)
    if learned:
        from safetensors.torch import load_file

        tokens = list(learned["tokens"])
        family = family_named(learned.get("layout", family_of(pipe).name))
        rows = family.embedding_rows(load_file(str(lora_dir / LORA_EMBEDDINGS_FILE)), tokens[0])
        try:
            for (tok, enc), row in zip(family.text_pairs(pipe), rows, strict=True):
                pipe.load_textual_inversion(row, token=tokens[0], text_encoder=enc, tokenizer=tok)
        except ValueError:
            pipe.delete_adapters(adapter_name)
            raise
        _loaded_tokens(pipe)[adapter_name] = tokens


_MISMATCH_HINT = ("it was probably trained for another base model (family or architecture): sample with the model it "
                  "was trained on, or train the subject again for this one")
_OLD_ATTENTION_NAMES = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def _module_of(key: str) -> str:
    """The module path a LoRA tensor key belongs to, in any layout diffusers reads: peft
    (``m.lora_A.weight``), diffusers (``m.lora.down.weight``, ``m.lora_linear_layer.up.weight``) and
    attention processors (``...attn1.processor.to_q_lora.down.weight``)."""
    key = key.replace(".processor.", ".")
    for marker in (".lora_A", ".lora_B", ".lora_magnitude_vector", ".lora.", ".lora_linear_layer"):
        if marker in key:
            return key[: key.index(marker)]
    module, _, leaf = key.rsplit(".", 2)[0].rpartition(".")
    return f"{module}.{_OLD_ATTENTION_NAMES[leaf]}" if leaf in _OLD_ATTENTION_NAMES else key


def file_lora_modules(state: dict[str, Any], components: Sequence[str]) -> dict[str, set[str]]:
    """The LoRA modules a diffusers-layout state dict holds, by pipeline component (``components``: the
    family's, e.g. ``unet``, ``text_encoder``, ``text_encoder_2``; keys under any other prefix go to ``""``)."""
    out: dict[str, set[str]] = {}
    for key in state:
        component, _, rest = key.partition(".")
        if component not in components:
            component, rest = "", key
        out.setdefault(component, set()).add(_module_of(rest))
    return out


def injected_modules(module, adapter_name: str) -> set[str]:
    """Paths of ``module``'s LoRA layers that hold adapter ``adapter_name``."""
    layers = {id(m) for m in lora_layers(module)}
    return {name for name, m in module.named_modules() if id(m) in layers and adapter_name in m.lora_A}


def _check_applied(pipe, weights: Path, expected: dict[str, set[str]], adapter_name: str, hint: str) -> None:
    """Refuse (and unload) an adapter unless every module of the file received it, and nothing else did."""
    missing: list[str] = []
    extra: list[str] = []
    for component in sorted(set(expected) | set(family_of(pipe).lora_components)):
        module = getattr(pipe, component, None) if component else None
        got = injected_modules(module, adapter_name) if module is not None else set()
        want = expected.get(component, set())
        missing += [f"{component}.{m}" if component else m for m in sorted(want - got)]
        extra += [f"{component}.{m}" for m in sorted(got - want)]
    if not missing and not extra:
        return
    if adapter_name in loaded_adapters(pipe):
        pipe.delete_adapters(adapter_name)
    total = sum(len(v) for v in expected.values())
    parts = [f"{len(missing)} of its {total} LoRA modules did not apply to this {type(pipe).__name__}"] if missing else []
    if extra:
        parts.append(f"{len(extra)} modules received an adapter the file holds no weights for")
    what = " and ".join(parts)
    example = (missing or extra)[0]
    raise LoraMismatchError(f"{weights}: {what} (e.g. {example}); {hint}")


def unload_subject_lora(pipe, adapter_name: str) -> None:
    """Remove a subject's adapter and its added tokens, leaving the base pipeline as before loading."""
    denoiser = family_of(pipe).denoiser(pipe)
    if has_adapter(denoiser, adapter_name):
        pipe.delete_adapters(adapter_name)
    tokens = _loaded_tokens(pipe).pop(adapter_name, [])
    for tok, te in family_of(pipe).text_pairs(pipe):
        if tokens:
            pipe.unload_textual_inversion(tokens=tokens, tokenizer=tok, text_encoder=te)
