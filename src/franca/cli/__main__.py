"""``python -m franca.cli``: the ``franca`` command line (:mod:`franca.cli`), as ``python -m franca``."""

import sys

from franca.cli import main

sys.exit(main())
