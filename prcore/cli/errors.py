"""How the CLI reports a user error: one clear line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

USER_ERROR_EXIT = 2


class UserError(Exception):
    """An error the user can fix (bad argument, manifest, URI, credentials, missing model)."""


@contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn UserError/ValueError/FileNotFoundError (and ``extra``) into ``error: ...`` + exit 2."""
    try:
        yield
    except (UserError, ValueError, FileNotFoundError, *extra) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(USER_ERROR_EXIT) from None
