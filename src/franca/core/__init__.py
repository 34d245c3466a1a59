"""The ground floor of franca: what every other layer may use and what uses nothing of franca.

- :mod:`franca.core.errors`: the exceptions that carry one actionable line for the user;
- :mod:`franca.core.io`: atomic, fsync'd writes, and a full disk reported as one line;
- :mod:`franca.core.runtime`: device, autocast and seeding;
- :mod:`franca.core.distributed`: collectives that are no-ops without a process group;
- :mod:`franca.core.progress`: progress bars with rate and ETA.

The library logs through the ``franca`` logger (``logging.getLogger(__name__)`` in each module) and never prints;
the command line configures the handler.
"""
