#!/usr/bin/env bash
# Set up, then run the test suite: `scripts/test.sh [pytest args]`.
#
# Two pytest-xdist workers: most tests use one core (imports, zarr I/O, a tiny model), so
# a second process halves the suite's time on a two-core machine. `--dist loadscope` keeps
# a module's tests in one worker, so a module's fixture (the demo, a dask cluster) is built
# once; each worker has its own session fixtures (the tiny stores, a Ray cluster). Modules
# go out slow ones first (tests/conftest.py: _slow_modules_first), so the quick ones fill
# the end of the run.
# `-n 0` after the script's name runs everything in one process (e.g. for --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
# Some machines set PYTHONDONTWRITEBYTECODE: then every process compiles our modules again,
# and pytest rewrites every test module's asserts again in each worker (seconds per worker).
unset PYTHONDONTWRITEBYTECODE
exec .venv/bin/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder "$@"
