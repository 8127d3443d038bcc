"""Extraction jobs for the service: the interface is the one door from ``vitcnn_store``
to ``jobs``, so ``vitcnn serve`` reaches the extraction config and Ray's job submission
through here (each imported on first use)."""

from __future__ import annotations

from typing import Any

__all__ = ["extract_config_class", "job_client", "submit_extract"]


def extract_config_class() -> type:
    """:class:`jobs.config.ExtractConfig`, whose option table ``vitcnn extract`` parses."""
    from jobs.config import ExtractConfig

    return ExtractConfig


def job_client(address: str) -> Any:
    """A Ray job-submission client for ``address`` (see :func:`jobs.submit.job_client`)."""
    from jobs.submit import job_client as make

    return make(address)


def submit_extract(client: Any, cfg: Any, *, job_id: str) -> Any:
    """Submit extraction ``cfg`` as Ray job ``job_id`` (see :func:`jobs.submit.submit_extract`)."""
    from jobs.submit import submit_extract as submit

    return submit(client, cfg, job_id=job_id)
