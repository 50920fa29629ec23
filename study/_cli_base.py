"""What every ``klstudy`` subcommand shares: the user-error type and the argument parser."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; printed as one ``error:`` line per line of its text
    (a spec with several problems: one each), exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless it has none worth showing (None, False)
    or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        return super()._get_help_string(action) or text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message}\n")
