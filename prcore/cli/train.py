"""``prcore train``: fine-tune one subject's LoRA with DCO and write it in the diffusers format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from prcore.cli.errors import UserError, user_errors
from prcore.cli.spec_options import spec_options
from prcore.data.schema import GENERATION_PARAMS, TRAIN_PARAMS


@spec_options(TRAIN_PARAMS)
def train_command(
    model: str = typer.Option(..., "--model", help="Base pipeline: a local diffusers folder or a hub id (SD 1.x/2.x or SDXL)."),
    images: list[Path] = typer.Option(..., "--images", help="Instance images: a folder (its image files) or files; repeat the option for several."),
    class_noun: str = typer.Option(..., "--class-noun", help="The subject's class, e.g. dog."),
    identifier: str = typer.Option(GENERATION_PARAMS["identifier"].default, "--identifier", help="Rare identifier word for the subject (not the class noun)."),
    out: Path = typer.Option(..., "--out", help="LoRA folder to create (pytorch_lora_weights.safetensors + training.json)."),
    caption: list[str] | None = typer.Option(None, "--caption", help='Caption template with {subject}: once for all images, or once per image in order. Default "a photo of a {subject}".'),
    device: str | None = typer.Option(None, "--device", help="cuda, mps or cpu (default: best available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Pipeline dtype: float32 | float16 | bfloat16 (default: fp16 on CUDA, else fp32)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with the running loss."),
    params: dict[str, Any] | None = None,
) -> None:
    """Fine-tune a LoRA on one subject with Direct Consistency Optimization (DCO)."""
    from prcore.data.images import list_image_files
    from prcore.data.schema import TrainConfig
    from prcore.method.dco import check_subject, resolve_captions, train_subject_lora
    from prcore.method.models import ModelNotFoundError

    with user_errors(ModelNotFoundError):
        # Everything checkable without the model is checked before loading it.
        config = TrainConfig(**(params or {}))  # the training options: generated from TrainConfig's specs
        check_subject(class_noun, identifier)
        files = list_image_files(images)
        captions = None
        if caption:
            if len(caption) not in (1, len(files)):
                raise UserError(f"got {len(caption)} --caption values for {len(files)} images: give one for all or one per image")
            captions = resolve_captions(caption[0] if len(caption) == 1 else caption, len(files))
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")

        from prcore.method.models import load_pipeline

        pipe = load_pipeline(model, device=device, dtype=dtype)
        result = train_subject_lora(
            pipe, images=files, class_noun=class_noun, identifier=identifier, out_dir=out,
            captions=captions, config=config, progress=progress,
        )
    if result.reused:
        typer.echo(f"{out}: already trained for these inputs (fingerprint {result.fingerprint}); nothing to do", err=True)
    else:
        typer.echo(
            f"trained {len(result.losses)} steps in {result.seconds_total:.1f}s ({result.seconds_per_step:.3f}s/step), "
            f"final loss {result.losses[-1]:.4f}, fingerprint {result.fingerprint}",
            err=True,
        )
    typer.echo(str(out))


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
