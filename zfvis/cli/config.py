"""``--config`` TOML files: read, checked per key against the command's options, merged under the command line."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

import tomllib

from ._common import CLIError, whole

__all__ = ["LIST_OPTIONS", "parse_command_line", "apply_config"]

# --------------------------------------------------------------------------- config files


#: String options that take comma-separated lists; a config file may give them as arrays.
LIST_OPTIONS = frozenset({"layers", "channels"})


class _Unset(list):  # type: ignore[type-arg]
    """Marks options not given on the command line (a list, so that append actions work)."""


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        return tomllib.loads(data.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))  # a BOM (Notepad's) is no TOML
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
    if kind is int or kind is whole:
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
