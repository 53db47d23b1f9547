"""Which LoRA adapter each batch row sees: per-sample routing for peft LoRA layers.

peft's LoRA layers accept ``adapter_names=[...]`` (one name per batch row, ``"__base__"`` for no
adapter) in their ``forward`` and then apply each adapter only to its rows
(``LoraLayer._mixed_batch_forward``). peft's own ``PeftModel`` passes that argument through
forward pre-hooks (``LoraModel._enable_peft_forward_hooks``); diffusers' UNet does not, so
:func:`per_sample_adapters` registers the same kind of pre-hook on the UNet's LoRA layers.

Per-sample routing cannot work on merged (``fuse_lora``) layers or DoRA adapters (peft raises);
:func:`mixed_batch_blocker` says why, and the sampler then falls back to one UNet call per adapter
group, switching the layers with :func:`use_adapter` inside :func:`adapter_state_preserved`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

from torch import nn

BASE = "__base__"


def lora_layers(module: nn.Module | None) -> list[nn.Module]:
    """The peft LoRA layers inside ``module`` (empty for None or a module without adapters)."""
    if module is None:
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def adapter_names_of(module: nn.Module | None) -> set[str]:
    """Names of the LoRA adapters loaded into ``module``."""
    names: set[str] = set()
    for layer in lora_layers(module):
        names |= set(layer.lora_A.keys()) | set(layer.lora_embedding_A.keys())
    return names


def loaded_adapters(pipe) -> set[str]:
    """Names of the LoRA adapters loaded anywhere in a pipeline (UNet and text encoders)."""
    names: set[str] = set()
    for attr in ("unet", "text_encoder", "text_encoder_2"):
        names |= adapter_names_of(getattr(pipe, attr, None))
    return names


def mixed_batch_blocker(module: nn.Module, adapter_names: Sequence[str]) -> str | None:
    """Why per-sample ``adapter_names`` cannot be used on ``module`` right now, or None if they can.

    peft refuses them for merged layers (``fuse_lora`` / ``merge_adapter``) and for DoRA adapters.
    """
    wanted = {n for n in adapter_names if n != BASE}
    for layer in lora_layers(module):
        if layer.merged:
            return f"LoRA layers are merged/fused ({', '.join(layer.merged_adapters)})"
        for name in wanted:
            if layer.use_dora.get(name, False):
                return f"adapter {name!r} uses DoRA"
    return None


class Routing:
    """The adapter of each row of the next forward; ``names`` may be replaced between forwards
    (e.g. for each chunk of a batch split to bound memory)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)


def _inject_adapter_names(module, args, kwargs, *, routing: Routing):
    kwargs["adapter_names"] = routing.names
    return args, kwargs


@contextmanager
def per_sample_adapters(module: nn.Module, adapter_names: Sequence[str]) -> Iterator[Routing]:
    """Within the block, row i of every forward through ``module`` uses adapter ``adapter_names[i]``
    (or ``routing.names[i]`` after the caller replaced them: the yielded :class:`Routing`).

    ``"__base__"`` means no adapter. Adapters are enabled for the duration (a disabled layer would
    ignore ``adapter_names``) and the previous state is restored afterwards. Active-adapter lists
    and adapter scales are not touched, so this composes with ``set_adapters`` weights.
    """
    routing = Routing(adapter_names)
    layers = lora_layers(module)
    handles = []
    disabled = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = False  # set directly: enable_adapters() would flip requires_grad
            handles.append(layer.register_forward_pre_hook(partial(_inject_adapter_names, routing=routing), with_kwargs=True))
        yield routing
    finally:
        for handle in handles:
            handle.remove()
        for layer, was_disabled in zip(layers, disabled, strict=True):
            layer._disable_adapters = was_disabled


def use_adapter(module: nn.Module | None, name: str) -> None:
    """Make every LoRA layer of ``module`` compute with adapter ``name`` only (``"__base__"``: none).

    Merged layers whose merged set differs from what is asked are unmerged first (peft would do it
    on its own for disabled layers); :func:`adapter_state_preserved` merges them back at the end.
    """
    for layer in lora_layers(module):
        want = set() if name == BASE else {name}
        if layer.merged and set(layer.merged_adapters) != want:
            layer.unmerge()
        if name == BASE:
            layer._disable_adapters = True
        else:
            layer._disable_adapters = False
            layer._active_adapter = [name]


@contextmanager
def adapter_state_preserved(*modules: nn.Module | None) -> Iterator[None]:
    """Restore each LoRA layer's active adapters, enabled flag and merged adapters on exit."""
    saved = []
    for module in modules:
        for layer in lora_layers(module):
            saved.append((layer, layer._active_adapter, layer._disable_adapters, list(layer.merged_adapters)))
    try:
        yield
    finally:
        for layer, active, disabled, merged in saved:
            layer._active_adapter = active
            layer._disable_adapters = disabled
            missing = [n for n in merged if n not in layer.merged_adapters]
            if missing:
                layer.merge(adapter_names=missing)
