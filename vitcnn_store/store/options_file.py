"""Storage options from a config file: ``~/.config/vitcnn/storage.toml``.

Each table is named by a URL prefix and holds the fsspec options of every
store below it (``$XDG_CONFIG_HOME`` moves the file; ``VITCNN_STORAGE_CONFIG``
names another one)::

    ["s3://team-activations"]
    endpoint_url = "https://minio.example.org:9000"
    key = "..."
    secret = "..."

The longest matching prefix wins; ``VITCNN_STORAGE_OPTIONS`` and
``--storage-option`` override single keys (see
:func:`vitcnn_store.store.layout.storage_options`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitcnn_store.errors import UsageError

__all__ = ["config_path", "file_options"]


def config_path() -> Path:
    """Where the storage config file is looked for."""
    named = os.environ.get("VITCNN_STORAGE_CONFIG")
    if named:
        return Path(named)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vitcnn" / "storage.toml"


def file_options(url: str) -> dict[str, Any]:
    """The options the config file gives ``url`` (``{}`` without a file or a match)."""
    path = config_path()
    if not path.is_file():
        return {}
    import tomllib

    try:
        tables = tomllib.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"storage config {path} is unreadable: {e}") from e
    out: dict[str, Any] = {}
    for prefix in sorted(tables, key=len):
        options = tables[prefix]
        p = prefix.rstrip("/")
        if isinstance(options, dict) and (url == p or url.startswith(p + "/")):
            out.update(options)
    return out
