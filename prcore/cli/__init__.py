"""The ``prcore`` command. Each sub-module registers its commands on the one Typer app."""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    name="prcore",
    help="Personalized images at catalogue scale: DCO LoRA fine-tuning + parallel-rescaled consistency guidance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per command group; each defines ``register(app: typer.Typer) -> None``.
_COMMAND_MODULES = ("sample", "train", "manifest", "run", "evaluate", "demo")


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"prcore.cli.{name}")
        module.register(app)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_all()
    app()
