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
# pip's own lines show progress (a fresh machine takes several minutes: torch, Ray); the
# "already satisfied" lines of a re-run and pip's location warnings are left out.
echo "installing vitcnn_store and its dependencies into .venv (several minutes the first time)"
set +e
.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -e ".[dev]" 2>&1 \
    | grep --line-buffered -v -e "^WARNING: Location" -e "^Requirement already satisfied"
pip_status=${PIPESTATUS[0]}
set -e
[ "$pip_status" = 0 ] || { echo "setup failed: pip install exited with $pip_status (above)" >&2; exit 1; }
.venv/bin/python -c "import vitcnn_store, torch, timm, ray, zarr" \
    || { echo "setup failed: vitcnn_store does not import" >&2; exit 1; }
# The report test drives Debian's chromium headless; install it when we may.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium for the report test (apt-get)"
    apt_log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >"$apt_log" 2>&1; then
        echo "could not install chromium: the browser test will be skipped. apt-get said:" >&2
        tail -n 8 "$apt_log" | sed 's/^/    /' >&2
    fi
    rm -f "$apt_log"
fi
