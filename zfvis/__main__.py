"""``python -m zfvis``: the same command line as the ``zfvis`` script."""

import sys

from .cli import main

sys.exit(main())
