"""What a server is started with, and the rules checked before it binds.

Light on purpose (standard library only): ``vitcnn serve`` validates its
options here and refuses bad ones with a one-line
:class:`~vitcnn_store.errors.UsageError` (exit 2) before FastAPI or uvicorn load.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from vitcnn_store.errors import UsageError

__all__ = [
    "ServeConfig",
    "check_serve_config",
    "is_loopback",
    "jobs_dir_for",
    "read_token",
]

MIB = 2**20


@dataclass(frozen=True)
class ServeConfig:
    """A server's settings.

    Parameters
    ----------
    store : str
        Store path or fsspec URL served at ``/zarr/`` and ``/api/``.
    host, port : str, int
        Where to listen; any host but a loopback address needs a ``token``.
    token : str or None
        The bearer token every request must carry (``None``: no token; loopback only).
    allow_jobs : bool
        Accept analysis jobs (the only thing that writes); needs a ``token``.
    cors_origins : tuple of str
        Origins allowed by CORS (none: CORS off).
    jobs_dir : str or None
        Where job records are kept (default: ``<store>.jobs`` beside the store).
    dask_address : str or None
        Scheduler that analysis jobs run on (default: the server's own threads).
    ray_address : str or None
        Ray job server (``http://HEAD:8265``) extraction jobs are submitted to
        (default: none; extraction jobs answer 501).
    max_request_bytes, max_response_bytes : int
        Largest request body and largest slice or result the server sends (413 beyond).
    request_timeout : float
        Seconds a request may take before it is answered 504.
    """

    store: str
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    allow_jobs: bool = False
    cors_origins: tuple[str, ...] = ()
    jobs_dir: str | None = None
    dask_address: str | None = None
    ray_address: str | None = None
    max_request_bytes: int = 64 * 1024
    max_response_bytes: int = 256 * MIB
    request_timeout: float = 60.0

    @property
    def jobs_location(self) -> str:
        """Folder (or fsspec URL) of the job records."""
        return self.jobs_dir or jobs_dir_for(self.store)


def jobs_dir_for(store: str) -> str:
    """Job records live beside the store, never inside it (``/zarr/`` serves the store).

    Examples
    --------
    >>> jobs_dir_for("/data/acts.zarr/")
    '/data/acts.zarr.jobs'
    >>> jobs_dir_for("s3://bucket/acts.zarr")
    's3://bucket/acts.zarr.jobs'
    """
    return store.rstrip("/") + ".jobs"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    Examples
    --------
    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost")
    (True, True, True)
    >>> is_loopback("0.0.0.0"), is_loopback("example.org")
    (False, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere: treat it as exposed


def read_token(path: str) -> str:
    """The bearer token in file ``path`` (surrounding whitespace dropped)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise UsageError(f"--token-file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--token-file {path}: not a UTF-8 text file") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise UsageError(
            f"--token-file {path}: the token must be one word of at least 16 characters "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`)"
        )
    return token


def check_serve_config(config: ServeConfig) -> ServeConfig:
    """Refuse settings that would expose the store, before anything binds or loads."""
    if not 0 <= config.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {config.port}")
    if config.token is None and not is_loopback(config.host):
        raise UsageError(
            f"--host {config.host} is reachable from other machines: give --token-file FILE "
            "(clients send Authorization: Bearer TOKEN) or bind 127.0.0.1"
        )
    if config.allow_jobs and config.token is None:
        raise UsageError("--allow-jobs lets clients write to the store: give --token-file FILE")
    for origin in config.cors_origins:
        if origin == "*" or not origin.startswith(("http://", "https://")):
            raise UsageError(f"--cors wants an origin such as https://host:port, got {origin!r}")
    if "://" not in config.store and not os.path.isdir(config.store):
        raise UsageError(f"no store at {config.store}")
    return config
