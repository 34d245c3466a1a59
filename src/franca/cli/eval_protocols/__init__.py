"""The ``franca eval <protocol>`` commands: one module per protocol, each with ``add_arguments(parser)`` and
``run(args)``.

The argument definitions import nothing heavy (defaults from :mod:`franca.eval.defaults`, validators from
:mod:`franca.cli.options`), so that ``franca --help`` builds every sub-parser cheaply; ``run`` imports the protocol's
library module (:mod:`franca.eval.knn`, ...) only when the protocol runs, calls its ``evaluate_<protocol>`` entry,
writes the JSON results and prints the tables. Options and glue shared by all protocols are in :mod:`.common`.
"""
