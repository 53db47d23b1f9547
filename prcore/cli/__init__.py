"""The ``prcore`` command. Each sub-module registers its commands on the one Typer app."""

from __future__ import annotations

import importlib
import os

import typer

from prcore.cli.errors import OneLineErrorGroup

# One module per command group; each defines ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = ("sample", "train", "manifest", "run", "evaluate", "demo")


def build_app(*modules: str) -> typer.Typer:
    """The ``prcore`` app with the given command modules (default: all of them)."""
    app = typer.Typer(
        name="prcore",
        help="Personalized images at catalogue scale: DCO LoRA fine-tuning + parallel-rescaled consistency guidance.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        cls=OneLineErrorGroup,
    )

    @app.callback()
    def _root() -> None:  # keeps a lone registered command a sub-command, as in the full app
        pass

    for name in modules or COMMAND_MODULES:
        importlib.import_module(f"prcore.cli.{name}").register(app)
    return app


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build_app()()
