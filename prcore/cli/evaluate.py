"""``prcore eval`` (score an existing output root) and ``prcore bench dreambench`` (the DreamBench protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prcore.cli.errors import UserError, user_errors
from prcore.data.schema import GENERATION_PARAMS, GenerationDefaults

_G = GenerationDefaults()  # the sampling defaults: one owner (prcore.data.schema); BenchConfig checks the values by their specs


def _help(name: str) -> str:
    """An option's help text from its parameter spec."""
    p = GENERATION_PARAMS[name]
    return f"{p.spec.help} Allowed: {p.spec.rule(p.kind)}."

DEFAULT_MODES = "parallel_rescaled,consistency,cfg"


def _store_errors() -> tuple[type[BaseException], ...]:
    from prcore.store.storage import StoreError

    return (StoreError,)


def _scorer(clip_model: str | None, dino_model: str | None, device: str | None, dtype: str | None, batch_size: int):
    from prcore.quality.scorer import Scorer

    if not clip_model and not dino_model:
        raise UserError("no metric model configured: give --clip-model (CLIP-T, CLIP-I) and/or --dino-model (DINO)")
    return Scorer(clip_model=clip_model, dino_model=dino_model, device=device, dtype=dtype, batch_size=batch_size)


def _fmt(value) -> str:
    return "" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def eval_command(
    output_root: Annotated[str, typer.Argument(help="Output root: a folder or s3://bucket/prefix.")],
    run: Annotated[str | None, typer.Option("--run", help="Score only the images of this run id.")] = None,
    clip_model: Annotated[str | None, typer.Option("--clip-model", help="CLIP model folder or hub id (CLIP-T, CLIP-I), e.g. openai/clip-vit-large-patch14.")] = None,
    dino_model: Annotated[str | None, typer.Option("--dino-model", help="DINO/ViT model folder or hub id, e.g. facebook/dino-vits16.")] = None,
    references: Annotated[Path | None, typer.Option("--references", help="Folder with one sub-folder of reference images per subject_id.")] = None,
    manifest: Annotated[str | None, typer.Option("--manifest", help="The manifest that produced the outputs: its instance_images are the references.")] = None,
    qc_clip_t: Annotated[float | None, typer.Option("--qc-clip-t", help="QC: minimum CLIP-T.")] = None,
    qc_clip_i: Annotated[float | None, typer.Option("--qc-clip-i", help="QC: minimum CLIP-I.")] = None,
    qc_dino: Annotated[float | None, typer.Option("--qc-dino", help="QC: minimum DINO.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cuda, cpu, mps (default: best available).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32, float16, bfloat16 (default: fp16 on CUDA, else fp32).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
) -> None:
    """Score existing outputs (CLIP-T, CLIP-I, DINO), apply QC, update the sidecars, write runs/.../scores.parquet."""
    from rich.console import Console
    from rich.table import Table

    from prcore.quality.evaluate import evaluate_outputs, reference_uris_from_folder, reference_uris_from_manifest
    from prcore.quality.qc import METRICS, QCThresholds
    from prcore.quality.scorer import MetricModelError
    from prcore.store.storage import open_store

    console = Console()
    with user_errors(MetricModelError, *_store_errors()):
        thresholds = QCThresholds(clip_t=qc_clip_t, clip_i=qc_clip_i, dino=qc_dino)
        if references is not None and manifest is not None:
            raise UserError("give --references or --manifest, not both")
        uris = None
        if references is not None:
            if not references.is_dir():
                raise UserError(f"--references {references} is not a folder")
            uris = reference_uris_from_folder(references)
        elif manifest is not None:
            uris = reference_uris_from_manifest(manifest)
        store = open_store(output_root)
        scorer = _scorer(clip_model, dino_model, device, dtype, batch_size)
        result = evaluate_outputs(store, scorer, run_id=run, thresholds=thresholds, reference_uris=uris)
    if not result.rows:
        console.print(f"no committed images found under {output_root}/images/")
        for line in result.skipped:
            console.print(f"[yellow]skipped[/] {line}")
        raise typer.Exit(1)
    table = Table(title=f"scores: {len(result.rows)} images")
    table.add_column("subject")
    table.add_column("images", justify="right")
    metrics = [m for m in METRICS if m in scorer.metrics]
    for m in metrics:
        table.add_column(m, justify="right")
    table.add_column("QC failed", justify="right")
    for entry in result.summary():
        table.add_row(entry["subject_id"], str(entry["images"]), *[_fmt(entry.get(m)) for m in metrics], _fmt(entry["qc_failed"]))
    console.print(table)
    for line in result.skipped:
        console.print(f"[yellow]skipped[/] {line}")
    typer.echo(f"sidecars updated; scores in {store.uri.rstrip('/')}/{result.scores_key}")


def dreambench_command(
    data: Annotated[Path, typer.Option("--data", help="google/dreambooth-style folder: one sub-folder of images per subject.")],
    model: Annotated[str, typer.Option("--model", help="Base pipeline folder or hub id (SD 1.x/2.x or SDXL).")],
    output: Annotated[str, typer.Option("--output", help="Where images, scores and the table go: folder or s3://bucket/prefix.")],
    clip_model: Annotated[str | None, typer.Option("--clip-model", help="CLIP model folder or hub id (CLIP-I, CLIP-T).")] = None,
    dino_model: Annotated[str | None, typer.Option("--dino-model", help="DINO model folder or hub id (DINO).")] = None,
    subjects: Annotated[str | None, typer.Option("--subjects", help="Comma-separated subject ids (default: all in the subjects CSV).")] = None,
    prompts_per_subject: Annotated[int | None, typer.Option("--prompts-per-subject", min=1, help="First N templates per subject (default: all 25).")] = None,
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", help=_help("num_images"))] = _G.num_images,
    modes: Annotated[str, typer.Option("--modes", help="Comma-separated guidance modes.")] = DEFAULT_MODES,
    num_inference_steps: Annotated[int, typer.Option("--num-inference-steps", help=_help("num_inference_steps"))] = _G.num_inference_steps,
    guidance_scale: Annotated[float, typer.Option("--guidance-scale", help=_help("guidance_scale"))] = _G.guidance_scale,
    consistency_scale: Annotated[float, typer.Option("--consistency-scale", help=_help("consistency_scale"))] = _G.consistency_scale,
    parallel_scale: Annotated[float, typer.Option("--parallel-scale", help=_help("parallel_scale"))] = _G.parallel_scale,
    height: Annotated[int | None, typer.Option("--height", help=_help("height"))] = _G.height,
    width: Annotated[int | None, typer.Option("--width", help=_help("width"))] = _G.width,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help=_help("scheduler"))] = _G.scheduler,
    identifier: Annotated[str, typer.Option("--identifier", help=_help("identifier"))] = _G.identifier,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    train_steps: Annotated[int | None, typer.Option("--train-steps", min=1, help="LoRA training steps (TrainConfig.steps).")] = None,
    train: Annotated[list[str] | None, typer.Option("--train", help="Training override KEY=VALUE (a TrainConfig field), repeatable.")] = None,
    subjects_csv: Annotated[Path | None, typer.Option("--subjects-csv", help="Default: DATA/dreambench_subjects.csv, else the shipped copy.")] = None,
    object_prompts: Annotated[Path | None, typer.Option("--object-prompts")] = None,
    live_prompts: Annotated[Path | None, typer.Option("--live-prompts")] = None,
    work_dir: Annotated[Path | None, typer.Option("--work-dir", help="Keep trained LoRAs here (reused on re-runs); default: a temporary folder.")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Scoring batch size.")] = 32,
) -> None:
    """Run the DreamBench protocol for the guidance modes and write the paper-style table."""
    from rich.console import Console

    from prcore.method.models import ModelNotFoundError
    from prcore.quality.dreambench import BenchConfig, load_protocol, parse_train_overrides, run_dreambench
    from prcore.quality.scorer import MetricModelError
    from prcore.store.storage import open_store

    console = Console(stderr=True)
    with user_errors(MetricModelError, ModelNotFoundError, *_store_errors()):
        overrides = parse_train_overrides(train or [])
        if train_steps is not None:
            overrides["steps"] = train_steps
        chosen = tuple(s.strip() for s in subjects.split(",") if s.strip()) if subjects else None
        config = BenchConfig(
            model=model, modes=tuple(m.strip() for m in modes.split(",") if m.strip()), subjects=chosen,
            prompts_per_subject=prompts_per_subject, images_per_prompt=images_per_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, consistency_scale=consistency_scale, parallel_scale=parallel_scale,
            height=height, width=width, scheduler=scheduler, identifier=identifier, seed=seed, train_overrides=overrides,
        )
        protocol = load_protocol(data, subjects=chosen, subjects_csv=subjects_csv, object_prompts=object_prompts, live_prompts=live_prompts)
        store = open_store(output)
        scorer = _scorer(clip_model, dino_model, device, dtype, batch_size)
        result = run_dreambench(
            protocol, config=config, scorer=scorer, output=store, device=device, dtype=dtype, work_dir=work_dir,
            log=lambda msg: console.print(msg), progress=True,
        )
    typer.echo(result.markdown)
    typer.echo(f"images, scores.parquet and table.{{md,csv,parquet}} in {result.output_uri} ({result.seconds:.0f}s)")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    bench = typer.Typer(help="Benchmarks of the product's guidance modes.", no_args_is_help=True)
    bench.command("dreambench")(dreambench_command)
    app.add_typer(bench, name="bench")
