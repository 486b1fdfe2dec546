"""``python -m mfdsl``."""

import sys

from mfdsl.cli import main

sys.exit(main())
