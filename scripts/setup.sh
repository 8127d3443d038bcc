#!/usr/bin/env bash
# Create .venv (once) and install vitcnn_store with its dev tools into it.
# Safe to re-run: pip skips what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# torch is a plain dependency (lower bound only): bring your own CUDA build if you need one.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 \
    | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import vitcnn_store, torch, timm, ray, zarr" \
    || { echo "setup failed: vitcnn_store does not import" >&2; exit 1; }
# The report test drives Debian's chromium headless; install it when we may.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium for the report test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/dev/null 2>&1 || echo "could not install chromium: the browser test will be skipped" >&2
fi
