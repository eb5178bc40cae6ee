"""gae_deferred's benchmarks (issue 6): ``python -m benchmarks`` or ``make bench``.

Each module measures one budget of docs/design.md against its peer or floor, in one run, as ratios;
``python -m benchmarks --quick`` is the short smoke version. This package imports only the
standard library at import time: the legacy interpreter imports ``benchmarks.tasks``.
"""
