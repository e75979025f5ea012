#!/usr/bin/env python
"""Shows the docstrings' Sphinx roles as code on the documentation site.

zfvis's docstrings cross-reference with Sphinx roles (``:func:`load_model```,
``:class:`~zfvis.core.deconvnet.Deconvnet```), which mkdocstrings leaves as raw text. This
MkDocs hook (`hooks:` in mkdocs.yml) turns each into plain code on the built pages: the role
name dropped, a leading ``~`` shortening the path to its last part, as Sphinx shows it.
Run alone, it converts stdin to stdout:

    echo '<p>see :func:<code>~zfvis.io.images.load_image</code></p>' | python scripts/docs_roles.py
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]+)</code>")


def strip_roles(html: str) -> str:
    """``:func:<code>x</code>`` -> ``<code>x</code>``; ``~a.b.c`` -> ``c``."""
    return _ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)


def on_page_content(html: str, **kwargs: Any) -> str:
    """The MkDocs hook."""
    return strip_roles(html)


def main(argv: list[str] | None = None) -> int:
    """Converts stdin to stdout; returns the exit status."""
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    sys.stdout.write(strip_roles(sys.stdin.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
