"""Shared pieces of the subcommands: the parser, model options, devices, config files,
outputs, and the error boundary of the command line."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from ..io.errors import (
    UserInputError,
    is_out_of_memory,
)
from ..io.progress import progress

# This module, like every command's module at import time, loads neither torch nor
# matplotlib: `zfvis --help`, `zfvis CMD --help` and `--version` answer at once
# (tests/test_cli_light.py). What needs torch is imported inside the functions that use it.

__all__ = [
    "CLIError",
    "whole",
    "ArgumentParser",
    "add_model_args",
    "add_config_arg",
    "add_output_args",
    "command_parser",
    "RULES",
    "ZOO_MODELS",
    "parse_channels",
    "progress",
    "is_out_of_memory",
    "REPORT_TO",
]

#: The reverse rules (:data:`zfvis.core.ops.RULES`, which loads torch; a test keeps them equal).
RULES = ("deconvnet", "guided", "gradient")

#: The zoo's model names (:func:`zfvis.models.zoo.list_models`, which loads torch; a test keeps them equal).
ZOO_MODELS = (
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "mobilenet_v2", "mobilenet_v3_large", "regnet_y_400mf", "resnet101", "resnet152", "resnet18", "resnet34",
    "resnet50", "resnext101_32x8d", "resnext50_32x4d", "shufflenet_v2_x1_0", "squeezenet1_1", "vgg11", "vgg11_bn",
    "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "wide_resnet101_2", "wide_resnet50_2", "zfnet",
    "zfnet-cifar10",
)

#: Whom internal errors should be reported to.
REPORT_TO = "the zfvis maintainers, with the command you ran"


class CLIError(UserInputError):
    """Bad command-line input: printed as one line, exit status 2."""


def whole(text: str) -> int:
    """The argparse type of whole-number options: ASCII digits with an optional sign
    (:func:`zfvis.io.parse.parse_int`; Python's ``int`` would also take ``٣``)."""
    from ..io.parse import parse_int

    try:
        return parse_int(text, "value")
    except UserInputError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r} (a whole number in ASCII digits, like 3)") from None


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: ``zfvis CMD: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Wraps the description's paragraphs; keeps indented lines (the examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.strip("\n").split("\n\n"):
            if para.startswith(" ") or "\n  " in para:
                paragraphs.append(textwrap.indent(para, indent))
            else:
                paragraphs.append(textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)


def command_parser(sub: argparse._SubParsersAction, name: str, description: str,
                   examples: Sequence[str]) -> argparse.ArgumentParser:
    """A command's sub-parser, its help headed by the command's summary (:data:`zfvis.cli.COMMANDS`),
    then ``description``, then ``examples`` (``"zfvis CMD ...  # what it does"``: each shown
    as its comment, then the command line, which runs offline as written)."""
    lines = []
    for example in examples:
        command, _, comment = example.partition("  # ")
        lines += [f"  # {comment.strip()}"] if comment else []
        lines += [f"  {command.strip()}"]
    epilog = "examples:\n" + "\n".join(lines)
    return sub.add_parser(name, description=description, epilog=epilog, formatter_class=HelpFormatter)


# --------------------------------------------------------------------------- options


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = "zfnet-cifar10") -> None:
    """--model, --weights, --device."""
    p.add_argument("--model", default=default_model,
                   help=f"zoo model ({', '.join(ZOO_MODELS)}; or timm:NAME, any timm model; default {default_model})")
    p.add_argument(
        "--weights",
        help="random, packaged, a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...) or a .pt file "
        "(default: packaged for zfnet-cifar10, DEFAULT for torchvision models, random for zfnet)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """--config FILE: a TOML file whose keys (option names, '-' or '_') supply defaults."""
    p.add_argument("--config", help="TOML file of default settings (keys are option names; tables named after commands)")


def add_output_args(p: argparse.ArgumentParser, default: str, what: str = "PNG file to write",
                    beside: str = "the settings go beside it (.json)") -> None:
    """-o/--output and --overwrite (replace a file zfvis did not write)."""
    p.add_argument("-o", "--output", default=default, help=f"{what} (default {default}); {beside}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output that zfvis did not write")


def parse_channels(spec: Any, count: int | None = None, layer: str | None = None) -> list[int] | list[tuple[int, int]]:
    """``"0-15,32,40"`` -> sorted unique channels, checked against ``count`` (the channels
    of ``layer``); without ``count``, the inclusive ranges (not expanded)."""
    from ..io.checks import check_channels, parse_channel_spec

    ranges = parse_channel_spec(spec)
    if count is None:
        return ranges
    return check_channels(ranges, count, layer)


