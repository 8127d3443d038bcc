#!/usr/bin/env bash
# Set up, then run the test suite: `scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
exec .venv/bin/python -m pytest "$@"
