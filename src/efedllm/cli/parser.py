"""The command line's parser, its one-line errors and the argument types that need nothing heavy (``efedllm --help``
imports only this module)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import NoReturn

from efedllm.common.errors import RecordError
from efedllm.common.spans import Span


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse's own print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def print_error(command: str, error: Exception) -> int:
    """The one line a command prints for a bad argument or a failure it can name; returns the exit code 2."""
    print(f"efedllm {command}: error: {error}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port must be in 0..65535, got {value}")
    return value


def span(text: str) -> Span:
    """``START:END``, the argparse type of ``--blocks``."""
    try:
        return Span.parse(text)
    except RecordError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def ipv4_host(text: str) -> str:
    """An IPv4 address to listen on (a name would reach the p2p daemon and fail there)."""
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IPv4 address such as 127.0.0.1 or 0.0.0.0, got {text!r}") from None
