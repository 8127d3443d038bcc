"""The Python API's entry to the jobs: :func:`extract` (torch, timm and Ray load with it).

``vitcnn_store.extract`` resolves here on first use, so that the package root
reaches the jobs only through the interface.
"""

from __future__ import annotations

from jobs.api import extract

__all__ = ["extract"]
