"""Placeholder: filled in by the issue that owns this command group."""

import typer


def register(app: typer.Typer) -> None:
    return None
