"""Shared pieces of the subcommands: the parser, model options, devices, config files,
outputs, and the error boundary of the command line."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from ..io.checks import (
    check_channels,
    parse_channel_spec,
)
from ..io.errors import (
    UserInputError,
    is_out_of_memory,
)
from ..io.parse import parse_int
from ..io.progress import progress
from ..models.zoo import list_models

__all__ = [
    "CLIError",
    "whole",
    "ArgumentParser",
    "add_model_args",
    "add_config_arg",
    "add_output_args",
    "parse_channels",
    "progress",
    "is_out_of_memory",
    "REPORT_TO",
]

#: Whom internal errors should be reported to.
REPORT_TO = "the zfvis maintainers, with the command you ran"


class CLIError(UserInputError):
    """Bad command-line input: printed as one line, exit status 2."""


def whole(text: str) -> int:
    """The argparse type of whole-number options: ASCII digits with an optional sign
    (:func:`zfvis.io.parse.parse_int`; Python's ``int`` would also take ``٣``)."""
    try:
        return parse_int(text, "value")
    except UserInputError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r} (a whole number in ASCII digits, like 3)") from None


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: ``zfvis CMD: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- options


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = "zfnet-cifar10") -> None:
    """--model, --weights, --device."""
    p.add_argument("--model", default=default_model, help=f"zoo model ({', '.join(list_models())}; or timm:NAME, any timm model; default {default_model})")
    p.add_argument(
        "--weights",
        help="random, packaged, a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...) or a .pt file "
        "(default: packaged for zfnet-cifar10, DEFAULT for torchvision models, random for zfnet)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """--config FILE: a TOML file whose keys (option names, '-' or '_') supply defaults."""
    p.add_argument("--config", help="TOML file of default settings (keys are option names; tables named after commands)")


def add_output_args(p: argparse.ArgumentParser, default: str, what: str = "PNG file to write") -> None:
    """-o/--output and --overwrite (replace a file zfvis did not write)."""
    p.add_argument("-o", "--output", default=default, help=f"{what} (default {default}); the settings go beside it (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output that zfvis did not write")


def parse_channels(spec: Any, count: int | None = None, layer: str | None = None) -> list[int] | list[tuple[int, int]]:
    """``"0-15,32,40"`` -> sorted unique channels, checked against ``count`` (the channels
    of ``layer``); without ``count``, the inclusive ranges (not expanded)."""
    ranges = parse_channel_spec(spec)
    if count is None:
        return ranges
    return check_channels(ranges, count, layer)


