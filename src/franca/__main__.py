"""``python -m franca``: the ``franca`` command line (:mod:`franca.cli`)."""

import sys

from franca.cli import main

sys.exit(main())
