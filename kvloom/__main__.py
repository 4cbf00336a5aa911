"""``python -m kvloom ...``: the same as the ``kvloom`` command."""

import sys

from kvloom.cli import main

sys.exit(main())
