"""Noise processes: how a training sample is noised, what the model learns to predict, how
timesteps are drawn and weighted, and how the sampler's scheduler is built and stepped.

Two processes cover the families prcore runs:

=========================  ===============================================  ==============================================
                           :class:`Diffusion` (SD 1.x/2.x, SDXL)            :class:`FlowMatching` (SD3.5)
=========================  ===============================================  ==============================================
noised sample              x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) e      x_s = (1 - s) x_0 + s e      (s: sigma in [0, 1])
model predicts (target)    e (epsilon) or v = sqrt(abar) e - sqrt(1-abar) x0  v = e - x_0   (velocity)
training timesteps         uniform integers in [0, T)                       s = shift(sigmoid(N(0, 1))): logit-normal, shifted
loss weights               1, or min-SNR-gamma                              1 (the logit-normal density is the weighting)
sampler scheduler          the model's own, or a named diffusers one        FlowMatchEulerDiscreteScheduler (``euler``)
model input at step t      ``scheduler.scale_model_input(x, t)``            x itself
initial latents            e * ``init_noise_sigma``                         e
=========================  ===============================================  ==============================================

The flow-matching recipe (logit-normal timesteps, ``noise - x_0`` target, uniform weights) is the
default of diffusers' SD3 DreamBooth LoRA script (``train_dreambooth_lora_sd3.py``,
``weighting_scheme="logit_normal"``), which follows the SD3 paper (arXiv 2403.03206, section 3.1).

Each :meth:`NoiseProcess.scheduler` call returns a fresh scheduler, so a sampling run never changes
``pipe.scheduler`` and multi-step solvers (DPM-Solver++) start with empty history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from prcore.data.schema import SCHEDULER_NAMES, TrainingInputError, scheduler_key
from prcore.method.families.errors import UnsupportedModelError


class UnknownSchedulerError(ValueError):
    """A scheduler name that is not in :data:`SCHEDULER_NAMES`, or one this noise process cannot step."""


# name (prcore.data.schema.SCHEDULER_NAMES, the one list of names) -> (diffusers class name, config overrides)
_DIFFUSION_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}

assert tuple(_DIFFUSION_SCHEDULERS) == SCHEDULER_NAMES, "every scheduler name needs its diffusers class here"

_FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {"euler": ("FlowMatchEulerDiscreteScheduler", {})}


def _build(table: Mapping[str, tuple[str, dict[str, Any]]], name: str | None, base_config: Any, what: str) -> Any:
    import diffusers

    if name is None:
        cls = getattr(diffusers, base_config["_class_name"]) if "_class_name" in base_config else None
        if cls is None:
            raise UnknownSchedulerError("the pipeline's scheduler config has no _class_name; pass scheduler=<name>")
        return cls.from_config(base_config)
    key = scheduler_key(name)
    if key not in table:
        if key in SCHEDULER_NAMES:
            raise UnknownSchedulerError(f"scheduler {name!r} cannot sample a {what} model; choose one of: {', '.join(table)}")
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; choose one of: {', '.join(table)}")
    class_name, overrides = table[key]
    cls: Callable = getattr(diffusers, class_name)
    return cls.from_config(base_config, **overrides)


def make_scheduler(name: str | None, base_config: Any) -> Any:
    """A new diffusion scheduler ``name`` configured like ``base_config`` (``pipe.scheduler.config``).

    ``name=None`` gives a fresh copy of the pipeline's own scheduler class. Names: ddim, euler,
    euler_ancestral, dpmpp_2m (DPM-Solver++ 2M), dpmpp_2m_karras, unipc, pndm.
    """
    return _build(_DIFFUSION_SCHEDULERS, name, base_config, "diffusion")


class NoiseProcess:
    """What training and sampling ask of a model's noise process (see the module's table)."""

    kind: str = ""
    scheduler_names: tuple[str, ...] = ()  # the names :meth:`scheduler` builds
    supports_min_snr: bool = False  # whether ``snr_gamma`` (min-SNR loss weights) applies

    # -- sampling -----------------------------------------------------------------------------------

    def scheduler(self, name: str | None, base_config: Any) -> Any:
        raise NotImplementedError

    def model_input(self, sched: Any, latents: Tensor, t: Any) -> Tensor:
        return latents

    def initial_latents(self, sched: Any, noise: Tensor) -> Tensor:
        return noise

    # -- training -----------------------------------------------------------------------------------

    def draw_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def noisy(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        raise NotImplementedError

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        raise NotImplementedError

    def check_weighting(self, snr_gamma: float | None) -> None:
        """Refuse (:class:`TrainingInputError`) a loss weighting this process cannot apply, before any work."""
        if snr_gamma and not self.supports_min_snr:
            raise TrainingInputError(f"snr_gamma (min-SNR weighting) is for noise-predicting models; a {self.kind.replace('_', '-')} "
                                     "model trains with its own timestep density and uniform weights: leave snr_gamma unset")

    def loss_weights(self, timesteps: Tensor, snr_gamma: float | None) -> Tensor | None:
        return None

    def dco_error_scale(self, timesteps: Tensor) -> Tensor | None:
        """Per-sample factor that turns this target's squared errors into noise-prediction (epsilon)
        squared errors, the units ``dco_beta`` is set in; None: they already are (or v-prediction,
        whose default was set on it)."""
        return None


class Diffusion(NoiseProcess):
    """DDPM noise with an epsilon or v-prediction target (``prediction_type`` of the model's scheduler)."""

    kind = "diffusion"
    scheduler_names = SCHEDULER_NAMES
    supports_min_snr = True

    def __init__(self, scheduler_config: Any):
        from diffusers import DDPMScheduler

        self.train_scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = str(self.train_scheduler.config.prediction_type)
        self.num_train_timesteps = int(self.train_scheduler.config.num_train_timesteps)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UnsupportedModelError(f"scheduler prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")

    def scheduler(self, name: str | None, base_config: Any) -> Any:
        return make_scheduler(name, base_config)

    def model_input(self, sched: Any, latents: Tensor, t: Any) -> Tensor:
        return sched.scale_model_input(latents, t)

    def initial_latents(self, sched: Any, noise: Tensor) -> Tensor:
        return noise * sched.init_noise_sigma

    def draw_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def noisy(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.train_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction)."""
        if self.prediction_type == "epsilon":
            return noise
        return self.train_scheduler.get_velocity(latents, noise, timesteps)

    def loss_weights(self, timesteps: Tensor, snr_gamma: float | None) -> Tensor | None:
        """Min-SNR-gamma weights (arXiv 2303.09556): min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR+1) for v."""
        if not snr_gamma:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.train_scheduler, timesteps).float()
        clipped = torch.clamp(snr, max=snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


class FlowMatching(NoiseProcess):
    """Rectified flow (SD3): x_s = (1 - s) x_0 + s e, the model predicts v = e - x_0.

    Training sigmas: u ~ N(logit_mean, logit_std), s = sigmoid(u), then the model's timestep shift
    s' = shift * s / (1 + (shift - 1) * s) (the scheduler's ``shift``, 3.0 for SD3.5); the model sees
    the timestep 1000 * s'. ``snr_gamma`` has no flow-matching meaning and is refused.
    """

    kind = "flow_matching"
    scheduler_names = tuple(_FLOW_SCHEDULERS)

    def __init__(self, scheduler_config: Any, *, logit_mean: float = 0.0, logit_std: float = 1.0):
        self.shift = float(scheduler_config.get("shift", 1.0))
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.logit_mean, self.logit_std = logit_mean, logit_std

    def scheduler(self, name: str | None, base_config: Any) -> Any:
        return _build(_FLOW_SCHEDULERS, name, base_config, "flow-matching")

    def draw_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        u = torch.sigmoid(torch.randn((n,), generator=generator) * self.logit_std + self.logit_mean)
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        return sigma * self.num_train_timesteps

    def _sigma(self, timesteps: Tensor, like: Tensor) -> Tensor:
        sigma = (timesteps.float() / self.num_train_timesteps).to(like.device)
        return sigma.view(-1, *([1] * (like.ndim - 1)))

    def noisy(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        s = self._sigma(timesteps, latents)
        return ((1 - s) * latents.float() + s * noise.float()).to(latents.dtype)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return noise - latents

    def loss_weights(self, timesteps: Tensor, snr_gamma: float | None) -> Tensor | None:
        self.check_weighting(snr_gamma)
        return None

    def dco_error_scale(self, timesteps: Tensor) -> Tensor:
        """(1 - s)^2: from x_s = (1 - s) x_0 + s e, a velocity estimate v' gives the noise estimate
        e' = x_s + (1 - s) v', so ||e' - e||^2 = (1 - s)^2 ||v' - v||^2. DCO's logit compares the two
        models' errors in these epsilon units, so ``dco_beta`` means the same on SD3 as on SD (the
        default 1000). A constant beta on velocity errors would be 1 / E[(1 - s)^2] = 8.8x steeper on
        average under SD3's timestep density (E[(1 - s)^2] = 0.113, measured over 10M draws:
        docs/training.md)."""
        return (1 - timesteps.float() / self.num_train_timesteps) ** 2
