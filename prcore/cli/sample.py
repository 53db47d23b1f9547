"""``prcore sample``: sample a personalized subject with a LoRA and write PNGs."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import typer

from prcore.cli.errors import UserError, user_errors
from prcore.data.schema import DEFAULT_IDENTIFIER, GenerationDefaults
from prcore.store.keys import LORA_WEIGHTS_FILE

_D = GenerationDefaults()  # the flow's defaults, so `prcore sample` draws what a manifest row would


def _adapter_name(lora_dir: Path) -> str:
    """A stable adapter name per LoRA folder, so loading the same folder twice is a no-op."""
    return "subject-" + hashlib.sha256(str(lora_dir.resolve()).encode()).hexdigest()[:12]


def _load_lora(pipe, lora_dir: Path) -> str:
    from prcore.method.lora_io import load_subject_lora

    name = _adapter_name(lora_dir)
    load_subject_lora(pipe, lora_dir, name)
    return name


def _check_lora_dir(lora: Path | None, guidance: str) -> None:
    if lora is None:
        if guidance != "pretrained":
            raise UserError(f"--lora DIR is required for --guidance {guidance} (only --guidance pretrained runs without a LoRA)")
        return
    if not lora.is_dir():
        raise UserError(f"--lora {lora}: no such folder (give the folder holding {LORA_WEIGHTS_FILE})")
    if not (lora / LORA_WEIGHTS_FILE).is_file():
        raise UserError(f"--lora {lora}: {LORA_WEIGHTS_FILE} is missing; point --lora at a LoRA folder in diffusers format")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sample_command(
    model: str = typer.Option(..., "--model", help="Base pipeline: a local diffusers folder or a hub id (SD 1.x/2.x or SDXL)."),
    prompt: str = typer.Option(..., "--prompt", help='Prompt template with {subject}, e.g. "a {subject} in the snow".'),
    class_noun: str = typer.Option(..., "--class-noun", help="The subject's class, e.g. dog."),
    out: Path = typer.Option(..., "--out", help="Folder to write the PNGs (and a JSON sidecar per image) into."),
    lora: Path | None = typer.Option(None, "--lora", help="The subject's LoRA folder (diffusers format). Optional only with --guidance pretrained."),
    identifier: str = typer.Option(DEFAULT_IDENTIFIER, "--identifier", help="The subject's rare identifier token."),
    guidance: str = typer.Option(_D.guidance, "--guidance", help="parallel_rescaled | consistency | cfg | pretrained."),
    guidance_scale: float = typer.Option(_D.guidance_scale, "--guidance-scale", help="w_cfg: classifier-free guidance weight."),
    consistency_scale: float = typer.Option(_D.consistency_scale, "--consistency-scale", help="w_cg: consistency guidance weight."),
    parallel_scale: float = typer.Option(_D.parallel_scale, "--parallel-scale", help="eta: weight of the part of g_cg parallel to g_cfg (1 = DCO)."),
    num_inference_steps: int = typer.Option(_D.num_inference_steps, "--num-inference-steps", help="Denoising steps."),
    seed: int = typer.Option(0, "--seed", help="Request seed; image i uses a generator seeded from (seed, i)."),
    num_images: int = typer.Option(1, "--num-images", help="How many images."),
    negative_prompt: str = typer.Option(_D.negative_prompt, "--negative-prompt", help="Negative prompt (empty by default)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="ddim | euler | euler_ancestral | dpmpp_2m | dpmpp_2m_karras | unipc | pndm (default: the model's)."),
    height: int | None = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: int | None = typer.Option(None, "--width", help="Image width (default: the model's)."),
    device: str | None = typer.Option(None, "--device", help="cuda, mps or cpu (default: best available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: fp16 on CUDA, else fp32)."),
    consistency_start: float = typer.Option(_D.consistency_start, "--consistency-start", help="Start of the consistency window (fraction of the schedule)."),
    consistency_stop: float = typer.Option(_D.consistency_stop, "--consistency-stop", help="End of the consistency window; outside it two UNet rows per image instead of three."),
    max_batch_rows: int | None = typer.Option(None, "--max-batch-rows", min=1, help="UNet rows per forward (3 per image); lower it when a GPU runs out of memory."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Decode images in tiles (very large sizes)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="UNet in channels-last memory format (GPU speed option)."),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet (GPU speed option)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over the steps."),
) -> None:
    """Sample a personalized subject with parallel-rescaled consistency guidance and write PNGs."""
    from prcore.data.schema import GUIDANCE_MODES, SCHEDULER_NAMES, scheduler_key
    from prcore.method.models import ModelNotFoundError
    from prcore.method.sampler import render_prompts

    with user_errors(ModelNotFoundError):
        # Everything checkable without the model is checked before loading it.
        render_prompts(prompt, class_noun, identifier)
        if guidance not in GUIDANCE_MODES:
            raise UserError(f"--guidance {guidance!r} is not one of: {', '.join(GUIDANCE_MODES)}")
        for flag, value in (("--guidance-scale", guidance_scale), ("--consistency-scale", consistency_scale), ("--parallel-scale", parallel_scale)):
            if value < 0:
                raise UserError(f"{flag} must be >= 0, got {value}")
        if scheduler is not None and scheduler_key(scheduler) not in SCHEDULER_NAMES:
            raise UserError(f"--scheduler {scheduler!r} is unknown; choose one of: {', '.join(SCHEDULER_NAMES)}")
        if num_inference_steps < 1 or num_images < 1 or seed < 0:
            raise UserError("--num-inference-steps and --num-images must be >= 1 and --seed >= 0")
        _check_lora_dir(lora, guidance)
        names = [f"{guidance}-seed{seed}-{i:03d}" for i in range(num_images)]
        existing = [n + ".png" for n in names if (out / f"{n}.png").exists()]
        if existing:
            raise UserError(f"{out} already holds {', '.join(existing)}; choose another --out or --seed (finished images are never overwritten)")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        _check_writable(out)

        from prcore.method.accel import UNetOptions, configure_unet
        from prcore.method.models import load_pipeline
        from prcore.method.sampler import sample

        pipe = load_pipeline(model, device=device, dtype=dtype)
        configure_unet(pipe, UNetOptions(channels_last=channels_last, compile=compile_unet))
        adapter = _load_lora(pipe, lora) if lora is not None else None
        result = sample(
            pipe, prompt=prompt, class_noun=class_noun, identifier=identifier, adapter_name=adapter,
            negative_prompt=negative_prompt, guidance=guidance, guidance_scale=guidance_scale,
            consistency_scale=consistency_scale, parallel_scale=parallel_scale, num_inference_steps=num_inference_steps,
            height=height, width=width, seed=seed, num_images=num_images, scheduler=scheduler,
            output_type="pil", progress=progress, max_batch_rows=max_batch_rows, vae_tiling=vae_tiling,
            consistency_start=consistency_start, consistency_stop=consistency_stop,
        )
    from prcore.data.fingerprint import fingerprint
    from prcore.data.load import default_prompt_id
    from prcore.outputs.sidecar import ImageRecord, encode_image, sidecar_bytes

    params = {"guidance": guidance, "guidance_scale": guidance_scale, "consistency_scale": consistency_scale,
              "parallel_scale": parallel_scale, "num_inference_steps": num_inference_steps,
              "negative_prompt": negative_prompt, "consistency_start": consistency_start, "consistency_stop": consistency_stop}
    req_fp = fingerprint("sample-cli", 1, {"model": str(model), "lora": str(lora) if lora else None, "prompt": prompt,
                                          "seed": seed, "scheduler": scheduler, "height": height, "width": width, **params})
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, image) in enumerate(zip(names, result.images, strict=True)):
        record = ImageRecord(
            subject_id=class_noun.replace(" ", "_"), prompt_id=default_prompt_id(prompt), req_fp=req_fp, index=i,
            key=f"{name}.png", seed=result.seeds[i], prompt_template=prompt, personal_prompt=result.personal_prompt,
            base_prompt=result.base_prompt, class_noun=class_noun, identifier=identifier, **params,
            scheduler=result.scheduler, height=image.height, width=image.width, base_model=str(model),
            lora_fp=None, device=str(pipe.unet.device), dtype=str(pipe.unet.dtype).removeprefix("torch."),
            peak_memory_bytes=result.peak_memory_bytes, unet_rows=result.unet_rows,
            seconds=round(result.seconds / num_images, 4),
            extra={"lora": str(lora) if lora else None, "request_seed": seed, "unet_batching": result.batch_mode},
        )
        data, record = encode_image(record, image)
        _write_atomic(out / f"{name}.png", data)
        _write_atomic(out / f"{name}.json", sidecar_bytes(record))
        typer.echo(str(out / f"{name}.png"))
    typer.echo(f"wrote {num_images} image(s) to {out} in {result.seconds:.1f}s", err=True)


def _check_writable(out: Path) -> None:
    """A real probe write (and delete) in ``--out`` before the model loads: one line, exit 2, when refused."""
    from prcore.store.storage import LocalStore, StoreError, probe_write

    try:
        probe_write(LocalStore(out))
    except StoreError as exc:
        raise UserError(f"--out {out}: {exc}") from None


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
