"""``python -m lbsgd_cli`` is the ``lbsgd`` command."""

import sys

from .cli import main

sys.exit(main())
