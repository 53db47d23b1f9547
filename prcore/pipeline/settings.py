"""One settings value for a run: what the nightly flow, its shards, ``prcore run`` and the tasks share.

:class:`RunSettings` is a pydantic model, so Prefect validates it and renders it as a form in its
UI, and it travels to every shard as one parameter. Its sections are the library's own types
(:class:`~prcore.data.schema.GenerationDefaults`, :class:`~prcore.data.schema.TrainConfig`,
:class:`~prcore.quality.qc.QCThresholds`): a field is defined once, where it is used.

How shards are fanned out is a separate value (:class:`FanOut`), so that a deployment can fix it
while the person starting a run passes only ``settings``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from prcore.data.schema import GenerationDefaults, TrainConfig
from prcore.quality.qc import QCThresholds

SHARD_DEPLOYMENT = "personalize-subject/gpu"


class Placement(BaseModel):
    """Where and how the model runs, and how much of it at once.

    ``device`` None: cuda if available, else mps, else cpu. ``dtype`` None: bf16 on CUDA devices
    that have it, else fp16 on CUDA, fp32 elsewhere. ``max_batch_rows`` caps the UNet rows of one
    forward (three per image per step; None: all at once); ``max_batch_images`` how many images of
    a subject's requests (same sampling parameters) share one denoising loop; ``vae_tiling``
    decodes in tiles. ``channels_last`` / ``compile_unet`` / ``attention`` are the GPU speed
    options of :mod:`prcore.method.accel` (off / off / "sdpa": what ``from_pretrained`` gives).
    """

    model_config = ConfigDict(extra="forbid")
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "auto"] | None = None
    max_batch_rows: int | None = Field(None, ge=1)
    max_batch_images: int = Field(16, ge=1, description="images of one subject's requests sampled in one denoising loop")
    vae_tiling: bool = False
    channels_last: bool = False
    compile_unet: bool = Field(False, description="torch.compile the UNet (recompiles after each LoRA change)")
    attention: Literal["sdpa", "classic"] = "sdpa"

    def denoiser_options(self):
        from prcore.method.accel import DenoiserOptions

        return DenoiserOptions(channels_last=self.channels_last, compile=self.compile_unet, attention=self.attention)


class Scoring(BaseModel):
    """Optional quality scores (CLIP-T / CLIP-I with ``clip_model``, DINO with ``dino_model``) and QC
    thresholds; a subject's ``qc_*`` manifest columns override ``qc``."""

    model_config = ConfigDict(extra="forbid")
    clip_model: str | None = None
    dino_model: str | None = None
    qc: QCThresholds = Field(default_factory=QCThresholds)

    @property
    def enabled(self) -> bool:
        return bool(self.clip_model or self.dino_model)


class RunSettings(BaseModel):
    """Everything a run needs besides the manifest and the output root."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="base model for rows without base_model: a diffusers folder or hub id (default: the embedded model)")
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults, description="what a null request column means")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training parameters where the manifest's train_* cells are null")
    placement: Placement = Field(default_factory=Placement)
    scoring: Scoring = Field(default_factory=Scoring)
    cache_dir: str | None = Field(None, description="local cache for the embedded model and downloaded LoRAs (default ~/.cache/prcore or $PRCORE_CACHE_DIR)")
    check_images: bool = Field(True, description="open the instance images of every subject with work left before anything runs")

    def cache_path(self) -> Path:
        return Path(self.cache_dir or os.environ.get("PRCORE_CACHE_DIR") or Path.home() / ".cache" / "prcore").expanduser()

    def train_config(self, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """The run's training config with a subject's manifest overrides applied."""
        values = {k: v for k, v in (overrides or {}).items() if v is not None}
        return replace(self.train, **values) if values else self.train

    def qc_for(self, subject_thresholds: dict[str, float] | None) -> QCThresholds:
        """The run's QC thresholds with a subject's ``qc_*`` columns winning per metric."""
        values = {k: v for k, v in (subject_thresholds or {}).items() if v is not None}
        return replace(self.scoring.qc, **values) if values else self.scoring.qc


class FanOut(BaseModel):
    """How the nightly flow runs its shards (the automatic shard size:
    :func:`prcore.pipeline.shards.choose_subjects_per_shard`)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["local", "deployment"] = Field("local", description="local: shards in this process; deployment: one flow run per shard")
    subjects_per_shard: int | None = Field(None, ge=1, description="subjects per shard (a shard loads the base model once); "
                                           "None: chosen by the run from the subjects with work left and the GPU workers")
    gpu_workers: int | None = Field(None, ge=1, description="GPU workers the shards share, for the automatic shard size "
                                    "(None: the `gpu` concurrency limit's slots, else the pool's online workers; 1 in local mode)")
    shard_deployment: str = SHARD_DEPLOYMENT
    max_subjects: int | None = Field(None, ge=1, description="run at most this many subjects with work left")
    shard_timeout_s: float = Field(6 * 3600, gt=0, description="how long to wait for deployment shards")
    use_gpu_limit: bool = Field(True, description="hold the `gpu` global concurrency limit around model work")
