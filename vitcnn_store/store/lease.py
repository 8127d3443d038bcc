"""Run leases: one live job writes a run at a time.

A lease is a small JSON attribute of the run group — owner, host, pid, when it
was taken and when it expires. The job holding it renews it while it runs; a
job that crashed stops renewing, so its lease expires and ``--resume`` can take
over. Object stores offer no compare-and-swap, so taking a lease writes it and
reads it back after a pause: of two jobs racing, the one whose write landed
last wins and the other sees a foreign owner and backs off.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from vitcnn_store.errors import RunLockedError
from vitcnn_store.store.layout import open_root, quiet_zarr

__all__ = ["DEFAULT_TTL", "Lease", "acquire_lease", "current_lease", "release_lease", "renew_lease"]

DEFAULT_TTL = 120.0  # seconds; the holder renews every TTL/4
LEASE_ATTR = "lease"


@dataclass(frozen=True)
class Lease:
    """Who writes a run, and until when (UTC ISO timestamps)."""

    owner: str
    host: str
    pid: int
    acquired_at: str
    expires_at: str

    @property
    def expired(self) -> bool:
        return _dt.datetime.fromisoformat(self.expires_at) <= _now()

    def describe(self) -> str:
        return f"{self.owner} (host {self.host}, pid {self.pid}, lease expires {self.expires_at})"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def new_owner() -> str:
    """A fresh owner id for one job."""
    return f"job-{uuid.uuid4().hex[:12]}"


def _group(url: str, run: str) -> Any:
    with quiet_zarr():
        return open_root(url, mode="r+")[run]


def current_lease(url: str, run: str) -> Lease | None:
    """The lease on ``run``, if any (expired or not)."""
    with quiet_zarr():
        raw = open_root(url, mode="r")[run].attrs.get(LEASE_ATTR)
    return Lease(**raw) if isinstance(raw, dict) else None


def check_not_leased(url: str, run: str, owner: str | None = None) -> None:
    """Raise :class:`RunLockedError` if another live job holds ``run``."""
    lease = current_lease(url, run)
    if lease is not None and not lease.expired and lease.owner != owner:
        raise RunLockedError(
            f"run {run!r} is being written by {lease.describe()}; wait for it, or if that job "
            "died, run again with --resume once its lease has expired"
        )


def _write(url: str, run: str, owner: str, ttl: float, acquired_at: str | None = None) -> Lease:
    now = _now()
    lease = Lease(
        owner=owner,
        host=socket.gethostname(),
        pid=os.getpid(),
        acquired_at=acquired_at or now.isoformat(timespec="seconds"),
        expires_at=(now + _dt.timedelta(seconds=ttl)).isoformat(timespec="seconds"),
    )
    with quiet_zarr():
        _group(url, run).attrs[LEASE_ATTR] = asdict(lease)
    return lease


def acquire_lease(url: str, run: str, owner: str, ttl: float = DEFAULT_TTL) -> Lease:
    """Take the lease on ``run`` for ``owner`` or raise :class:`RunLockedError`."""
    check_not_leased(url, run, owner)
    lease = _write(url, run, owner, ttl)
    time.sleep(0.2)  # let a racing writer land, then see who won
    check_not_leased(url, run, owner)
    return lease


def renew_lease(url: str, run: str, lease: Lease, ttl: float = DEFAULT_TTL) -> Lease:
    """Extend a held lease; raises :class:`RunLockedError` if someone else took it."""
    check_not_leased(url, run, lease.owner)
    return _write(url, run, lease.owner, ttl, lease.acquired_at)


def release_lease(url: str, run: str, owner: str) -> None:
    """Drop the lease if ``owner`` still holds it."""
    lease = current_lease(url, run)
    if lease is not None and lease.owner == owner:
        with quiet_zarr():
            _group(url, run).attrs.pop(LEASE_ATTR, None)
