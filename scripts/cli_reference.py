#!/usr/bin/env python
"""The command-line reference, generated from the argparse parsers (`zfvis.cli.get_args_parser`).

It is an MkDocs hook (`hooks:` in mkdocs.yml): on `docs/reference/cli.md` it replaces the
line `<!-- cli-reference -->` with every command's summary and `--help` text, so that the
page cannot drift from the code. Run alone, it prints that Markdown:

    python scripts/cli_reference.py > cli.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from zfvis.cli import COMMANDS, get_args_parser  # noqa: E402

MARKER = "<!-- cli-reference -->"
PAGE = "reference/cli.md"
WIDTH = "88"  # columns of the help text: as a terminal of that width shows it


def _help(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to $COLUMNS
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def reference() -> str:
    """Markdown: the top-level help, then one section per command (summary, then its help)."""
    parser = get_args_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    parts = ["## zfvis", "", "```text", _help(parser), "```", ""]
    for name, (_, summary) in COMMANDS.items():
        parts += [f"## zfvis {name}", "", f"{summary[0].upper()}{summary[1:]}.", "", "```text",
                  _help(commands[name]), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """The MkDocs hook: fills in the reference page."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its {MARKER} line, where the generated reference goes")
    return markdown.replace(MARKER, reference())


def main(argv: list[str] | None = None) -> int:
    """Prints the reference; returns the exit status."""
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
