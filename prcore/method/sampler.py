"""Personalized sampling with parallel-rescaled consistency guidance, for every model family.

The denoising loop is assembled from the pipeline's public parts (``encode_prompt``, its denoiser,
VAE and ``image_processor``) and a fresh scheduler, asking the pipeline's model family
(:mod:`prcore.method.families`) for each model-specific part. At every step the three predictions of
the method (noise predictions for SD; velocities for a flow-matching model such as SD3)

    e_u   pretrained model (LoRA off), negative prompt
    e_c   pretrained model (LoRA off), base prompt      (template with {subject} -> class noun)
    e_p   fine-tuned model (LoRA on),  personal prompt  (template with {subject} -> identifier + class noun)

come from ONE batched denoiser forward over rows [e_u, e_c, e_p] (3 * num_images rows); the LoRA is
routed to the e_p rows only (:func:`prcore.method.adapters.per_sample_adapters`). They are combined by
:mod:`prcore.method.guidance`:

    e_hat = e_u + w_cfg * g_cfg + w_cg * (g_ort + eta * g_par),   g_cfg = e_c - e_u,  g_cg = e_p - e_c
"""

from __future__ import annotations

import contextlib
import inspect
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from prcore.data.fingerprint import image_seed
from prcore.data.schema import SEED_MAX, GenerationDefaults
from prcore.method import guidance as G
from prcore.method.adapters import (
    BASE,
    adapter_names_of,
    adapter_state_preserved,
    loaded_adapters,
    lora_layers,
    mixed_batch_blocker,
    per_sample_adapters,
    use_adapter,
)
from prcore.method.families import ModelFamily, TextCond, UnsupportedModelError, family_of
from prcore.method.families.noise import SCHEDULER_NAMES, NoiseProcess, UnknownSchedulerError
from prcore.method.models import peak_memory, reset_peak_memory

_DEFAULTS = GenerationDefaults()  # the product's sampling defaults: one owner (prcore.data.schema)
BatchMode = Literal["auto", "batched", "separate"]



class SamplerError(ValueError):
    """A bad argument to :func:`sample`; the message says which and what to do."""


@dataclass
class SampleOutput:
    """What :func:`sample` returns.

    ``images``: list of PIL images (``output_type="pil"``), a float numpy array (N, H, W, 3) in
    [0, 1] (``"np"``) or the final latents (``"latent"``). ``seeds``: the int seed each image's
    generator used. ``batch_mode``: how the UNet ran ("batched" = one forward per step with
    per-sample adapters, "separate" = one forward per adapter group, "single" = no adapter routing
    needed).
    """

    images: Any
    seeds: list[int]
    personal_prompt: str
    base_prompt: str
    seconds: float
    batch_mode: str = "single"
    guidance: str = "parallel_rescaled"
    scheduler: str = ""
    unet_rows: int = 0  # UNet rows evaluated per image over the whole trajectory
    peak_memory_bytes: int | None = None  # peak device memory of this call (CUDA allocator peak; on a CPU the process max RSS)
    extra: dict[str, Any] = field(default_factory=dict)


def render_prompts(template: str, class_noun: str, identifier: str) -> tuple[str, str]:
    """``(personal, base)``: ``{subject}`` -> ``"{identifier} {class_noun}"`` and -> ``class_noun``."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None] if "{" in template else []
    if "subject" not in fields:
        raise SamplerError(f"prompt {template!r} has no {{subject}} placeholder; write e.g. 'a photo of {{subject}} on the beach'")
    others = sorted({f for f in fields if f != "subject"})
    if others:
        raise SamplerError(f"prompt {template!r} has unknown placeholder(s) {others}; only {{subject}} is allowed (write literal braces as {{{{ }}}})")
    if not class_noun or not class_noun.strip():
        raise SamplerError("class_noun is empty; give the subject's class, e.g. 'dog'")
    if not identifier or not identifier.strip():
        raise SamplerError("identifier is empty; give the subject's rare token, e.g. 'sks'")
    personal = template.format(subject=f"{identifier.strip()} {class_noun.strip()}")
    base = template.format(subject=class_noun.strip())
    return personal, base


def image_seeds(seed: int | Sequence[int], num_images: int) -> list[int]:
    """Per-image seeds: ``seeds[i]`` as given, or ``prcore.data.fingerprint.image_seed(seed, i)`` for an int.

    Image i's noise depends on its seed only, so it is the same whatever ``num_images`` is, and
    ``prcore sample --seed S`` draws what a manifest row with ``seed = S`` draws.
    """
    if isinstance(seed, bool) or num_images < 1:
        raise SamplerError(f"num_images must be >= 1 (got {num_images}) and seed an int or a list of ints")
    if isinstance(seed, int):
        if seed < 0:
            raise SamplerError(f"seed must be >= 0, got {seed}")
        return [image_seed(seed, i) for i in range(num_images)]
    seeds = list(seed)
    if len(seeds) != num_images:
        raise SamplerError(f"seed lists {len(seeds)} seeds but num_images is {num_images}; give one seed per image")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_MAX:
            raise SamplerError(f"seeds must be ints in [0, 2**63-1], got {s!r}")
    return seeds


@dataclass
class Request:
    """One prompt of a subject inside a batched denoising loop: its own prompt, subject, LoRA and
    per-image seeds (``sample_batch``); the sampling parameters are the batch's."""

    prompt: str
    class_noun: str
    identifier: str
    adapter_name: str | None
    seeds: list[int]


@dataclass
class _Cond:
    """Text conditioning of one row group (one row per image of the batch), and each row's adapter."""

    text: TextCond
    adapters: list[str]

    @staticmethod
    def cat(conds: Sequence[_Cond]) -> _Cond:
        return _Cond(TextCond.cat([c.text for c in conds]), [a for c in conds for a in c.adapters])


def _encode(pipe, family: ModelFamily, text: str, adapter: str, n: int, device, *, zero: bool) -> _Cond:
    """Encode one prompt with the text encoders' LoRA (if any) set to ``adapter``; repeat n times."""
    for enc in family.text_encoders(pipe):
        use_adapter(enc, adapter if adapter in adapter_names_of(enc) else BASE)
    cond = family.encode(pipe, text, device)
    if zero:  # e.g. SDXL's force_zeros_for_empty_prompt: the empty negative prompt is all zeros
        cond = cond.zeros_like()
    return _Cond(cond.repeat(n), [adapter] * n)


def _check_scales(**scales: float) -> None:
    for name, value in scales.items():
        if not isinstance(value, (int, float)) or value != value or value < 0:
            raise SamplerError(f"{name} must be a number >= 0, got {value!r}")


def _check_size(pipe, family: ModelFamily, height: int | None, width: int | None) -> tuple[int, int]:
    factor = family.size_multiple(pipe)
    default = family.default_resolution(pipe)
    height = default if height is None else height
    width = default if width is None else width
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % factor:
            raise SamplerError(f"{name}={v!r} must be a positive multiple of {family.size_multiple_name} {factor} (e.g. {max(factor, (int(v) // factor) * factor) if isinstance(v, int) and v > 0 else default})")
    return height, width


class _DenoiserRows:
    """Noise predictions for each row group at (x_t, t), with as few UNet forwards as allowed.

    ``mode`` "single": every row uses one adapter (or none), one forward; "batched": one forward
    over all rows with the LoRA routed per row (``routing``, from :func:`per_sample_adapters`, held
    open by the caller around the loop); "separate": one forward per distinct adapter, switching
    the layers. ``max_rows`` caps the rows of one forward (memory): a larger batch is split into
    consecutive chunks, each row keeping its own adapter. The conditioning is concatenated once
    here, not at every step.
    """

    def __init__(self, pipe, family: ModelFamily, conds: list[_Cond], time_ids: Tensor | None, mode: str,
                 max_rows: int | None = None):
        self.pipe = pipe
        self.family = family
        self.k = len(conds)
        self.mode = mode
        self.max_rows = max_rows
        self.routing = None
        whole = _Cond.cat(conds)
        rows = len(whole.adapters)
        tids = None if time_ids is None else time_ids[:rows]
        self.calls: list[tuple[str | None, Tensor | None, TextCond, Tensor | None, list[str]]] = []
        if mode == "separate":
            for name in dict.fromkeys(whole.adapters):
                idx = torch.tensor([i for i, a in enumerate(whole.adapters) if a == name])
                self.calls.append((name, idx, whole.text.rows(idx), None if tids is None else tids[idx.to(tids.device)],
                                   [name] * len(idx)))
        else:
            self.calls.append((None, None, whole.text, tids, whole.adapters))

    def _forward(self, x_in: Tensor, t, text: TextCond, tids: Tensor | None, names: list[str]) -> Tensor:
        rows = x_in.shape[0]
        step = self.max_rows if self.max_rows and self.max_rows < rows else rows
        outs = []
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            if self.routing is not None:
                self.routing.names = names[start:stop]
            outs.append(self.family.predict(self.pipe, x_in[start:stop], t, text.slice(start, stop),
                                              None if tids is None else tids[start:stop]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, x: Tensor, t) -> list[Tensor]:
        x_all = torch.cat([x] * self.k) if self.k > 1 else x
        if len(self.calls) == 1 and self.calls[0][1] is None:
            _, _, text, tids, names = self.calls[0]
            return list(self._forward(x_all, t, text, tids, names).chunk(self.k))
        preds = None
        for adapter, idx, text, tids, names in self.calls:
            use_adapter(self.family.denoiser(self.pipe), adapter)
            pred = self._forward(x_all[idx.to(x_all.device)], t, text, tids, names)
            if preds is None:
                preds = pred.new_empty((x_all.shape[0], *pred.shape[1:]))
            preds[idx.to(preds.device)] = pred
        return list(preds.chunk(self.k))


def _step(noise: NoiseProcess, sched, unet_rows: _DenoiserRows, latents: Tensor, t, mode: G.Mode, step_kwargs: dict,
          scales: dict[str, float]) -> Tensor:
    """One denoising step: predictions at x_t, guided estimate, scheduler update to x_{t-1}."""
    preds = unet_rows(noise.model_input(sched, latents, t), t)
    eps = mode.combine(*preds, **scales)
    return sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]


def _decode(pipe, family: ModelFamily, latents: Tensor, output_type: str, *, vae_tiling: bool = False):
    """Latents -> images, one image per VAE call (the decoder's activations at 1024 px are several
    GiB per image), in fp32 where the VAE config asks to upcast; ``vae_tiling`` decodes in
    overlapping tiles (diffusers' tiled VAE: bounded memory at any size, slightly different pixels)."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    needs_upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if needs_upcast else vae.dtype
    z = family.from_latents(vae.config, latents.to(dtype))
    original = vae.dtype
    tiled = bool(getattr(vae, "use_tiling", False))
    if needs_upcast:
        vae.to(torch.float32)
    if vae_tiling and not tiled:
        vae.enable_tiling()
    try:
        image = torch.cat([vae.decode(z[i : i + 1], return_dict=False)[0] for i in range(z.shape[0])])
    finally:
        if vae_tiling and not tiled:
            vae.disable_tiling()
        if needs_upcast:
            vae.to(original)
    return pipe.image_processor.postprocess(image, output_type=output_type)


def sample(
    pipe,
    *,
    prompt: str,
    class_noun: str,
    identifier: str,
    adapter_name: str | None,
    seed: int | Sequence[int] = 0,
    num_images: int = 1,
    **options: Any,
) -> SampleOutput:
    """Sample ``num_images`` images of a subject with the chosen guidance (one request of
    :func:`sample_batch`, whose keyword arguments ``options`` are).

    Image i's noise comes from its own CPU ``torch.Generator`` seeded with ``seeds[i]``
    (:func:`image_seeds`), so the same call gives the same pixels.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise SamplerError(f"num_images must be an int >= 1, got {num_images!r}")
    request = Request(prompt, class_noun, identifier, adapter_name, image_seeds(seed, num_images))
    return sample_batch(pipe, [request], **options)[0]


@torch.no_grad()
def sample_batch(
    pipe,
    requests: Sequence[Request],
    *,
    negative_prompt: str = "",
    guidance: str = _DEFAULTS.guidance,
    guidance_scale: float = _DEFAULTS.guidance_scale,
    consistency_scale: float = _DEFAULTS.consistency_scale,
    parallel_scale: float = _DEFAULTS.parallel_scale,
    num_inference_steps: int = _DEFAULTS.num_inference_steps,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    output_type: str = "pil",
    progress: bool = True,
    batch_mode: BatchMode = "auto",
    max_batch_rows: int | None = None,
    vae_tiling: bool = False,
    consistency_start: float = _DEFAULTS.consistency_start,
    consistency_stop: float = _DEFAULTS.consistency_stop,
) -> list[SampleOutput]:
    """Sample several requests (prompts, subjects, LoRAs, seeds) in ONE denoising loop.

    Every image of every request is a row of each row group; a request's personal rows use its own
    adapter (several subjects' LoRAs in one loop, routed per row), and image i of a request draws
    what the same request alone draws for the same seed. The sampling parameters are shared.

    ``guidance``:
      - ``parallel_rescaled``: e_u + w_cfg*g_cfg + w_cg*(g_ort + eta*g_par)  (eta = ``parallel_scale``)
      - ``consistency``: DCO consistency guidance, e_u + w_cfg*g_cfg + w_cg*g_cg (eta = 1)
      - ``cfg``: CFG of the fine-tuned model (LoRA on for both rows) on the personal prompt vs the
        negative prompt: the DreamBooth baseline
      - ``pretrained``: CFG of the base model (no adapter) on the base prompt; ``adapter_name`` may be None

    ``batch_mode``: "auto" (one batched UNet forward per step with per-sample LoRA routing, or
    one forward per adapter where peft cannot route per sample: merged/fused LoRA, DoRA),
    "batched" (error if routing is impossible) or "separate" (always one forward per adapter).
    ``consistency_start`` / ``consistency_stop``: the consistency window, fractions of the schedule
    (step i of N is inside when start <= i/N < stop). Inside it the mode's three rows run; outside
    it two (``guidance.PERSONAL_CFG``: e_u + w_cfg * (e_p - e_u)). The default (0, 1) is the whole
    trajectory. ``SampleOutput.unet_rows`` counts the UNet rows per image.
    ``max_batch_rows`` caps the UNet rows of one forward (None: all rows of a step at once); the
    images are the same either way. The VAE decodes one image per call; ``vae_tiling`` tiles it.
    """
    started = time.perf_counter()
    if not requests:
        raise SamplerError("sample_batch needs at least one request")
    prompts = [render_prompts(r.prompt, r.class_noun, r.identifier) for r in requests]
    if guidance not in G.MODES:
        raise SamplerError(f"unknown guidance {guidance!r}; choose one of: {', '.join(G.MODES)}")
    _check_scales(guidance_scale=guidance_scale, consistency_scale=consistency_scale, parallel_scale=parallel_scale)
    if not (isinstance(consistency_start, (int, float)) and isinstance(consistency_stop, (int, float))
            and 0.0 <= consistency_start <= consistency_stop <= 1.0):
        raise SamplerError(f"the consistency window must satisfy 0 <= consistency_start <= consistency_stop <= 1, "
                           f"got ({consistency_start!r}, {consistency_stop!r})")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise SamplerError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise SamplerError(f"output_type must be one of pil, np, pt, latent; got {output_type!r}")
    if max_batch_rows is not None and (isinstance(max_batch_rows, bool) or not isinstance(max_batch_rows, int) or max_batch_rows < 1):
        raise SamplerError(f"max_batch_rows must be None or an int >= 1, got {max_batch_rows!r}")
    if batch_mode not in ("auto", "batched", "separate"):
        raise SamplerError(f"batch_mode must be auto, batched or separate; got {batch_mode!r}")
    family = family_of(pipe)
    height, width = _check_size(pipe, family, height, width)
    seeds = [image_seeds(list(r.seeds), len(r.seeds)) for r in requests]
    if guidance != "pretrained":
        loaded = loaded_adapters(pipe)
        for r in requests:
            if r.adapter_name is None:
                raise SamplerError(f"guidance={guidance!r} needs adapter_name (the subject's LoRA); only guidance='pretrained' runs without one")
            if r.adapter_name == BASE or r.adapter_name not in loaded:
                have = ", ".join(sorted(loaded)) or "none"
                raise SamplerError(f"unknown adapter {r.adapter_name!r}; LoRA adapters loaded into this pipeline: {have}. Load it first with pipe.load_lora_weights(dir, adapter_name=...)")
    noise = family.noise_process(pipe)
    try:
        sched = noise.scheduler(scheduler, pipe.scheduler.config)
    except UnknownSchedulerError as exc:
        raise SamplerError(str(exc)) from None

    device = pipe._execution_device
    reset_peak_memory(torch.device(device))  # this call's peak, not the process' (training may have run before)
    denoiser = family.denoiser(pipe)
    dtype = denoiser.dtype
    zero_negative = family.zero_negative(pipe, negative_prompt)
    counts = [len(s) for s in seeds]

    with adapter_state_preserved(denoiser, *family.text_encoders(pipe)):
        mode_spec = G.MODES[guidance]
        steps = int(num_inference_steps)
        windowed = mode_spec.outside is not None and not (consistency_start <= 0.0 and consistency_stop >= 1.0)
        specs = [mode_spec, mode_spec.outside] if windowed else [mode_spec]
        encoded: dict[tuple[str, bool], _Cond] = {}
        for spec in specs:
            for p, on in spec.rows:
                if (p, on) in encoded:
                    continue
                parts = []
                for r, (personal, base), n in zip(requests, prompts, counts, strict=True):
                    lora = r.adapter_name if (on and r.adapter_name is not None) else BASE
                    text = {"negative": negative_prompt, "base": base, "personal": personal}[p]
                    parts.append(_encode(pipe, family, text, lora, n, device, zero=zero_negative and p == "negative"))
                encoded[p, on] = _Cond.cat(parts)
        row_sets = [[encoded[r] for r in spec.rows] for spec in specs]
        adapters_used = list(dict.fromkeys(a for c in encoded.values() for a in c.adapters))

        if len(adapters_used) == 1 or not lora_layers(denoiser):
            mode = "single"
        else:
            blocker = mixed_batch_blocker(denoiser, adapters_used)
            if batch_mode == "batched" and blocker:
                raise SamplerError(f"batch_mode='batched' is impossible here: {blocker}; use batch_mode='auto' or 'separate'")
            mode = "separate" if (batch_mode == "separate" or blocker) else "batched"

        n = sum(counts)
        try:
            most_rows = max(len(rows) for rows in row_sets) * n
            time_ids = family.time_ids(pipe, [(height, width, 0, 0, height, width)] * most_rows,
                                       dtype=row_sets[0][0].text.embeds.dtype, device=device)
        except UnsupportedModelError as exc:
            raise SamplerError(str(exc)) from None
        generators = [torch.Generator("cpu").manual_seed(s) for group in seeds for s in group]
        from diffusers.utils.torch_utils import randn_tensor

        sched.set_timesteps(steps, device=device)
        shape = (n, family.latent_channels(pipe), height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        latents = noise.initial_latents(sched, randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype))
        step_params = inspect.signature(sched.step).parameters
        step_kwargs: dict[str, Any] = {"generator": generators} if "generator" in step_params else {}
        if "eta" in step_params:
            step_kwargs["eta"] = 0.0

        from tqdm.auto import tqdm

        unet_rows = [_DenoiserRows(pipe, family, rows, time_ids, mode, max_batch_rows) for rows in row_sets]
        scales = {"guidance_scale": guidance_scale, "consistency_scale": consistency_scale, "parallel_scale": parallel_scale}
        routing = contextlib.nullcontext()
        if mode == "batched":
            routing = per_sample_adapters(denoiser, _Cond.cat(row_sets[0]).adapters)
        elif mode == "single":
            use_adapter(denoiser, adapters_used[0])
        rows_per_image = 0
        with routing as route:
            for rows in unet_rows:
                rows.routing = route
            for i, t in enumerate(tqdm(sched.timesteps, desc=f"sampling ({guidance})", disable=not progress, leave=False)):
                k = 0 if not windowed or G.in_window(i, steps, consistency_start, consistency_stop) else 1
                rows_per_image += len(row_sets[k])
                latents = _step(noise, sched, unet_rows[k], latents, t, specs[k], step_kwargs, scales)

        images = _decode(pipe, family, latents, output_type, vae_tiling=vae_tiling)
    seconds = time.perf_counter() - started
    peak = peak_memory(torch.device(device))[0]
    outputs, start = [], 0
    for (personal, base), group, count in zip(prompts, seeds, counts, strict=True):
        part = images[start : start + count]
        outputs.append(SampleOutput(
            images=part, seeds=group, personal_prompt=personal, base_prompt=base, seconds=seconds * count / n,
            batch_mode=mode, guidance=guidance, scheduler=scheduler or type(sched).__name__, unet_rows=rows_per_image,
            peak_memory_bytes=peak, extra={"batch_images": n, "batch_requests": len(requests)},
        ))
        start += count
    return outputs


__all__ = ["Request", "SampleOutput", "SamplerError", "render_prompts", "image_seeds", "sample", "sample_batch", "SCHEDULER_NAMES", "BatchMode"]
