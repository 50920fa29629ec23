"""What every ``klstudy`` subcommand shares: the user-error type and the argument parser."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; printed as one ``error:`` line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message}\n")
