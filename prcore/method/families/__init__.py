"""Model families: everything model-specific, one module per family (see :mod:`.base` for what a
family owns). The registry below is the one list of families; a pipeline, a ``model_index.json``
or a family name finds its family here.

=========  ===================================  ======================================================
name       module                               models
=========  ===================================  ======================================================
``sd3``    :mod:`.sd3`                          SD 3 Medium, SD 3.5 Medium / Large (MMDiT, flow matching)
``sdxl``   :mod:`.sdxl`                         SDXL base (UNet, epsilon)
``sd``     :mod:`.sd`                           SD 1.x (epsilon), SD 2.x (epsilon / v-prediction)
=========  ===================================  ======================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prcore.method.families.base import ModelFamily, TextCond, UnsupportedModelError
from prcore.method.families.sd import StableDiffusion
from prcore.method.families.sd3 import StableDiffusion3
from prcore.method.families.sdxl import StableDiffusionXL

FAMILIES: tuple[ModelFamily, ...] = (StableDiffusion3(), StableDiffusionXL(), StableDiffusion())
"""Every supported family, most specific first (a pipeline is matched against them in order)."""


def family_of(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family
    raise UnsupportedModelError(f"{type(pipe).__name__} is not a supported model family ({', '.join(f.name for f in FAMILIES)})")


def family_for_index(model_index: Mapping[str, Any]) -> ModelFamily:
    """The family a diffusers ``model_index.json`` describes."""
    for family in FAMILIES:
        if family.matches_index(model_index):
            return family
    raise UnsupportedModelError(
        f"pipeline class {model_index.get('_class_name')!r} is not supported; prcore runs "
        + ", ".join(f.pipeline_class_name for f in FAMILIES)
    )


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


__all__ = ["FAMILIES", "ModelFamily", "TextCond", "UnsupportedModelError", "family_for_index", "family_named", "family_of"]
