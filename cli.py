#!/usr/bin/env python
"""Launch mfdsl from a source checkout without installing it (as Django's manage.py).

    python cli.py check specs/quickstart.mf

The installed entry points are the ``mfdsl`` console script and ``python -m mfdsl``.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    root = Path(__file__).resolve().parent
    # The backends live beside the core in a checkout; installed, they are packages.
    sys.path[:0] = [str(root), str(root / "backends")]
    from mfdsl.cli import main

    sys.exit(main())
