"""Shared pieces of the subcommands: the parser, model options, devices, config files,
outputs, and the error boundary of the command line."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import difflib
import errno
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import tomllib
import torch
from torch import nn

from .._io import atomic_write_text
from .._progress import progress
from ..checkpoints import check_checkpoint_file
from ..checks import check_channels, check_device, check_input_size, check_memory, parse_channel_spec
from ..errors import ForwardPassError, UserInputError, ZfvisError, error_chain, first_line, is_out_of_memory
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
    "feature_layers",
    "fit_input_size",
    "progress",
    "report_error",
    "is_out_of_memory",
    "shapes_only",
    "Invocation",
    "invocation",
    "REPORT_TO",
]

#: Whom internal errors should be reported to.
REPORT_TO = "the zfvis maintainers, with the command you ran"


class CLIError(UserInputError):
    """Bad command-line input: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Invocation:
    """What the command line being run was given, for checks that span options.

    Attributes:
        inputs: Every existing file an option or the config file names (resolved), with
            the option's name: no output may replace one, ``--overwrite`` or not.
        config: The config file, if any.
        from_config: Option (dest) -> the config key that set it, for messages.
        datasets: The data sets the options name (``dataset``): no output may lie in such
            a folder or be an image such a list file names.
    """

    inputs: dict[Path, str] = dataclasses.field(default_factory=dict)
    config: str | None = None
    from_config: dict[str, str] = dataclasses.field(default_factory=dict)
    datasets: tuple[Path, ...] = ()

    def reads(self, path: Path) -> str | None:
        """What writing ``path`` would replace or add to among what the command reads
        (``None``: nothing)."""
        with contextlib.suppress(OSError):
            target = path.resolve()
            if target in self.inputs:
                return f"the input file '{path}' ({self.inputs[target]})"
            for data in self.datasets:
                if data.is_dir() and data.resolve() in target.parents:
                    return f"a file inside the data set '{data}'"
                if data.is_file() and target in _listed(data):
                    return f"the image '{path}' of the data set '{data}'"
        return None


def _listed(list_file: Path) -> set[Path]:
    """The images a data-set list file names, resolved (empty if it is not a list)."""
    from ..data import list_images, resolve

    try:
        return {resolve(list_file, rel).resolve() for rel in list_images(list_file)}
    except (OSError, UserInputError):
        return set()


_INVOCATION: contextvars.ContextVar[Invocation] = contextvars.ContextVar("zfvis_invocation", default=Invocation())


def invocation() -> Invocation:
    """The :class:`Invocation` of the command line being run (empty outside one)."""
    return _INVOCATION.get()


@contextlib.contextmanager
def invoked(args: argparse.Namespace, config: str | None, from_config: dict[str, str]) -> Iterator[Invocation]:
    """Makes ``args`` the current :class:`Invocation` for the block."""
    datasets = tuple(Path(v) for v in [getattr(args, "dataset", None)] if isinstance(v, str) and v)
    token = _INVOCATION.set(Invocation(_input_files(args, config), config, dict(from_config), datasets))
    try:
        yield _INVOCATION.get()
    finally:
        _INVOCATION.reset(token)


def _input_files(args: argparse.Namespace, config: str | None) -> dict[Path, str]:
    named: list[tuple[str, Any]] = [("config file", config)] if config else []
    for dest, value in vars(args).items():
        if dest != "output":
            named += [(dest.replace("_", "-"), v) for v in (value if isinstance(value, list) else [value])]
    found: dict[Path, str] = {}
    for label, v in named:
        if isinstance(v, (str, os.PathLike)) and str(v):
            with contextlib.suppress(OSError, ValueError):
                if Path(v).is_file():
                    found.setdefault(Path(v).resolve(), label)
    return found


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
    """The ``--config`` file of a sub-command's arguments (refused when given twice)."""
    paths = []
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif token.startswith("--config="):
            paths.append(token.split("=", 1)[1])
    if len(paths) > 1:
        raise CLIError(f"--config is given {len(paths)} times ({', '.join(paths)}); give one config file")
    return paths[0] if paths else None


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


def _settable(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in sub._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}


def _table_values(table: dict[str, Any], command: str, sub: argparse.ArgumentParser,
                  path: str) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    """A table's settings checked against ``command``'s options: (dest -> value, dest -> key)."""
    actions = _settable(sub)
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if isinstance(value, dict):
            raise CLIError(f"config file '{path}': [{command}.{key}] is a table; a setting is a single value or a list")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0].replace('_', '-')}'?" if close else ""
            raise CLIError(f"config file '{path}': unknown setting '{key}' for `zfvis {command}`{hint}")
        if dest in keys:
            raise CLIError(f"config file '{path}': '{keys[dest]}' and '{key}' set the same option; keep one")
        values[dest] = _config_value(actions[dest], value, f"config file '{path}': {key}")
        keys[dest] = key
    return values, keys


def _config_settings(path: str, command: str, commands: dict[str, argparse.ArgumentParser]
                     ) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    """The settings ``path`` gives ``command``. The other commands' tables are checked too,
    so that a slip in one is found the first time the file is used."""
    data = _read_toml(path)
    table = _config_table(data, command, list(commands), path)
    for other, value in data.items():
        if other != command and isinstance(value, dict):
            _table_values(value, other, commands[other], path)
    return _table_values(table, command, commands[command], path)


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parses ``argv``, with defaults from the ``--config`` file where one is given.

    Keys sit at the top level or in a table named after the command; the command line
    wins. Every value is checked against the option it sets, and every table's keys
    against its command's options. What the config set is recorded in the current
    :class:`Invocation` (``from_config``) when the caller holds one (:func:`main`).
    """
    args, _, _ = _parse(parser, argv)
    return args


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, str | None, dict[str, str]]:
    """:func:`parse_command_line`, also returning the config file and what it set."""
    commands = _commands(parser)
    path = _config_path(argv[1:]) if argv and argv[0] in commands else None
    if path is None:
        return parser.parse_args(list(argv)), None, {}
    sub = commands[argv[0]]
    values, keys = _config_settings(path, argv[0], commands)
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
    return args, path, {d: keys[d] for d in values if d not in explicit}


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """Compatibility wrapper: :func:`parse_command_line` (``args`` is ignored)."""
    return parse_command_line(parser, argv)


# --------------------------------------------------------------------------- devices, models, layers


def resolve_device(name: str) -> torch.device:
    """A torch device, checked to exist (:func:`zfvis.checks.check_device`)."""
    return check_device(name, "--device")


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
        names += list(dict.fromkeys(["DEFAULT", *spec.weights_enum.__members__]))
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
    """The engine's name for a layer the person named.

    Raises:
        UserInputError: An unknown name (the engine's message names the closest ones).
    """
    return dn.resolve(layer)


def feature_layers(dn: Any) -> tuple[list[str], list[str]]:
    """The layers the commands choose their defaults from, in execution order: the
    feature-map layers and the vector layers. For a zoo model its paper names (``conv1``..,
    ``layer1``.., ``inception3a``..; pools left out) and ``fc6``..; for another model its
    convolutions and linear layers."""
    maps = [a for a in dn.aliases if not a.startswith(("pool", "fc"))]
    vectors = [a for a in dn.aliases if a.startswith("fc")]
    if not maps:
        nodes = [n for n in dn.graph.nodes if n.carries and n.module_name]
        maps = [n.module_name for n in nodes if isinstance(n.module, nn.Conv2d)]
        vectors = [n.module_name for n in nodes if isinstance(n.module, nn.Linear)]
    return maps, vectors


def _model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


class _Tally:
    """Counts the bytes of the tensors the operations inside create (views excluded)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tally = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                if not getattr(func, "is_view", False):
                    seen = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                    tally.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out)
                                       if isinstance(t, torch.Tensor) and id(t) not in seen)
                return out

        self.bytes = 0
        self.mode = Mode()


@contextlib.contextmanager
def shapes_only() -> Iterator[_Tally]:
    """Inside, tensors are fake: operations compute shapes and dtypes but allocate nothing.
    Yields a tally of the bytes those operations would have allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its report of a failing op is the error we raise, not a log line
    tally = _Tally()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), tally.mode:
            yield tally
    finally:
        log.setLevel(level)


def _is_fake_failure(err: BaseException) -> bool:
    """Whether a failure in :func:`shapes_only` is the fake tensors' own limit (an op they
    cannot run without data), not the shapes'."""
    chain = [err, err.__cause__]
    return any(e is not None and type(e).__module__.startswith(("torch._subclasses", "torch.fx.experimental"))
               for e in chain)


def _forward(dn: Any, layer: str, size: int, device: torch.device, dtype: torch.dtype) -> None:
    dn.output(torch.zeros(1, 3, size, size, device=device, dtype=dtype), layer)


def _probe_size(dn: Any, layer: str, size: int, device: torch.device, dtype: torch.dtype) -> tuple[BaseException | None, int | None]:
    """A forward pass at ``size`` without allocating: (its failure or ``None``, the bytes it
    would allocate; ``None`` when fake tensors cannot run the model)."""
    try:
        with shapes_only() as tally:
            _forward(dn, layer, size, device, dtype)
    except ImportError:  # a torch without fake tensors (a private API): a real pass instead
        return None, None
    except (ValueError, RuntimeError) as err:
        if _is_fake_failure(err):
            return None, None
        return err, tally.bytes
    return None, tally.bytes


def fit_input_size(dn: Any, model: nn.Module, layer: str, size: int, default: int, model_name: str, *,
                   memory: bool = True) -> None:
    """Checks that square inputs of ``size`` reach ``layer``, and fit in memory, before any
    real work: the forward pass runs on fake tensors (shapes only, nothing allocated). The
    model's own ``default`` size is the reference: only when it works and ``size`` does not
    is the size at fault.

    Args:
        dn: The model's deconvnet.
        model: The model.
        layer: The deepest layer the command needs.
        size: The side asked for.
        default: The model's own side.
        model_name: For messages.
        memory: Also refuse a size whose forward pass needs more memory than is free.

    Raises:
        CLIError: ``size`` is out of bounds, does not fit the model up to ``layer``, or
            needs more memory than is free.
    """
    check_input_size(size)
    device, dtype = _model_place(model)
    failure, need = _probe_size(dn, layer, size, device, dtype)
    if need is None:  # fake tensors cannot run this model: a real pass, as small as it gets
        if size == default:
            return
        try:
            with torch.no_grad():
                _forward(dn, layer, size, device, dtype)
            return
        except (ValueError, RuntimeError) as err:
            if is_out_of_memory(err):
                raise
            failure = err
    if failure is None:
        if memory:
            check_memory(need, device, f"--input-size {size}: a forward pass of {model_name} up to layer {layer}",
                         "--input-size")
        return
    if size != default and _probe_size(dn, layer, default, device, dtype)[0] is None:
        raise CLIError(f"--input-size {size} does not fit {model_name} up to layer {layer} ({first_line(failure)}); "
                       f"its own input size is {default}")
    raise failure  # the model fails at its own size too: not the size's fault


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


def check_output(path: str | os.PathLike[str], *, directory: bool = False, overwrite: bool | None = None,
                 also: Sequence[str] = ()) -> Path:  # fmt: skip
    """Fails early, with a clear message, where an output cannot or should not be written.

    No output ever replaces a file that the command reads (an image, a checkpoint, a part
    file, the config file: see :class:`Invocation`), ``--overwrite`` or not.

    Args:
        path: The output file (or folder, with ``directory``).
        directory: The output is a folder (created here).
        overwrite: ``False``: refuse to replace an existing file (or its ``.json``
            settings, or a companion) that zfvis did not write; ``True``: replace it;
            ``None``: do not check (commands without ``--overwrite``).
        also: Suffixes of further files written beside ``path`` (``(".png",)``).
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
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise CLIError(f"cannot write '{path}': '{folder}' {what}")
        written = _written_files(path, also)
        _refuse_inputs(path, written)
        if overwrite is False:
            _refuse_foreign(path, written)
    if not os.access(folder, os.W_OK):
        raise CLIError(f"cannot write '{path}': folder '{folder}' is not writable")
    return path


def _written_files(path: Path, also: Sequence[str]) -> list[Path]:
    """The files an output writes: itself, its ``.json`` settings, its companions."""
    return list(dict.fromkeys([path, path.with_suffix(".json"), *(path.with_suffix(s) for s in also)]))


def _refuse_inputs(path: Path, written: Sequence[Path]) -> None:
    for f in written:
        what = invocation().reads(f)
        if what is not None:
            which = "" if f == path else f", where the {'settings' if f.suffix == '.json' else f.suffix[1:]} of '{path.name}' go"
            raise CLIError(f"-o {path} would replace {what}{which}; choose another -o")


def _refuse_foreign(path: Path, written: Sequence[Path]) -> None:
    ours = _written_by_zfvis(path)
    for f in written:
        if f.exists() and not ours:
            where = "" if f == path else f" (where the {'settings' if f.suffix == '.json' else f.suffix[1:]} of '{path.name}' go)"
            raise CLIError(f"'{f}'{where} already exists and zfvis did not write it; choose another -o or pass --overwrite")


def write_settings(path: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Writes the resolved settings as JSON (atomically), marked as zfvis's."""
    from .. import __version__

    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if k not in ("func", "debug")}
    output = clean.get("output")
    clean["zfvis"] = {"command": clean.get("command"), "version": __version__,
                      "output": Path(output).name if isinstance(output, str) else None}
    atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------- the error boundary


_PATH_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}

#: What to do about an operating-system error on a path a person gave.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "choose another path",
    errno.ENOSPC: "free some space, or write elsewhere (-o)",
    errno.EDQUOT: "free some space, or write elsewhere (-o)",
    errno.EROFS: "the file system is read-only: write elsewhere (-o)",
    errno.ENAMETOOLONG: "choose a shorter name",
    errno.ELOOP: "the path's symbolic links go round in a circle",
}

def _forward_failure(err: BaseException) -> BaseException | None:
    """The error of a forward pass that the engine passed on as a :class:`UserInputError`
    ("does the model expect another input size?"). On the command line the input size is
    zfvis's own or checked by :func:`fit_input_size` first, so such a failure is ours."""
    return err.__cause__ if isinstance(err, ForwardPassError) else None


def _is_user_os_error(err: BaseException) -> bool:
    path_errors = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
    return isinstance(err, path_errors) or (isinstance(err, OSError) and err.errno in _PATH_ERRNOS)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:
        fix = _OS_FIXES.get(err.errno or 0)
        return f"{err.strerror}: '{err.filename}'" + (f"; {fix}" if fix else "")
    return first_line(err)


def _from_config(line: str) -> str:
    """``line`` with the config key named where the option at fault came from the config file."""
    inv = invocation()
    for dest, key in inv.from_config.items():
        if f"--{dest.replace('_', '-')}" in line:
            return f"{line} (set by '{key}' in config file '{inv.config}')"
    return line


def _internal(what: str) -> str:
    return (f"zfvis: internal error: {what[:300]} — a bug in zfvis; please report it to {REPORT_TO} "
            "(rerun with --debug for the traceback)")


def report_error(err: BaseException, command: str | None) -> int:
    """Prints one line for ``err`` on stderr and returns the exit status.

    Errors from checking what a person gave (zfvis's :class:`UserInputError`,
    :class:`~zfvis.UnsupportedModelError`, :class:`~zfvis.WeightsDownloadError`, missing or
    unwritable paths) and running out of memory: status 2. zfvis's other deliberate
    errors: status 1. Anything else is a bug (a forward pass of a zoo model that fails,
    too): status 1 and a request to report it.
    """
    from .. import UnsupportedModelError, WeightsDownloadError

    if is_out_of_memory(err):
        text = " ".join(str(e) for e in error_chain(err)).lower()
        where = "GPU memory" if "cuda" in text or "gpu" in text else "memory"
        lower = "--batch-size or --input-size" if command in ("mine", "evolution", "occlude") else "--input-size"
        print(f"zfvis: error: out of {where} ({first_line(error_chain(err)[-1])[:160]}); lower {lower}", file=sys.stderr)
        return 2
    cause = _forward_failure(err)
    if cause is not None:
        print(_internal(f"the forward pass failed ({type(cause).__name__}: {first_line(cause)})"), file=sys.stderr)
        return 1
    if isinstance(err, (UserInputError, UnsupportedModelError, WeightsDownloadError)) or _is_user_os_error(err):
        print(f"zfvis: error: {_from_config(_one_line(err))}", file=sys.stderr)
        return 2
    if isinstance(err, ZfvisError):
        print(f"zfvis: error: {_one_line(err)}", file=sys.stderr)
        return 1
    print(_internal(f"{type(err).__name__}: {_one_line(err)}"), file=sys.stderr)
    return 1
