"""Noise schedulers by name, built from the pipeline's own scheduler config.

Each call returns a fresh scheduler, so a sampling run never changes ``pipe.scheduler`` and
multi-step solvers (DPM-Solver++) start with empty history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prcore.data.schema import SCHEDULER_NAMES, scheduler_key

# name (prcore.data.schema.SCHEDULER_NAMES, the one list of names) -> (diffusers class name, config overrides)
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}

assert tuple(_SCHEDULERS) == SCHEDULER_NAMES, "every scheduler name needs its diffusers class here"


class UnknownSchedulerError(ValueError):
    """A scheduler name that is not in :data:`SCHEDULER_NAMES`."""


def make_scheduler(name: str | None, base_config: Any) -> Any:
    """A new scheduler ``name`` configured like ``base_config`` (``pipe.scheduler.config``).

    ``name=None`` gives a fresh copy of the pipeline's own scheduler class. Names: ddim, euler,
    euler_ancestral, dpmpp_2m (DPM-Solver++ 2M), dpmpp_2m_karras, unipc, pndm.
    """
    import diffusers

    if name is None:
        cls = getattr(diffusers, base_config["_class_name"]) if "_class_name" in base_config else None
        if cls is None:
            raise UnknownSchedulerError("the pipeline's scheduler config has no _class_name; pass scheduler=<name>")
        return cls.from_config(base_config)
    key = scheduler_key(name)
    if key not in _SCHEDULERS:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    class_name, overrides = _SCHEDULERS[key]
    cls: Callable = getattr(diffusers, class_name)
    return cls.from_config(base_config, **overrides)
