"""``vitcnn submit extract ...``: run an extraction as a Ray Job on a remote cluster.

The job's entrypoint is the ``vitcnn extract`` command line that makes the
parsed config (:func:`vitcnn_store.options.to_argv`, run as ``python -m
vitcnn_store.cli extract ...``); its runtime environment uploads this
package (``py_modules``) and forwards object-store credentials from the
environment, so the cluster image only needs the dependencies (torch, timm,
ray, zarr, xarray, dask). Ray 2.60 clusters use token auth: remote clients set
``RAY_AUTH_TOKEN`` (or keep the token in ``~/.ray/auth_token``).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.config import ExtractConfig
from vitcnn_store.errors import ClusterError
from vitcnn_store.options import option, to_argv

__all__ = [
    "SubmitOptions",
    "SubmitRequest",
    "entrypoint_args",
    "job_client",
    "submit",
    "submit_extract",
]


@dataclass(frozen=True)
class SubmitOptions:
    """Options of ``vitcnn submit extract`` beyond those of ``vitcnn extract``."""

    wait: bool = option(
        False, flag="--wait", action="true", help="follow the job's logs to its end"
    )
    pip: tuple[str, ...] = option(
        (),
        flag="--pip",
        parse=str,
        action="append",
        help="extra pip package for the job (repeatable)",
    )
    job_id: str | None = option(
        None, flag="--job-id", parse=str, help="submission id (default: generated)"
    )


@dataclass(frozen=True)
class SubmitRequest:
    """A job to submit: the job server's address, the extraction, and how to submit it."""

    address: str
    extract: ExtractConfig
    options: SubmitOptions = SubmitOptions()


def entrypoint_args(cfg: ExtractConfig) -> list[str]:
    """The ``vitcnn extract`` arguments that make ``cfg`` on the cluster.

    ``--address`` is the job server's for ``submit``; inside the job Ray sets
    ``RAY_ADDRESS`` to the cluster itself, so it is not passed on.

    Examples
    --------
    >>> from vitcnn_store.models import ModelSpec
    >>> cfg = ExtractConfig(ModelSpec("resnet50", model_args={"depth": 2}), "builtin:faces",
    ...                     "s3://b/acts.zarr", "r", address="http://h:8265", chunk_size=16)
    >>> entrypoint_args(cfg)
    ['resnet50', '--model-arg', 'depth=2', '--images', 'builtin:faces', '--store', \
's3://b/acts.zarr', '--run', 'r', '--chunk-size', '16']
    """
    return to_argv(cfg, skip=("address",))


def _runtime_env(pip: Sequence[str]) -> dict[str, Any]:
    import jobs
    import vitcnn_store.errors
    from jobs.ray_cluster import passthrough_env

    package = Path(vitcnn_store.errors.__file__).parent
    env: dict[str, Any] = {
        "py_modules": [str(package), str(Path(jobs.__file__).parent)],
        "env_vars": {**passthrough_env(), "PYTHONUNBUFFERED": "1"},
    }
    if pip:
        env["pip"] = list(pip)
    return env


def job_client(address: str) -> Any:
    """A Ray ``JobSubmissionClient`` for the job server at ``address`` (probed first)."""
    from jobs.ray_cluster import probe_address

    probe_address(address)  # bounded: the SDK would retry an unreachable address for long
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()
    ):
        # The SDK sends the token only in token mode, read when ray is first imported.
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    # The SDK lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an explicit address.
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(name, None)
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(
            f"cannot reach the Ray job server at {address} ({first}); check --address "
            "(http://HEAD:8265) and RAY_AUTH_TOKEN"
        ) from e


async def _follow(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def submit_extract(
    client: Any, cfg: ExtractConfig, pip: Sequence[str] = (), job_id: str | None = None
) -> str:
    """Submit ``cfg`` as a Ray job running ``vitcnn extract``; returns its submission id.

    ``vitcnn submit extract`` and ``vitcnn serve``'s extraction jobs both submit here,
    so a job from either writes what ``vitcnn extract`` writes.
    """
    entrypoint = shlex.join(["python", "-m", "vitcnn_store.cli", "extract", *entrypoint_args(cfg)])
    return str(
        client.submit_job(
            entrypoint=entrypoint,
            runtime_env=_runtime_env(pip),
            submission_id=job_id,
            metadata={"tool": "vitcnn", "command": "extract"},
        )
    )


def submit(request: SubmitRequest) -> int:
    """Submit the job; with ``wait``, follow its logs and return 0 only if it succeeded."""
    client = job_client(request.address)
    job_id = submit_extract(client, request.extract, request.options.pip, request.options.job_id)
    print(f"submitted Ray job {job_id} to {request.address}")
    for verb in ("status", "logs", "stop"):
        print(f"  {verb}: ray job {verb} --address {request.address} {job_id}")
    if not request.options.wait:
        return 0
    import asyncio  # here: the CLI imports this module to build its parser

    asyncio.run(_follow(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id} {status.value}")
    return 0 if status.value == "SUCCEEDED" else 1
