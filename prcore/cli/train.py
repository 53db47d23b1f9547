"""``prcore train``: fine-tune one subject's LoRA with DCO and write it in the diffusers format."""

from __future__ import annotations

from pathlib import Path

import typer

from prcore.cli.errors import UserError, user_errors
from prcore.data.schema import DEFAULT_IDENTIFIER


def train_command(
    model: str = typer.Option(..., "--model", help="Base pipeline: a local diffusers folder or a hub id (SD 1.x/2.x or SDXL)."),
    images: list[Path] = typer.Option(..., "--images", help="Instance images: a folder (its image files) or files; repeat the option for several."),
    class_noun: str = typer.Option(..., "--class-noun", help="The subject's class, e.g. dog."),
    identifier: str = typer.Option(DEFAULT_IDENTIFIER, "--identifier", help="Rare identifier word for the subject (not the class noun)."),
    out: Path = typer.Option(..., "--out", help="LoRA folder to create (pytorch_lora_weights.safetensors + training.json)."),
    caption: list[str] | None = typer.Option(None, "--caption", help='Caption template with {subject}: once for all images, or once per image in order. Default "a photo of a {subject}".'),
    steps: int = typer.Option(400, "--train-steps", help="Optimizer steps (the manifest column train_steps)."),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", "--lr", help="AdamW learning rate."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank r."),
    alpha: float = typer.Option(8.0, "--alpha", help="LoRA alpha (scaling alpha/r)."),
    target_modules: str = typer.Option("to_q,to_k,to_v,to_out.0", "--target-modules", help="Comma-separated UNet module names to adapt."),
    resolution: int | None = typer.Option(None, "--resolution", help="Training resolution (default: the model's)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Instance images per step."),
    dco_beta: float = typer.Option(1000.0, "--dco-beta", help="DCO beta; <= 0 trains with the plain DreamBooth loss."),
    seed: int = typer.Option(0, "--seed", help="Seed of LoRA init, noise, timesteps, flips."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="auto | no | fp16 | bf16 (auto: bf16 on GPUs that have it, else fp16; on the CPU bf16 for bf16 weights, else fp32)."),
    gradient_checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Trade compute for memory (default: on for SDXL)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adamw8bit (bitsandbytes, CUDA)."),
    train_text_embeddings: bool = typer.Option(False, "--train-text-embeddings/--no-train-text-embeddings", help="Also learn an embedding for the identifier (must be a new token, e.g. '<sks>')."),
    prior_preservation: bool = typer.Option(False, "--prior-preservation/--no-prior-preservation", help="Add a prior loss on class images the base model generates."),
    num_class_images: int = typer.Option(50, "--num-class-images", help="Class images for prior preservation."),
    prior_loss_weight: float = typer.Option(1.0, "--prior-loss-weight", help="Weight of the prior-preservation loss."),
    offset_noise: float = typer.Option(0.0, "--offset-noise", help="Offset-noise strength (0 = off)."),
    snr_gamma: float | None = typer.Option(None, "--snr-gamma", help="Min-SNR-gamma loss weighting, e.g. 5 (default off)."),
    random_flip: bool = typer.Option(True, "--random-flip/--no-random-flip", help="Random horizontal flips."),
    device: str | None = typer.Option(None, "--device", help="cuda, mps or cpu (default: best available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Pipeline dtype: float32 | float16 | bfloat16 (default: fp16 on CUDA, else fp32)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with the running loss."),
) -> None:
    """Fine-tune a LoRA on one subject with Direct Consistency Optimization (DCO)."""
    from prcore.data.images import list_image_files
    from prcore.data.schema import TrainConfig
    from prcore.method.dco import check_subject, resolve_captions, train_subject_lora
    from prcore.method.models import ModelNotFoundError

    with user_errors(ModelNotFoundError):
        # Everything checkable without the model is checked before loading it.
        config = TrainConfig(
            steps=steps, learning_rate=learning_rate, rank=rank, alpha=alpha, target_modules=target_modules,
            resolution=resolution, batch_size=batch_size, dco_beta=dco_beta, seed=seed,
            mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
            train_text_embeddings=train_text_embeddings, prior_preservation=prior_preservation,
            num_class_images=num_class_images, prior_loss_weight=prior_loss_weight, offset_noise=offset_noise,
            snr_gamma=snr_gamma, random_flip=random_flip,
        )
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
