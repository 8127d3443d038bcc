"""The ``vitcnn`` command's stable address: ``python -m vitcnn_store.cli`` and
``from vitcnn_store.cli import main``.

The command line lives in :mod:`vitcnn_store.interface.cli` (the interface is
the one subpackage that imports the jobs); this module only points there, so
scripts, tests and the cluster's job entrypoints that name ``vitcnn_store.cli``
keep working.
"""

from __future__ import annotations

import sys

from vitcnn_store.interface.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
