#!/usr/bin/env bash
# Set up, then run the whole pipeline on built-in images: `scripts/demo.sh [--quick] [--out DIR]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vitcnn demo "$@"
