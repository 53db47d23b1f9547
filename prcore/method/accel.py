"""Speed options for a loaded pipeline's denoiser, for GPUs: memory format, compilation, attention kernel.
The family applies each (:mod:`prcore.method.families`).

    channels_last   UNet weights and activations in NHWC (``torch.channels_last``): tensor cores'
                    preferred layout for convolutions; same results up to rounding (a transformer
                    such as SD3's has no convolutions past its patch embedding: no change)
    compile         ``denoiser.compile()`` (``torch.compile`` in place, so peft can still inject and
                    remove LoRA layers: the per-subject adapters and the per-row routing make
                    dynamo recompile on the first call after each change, then reuse the graph);
                    ``compile_backend`` is torch.compile's backend ("inductor", the default and the
                    one that speeds things up; "aot_eager" traces the same graph without code
                    generation: for debugging a graph break or a guard)
    attention       "sdpa" (``torch.nn.functional.scaled_dot_product_attention``: diffusers' default
                    on torch 2, FlashAttention / memory-efficient kernels on CUDA) or "classic"
                    (explicit softmax(QK^T)V, for comparison only; UNet families only)

All default off / "sdpa", which is what ``from_pretrained`` gives. ``configure_denoiser`` is idempotent
on a cached pipeline and records what it applied (``pipe._prcore_accel``), which the sidecar's
``worker`` and the GPU suite report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from prcore.method.families import family_of

ATTENTION_KERNELS = ("sdpa", "classic")


@dataclass(frozen=True)
class DenoiserOptions:
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    attention: Literal["sdpa", "classic"] = "sdpa"


def options_in_use(pipe: Any) -> dict[str, Any] | None:
    """What :func:`configure_denoiser` applied to ``pipe``, or None when nothing differs from the defaults."""
    applied = getattr(pipe, "_prcore_accel", None)
    return applied if applied and applied != asdict(DenoiserOptions()) else None


def configure_denoiser(pipe: Any, options: DenoiserOptions) -> dict[str, Any]:
    """Apply ``options`` to the pipeline's denoiser (once per pipeline object) and return what is applied."""
    if options.attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention {options.attention!r}: use one of {', '.join(ATTENTION_KERNELS)}")
    applied = getattr(pipe, "_prcore_accel", None)
    wanted = asdict(options)
    if applied == wanted:
        return applied
    if applied is not None and applied.get("compile") and not options.compile:
        raise ValueError("this cached pipeline's denoiser is compiled; load the model again (cache=False) to run it uncompiled")
    family = family_of(pipe)
    family.set_channels_last(pipe, options.channels_last)
    family.set_attention(pipe, options.attention)
    if options.compile and not (applied or {}).get("compile"):
        family.denoiser(pipe).compile(backend=options.compile_backend)
    pipe._prcore_accel = wanted
    return wanted
