"""Shared pieces of the subcommands: the parser, model options, devices, config files,
outputs, and the error boundary of the command line."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import tomllib
import torch
from torch import nn

from .._io import atomic_write_text
from ..checkpoints import check_checkpoint_file
from ..checks import check_channels, check_input_size, parse_channel_spec
from ..errors import UserInputError, ZfvisError
from ..zoo import get_spec, list_models, load_model

__all__ = [
    "CLIError",
    "ArgumentParser",
    "add_model_args",
    "add_config_arg",
    "add_output_args",
    "apply_config",
    "parse_command_line",
    "resolve_device",
    "check_output",
    "write_settings",
    "parse_channels",
    "load_zoo_model",
    "resolve_layer",
    "layer_modules",
    "fit_input_size",
    "progress",
    "report_error",
    "REPORT_TO",
]

#: Whom internal errors should be reported to.
REPORT_TO = "the zfvis maintainers, with the command you ran"


class CLIError(UserInputError):
    """Bad command-line input: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: ``zfvis CMD: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- options


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
    p.add_argument("--config", help="TOML file of default settings (keys are option names; tables named after commands)")


def add_output_args(p: argparse.ArgumentParser, default: str, what: str = "PNG file to write") -> None:
    """-o/--output and --overwrite (replace a file zfvis did not write)."""
    p.add_argument("-o", "--output", default=default, help=f"{what} (default {default}); the settings go beside it (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output that zfvis did not write")


# --------------------------------------------------------------------------- config files


#: String options that take comma-separated lists; a config file may give them as arrays.
LIST_OPTIONS = frozenset({"layers", "channels"})


class _Unset(list):  # type: ignore[type-arg]
    """Marks options not given on the command line (a list, so that append actions work)."""


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CLIError(f"config file '{path}' does not exist") from None
    except IsADirectoryError:
        raise CLIError(f"config file '{path}' is a folder; pass a .toml file") from None
    except UnicodeDecodeError as err:
        raise CLIError(f"config file '{path}' is not UTF-8 text (byte {err.start}); a config file is TOML text") from None
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"config file '{path}' is not valid TOML: {err}") from None


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _config_path(argv: Sequence[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _config_table(data: dict[str, Any], command: str, commands: Sequence[str], path: str) -> dict[str, Any]:
    """The settings for ``command``: top-level keys, then its own table; unknown tables refused."""
    for key, value in data.items():
        if isinstance(value, dict) and key not in commands:
            close = difflib.get_close_matches(key, list(commands), n=1, cutoff=0.5)
            hint = f" Did you mean [{close[0]}]?" if close else ""
            raise CLIError(f"config file '{path}': unknown table [{key}].{hint} Tables are named after commands: "
                           f"{', '.join(f'[{c}]' for c in commands)}")
    table = {k: v for k, v in data.items() if not isinstance(v, dict)}
    table.update(data.get(command, {}))
    return table


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type
    if isinstance(value, dict):
        raise CLIError(f"{where} is a table; it must be a single value")
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise CLIError(f"{where} must be a whole number (no quotes), got {value!r}")
    elif kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CLIError(f"{where} must be a number, got {value!r}")
    elif kind in (None, str):
        if action.dest in LIST_OPTIONS and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise CLIError(f"{where} must be a string (in quotes), got {value!r}")
    elif isinstance(value, str):
        try:
            value = kind(value)  # type: ignore[misc]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise CLIError(f"{where}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` checked against the option it sets (and converted where TOML allows two forms)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CLIError(f"{where} must be true or false (no quotes), got {value!r}")
        return value
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    if many:
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, v, where) for v in items]
    if isinstance(value, list):
        if action.dest not in LIST_OPTIONS:
            raise CLIError(f"{where} takes one value, not a list, got {value!r}")
        return ",".join(str(_scalar(action, v, where)) for v in value)
    return _scalar(action, value, where)


def _explicit(sub: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The options that ``argv`` (the sub-command's part) gives on the command line."""
    dests = {a.dest for a in sub._actions if a.dest is not argparse.SUPPRESS}
    ns = argparse.Namespace(**{d: _Unset() for d in dests})
    sub.parse_known_args(list(argv), namespace=ns)
    positional = {a.dest: a.default for a in sub._actions if not a.option_strings}

    def given(dest: str) -> bool:
        value = getattr(ns, dest)
        if isinstance(value, _Unset):
            return bool(value)  # an append action that appended
        return not (dest in positional and value in (positional[dest], None, []))

    return {d for d in dests if given(d)}


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parses ``argv``, with defaults from the ``--config`` file where one is given.

    Keys sit at the top level or in a table named after the command; the command line
    wins. Every value is checked against the option it sets.
    """
    commands = _commands(parser)
    path = _config_path(argv[1:]) if argv and argv[0] in commands else None
    if path is None:
        return parser.parse_args(list(argv))
    sub = commands[argv[0]]
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}
    values: dict[str, Any] = {}
    for key, value in _config_table(_read_toml(path), argv[0], list(commands), path).items():
        dest = key.replace("-", "_")
        if isinstance(value, dict):
            raise CLIError(f"config file '{path}': [{argv[0]}.{key}] is a table; a setting is a single value or a list")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0].replace('_', '-')}'?" if close else ""
            raise CLIError(f"config file '{path}': unknown setting '{key}' for `zfvis {argv[0]}`{hint}")
        values[dest] = _config_value(actions[dest], value, f"config file '{path}': {key}")
    for action in sub._actions:  # what the config gives need not be on the command line
        if action.dest in values and not action.option_strings:
            action.nargs = "*" if action.nargs in ("+", "*") else "?"
        elif action.dest in values:
            action.required = False
    explicit = _explicit(sub, argv[1:])
    args = parser.parse_args(list(argv))
    for group in sub._mutually_exclusive_groups:
        members = {a.dest for a in group._group_actions}
        if members & explicit:
            for dest in members - explicit:
                values.pop(dest, None)
    for dest, value in values.items():
        if dest not in explicit:
            setattr(args, dest, value)
    return args


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """Compatibility wrapper: :func:`parse_command_line` (``args`` is ignored)."""
    return parse_command_line(parser, argv)


# --------------------------------------------------------------------------- devices, models, layers


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


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".ckpt")) or Path(weights).exists()


def check_model_name(name: str) -> None:
    """Refuses an unknown zoo model, naming the closest."""
    if name not in list_models():
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise CLIError(f"unknown model '{name}'.{hint} Valid: {', '.join(list_models())}")


def check_weights(model: str, weights: str | None, what: str = "--weights") -> None:
    """Checks a weights name against the model's, or a weights file's kind, before loading."""
    if weights is None:
        return
    if _looks_like_path(weights):
        check_checkpoint_file(weights, "weights file" if what == "--weights" else what)
        return
    spec = get_spec(model)
    names = ["random"] + (["packaged"] if spec.packaged else [])
    if spec.weights_enum is not None:
        names += ["DEFAULT", *spec.weights_enum.__members__]
    if weights not in names:
        close = difflib.get_close_matches(weights, names, n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise CLIError(f"unknown weights '{weights}' for {model}.{hint} Valid: {', '.join(names)}, or the path of a .pt file")


def load_zoo_model(name: str, weights: str | None, device: torch.device) -> tuple[nn.Module, Any]:
    """``zoo.load_model`` after checking the model and weights a person named."""
    check_model_name(name)
    check_weights(name, weights)
    if weights is not None and _looks_like_path(weights):
        return load_model(name, weights=Path(weights), device=device)  # a path, whatever its name
    return load_model(name, weights=weights, device=device)


def resolve_layer(dn: Any, layer: str) -> str:
    """The engine's name for a layer the person named (unknown: the closest names)."""
    try:
        return dn.resolve(layer)
    except UserInputError:
        raise
    except (ValueError, TypeError) as err:  # the engine's name lookup: the name came from the person
        raise CLIError(str(err).splitlines()[0]) from None


def layer_modules(dn: Any) -> list[tuple[str, nn.Module | None]]:
    """The model's layers in execution order, each with its module (``None``: a function
    node of the graph), from the engine's own list of layer names."""
    modules = dict(dn.model.named_modules())
    return [(name, modules.get(name)) for name in dn.layer_names(aliases=False)]


def _model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def fit_input_size(dn: Any, model: nn.Module, layer: str, size: int, default: int, model_name: str) -> None:
    """Checks that square inputs of ``size`` reach ``layer``; the model's own ``default``
    size is the reference: only when it works and ``size`` does not is the size at fault.

    Raises:
        CLIError: ``size`` is out of bounds, or does not fit the model up to ``layer``.
    """
    check_input_size(size)
    if size == default:
        return
    device, dtype = _model_place(model)
    try:
        with torch.no_grad():
            dn.output(torch.zeros(1, 3, size, size, device=device, dtype=dtype), layer)
        return
    except (ValueError, RuntimeError) as err:
        if is_out_of_memory(err):
            raise
        failure = err
    try:
        with torch.no_grad():
            dn.output(torch.zeros(1, 3, default, default, device=device, dtype=dtype), layer)
    except Exception:  # noqa: BLE001 - the model fails at its own size too: not the size's fault
        raise failure from None
    first = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
    raise CLIError(f"--input-size {size} does not fit {model_name} up to layer {layer} ({first}); "
                   f"its own input size is {default}")


def parse_channels(spec: Any, count: int | None = None, layer: str | None = None) -> list[int] | list[tuple[int, int]]:
    """``"0-15,32,40"`` -> sorted unique channels, checked against ``count`` (the channels
    of ``layer``); without ``count``, the inclusive ranges (not expanded)."""
    ranges = parse_channel_spec(spec)
    if count is None:
        return ranges
    return check_channels(ranges, count, layer)


# --------------------------------------------------------------------------- outputs


def _settings_of(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _written_by_zfvis(output: Path) -> bool:
    """Whether an existing output is zfvis's: its settings file says so."""
    settings = _settings_of(output.with_suffix(".json"))
    if settings is None:
        return False
    marker = settings.get("zfvis")
    named = marker.get("output") if isinstance(marker, dict) else settings.get("output")  # older runs: no marker
    return isinstance(named, str) and Path(named).name == output.name and ("zfvis" in settings or "command" in settings)


def check_output(path: str | os.PathLike[str], *, directory: bool = False, overwrite: bool | None = None) -> Path:
    """Fails early, with a clear message, where an output cannot or should not be written.

    Args:
        path: The output file (or folder, with ``directory``).
        directory: The output is a folder (created here).
        overwrite: ``False``: refuse to replace an existing file (or its ``.json``
            settings) that zfvis did not write; ``True``: replace it; ``None``: do not
            check (commands without ``--overwrite``).
    """
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
        if overwrite is False:
            _refuse_foreign(path)
    if not os.access(folder, os.W_OK):
        raise CLIError(f"cannot write '{path}': folder '{folder}' is not writable")
    return path


def _refuse_foreign(path: Path) -> None:
    sidecar = path.with_suffix(".json")
    ours = _written_by_zfvis(path)
    if path.exists() and not ours:
        raise CLIError(f"'{path}' already exists and zfvis did not write it; choose another -o or pass --overwrite")
    if sidecar.exists() and not ours and sidecar != path:
        raise CLIError(f"'{sidecar}' (where the settings of '{path.name}' go) already exists and zfvis did not write "
                       "it; choose another -o or pass --overwrite")


def write_settings(path: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Writes the resolved settings as JSON (atomically), marked as zfvis's."""
    from .. import __version__

    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if k not in ("func", "debug")}
    output = clean.get("output")
    clean["zfvis"] = {"command": clean.get("command"), "version": __version__,
                      "output": Path(output).name if isinstance(output, str) else None}
    atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str, show: bool = True) -> Iterator[Any]:
    """A tqdm bar on stderr that is cleared, not left behind, when the work fails."""
    from tqdm.auto import tqdm

    # shown after a second: an error in the first moments is then the only line on stderr
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show, dynamic_ncols=True, delay=1.0)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


# --------------------------------------------------------------------------- the error boundary


_PATH_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the CPU or a GPU running out of memory."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def _is_user_os_error(err: BaseException) -> bool:
    path_errors = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
    return isinstance(err, path_errors) or (isinstance(err, OSError) and err.errno in _PATH_ERRNOS)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.strerror}: '{err.filename}'"
    return text.splitlines()[0] if text else type(err).__name__


def report_error(err: BaseException, command: str | None) -> int:
    """Prints one line for ``err`` on stderr and returns the exit status.

    Errors from checking what a person gave (zfvis's :class:`UserInputError`,
    :class:`~zfvis.UnsupportedModelError`, :class:`~zfvis.WeightsDownloadError`, missing or
    unwritable paths) and running out of memory: status 2. zfvis's other deliberate
    errors: status 1. Anything else is a bug: status 1 and a request to report it.
    """
    from .. import UnsupportedModelError, WeightsDownloadError

    if isinstance(err, (UserInputError, UnsupportedModelError, WeightsDownloadError)) or _is_user_os_error(err):
        print(f"zfvis: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if is_out_of_memory(err):
        where = "the GPU" if "cuda" in str(err).lower() or type(err).__name__ == "OutOfMemoryError" else "memory"
        lower = "--batch-size or --input-size" if command in ("mine", "evolution") else "--input-size"
        print(f"zfvis: error: out of {where} ({_one_line(err)[:160]}); lower {lower}", file=sys.stderr)
        return 2
    if isinstance(err, ZfvisError):
        print(f"zfvis: error: {_one_line(err)}", file=sys.stderr)
        return 1
    print(f"zfvis: internal error: {type(err).__name__}: {_one_line(err)[:300]} — a bug in zfvis; please report it "
          f"to {REPORT_TO} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1
