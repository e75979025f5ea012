"""Shared pieces of the subcommands: model options, devices, config files, outputs."""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..zoo import list_models

__all__ = ["CLIError", "add_model_args", "add_config_arg", "apply_config", "resolve_device", "check_output", "write_settings", "parse_channels"]


class CLIError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = "zfnet-cifar10") -> None:
    """--model, --weights, --device."""
    p.add_argument("--model", default=default_model, help=f"zoo model ({', '.join(list_models())}; default {default_model})")
    p.add_argument(
        "--weights",
        help="random, packaged, a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...) or a .pt file "
        "(default: packaged for zfnet-cifar10, DEFAULT for torchvision models, random for zfnet)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """--config FILE: a TOML file whose keys (option names, '-' or '_') supply defaults."""
    p.add_argument("--config", help="TOML file of default settings (keys are option names)")


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """Re-parses ``argv`` with the defaults from ``args.config`` (command-line options win).

    Keys may sit at the top level or in a table named after the command.
    """
    path = getattr(args, "config", None)
    if not path:
        return args
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise CLIError(f"config file '{path}' does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"config file '{path}' is not valid TOML: {err}") from None
    table = dict(data.get(args.command, {})) if isinstance(data.get(args.command), dict) else {}
    table.update({k: v for k, v in data.items() if not isinstance(v, dict)})
    known = vars(args)
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in known or dest in ("command", "func", "config"):
            raise CLIError(f"config file '{path}': unknown setting '{key}' for `zfvis {args.command}`")
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        defaults[dest] = value
    sub = _subparser(parser, args.command)
    sub.set_defaults(**defaults)
    # positional arguments given in the config need not be repeated on the command line
    for action in sub._actions:
        if not action.option_strings and action.dest in defaults and action.nargs is None:
            action.nargs = "?"
    return parser.parse_args(list(argv))


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise CLIError(f"unknown command '{name}'")


def resolve_device(name: str) -> torch.device:
    """A torch device, checked to exist."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("CUDA was asked for (--device cuda) but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type not in ("cpu", "mps"):
        raise CLIError(f"unsupported device '{name}'; use cpu, cuda or cuda:N")
    return device


def check_output(path: str | os.PathLike[str], *, directory: bool = False) -> Path:
    """Fails early, with a clear message, where an output cannot be written."""
    path = Path(path)
    folder = path if directory else path.parent
    if directory:
        if path.exists() and not path.is_dir():
            raise CLIError(f"output '{path}' exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CLIError(f"cannot create output directory '{path}': {err.strerror}") from None
    else:
        if path.is_dir():
            raise CLIError(f"output '{path}' is a directory; give a file name such as {path / 'out.png'}")
        if not folder.is_dir():
            raise CLIError(f"cannot write '{path}': folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"cannot write '{path}': folder '{folder}' is not writable")
    return path


def write_settings(path: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Writes the resolved settings as JSON (atomically)."""
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if k != "func"}
    atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True, default=str) + "\n")


def parse_channels(spec: str, count: int | None = None, layer: str | None = None) -> list[int]:
    """``"0-15,32,40"`` -> sorted unique channel numbers, checked against ``count``
    (the number of channels of ``layer``) where given."""
    chans: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise CLIError(f"--channels: range '{part}' runs backwards")
                chans.update(range(a, b + 1))
            else:
                chans.add(int(part))
        except ValueError:
            raise CLIError(f"--channels: '{part}' is not a channel number or range like 0-15") from None
    if not chans:
        raise CLIError(f"--channels: '{spec}' names no channels; use e.g. 0-15,32,40")
    if min(chans) < 0:
        raise CLIError("--channels: channel numbers start at 0")
    if count is not None and max(chans) >= count:
        raise CLIError(f"channel {max(chans)} is out of range: layer '{layer}' has {count} channels (0..{count - 1})")
    return sorted(chans)
