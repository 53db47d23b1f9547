"""``prcore demo --output DIR``: the nightly batch on the demo manifest with the embedded model.

Equivalent to ``prcore run manifests/demo.parquet --output DIR`` with settings sized for a CPU
(few training and denoising steps), then prints where the images, contact sheets and catalogue are.
"""

from __future__ import annotations

from pathlib import Path

import typer

from prcore.cli.errors import UserError, user_errors

DEMO_TRAIN_STEPS = 80
DEMO_INFERENCE_STEPS = 20


def demo_manifest() -> Path:
    """``manifests/demo.parquet`` of the checkout (the repository root above the package)."""
    import prcore

    path = Path(prcore.__file__).resolve().parents[1] / "manifests" / "demo.parquet"
    if not path.is_file():
        raise UserError(f"demo manifest {path} not found: run from a checkout of the repository "
                        "(or regenerate it with `python manifests/make_demo.py`)")
    return path


def demo_command(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Folder to write the demo run into."),
    model: str | None = typer.Option(None, "--model", help="Base model (default: the embedded model)."),
    train_steps: int = typer.Option(DEMO_TRAIN_STEPS, "--train-steps", help="LoRA training steps per subject."),
    num_inference_steps: int = typer.Option(DEMO_INFERENCE_STEPS, "--num-inference-steps", help="Denoising steps per image."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
) -> None:
    """Run the demo batch (manifests/demo.parquet) into --output and show where everything went."""
    from prcore.cli.run import print_outcome, run_batch, settings_from_options, silence_shutdown
    from prcore.store.storage import StoreError

    with user_errors(StoreError):
        manifest = demo_manifest()
        out = output.expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        settings = settings_from_options(model=model, train={"steps": train_steps},
                                         generation={"num_inference_steps": num_inference_steps})
        outcome = run_batch(str(manifest), str(out), settings, verbose=verbose)
    print_outcome(outcome)
    if outcome.ok and outcome.run_id:
        sheets = sorted((out / "runs" / outcome.run_id / "contact_sheets").glob("*.png"))
        for sheet in sheets:
            print(f"  contact sheet:  {sheet}")
            print(f"    {sheet.stem}: the left column is its reference pictures; the images beside them should show that "
                  "same object in their prompted scenes and styles (the report page names each image's prompt: "
                  f"{out / 'runs' / outcome.run_id / 'index.html'})")
        if not sheets:
            print("  (nothing new to make: every image of the demo is already in this folder)")
    silence_shutdown()
    raise typer.Exit(0 if outcome.ok else 1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
