"""``vitcnn submit extract ...``: run an extraction as a Ray Job on a remote cluster.

The job's entrypoint is the same ``vitcnn extract`` command line (run as
``python -m vitcnn_store.cli extract ...``); its runtime environment uploads this
package (``py_modules``) and forwards object-store credentials from the
environment, so the cluster image only needs the dependencies (torch, timm,
ray, zarr, xarray, dask). Ray 2.60 clusters use token auth: remote clients set
``RAY_AUTH_TOKEN`` (or keep the token in ``~/.ray/auth_token``).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitcnn_store.errors import ClusterError

__all__ = ["SubmitRequest", "entrypoint_args", "submit"]

# Options of `submit` that do not travel to the job's own `vitcnn extract`.
LOCAL_ONLY = {"--address": True, "--wait": False, "--pip": True, "--job-id": True}


@dataclass(frozen=True)
class SubmitRequest:
    address: str
    extract_args: list[str]
    wait: bool = False
    pip: tuple[str, ...] = ()
    job_id: str | None = None


def entrypoint_args(argv: Sequence[str]) -> list[str]:
    """``argv`` of ``submit extract`` less the options that only the client uses.

    Examples
    --------
    >>> entrypoint_args(["resnet50", "--address", "http://h:8265", "--wait", "--run", "r"])
    ['resnet50', '--run', 'r']
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = arg.partition("=")
        if name in LOCAL_ONLY:
            skip = LOCAL_ONLY[name] and not eq
            continue
        out.append(arg)
    return out


def _runtime_env(pip: Sequence[str]) -> dict[str, Any]:
    import jobs
    import vitcnn_store
    from jobs.ray_cluster import passthrough_env

    env: dict[str, Any] = {
        "py_modules": [str(Path(vitcnn_store.__file__).parent), str(Path(jobs.__file__).parent)],
        "env_vars": {**passthrough_env(), "PYTHONUNBUFFERED": "1"},
    }
    if pip:
        env["pip"] = list(pip)
    return env


def _client(address: str) -> Any:
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


def submit(request: SubmitRequest) -> int:
    """Submit the job; with ``wait``, follow its logs and return 0 only if it succeeded."""
    client = _client(request.address)
    entrypoint = shlex.join(["python", "-m", "vitcnn_store.cli", "extract", *request.extract_args])
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=_runtime_env(request.pip),
        submission_id=request.job_id,
        metadata={"tool": "vitcnn", "command": "extract"},
    )
    print(f"submitted Ray job {job_id} to {request.address}")
    for verb in ("status", "logs", "stop"):
        print(f"  {verb}: ray job {verb} --address {request.address} {job_id}")
    if not request.wait:
        return 0
    asyncio.run(_follow(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id} {status.value}")
    return 0 if status.value == "SUCCEEDED" else 1
