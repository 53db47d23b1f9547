"""``prcore sample``: sample a personalized subject with a LoRA and write PNGs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import typer

from prcore.cli.errors import UserError, user_errors
from prcore.cli.spec_options import spec_options
from prcore.data.schema import GENERATION_PARAMS, PROMPT, SEED
from prcore.store.keys import LORA_WEIGHTS_FILE


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


@spec_options({**GENERATION_PARAMS, "seed": SEED}, defaults={"num_images": 1, "seed": 0})
def sample_command(
    model: str = typer.Option(..., "--model", help="Base pipeline: a local diffusers folder or a hub id (SD 1.x/2.x or SDXL)."),
    prompt: str = typer.Option(..., "--prompt", help=f'{PROMPT.spec.help} Allowed: {PROMPT.spec.rule(PROMPT.kind)}. E.g. "a {{subject}} in the snow".'),
    class_noun: str = typer.Option(..., "--class-noun", help="The subject's class, e.g. dog."),
    out: Path = typer.Option(..., "--out", help="Folder to write the PNGs (and a JSON sidecar per image) into."),
    lora: Path | None = typer.Option(None, "--lora", help="The subject's LoRA folder (diffusers format). Optional only with --guidance pretrained."),
    device: str | None = typer.Option(None, "--device", help="cuda, mps or cpu (default: best available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: fp16 on CUDA, else fp32)."),
    max_batch_rows: int | None = typer.Option(None, "--max-batch-rows", min=1, help="UNet rows per forward (3 per image); lower it when a GPU runs out of memory."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Decode images in tiles (very large sizes)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="UNet in channels-last memory format (GPU speed option)."),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet (GPU speed option)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar over the steps."),
    params: dict[str, Any] | None = None,
) -> None:
    """Sample a personalized subject with parallel-rescaled consistency guidance and write PNGs.

    The sampling options (--guidance ... --consistency-stop, --seed, --num-images, --identifier)
    are generated from their specs in prcore.data.schema, and checked by them before any work."""
    from prcore.method.models import ModelNotFoundError, placement
    from prcore.method.sampler import render_prompts

    params = dict(params or {})
    identifier, seed, num_images = params.pop("identifier"), params.pop("seed"), params.pop("num_images")
    guidance = params["guidance"]
    with user_errors(ModelNotFoundError):
        # Everything checkable without the model is checked before loading it.
        if problem := PROMPT.problem(prompt):
            raise UserError(f"--prompt: {problem}")
        render_prompts(prompt, class_noun, identifier)
        _check_lora_dir(lora, guidance)
        names = [f"{guidance}-seed{seed}-{i:03d}" for i in range(num_images)]
        existing = [n + ".png" for n in names if (out / f"{n}.png").exists()]
        if existing:
            raise UserError(f"{out} already holds {', '.join(existing)}; choose another --out or --seed (finished images are never overwritten)")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        _check_writable(out)

        from prcore.method.accel import DenoiserOptions, configure_denoiser
        from prcore.method.models import load_pipeline
        from prcore.method.sampler import sample

        pipe = load_pipeline(model, device=device, dtype=dtype)
        configure_denoiser(pipe, DenoiserOptions(channels_last=channels_last, compile=compile_unet))
        adapter = _load_lora(pipe, lora) if lora is not None else None
        result = sample(
            pipe, prompt=prompt, class_noun=class_noun, identifier=identifier, adapter_name=adapter,
            seed=seed, num_images=num_images, output_type="pil", progress=progress, max_batch_rows=max_batch_rows,
            vae_tiling=vae_tiling, **params,
        )
    from prcore.data.fingerprint import default_prompt_id, fingerprint
    from prcore.outputs.sidecar import ImageRecord, encode_image, sidecar_bytes

    req_fp = fingerprint("sample-cli", 1, {"model": str(model), "lora": str(lora) if lora else None, "prompt": prompt, "seed": seed, **params})
    recorded = {k: v for k, v in params.items() if k not in ("scheduler", "height", "width")}  # recorded as used, below
    from prcore.store.storage import LocalStore, StoreError

    device, dtype = placement(pipe)
    store = LocalStore(out)  # atomic writes (tmp + rename); a full disk or a refused write: one line, exit 2
    for i, (name, image) in enumerate(zip(names, result.images, strict=True)):
        record = ImageRecord(
            subject_id=class_noun.replace(" ", "_"), prompt_id=default_prompt_id(prompt), req_fp=req_fp, index=i,
            key=f"{name}.png", seed=result.seeds[i], prompt_template=prompt, personal_prompt=result.personal_prompt,
            base_prompt=result.base_prompt, class_noun=class_noun, identifier=identifier, **recorded,
            scheduler=result.scheduler, height=image.height, width=image.width, base_model=str(model),
            lora_fp=None, device=device, dtype=dtype,
            peak_memory_bytes=result.peak_memory_bytes, unet_rows=result.unet_rows,
            seconds=round(result.seconds / num_images, 4),
            extra={"lora": str(lora) if lora else None, "request_seed": seed, "unet_batching": result.batch_mode},
        )
        data, record = encode_image(record, image)
        with user_errors(StoreError):
            store.put(f"{name}.png", data)
            store.put(f"{name}.json", sidecar_bytes(record))  # last: the sidecar marks the image finished
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
