"""Which LoRA adapter each batch row sees: per-sample routing for peft LoRA layers.

peft's LoRA layers accept ``adapter_names=[...]`` (one name per batch row) and then apply each
adapter to its rows (``LoraLayer._mixed_batch_forward``), but they index the rows with Python lists:
two host-to-device copies, each a stream synchronisation, in every LoRA layer of every forward (on
an H200 that made SD 1.5's guided sampling 2.1x diffusers' CFG instead of ~1.25x: the GPU idles
while the CPU waits). :func:`per_sample_adapters` routes by slices instead: the sampler lays a
step's rows out in blocks (e_u rows, e_c rows, e_p rows; one request's images together), so each
adapter covers a few runs of consecutive rows, worked out once per layout in plain Python. Each LoRA
layer runs its base layer (adapters disabled) and a forward hook adds, on each run's slice,
``lora_B(lora_A(x[run])) * scaling`` in place: no index tensors, no synchronisation, static shapes,
the LoRA computed only on its own rows, and ``set_adapters`` weights (peft's ``scaling``) still apply.

Per-sample routing does not handle merged (``fuse_lora``) layers or DoRA and other peft LoRA
variants; :func:`mixed_batch_blocker` says why, and the sampler then falls back to one UNet call per adapter
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


def has_adapter(module: nn.Module, name: str) -> bool:
    """Whether peft holds an adapter ``name`` in ``module`` (its config: no walk over the layers)."""
    return bool(getattr(module, "_hf_peft_config_loaded", False)) and name in module.peft_config


def loaded_adapters(pipe) -> set[str]:
    """Names of the LoRA adapters loaded anywhere in a pipeline (its family's ``lora_components``)."""
    from prcore.method.families import family_of

    names: set[str] = set()
    for attr in family_of(pipe).lora_components:
        names |= adapter_names_of(getattr(pipe, attr, None))
    return names


def mixed_batch_blocker(module: nn.Module, adapter_names: Sequence[str]) -> str | None:
    """Why per-sample ``adapter_names`` cannot be used on ``module`` right now, or None if they can.

    Not for merged layers (``fuse_lora`` / ``merge_adapter``), nor for DoRA or another peft LoRA
    variant (the routing hook computes plain LoRA: ``lora_B(lora_A(x)) * scaling``).
    """
    wanted = {n for n in adapter_names if n != BASE}
    for layer in lora_layers(module):
        if layer.merged:
            return f"LoRA layers are merged/fused ({', '.join(layer.merged_adapters)})"
        for name in wanted:
            if layer.use_dora.get(name, False):
                return f"adapter {name!r} uses DoRA"
            if name in getattr(layer, "lora_variant", {}):
                return f"adapter {name!r} is a {type(layer.lora_variant[name]).__name__} (a LoRA variant)"
    return None


class Routing:
    """The adapter of each row of the next forward; ``names`` may be replaced between forwards
    (e.g. for each chunk of a batch split to bound memory)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._runs: dict[tuple[str, ...], list[tuple[str, int, int]]] = {}

    def runs(self) -> list[tuple[str, int, int]]:
        """``(adapter, start, stop)`` for each run of consecutive rows with one adapter (``"__base__"``
        runs left out), worked out once per layout: plain Python, nothing on the device."""
        key = tuple(self.names)
        if key not in self._runs:
            found: list[tuple[str, int, int]] = []
            for i, name in enumerate(key):
                if found and found[-1][0] == name and found[-1][2] == i:
                    found[-1] = (name, found[-1][1], i + 1)
                elif name != BASE:
                    found.append((name, i, i + 1))
            self._runs[key] = found
        return self._runs[key]


def _add_routed_lora(layer, args, kwargs, output, *, routing: Routing):
    """Forward hook: ``output`` (the base layer's, adapters disabled) plus, on each run of rows, its
    adapter's ``lora_B(lora_A(x)) * scaling`` (added in place on that slice of the batch)."""
    x = args[0] if args else next(iter(kwargs.values()))
    if len(routing.names) != x.shape[0]:
        raise ValueError(f"routing has {len(routing.names)} adapter names for a batch of {x.shape[0]} rows")
    for name, start, stop in routing.runs():
        if name not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        hidden = lora_a(layer.lora_dropout[name](x[start:stop].to(lora_a.weight.dtype)))
        delta = lora_b(hidden.to(lora_b.weight.dtype))  # A and B may differ (an fp32 B on bf16 weights)
        output[start:stop].add_(delta.to(output.dtype), alpha=layer.scaling[name])
    return output


@contextmanager
def per_sample_adapters(module: nn.Module, adapter_names: Sequence[str]) -> Iterator[Routing]:
    """Within the block, row i of every forward through ``module`` uses adapter ``adapter_names[i]``
    (or ``routing.names[i]`` after the caller replaced them: the yielded :class:`Routing`).

    ``"__base__"`` means no adapter. peft's own adapter computation is switched off for the duration
    (the hook adds the routed ones) and the previous state is restored afterwards. Active-adapter
    lists and adapter scales are not touched, so this composes with ``set_adapters`` weights.
    """
    routing = Routing(adapter_names)
    layers = lora_layers(module)
    handles = []
    disabled = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            if layer.merged:
                raise ValueError("per-row LoRA routing needs unmerged LoRA layers (unfuse_lora first)")
            layer._disable_adapters = True  # set directly: peft's forward is then the base layer's
            handles.append(layer.register_forward_hook(partial(_add_routed_lora, routing=routing), with_kwargs=True))
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
