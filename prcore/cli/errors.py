"""How the CLI reports a user error: one clear line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.25 parses with its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

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


class OneLineErrorGroup(TyperGroup):
    """The root command group: click's usage errors (a missing or unknown option, a bad value)
    become one ``error: ...`` line on stderr and exit 2, like every other user error, instead of
    a usage block or a rich box."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:  # `prcore` alone: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
            print(f"error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except (click_exceptions.Abort, typer.Abort):
            print("Aborted!", file=sys.stderr)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
