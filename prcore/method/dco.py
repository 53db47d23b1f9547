"""Per-subject LoRA fine-tuning with Direct Consistency Optimization (DCO), and LoRA save/load.

DCO (arXiv 2402.12004) trains the LoRA so the fine-tuned model beats the frozen pretrained model
on the subject's images, by a margin the sigmoid keeps bounded:

    loss = -log sigmoid(-beta * (||eps_theta(x_t, c_personal) - eps||^2 - ||eps_ref(x_t, c_base) - eps||^2))

``eps_ref`` is the same UNet with the LoRA switched off, conditioned on the *base* caption (class
noun instead of identifier + class noun) and evaluated without gradients. ``beta <= 0`` gives the
plain DreamBooth loss ``||eps_theta - eps||^2`` for comparison.

The result is a folder in the diffusers LoRA format (``pytorch_lora_weights.safetensors``, with
the peft LoRA config in its metadata so alpha != rank reloads exactly), optional learned token
embeddings in the diffusers textual-inversion layout, and ``training.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prcore.data.fingerprint import fingerprint, sha256_bytes
from prcore.data.images import ImageSource, PreparedImage, fingerprint_bytes, prepare_images
from prcore.data.schema import DEFAULT_CAPTION, SUBJECT_PLACEHOLDER, TrainConfig, TrainingInputError, identifier_problem
from prcore.method.adapters import has_adapter
from prcore.method.families import ModelFamily, TextCond, family_of
from prcore.method.families.noise import NoiseProcess
from prcore.method.lora_io import read_training_record, save_embeddings, save_lora
from prcore.method.models import peak_memory, reset_peak_memory
from prcore.store.keys import LORA_RECORD_FILE, LORA_WEIGHTS_FILE

TRAINING_ALGORITHM_VERSION = 2  # 2: mixed precision by device (autocast, fp32 LoRA), identifier embedding as its own parameter
TRAIN_ADAPTER_NAME = "prcore_train"
CLASS_IMAGE_STEPS = 25  # denoising steps for prior-preservation class images


class LoraOverwriteError(TrainingInputError):
    """The output folder holds a different subject's LoRA."""


@dataclass
class TrainResult:
    out_dir: Path
    fingerprint: str
    losses: list[float]
    seconds_total: float
    seconds_per_step: float
    reused: bool = False  # True: an existing LoRA with the same fingerprint was returned untrained
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the training.json content


# ----------------------------------------------------------------------------------------------
# The loss


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all non-batch dims of (pred - target)^2, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def dco_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DCO loss, averaged over the batch.

        l_i = -log sigmoid(-beta * (w_i * mse_i(model_pred, target) - w_i * mse_i(ref_pred, target)))

    ``mse_i`` is the per-sample mean squared error and ``w_i`` an optional per-sample weight
    (min-SNR). Equal predictions give exactly log 2. ``ref_pred`` gets no gradient.
    """
    model_mse = per_sample_mse(model_pred, target)
    ref_mse = per_sample_mse(ref_pred.detach(), target)
    if weights is not None:
        model_mse, ref_mse = model_mse * weights, ref_mse * weights
    return -F.logsigmoid(-beta * (model_mse - ref_mse)).mean()


def dreambooth_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Plain denoising loss: mean_i w_i * mse_i(model_pred, target)."""
    mse = per_sample_mse(model_pred, target)
    return (mse * weights).mean() if weights is not None else mse.mean()


# ----------------------------------------------------------------------------------------------
# Subjects, captions, fingerprints


def check_subject(class_noun: str, identifier: str) -> None:
    """The identifier must be a non-empty word distinct from the class noun (and its words): the rule
    of :func:`prcore.data.schema.identifier_problem`, which manifest validation applies too."""
    if not class_noun or not class_noun.strip():
        raise TrainingInputError("class_noun is empty: give the subject's class, e.g. 'dog'")
    if "{" in class_noun or "}" in class_noun:
        raise TrainingInputError(f"class_noun {class_noun!r} must not contain '{{' or '}}'")
    problem = identifier_problem(identifier, class_noun)
    if problem:
        raise TrainingInputError(f"identifier {problem}")


def render_caption(template: str, subject: str) -> str:
    return template.replace(SUBJECT_PLACEHOLDER, subject)


def resolve_captions(captions: str | Sequence[str] | None, num_images: int) -> list[str]:
    """One caption template per image; None gives DEFAULT_CAPTION, a single string applies to all."""
    if captions is None:
        return [DEFAULT_CAPTION] * num_images
    if isinstance(captions, str):
        captions = [captions] * num_images
    captions = list(captions)
    if len(captions) != num_images:
        raise TrainingInputError(f"got {len(captions)} captions for {num_images} images: give one caption per image")
    for i, c in enumerate(captions):
        if SUBJECT_PLACEHOLDER not in c:
            raise TrainingInputError(f"caption #{i} {c!r} has no {SUBJECT_PLACEHOLDER} placeholder")
    return captions


def lora_fingerprint(
    *,
    base_model_id: str,
    images: Sequence[bytes],
    class_noun: str,
    identifier: str,
    captions: str | Sequence[str] | None,
    config: TrainConfig,
) -> str:
    """Content hash of everything that determines a subject's LoRA (16 hex chars).

    Covers the base model id, each image's bytes (in order), class noun, identifier, the caption
    templates (None and the explicit default are the same), every TrainConfig field that changes the
    result (``TrainConfig.fingerprint_dict``), and TRAINING_ALGORITHM_VERSION.
    """
    payload = {
        "base_model_id": str(base_model_id),
        "images": [sha256_bytes(bytes(b)) for b in images],
        "class_noun": class_noun,
        "identifier": identifier,
        "captions": resolve_captions(captions, len(images)),
        "config": config.fingerprint_dict(),
    }
    return fingerprint("lora", TRAINING_ALGORITHM_VERSION, payload)


def base_model_id_of(pipe) -> str:
    return str(getattr(pipe, "_prcore_model_id", None) or getattr(pipe.config, "_name_or_path", "") or "unknown")


# ----------------------------------------------------------------------------------------------
# Output folder: reuse, refuse, atomic publish


def _existing_result(out_dir: Path, fp: str) -> TrainResult | None:
    """The finished LoRA already in ``out_dir`` if it has fingerprint ``fp``; refuse any other content."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise LoraOverwriteError(f"output path {out_dir} exists and is not a folder: choose another --out")
    record = read_training_record(out_dir)
    if record is None:
        if any(out_dir.iterdir()):
            raise LoraOverwriteError(
                f"output folder {out_dir} is not empty and holds no {LORA_RECORD_FILE}: refusing to overwrite it; "
                "choose an empty or new folder"
            )
        return None
    if record.get("fingerprint") != fp:
        raise LoraOverwriteError(
            f"output folder {out_dir} holds a different subject's LoRA (fingerprint {record.get('fingerprint')}, "
            f"subject {record.get('identifier')!r} {record.get('class_noun')!r}; this one is {fp}): refusing to "
            "overwrite it; choose another folder or delete that one"
        )
    return TrainResult(
        out_dir=out_dir,
        fingerprint=fp,
        losses=list(record.get("losses", [])),
        seconds_total=float(record.get("seconds_total", 0.0)),
        seconds_per_step=float(record.get("seconds_per_step", 0.0)),
        reused=True,
        record=record,
    )


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Rename the finished temp folder into place (atomic on one filesystem)."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if out_dir.exists():
        raise LoraOverwriteError(f"output folder {out_dir} appeared while training (another process?): not overwriting it")
    os.replace(tmp_dir, out_dir)


# ----------------------------------------------------------------------------------------------
# Pipeline state: what training changes and must put back


def _trained_modules(pipe) -> list[torch.nn.Module]:
    """The networks whose state training touches: the denoiser, the VAE and the family's text encoders."""
    family = family_of(pipe)
    return [family.denoiser(pipe), pipe.vae, *family.text_encoders(pipe)]


@contextlib.contextmanager
def _preserved_pipeline_state(pipe) -> Iterator[None]:
    """Restore requires_grad flags, train/eval modes, gradient checkpointing and active adapters."""
    modules = _trained_modules(pipe)
    denoiser = modules[0]
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for m in modules]
    checkpointing = bool(getattr(denoiser, "is_gradient_checkpointing", False))
    active = list(denoiser.active_adapters()) if getattr(denoiser, "_hf_peft_config_loaded", False) else []
    try:
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, training in modes:
            m.train(training)
        if checkpointing != bool(getattr(denoiser, "is_gradient_checkpointing", False)):
            (denoiser.enable_gradient_checkpointing if checkpointing else denoiser.disable_gradient_checkpointing)()
        if active:
            denoiser.set_adapter(active)


def add_training_adapter(denoiser, config: TrainConfig, adapter_name: str = TRAIN_ADAPTER_NAME) -> list[torch.nn.Parameter]:
    """Add a fresh LoRA (B = 0, A gaussian, seeded by config.seed) to ``denoiser``; return its parameters in fp32."""
    from peft import LoraConfig

    if has_adapter(denoiser, adapter_name):
        denoiser.delete_adapters(adapter_name)  # left over from an interrupted run in this process
    lora_config = LoraConfig(
        r=int(config.rank),
        lora_alpha=float(config.alpha),
        init_lora_weights="gaussian",
        target_modules=list(config.target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            with warnings.catch_warnings():  # other subjects' adapters may be loaded: intended
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                denoiser.add_adapter(lora_config, adapter_name=adapter_name)
        except ValueError as exc:
            raise TrainingInputError(f"target_modules {list(config.target_modules)} do not match the model's layers: {exc}") from exc
    params = []
    for name, p in denoiser.named_parameters():
        if f".{adapter_name}." in name and "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise TrainingInputError(f"target_modules {list(config.target_modules)} matched no layer of the model")
    return params


# ----------------------------------------------------------------------------------------------
# Conditioning


def _image_sizes(prepared: Sequence[PreparedImage], resolution: int) -> list[tuple[int, ...]]:
    """Per image: original (h, w), crop (top, left), target (h, w) (what SDXL's micro-conditioning reads)."""
    return [(*p.original_size, *p.crop_top_left, resolution, resolution) for p in prepared]


# ----------------------------------------------------------------------------------------------
# Latents


@dataclass
class LatentCache:
    """VAE posterior of each image (and its mirror image), computed once per run."""

    mean: torch.Tensor  # (n_variants, n, c, h, w); variant 1 is the horizontal flip when present
    std: torch.Tensor
    scaling_factor: float
    shift_factor: float

    def sample(self, variant: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[variant, index], self.std[variant, index]
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        return (mean + std * eps - self.shift_factor) * self.scaling_factor


def _to_pixels(images: Sequence[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_latents(pipe, images: Sequence[Any], *, flips: bool, chunk: int = 4) -> LatentCache:
    """Encode RGB images with the pipeline's VAE (fp32 when its config asks to upcast)."""
    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    pixels = _to_pixels(images)
    variants = [pixels, pixels.flip(-1)] if flips else [pixels]
    try:
        if upcast:
            vae.to(torch.float32)
        means, stds = [], []
        for px in variants:
            m_parts, s_parts = [], []
            for start in range(0, len(px), chunk):
                dist = vae.encode(px[start : start + chunk].to(vae.device, vae.dtype)).latent_dist
                m_parts.append(dist.mean.float())
                s_parts.append(dist.std.float())
            means.append(torch.cat(m_parts))
            stds.append(torch.cat(s_parts))
    finally:
        if upcast:
            vae.to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return LatentCache(torch.stack(means), torch.stack(stds), float(vae.config.scaling_factor), float(shift))


def generate_class_images(pipe, class_noun: str, *, num_images: int, resolution: int, seed: int, chunk: int = 4) -> list[Any]:
    """Prior-preservation images of the class from the base model itself (before any LoRA is added)."""
    prompt = render_caption(DEFAULT_CAPTION, class_noun)
    out = []
    for start in range(0, num_images, chunk):
        n = min(chunk, num_images - start)
        generators = [torch.Generator("cpu").manual_seed(seed * 100_003 + start + i) for i in range(n)]
        res = pipe(
            prompt=[prompt] * n, height=resolution, width=resolution, num_inference_steps=CLASS_IMAGE_STEPS,
            generator=generators, output_type="pil",
        )
        out.extend(res.images)
    return out


# ----------------------------------------------------------------------------------------------
# Training


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("prcore", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


class _NullScaler:
    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        return None

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        return None


def _check_new_token(tokenizer, identifier: str) -> None:
    ids = tokenizer(identifier, add_special_tokens=False).input_ids
    if identifier in tokenizer.get_vocab() or len(ids) == 1:
        raise TrainingInputError(
            f"train_text_embeddings needs an identifier that is a new token, but {identifier!r} is already in the "
            f"tokenizer vocabulary: use a fresh token such as '<{identifier}>'"
        )


def resolve_precision(requested: str, device: torch.device, weights: torch.dtype) -> str:
    """The autocast precision training runs in: "no" (fp32), "bf16", or "fp16" (with a GradScaler).

    Trainable parameters (LoRA, a learned identifier embedding) are always fp32; autocast runs the
    frozen weights' forward and backward in the reduced precision. ``requested`` is
    ``TrainConfig.mixed_precision``: "auto" picks bf16 on CUDA devices that support it (else fp16),
    and on the CPU bf16 for bf16 weights (else fp32); "no" uses only what the weights' dtype needs.
    """
    half = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weights, "no")
    if device.type == "cuda":
        want = requested if requested in ("fp16", "bf16") else half
        if requested == "auto" and want == "no":
            want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if want == "bf16" and not torch.cuda.is_bf16_supported():
            raise TrainingInputError("mixed_precision bf16 needs a GPU that supports bfloat16 (Ampere or newer); use fp16")
        return want
    if weights == torch.float16:
        raise TrainingInputError(f"fp16 weights cannot train on {device.type} (no fp16 autocast there, and it is ~300x slower "
                                 "than fp32): load the model with --dtype bfloat16 or float32")
    if requested == "fp16":
        raise TrainingInputError(f"mixed_precision fp16 needs a CUDA device; on {device.type} use bf16, no or auto")
    if device.type == "cpu" and (requested == "bf16" or half == "bf16"):
        return "bf16"
    if half != "no" or requested == "bf16":
        raise TrainingInputError(f"{half if half != 'no' else 'bf16'} training is not supported on {device.type}; use float32 weights")
    return "no"


def _autocast(device: torch.device, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


class LearnedToken(torch.nn.Module):
    """A text encoder's token embedding with one row taken from an fp32 parameter.

    Only ``row`` learns (and is what the optimizer holds); the embedding matrix stays frozen in
    its own dtype, so untouched rows can never change (an fp16 matrix inside AdamW turns every
    row NaN after one step: eps underflows).
    """

    def __init__(self, base: torch.nn.Embedding, token_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.token_id = token_id
        self.row = torch.nn.Parameter(init.detach().to(torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # what code reading get_input_embeddings().weight sees
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        hit = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(hit, self.row.to(out.dtype), out)


def _add_learned_token(tokenizer, text_encoder, identifier: str, class_noun: str) -> LearnedToken:
    """Add ``identifier`` as a new token whose embedding (initialised to the class noun's mean
    embedding) is a trainable fp32 parameter; the encoder's matrix grows by one frozen row."""
    _check_new_token(tokenizer, identifier)
    class_ids = tokenizer(class_noun, add_special_tokens=False).input_ids
    tokenizer.add_tokens([identifier])
    token_id = tokenizer.convert_tokens_to_ids(identifier)
    text_encoder.resize_token_embeddings(len(tokenizer))
    base = text_encoder.get_input_embeddings()
    with torch.no_grad():
        init = base.weight[class_ids].float().mean(dim=0)
        base.weight[token_id] = init.to(base.weight.dtype)
    learned = LearnedToken(base, token_id, init)
    text_encoder.set_input_embeddings(learned)
    return learned


def _make_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float):
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingInputError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes (CUDA only)") from None
        return bnb.optim.AdamW8bit(param_groups, lr=lr)
    return torch.optim.AdamW(param_groups, lr=lr)


def train_subject_lora(
    pipe,
    *,
    images: Sequence[ImageSource],
    class_noun: str,
    identifier: str,
    out_dir: str | Path,
    captions: str | Sequence[str] | None = None,
    config: TrainConfig = TrainConfig(),
    base_model_id: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune a LoRA on one subject with DCO (or DreamBooth when ``config.dco_beta <= 0``).

    ``images`` are PIL images (or encoded bytes / file paths); ``captions`` per-image templates with
    ``{subject}``. If ``out_dir`` already holds this subject's LoRA (same fingerprint) it is returned
    without training; a different subject's LoRA there is never overwritten. The pipeline is left
    as it was (the training adapter and any added tokens are removed afterwards).
    """
    t_start = time.perf_counter()
    if not isinstance(config, TrainConfig):
        raise TrainingInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_subject(class_noun, identifier)
    if not images:
        from prcore.data.images import NoImagesError

        raise NoImagesError("no instance images: give at least one image of the subject")
    templates = resolve_captions(captions, len(images))
    base_model_id = base_model_id or base_model_id_of(pipe)
    fp = lora_fingerprint(
        base_model_id=base_model_id,
        images=[fingerprint_bytes(s, i) for i, s in enumerate(images)],
        class_noun=class_noun,
        identifier=identifier,
        captions=templates,
        config=config,
    )
    out_dir = Path(out_dir)
    existing = _existing_result(out_dir, fp)
    if existing is not None:
        return existing

    family = family_of(pipe)
    resolution = int(config.resolution or family.default_resolution(pipe))
    multiple = family.resolution_multiple(pipe)
    if resolution % multiple:
        raise TrainingInputError(f"resolution {resolution} must be a multiple of {multiple} for this model")
    prepared = prepare_images(images, resolution)
    if config.train_text_embeddings:
        if not family.supports_text_embeddings:
            raise TrainingInputError(f"train_text_embeddings is not supported for {family.label} models; train the LoRA alone "
                                     "(train_text_embeddings=false)")
        for tok, _ in family.text_pairs(pipe):
            _check_new_token(tok, identifier)
    noise = family.noise_process(pipe)
    noise.check_weighting(config.snr_gamma)

    denoiser = family.denoiser(pipe)
    device = denoiser.device
    mixed = resolve_precision(config.mixed_precision, device, denoiser.dtype)
    checkpointing = family.gradient_checkpointing if config.gradient_checkpointing is None else config.gradient_checkpointing
    personal = [render_caption(t, f"{identifier} {class_noun}") for t in templates]
    base = [render_caption(t, class_noun) for t in templates]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    reset_peak_memory(device)
    added_tokens: list[tuple[Any, Any, LearnedToken]] = []
    try:
        with _preserved_pipeline_state(pipe):
            for m in _trained_modules(pipe):
                m.requires_grad_(False)
            class_images = []
            if config.prior_preservation:
                class_images = generate_class_images(
                    pipe, class_noun, num_images=config.num_class_images, resolution=resolution, seed=config.seed
                )
            cache = encode_latents(pipe, [p.image for p in prepared], flips=config.random_flip)
            class_cache = encode_latents(pipe, class_images, flips=False) if class_images else None
            with torch.no_grad():
                base_cond = family.encode(pipe, base, device)
                personal_cond = None if config.train_text_embeddings else family.encode(pipe, personal, device)
                class_cond = family.encode(pipe, [render_caption(DEFAULT_CAPTION, class_noun)], device) if class_images else None
            time_ids = family.time_ids(pipe, _image_sizes(prepared, resolution), dtype=torch.float32, device=device)

            lora_params = add_training_adapter(denoiser, config)
            param_groups: list[dict[str, Any]] = [{"params": lora_params, "weight_decay": 1e-2}]
            if config.train_text_embeddings:
                for tok, te in family.text_pairs(pipe):
                    added_tokens.append((tok, te, _add_learned_token(tok, te, identifier, class_noun)))
                param_groups.append({"params": [t.row for *_, t in added_tokens], "weight_decay": 0.0})
            if checkpointing:
                denoiser.enable_gradient_checkpointing()
            denoiser.train()
            optimizer = _make_optimizer(config.optimizer, param_groups, config.learning_rate)
            losses, loop_seconds, loop_cpu_seconds = _train_loop(
                pipe, noise, config, optimizer, lora_params + [t.row for *_, t in added_tokens], cache, class_cache,
                base_cond, personal_cond, personal, class_cond, time_ids, resolution, mixed, progress,
                desc=f"train {identifier} {class_noun}",
            )
            tmp_dir.mkdir(parents=True)
            save_lora(pipe, tmp_dir, TRAIN_ADAPTER_NAME)
            learned = save_embeddings(family, tmp_dir, [t.row for *_, t in added_tokens], identifier) if added_tokens else None
        peak, peak_kind = peak_memory(device)
        seconds_per_step = loop_seconds / config.steps
        seconds_total = time.perf_counter() - t_start
        record = {
            "fingerprint": fp,
            "training_algorithm_version": TRAINING_ALGORITHM_VERSION,
            "base_model_id": base_model_id,
            "model_family": family.name,
            "class_noun": class_noun,
            "identifier": identifier,
            "captions": templates,
            "personal_captions": personal,
            "base_captions": base,
            "num_images": len(prepared),
            "image_sha256": [sha256_bytes(fingerprint_bytes(s, i)) for i, s in enumerate(images)],
            "config": config.to_dict(),
            "resolution": resolution,
            "mixed_precision_used": mixed,
            "gradient_checkpointing_used": bool(checkpointing),
            "loss": "dco" if config.dco_beta > 0 else "dreambooth",
            "adapter": {"weight_name": LORA_WEIGHTS_FILE, "rank": int(config.rank), "alpha": float(config.alpha)},
            "learned_embeddings": learned,
            "losses": losses,
            "seconds_total": seconds_total,
            "seconds_per_step": seconds_per_step,
            "cpu_seconds_per_step": loop_cpu_seconds / config.steps,  # process CPU time: robust on shared CPUs
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "device": str(device),
            "unet_dtype": str(denoiser.dtype),  # the denoiser's dtype (the key keeps its first name)
            "library_versions": _library_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp_dir / LORA_RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        if out_dir.exists():  # another process finished the same subject meanwhile: keep its result
            concurrent = _existing_result(out_dir, fp)
            if concurrent is not None:
                return concurrent
        _publish(tmp_dir, out_dir)
    finally:
        _remove_training_adapter(pipe)
        for tok, te, learned_token in added_tokens:  # the encoder exactly as it was: matrix, tokenizer, module
            te.set_input_embeddings(learned_token.base)
            pipe.unload_textual_inversion(tokens=[identifier], tokenizer=tok, text_encoder=te)
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return TrainResult(out_dir, fp, losses, seconds_total, seconds_per_step, reused=False, record=record)


def _remove_training_adapter(pipe) -> None:
    denoiser = family_of(pipe).denoiser(pipe)
    if has_adapter(denoiser, TRAIN_ADAPTER_NAME):
        denoiser.delete_adapters(TRAIN_ADAPTER_NAME)


REF_CHUNK_STEPS = 8  # steps whose reference predictions are computed together, ahead of training
REF_MAX_ROWS = 8  # rows per reference denoiser call (bounds memory at high resolution)


@dataclass
class _Draw:
    """One step's random choices, drawn from the run's CPU generator (instance rows first, then class rows)."""

    idx: torch.Tensor
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def _draw_step(gen, config, order: list[int], cache: LatentCache, class_cache: LatentCache | None, noise_process: NoiseProcess) -> _Draw:
    b = int(config.batch_size)
    n = cache.mean.shape[1]
    while len(order) < b:  # epochs of random permutations
        order.extend(torch.randperm(n, generator=gen).tolist())
    idx = torch.tensor(order[:b])
    del order[:b]
    variant = (torch.rand(b, generator=gen) < 0.5).long() if config.random_flip else torch.zeros(b, dtype=torch.long)
    latents = cache.sample(variant, idx, gen)
    if class_cache is not None:
        cidx = torch.randint(0, class_cache.mean.shape[1], (b,), generator=gen)
        latents = torch.cat([latents, class_cache.sample(torch.zeros(b, dtype=torch.long), cidx, gen)])
    bb = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen)
    if config.offset_noise > 0:
        noise = noise + config.offset_noise * torch.randn((bb, latents.shape[1], 1, 1), generator=gen)
    timesteps = noise_process.draw_timesteps(bb, gen)
    return _Draw(idx, latents, noise, timesteps)


@torch.no_grad()
def _reference_predictions(pipe, family: ModelFamily, noise_process: NoiseProcess, draws: list[_Draw], b: int, base_cond: TextCond,
                           time_ids, autocast) -> list[torch.Tensor]:
    """eps_ref for the instance rows of several steps: the frozen denoiser (LoRA off) on the base caption.

    The reference depends only on frozen weights and on each step's random draw, never on the LoRA
    being trained, so the reference rows of ``REF_CHUNK_STEPS`` steps go through the denoiser
    together: one batched no-grad forward instead of one small forward per step.
    """
    denoiser = family.denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    lat = torch.cat([d.latents[:b] for d in draws]).to(device)
    noise = torch.cat([d.noise[:b] for d in draws]).to(device)
    t = torch.cat([d.timesteps[:b] for d in draws]).to(device)
    idx = torch.cat([d.idx for d in draws])
    noisy = noise_process.noisy(lat, noise, t).to(dtype)
    cond = base_cond.rows(idx)
    tids = None if time_ids is None else time_ids[idx.to(time_ids.device)]
    outs = []
    denoiser.disable_adapters()
    try:
        with autocast():
            for s in range(0, len(idx), REF_MAX_ROWS):
                rows = slice(s, s + REF_MAX_ROWS)
                part_tids = None if tids is None else tids[rows]
                outs.append(family.predict(pipe, noisy[rows], t[rows], cond.slice(s, s + REF_MAX_ROWS), part_tids))
    finally:
        denoiser.enable_adapters()
    return list(torch.cat(outs).split(b))


def _train_loop(
    pipe, noise_process: NoiseProcess, config, optimizer, trainable, cache: LatentCache, class_cache: LatentCache | None,
    base_cond: TextCond, personal_cond: TextCond | None, personal_prompts: list[str], class_cond: TextCond | None,
    time_ids: torch.Tensor | None, resolution: int, mixed: str, progress: bool, desc: str,
) -> tuple[list[float], float, float]:
    from tqdm.auto import tqdm

    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    gen = torch.Generator("cpu").manual_seed(int(config.seed))
    b = int(config.batch_size)
    autocast = _autocast(device, mixed)
    scaler = torch.amp.GradScaler("cuda") if mixed == "fp16" else _NullScaler()
    class_time_ids = family.time_ids(pipe, [(resolution, resolution, 0, 0, resolution, resolution)], dtype=torch.float32, device=device)
    use_dco = config.dco_beta > 0
    order: list[int] = []
    losses: list[float] = []
    running = None
    bar = tqdm(total=config.steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    t0, c0 = time.perf_counter(), time.process_time()
    while len(losses) < config.steps:
        chunk = min(REF_CHUNK_STEPS, config.steps - len(losses))
        draws = [_draw_step(gen, config, order, cache, class_cache, noise_process) for _ in range(chunk)]
        refs = _reference_predictions(pipe, family, noise_process, draws, b, base_cond, time_ids, autocast) if use_dco else [None] * chunk
        for d, ref in zip(draws, refs, strict=True):
            cond_p = personal_cond if personal_cond is not None else family.encode(pipe, personal_prompts, device)
            cond = cond_p.rows(d.idx)
            tids = None if time_ids is None else time_ids[d.idx.to(device)]
            if class_cache is not None:
                cond = TextCond.cat([cond, class_cond.repeat(b)])
                tids = None if tids is None else torch.cat([tids, class_time_ids.expand(b, -1)])
            latents, noise, timesteps = d.latents.to(device), d.noise.to(device), d.timesteps.to(device)
            noisy = noise_process.noisy(latents, noise, timesteps)
            target = noise_process.target(latents, noise, timesteps)
            weights = noise_process.loss_weights(timesteps, config.snr_gamma)
            with autocast():
                pred = family.predict(pipe, noisy.to(dtype), timesteps, cond, tids)
            w_inst = None if weights is None else weights[:b]
            if use_dco:
                scale = noise_process.dco_error_scale(timesteps[:b])
                loss = dco_loss(pred[:b], ref, target[:b], config.dco_beta, w_inst if scale is None else scale.to(pred.device))
            else:
                loss = dreambooth_loss(pred[:b], target[:b], w_inst)
            if class_cache is not None:
                loss = loss + config.prior_loss_weight * dreambooth_loss(pred[b:], target[b:], None if weights is None else weights[b:])
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {len(losses)}: lower learning_rate")
            losses.append(value)
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
    bar.close()
    return losses, time.perf_counter() - t0, time.process_time() - c0
