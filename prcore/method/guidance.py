"""Parallel-rescaled consistency guidance (arXiv 2506.00607) as small pure tensor functions.

Three noise predictions at the same latent x_t and timestep t:

    e_u  pretrained model, negative/empty prompt
    e_c  pretrained model, base prompt ("a dog on the beach")
    e_p  fine-tuned model (LoRA on), personal prompt ("a sks dog on the beach")

    g_cfg = e_c - e_u
    g_cg  = e_p - e_c
    g_par = <g_cg, g_cfg> / (||g_cfg||^2 + tiny) * g_cfg      (per sample)
    g_ort = g_cg - g_par
    e_hat = e_u + w_cfg * g_cfg + w_cg * (g_ort + eta * g_par)

Each mode of ``prcore.data.schema.GUIDANCE_MODES`` is a :class:`Mode` in :data:`MODES`: the UNet
rows it needs and the pure function that combines their predictions. A new mode is one function
and one entry here (and its name in the schema).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from prcore.data.schema import GUIDANCE_MODES

# Added to ||direction||^2 so a zero direction yields a zero parallel part instead of NaN.
TINY = 1e-12


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def decompose(g: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``g`` into its part parallel to ``direction`` and the orthogonal rest, per sample.

        parallel   = <g, d> / (||d||^2 + tiny) * d
        orthogonal = g - parallel

    Dim 0 is the batch; inner products and norms run over all other dims, in float32 (float64 for
    float64 inputs) whatever the input dtype. Both parts come back in ``g``'s dtype.
    """
    if g.shape != direction.shape:
        raise ValueError(f"g and direction must have the same shape, got {tuple(g.shape)} and {tuple(direction.shape)}")
    acc = _accumulation_dtype(g.dtype)
    g32 = g.to(acc)
    d32 = direction.to(acc)
    dims = tuple(range(1, g.ndim))
    dot = (g32 * d32).sum(dim=dims, keepdim=True)
    norm_sq = (d32 * d32).sum(dim=dims, keepdim=True)
    parallel = dot / (norm_sq + TINY) * d32
    orthogonal = g32 - parallel
    return parallel.to(g.dtype), orthogonal.to(g.dtype)


def cfg(eps_uncond: Tensor, eps_cond: Tensor, *, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: ``e_u + w_cfg * (e_c - e_u)``."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def parallel_rescaled(
    eps_uncond: Tensor,
    eps_cond: Tensor,
    eps_personal: Tensor,
    *,
    guidance_scale: float,
    consistency_scale: float,
    parallel_scale: float,
) -> Tensor:
    """Parallel-rescaled consistency guidance.

        g_cfg = e_c - e_u,  g_cg = e_p - e_c,  (g_par, g_ort) = decompose(g_cg, g_cfg)
        e_hat = e_u + w_cfg * g_cfg + w_cg * (g_ort + eta * g_par)

    with ``w_cfg = guidance_scale``, ``w_cg = consistency_scale`` and ``eta = parallel_scale``.
    ``parallel_scale = 1`` is DCO's consistency guidance, ``consistency_scale = 0`` plain CFG.
    Computed in float32 (or wider); returned in the inputs' dtype.
    """
    acc = _accumulation_dtype(eps_uncond.dtype)
    e_u, e_c, e_p = (e.to(acc) for e in (eps_uncond, eps_cond, eps_personal))
    g_cfg = e_c - e_u
    g_cg = e_p - e_c
    g_par, g_ort = decompose(g_cg, g_cfg)
    e_hat = e_u + guidance_scale * g_cfg + consistency_scale * (g_ort + parallel_scale * g_par)
    return e_hat.to(eps_uncond.dtype)


def consistency(eps_uncond: Tensor, eps_cond: Tensor, eps_personal: Tensor, *, guidance_scale: float, consistency_scale: float) -> Tensor:
    """DCO consistency guidance: ``e_u + w_cfg * (e_c - e_u) + w_cg * (e_p - e_c)``."""
    acc = _accumulation_dtype(eps_uncond.dtype)
    e_u, e_c, e_p = (e.to(acc) for e in (eps_uncond, eps_cond, eps_personal))
    return (e_u + guidance_scale * (e_c - e_u) + consistency_scale * (e_p - e_c)).to(eps_uncond.dtype)


def parallel_fraction(eps_uncond: Tensor, eps_cond: Tensor, eps_personal: Tensor) -> Tensor:
    """Per-sample cosine between g_cg and g_cfg: how much of the consistency signal lies along CFG.

    A diagnostic for logs and benchmarks, not used by the update itself.
    """
    acc = _accumulation_dtype(eps_uncond.dtype)
    g_cfg = (eps_cond.to(acc) - eps_uncond.to(acc)).flatten(1)
    g_cg = (eps_personal.to(acc) - eps_cond.to(acc)).flatten(1)
    return torch.nn.functional.cosine_similarity(g_cg, g_cfg, dim=1, eps=1e-12)


@dataclass(frozen=True)
class Mode:
    """A guidance mode: the UNet rows of each step and how their predictions combine.

    ``rows``: (prompt, LoRA on) per row group, prompt one of "negative", "base", "personal".
    ``combine(*predictions, guidance_scale=, consistency_scale=, parallel_scale=)``: the noise estimate.
    ``outside``: the cheaper mode used outside the consistency window (None: the mode has no window).
    """

    rows: tuple[tuple[str, bool], ...]
    combine: Callable[..., Tensor]
    outside: Mode | None = None


def _cfg_rows(e_uncond: Tensor, e_cond: Tensor, *, guidance_scale: float, **_: float) -> Tensor:
    return cfg(e_uncond, e_cond, guidance_scale=guidance_scale)


def _consistency_rows(e_u: Tensor, e_c: Tensor, e_p: Tensor, *, guidance_scale: float, consistency_scale: float, **_: float) -> Tensor:
    return consistency(e_u, e_c, e_p, guidance_scale=guidance_scale, consistency_scale=consistency_scale)


_THREE = (("negative", False), ("base", False), ("personal", True))
# Outside the consistency window: two rows, CFG of the fine-tuned model on the personal prompt
# against the pretrained model's negative prompt, e_u + w_cfg * (e_p - e_u): the subject (LoRA) and
# the prompt stay in the estimate, only the consistency term (e_c) is dropped.
PERSONAL_CFG = Mode((("negative", False), ("personal", True)), _cfg_rows)
MODES: dict[str, Mode] = {
    "parallel_rescaled": Mode(_THREE, parallel_rescaled, PERSONAL_CFG),
    "consistency": Mode(_THREE, _consistency_rows, PERSONAL_CFG),
    "cfg": Mode((("negative", True), ("personal", True)), _cfg_rows),  # the fine-tuned model alone: DreamBooth
    "pretrained": Mode((("negative", False), ("base", False)), _cfg_rows),  # the base model, no subject
}
assert tuple(MODES) == GUIDANCE_MODES, "prcore.data.schema.GUIDANCE_MODES and guidance.MODES must name the same modes"


def in_window(step: int, steps: int, start: float, stop: float) -> bool:
    """Whether denoising step ``step`` of ``steps`` (0 = the noisiest) lies in the consistency window
    ``[start, stop)``, fractions of the schedule: ``start <= step / steps < stop``."""
    return start <= step / steps < stop
