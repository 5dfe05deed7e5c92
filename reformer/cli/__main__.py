"""``python -m reformer.cli``: the ``reformer`` command (torchrun starts it this way)."""

import sys

from . import main

sys.exit(main())
