"""``prcore run MANIFEST --output URI``: the nightly batch, here, now.

Runs the ``nightly-batch`` Prefect flow in this process (Prefect's ephemeral local API unless
PREFECT_API_URL points at a server) with a live progress display. The manifest, output and model
are checked before Prefect starts, so a user error is one line and exit code 2; a run where some
subject failed exits 1 after all the others finished.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import typer

from prcore.cli.errors import UserError, user_errors
from prcore.cli.spec_options import spec_options
from prcore.data.schema import GENERATION_PARAMS, TRAIN_PARAMS
from prcore.pipeline.settings import FanOut, RunSettings

QUIET_PREFECT_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # A busy laptop can take longer than Prefect's default 20 s to start the ephemeral API.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_CLI_COLORS": "false",
}


def quiet_prefect(verbose: bool = False) -> None:
    """Environment for an in-process Prefect run: no analytics, no INFO chatter (unless ``verbose``).

    Must run before ``prefect`` is imported (Prefect reads its settings at import).
    """
    for key, value in QUIET_PREFECT_ENV.items():
        os.environ.setdefault(key, value)
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging tweaks only
        pass


def silence_shutdown() -> None:
    """After the result is printed: send stderr to /dev/null so the ephemeral API's shutdown
    tracebacks (event loop already closed, cancelled websockets) do not reach the user. atexit
    hooks still run, so Prefect still stops its temporary server."""
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives until exit
    except OSError:
        pass


@dataclass
class RunOutcome:
    ok: bool
    run_id: str | None
    output: str
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    ephemeral_seconds: float = 0.0


class _ProgressHandler(logging.Handler):
    """Feeds ``prcore.progress`` events (emitted by the flows) into a rich progress display."""

    def __init__(self, progress, console):
        super().__init__(logging.INFO)
        self.progress = progress
        self.console = console
        self.images = None
        self.subjects = None

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "prcore_event", None)
        if not event:
            return
        kind = event.get("event")
        if kind == "planned":
            self.subjects = self.progress.add_task("subjects", total=max(event["todo_subjects"], 0))
            self.images = self.progress.add_task("images", total=max(event["pending"], 0))
            self.console.print(f"run {event['run_id']}: {event['subjects']} subject(s), {event['images']} image(s), "
                               f"{event['pending']} to make in {event['shards']} shard(s)")
        elif kind == "request_done" and self.images is not None:
            self.progress.advance(self.images, event.get("generated", 0))
        elif kind in ("subject_done", "subject_failed") and self.subjects is not None:
            self.progress.advance(self.subjects, 1)
            if kind == "subject_failed":
                self.console.print(f"[red]subject {event['subject_id']} failed at {event['step']}: {event['error']}[/red]")


def preflight(manifest: str, output: str, settings: RunSettings) -> RunSettings:
    """Check what the user gave before Prefect starts; returns the settings with the model filled in.

    A hub id is loaded here (into the per-process cache the in-process flow then reuses), so an id
    that does not resolve is one clear error instead of a failure of every subject. The manifest is
    validated here; the flow plans it (once)."""
    from prcore.data.load import load_manifest
    from prcore.data.model_source import looks_local
    from prcore.data.schema import ManifestInvalid
    from prcore.data.validate import base_model_problem, validate
    from prcore.method.models import default_device, resolve_dtype
    from prcore.pipeline.models import default_model_id, resolve_model
    from prcore.pipeline.subject import open_output
    from prcore.store.storage import StoreError

    try:  # first, in seconds: the output root takes writes (a real probe write), before any model or plan
        store = open_output(output)
    except StoreError as exc:
        raise UserError(f"--output {output}: {exc}") from None
    try:
        resolve_dtype(settings.placement.dtype, settings.placement.device or default_device())
    except ValueError as exc:
        raise UserError(f"--dtype: {exc}") from None
    model = settings.model
    if model:
        if problem := base_model_problem(model):  # a local folder or single file: the manifest's own check
            raise UserError(f"--model: {problem}")
        if not looks_local(model):
            from prcore.method.models import ModelNotFoundError, load_pipeline

            try:
                load_pipeline(model, device=settings.placement.device, dtype=settings.placement.dtype)
            except ModelNotFoundError as exc:
                raise UserError(f"--model: {exc}") from None
    else:
        model = default_model_id()
        resolve_model(model, settings.cache_path())  # builds the tiny pipeline once, before Prefect starts
    loaded = load_manifest(manifest)
    errors = validate(loaded, check_images=False)
    if errors:
        raise ManifestInvalid(errors, loaded.source)
    # the run's defaults by the manifest's rules, and the instance images of the subjects with work left
    from prcore.pipeline.subject import plan_jobs

    plan_jobs(manifest, store, model_id=model, defaults=settings.generation, check_images=settings.check_images,
              cache_dir=settings.cache_path(), target_modules=settings.train.target_modules)
    return settings.model_copy(update={"model": model, "check_images": False})  # images checked: once is enough


def _no_store_write_traceback(record: logging.LogRecord) -> bool:
    """Drop Prefect's traceback of a run stopped by a refused write: the CLI prints it as one line."""
    from prcore.store.storage import StoreWriteError

    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, StoreWriteError) and "StoreWriteError" not in record.getMessage()


def run_batch(manifest: str, output: str, settings: RunSettings, fan_out: FanOut | None = None, *,
              verbose: bool = False, show_progress: bool = True) -> RunOutcome:
    """Validate, then run ``nightly-batch`` in-process with a live display; never raises on subject failures."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    quiet_prefect(verbose)
    console = Console(stderr=True)
    settings = preflight(manifest, output, settings)
    fan_out = fan_out or FanOut(use_gpu_limit=False)  # nothing defines the limit on an ephemeral API

    started = time.perf_counter()
    from prcore.cli.watchdog import start_watchdog

    start_watchdog()  # a kill of this process must not leave the ephemeral Prefect API behind
    from flows.nightly import nightly_batch  # imports Prefect: after quiet_prefect()

    progress = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not show_progress)
    handler = _ProgressHandler(progress, console)
    plog = logging.getLogger("prcore.progress")
    plog.setLevel(logging.INFO)
    plog.addHandler(handler)
    plog.propagate = False
    summary: dict[str, Any] = {}

    class _Finished(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            event = getattr(record, "prcore_event", None)
            if event and event.get("event") == "finished":
                summary.update(event["summary"])

    finished = _Finished(logging.INFO)
    plog.addHandler(finished)
    prefect_logs = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for lg in prefect_logs:
        lg.addFilter(_no_store_write_traceback)
    try:
        with progress:
            state = nightly_batch(manifest=manifest, output=output, settings=settings, fan_out=fan_out, return_state=True)
    finally:
        plog.removeHandler(handler)
        plog.removeHandler(finished)
        for lg in prefect_logs:
            lg.removeFilter(_no_store_write_traceback)
    ok = state.is_completed()
    error = None
    if not ok:
        from prcore.store.storage import StoreWriteError

        try:
            state.result(raise_on_failure=True)
        except StoreWriteError:  # disk full / permission denied mid-run: one line, exit 2 (finished outputs kept)
            raise
        except Exception as exc:  # the flow's own one-line failure message
            error = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return RunOutcome(ok=ok, run_id=summary.get("run_id"), output=output, summary=summary, error=error,
                      ephemeral_seconds=time.perf_counter() - started)


def print_outcome(outcome: RunOutcome) -> None:
    s = outcome.summary
    root = s.get("output", outcome.output)
    if s:
        print(f"run {s.get('run_id')}: {s.get('generated', 0)} image(s) generated, {s.get('skipped', 0)} already done, "
              f"{s.get('failed_subjects', 0)} subject(s) failed, {s.get('trained', 0)} LoRA(s) trained")
        print(f"  images:         {root}/images/")
        print(f"  contact sheets: {root}/runs/{s.get('run_id')}/contact_sheets/")
        print(f"  catalogue:      {root}/catalog/")
        print(f"  run summary:    {root}/runs/{s.get('run_id')}/summary.json")
    if not outcome.ok:
        print(f"error: {outcome.error or 'the run failed'}", file=sys.stderr)
        if s:
            print(f"  failure report: {root}/runs/{s.get('run_id')}/failures.json", file=sys.stderr)


# The run's defaults for null manifest cells: every sampling parameter, and the training steps,
# as options generated from their specs (None: the settings' default).
_RUN_PARAMS = {**GENERATION_PARAMS, "train_steps": TRAIN_PARAMS["steps"]}


@spec_options(_RUN_PARAMS, optional=True)
def run_command(
    manifest: str = typer.Argument(..., help="Parquet manifest: a file, a folder of files or an s3:// prefix."),
    output: str = typer.Option(..., "--output", "-o", help="Output root: a folder or s3://bucket/prefix."),
    model: str | None = typer.Option(None, "--model", help="Base model: a diffusers folder or hub id (default: the embedded model)."),
    subjects_per_shard: int | None = typer.Option(None, "--subjects-per-shard", min=1,
                                                  help="Subjects per shard (default: chosen from the subjects with work left)."),
    max_subjects: int | None = typer.Option(None, "--max-subjects", help="Run at most this many subjects with work left."),
    device: str | None = typer.Option(None, "--device", help="cuda, mps or cpu (default: best available)."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: bf16 on GPUs that have it, else fp16 on CUDA, fp32 on the CPU)."),
    max_batch_rows: int | None = typer.Option(None, "--max-batch-rows", help="UNet rows per forward (3 per image); lower it when a GPU runs out of memory."),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Decode images in tiles (very large sizes)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="UNet in channels-last memory format (GPU speed option)."),
    compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet (GPU speed option; recompiles after each LoRA change)."),
    clip_model: str | None = typer.Option(None, "--clip-model", help="Score images with this CLIP model (folder or hub id)."),
    dino_model: str | None = typer.Option(None, "--dino-model", help="Score images with this DINO model."),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Local cache for models and LoRAs (default ~/.cache/prcore)."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images",
                                      help="Open the instance images of every subject with work left before starting (as validate does)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
    params: dict[str, Any] | None = None,
) -> None:
    """Run the nightly batch on MANIFEST into --output, here (Prefect's ephemeral API), with live progress."""
    from prcore.store.storage import StoreError

    params = params or {}
    generation = {k: v for k, v in params.items() if k in GENERATION_PARAMS}
    with user_errors(StoreError):
        settings = settings_from_options(
            model=model, generation=generation, train={"steps": params.get("train_steps")}, device=device, dtype=dtype,
            max_batch_rows=max_batch_rows, vae_tiling=vae_tiling, channels_last=channels_last, compile_unet=compile_unet,
            clip_model=clip_model, dino_model=dino_model, cache_dir=cache_dir, check_images=check_images)
        fan_out = FanOut(subjects_per_shard=subjects_per_shard, max_subjects=max_subjects, use_gpu_limit=False)
        outcome = run_batch(manifest, output, settings, fan_out, verbose=verbose)
    print_outcome(outcome)
    silence_shutdown()
    raise typer.Exit(0 if outcome.ok else 1)


def settings_from_options(*, model: str | None = None, generation: dict[str, Any] | None = None,
                          train: dict[str, Any] | None = None, device: str | None = None, dtype: str | None = None,
                          max_batch_rows: int | None = None, vae_tiling: bool = False, channels_last: bool = False,
                          compile_unet: bool = False, clip_model: str | None = None,
                          dino_model: str | None = None, cache_dir: str | None = None, check_images: bool = True) -> RunSettings:
    """:class:`RunSettings` from command-line options (None: the default); invalid values are one
    clear error, like a bad manifest cell."""
    from pydantic import ValidationError

    drop = lambda d: {k: v for k, v in (d or {}).items() if v is not None}  # noqa: E731
    raw = {"model": model, "generation": drop(generation), "train": drop(train),
           "placement": drop({"device": device, "dtype": dtype, "max_batch_rows": max_batch_rows, "vae_tiling": vae_tiling or None,
                              "channels_last": channels_last or None, "compile_unet": compile_unet or None}),
           "scoring": drop({"clip_model": clip_model, "dino_model": dino_model}),
           "cache_dir": cache_dir, "check_images": check_images}
    try:
        return RunSettings.model_validate(drop(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"invalid option {where}: {first['msg']}") from None


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
