"""Run leases: one live job writes a run at a time.

A lease lives outside the run it guards — the zarr group
``<store>/_leases/<run>/<generation>/`` — so that it exists *before* the run
is created or replaced and survives ``--overwrite`` deleting the run group.
Its attribute ``vitcnn_store.lease`` holds the owner, host, pid, when it was
taken and when it expires; the highest generation is the run's lease, live
until it expires or its holder marks it released.

Taking a lease creates the next generation's ``zarr.json`` **if absent**,
atomically: locally by a hard link (``link(2)`` fails when the name exists), on object
stores by a conditional write (``If-None-Match: *``, which S3, GCS and moto
honour). Of two jobs racing for generation ``g + 1`` exactly one creates it;
the other gets :class:`RunLockedError` naming the winner and has written
nothing. An expired (crashed) or released lease is taken over the same way:
by creating the generation after it, so a takeover is as atomic as a first
lease. The holder renews by rewriting its own lease (renewing every TTL/4);
it checks first that no later generation exists.

Remaining race, by design of any lease: a holder stalled for longer than its
TTL may still be renewing when another job takes the run over. The holder sees
the later generation at its next renewal (within TTL/4) and stops, but one
unit it was writing may land meanwhile; units are idempotent, so the new
holder's rewrite of that unit is the same bytes.

Runs written before leases moved here kept a ``lease`` attribute on the run
group; a live one is still honoured (refused), an expired one ignored.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace

from vitcnn_store.errors import RunLockedError, StoreError, VitcnnError
from vitcnn_store.store.layout import (
    LEASES,
    check_name,
    create_if_absent,
    filesystem,
    group_doc,
    open_root,
    quiet_zarr,
    store_io,
)

__all__ = [
    "DEFAULT_TTL",
    "Lease",
    "acquire_lease",
    "check_not_leased",
    "current_lease",
    "new_owner",
    "release_lease",
    "renew_lease",
]

DEFAULT_TTL = 120.0  # seconds; the holder renews every TTL/4
LEASE_ATTR = "vitcnn_store.lease"
LEGACY_ATTR = "lease"  # the run attribute older versions used
_GENERATION = re.compile(r"(\d{10})")
_KEEP = 2  # generations kept: the live one and the one before it


@dataclass(frozen=True)
class Lease:
    """Who writes a run, and until when (UTC ISO timestamps)."""

    owner: str
    host: str
    pid: int
    acquired_at: str
    expires_at: str
    generation: int = 0  # 0: a legacy lease attribute on the run group
    released: bool = False

    @property
    def expired(self) -> bool:
        if self.released or self.abandoned:
            return True
        return _dt.datetime.fromisoformat(self.expires_at) <= _now()

    @property
    def abandoned(self) -> bool:
        """Held by a job of this host that is known to be gone: its process has exited,
        or it is this process and the job let go of it (a release that could not be
        written, e.g. on a full disk). Such a lease need not wait out its TTL."""
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return self.owner not in _HELD
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # e.g. another user's process: alive
            return False
        return False

    def describe(self) -> str:
        return f"{self.owner} (host {self.host}, pid {self.pid}, lease expires {self.expires_at})"


#: Owners whose leases this process holds (taken and not yet let go of).
_HELD: set[str] = set()


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def new_owner() -> str:
    """A fresh owner id for one job."""
    return f"job-{uuid.uuid4().hex[:12]}"


# -- storage: the lease folder of one run ----------------------------------------------


class _Folder:
    """``<store>/_leases/<run>/`` on a local disk or any fsspec file system.

    Each generation is a zarr group ``<generation>/`` whose attribute
    ``vitcnn_store.lease`` is the lease, so the store stays a pure zarr hierarchy
    (plain zarr and xarray walk it without warnings).
    """

    def __init__(self, url: str, run: str) -> None:

        check_name(run)
        self.url = url
        with store_io(url):
            self.fs, root = filesystem(url)
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol
        self.leases = f"{root.rstrip('/')}/{LEASES}"
        self.path = f"{self.leases}/{run}"

    def file(self, generation: int) -> str:
        return f"{self.path}/{generation:010d}/zarr.json"

    def generations(self) -> list[int]:
        with store_io(self.url):
            try:
                names = self.fs.ls(self.path, detail=False, refresh=True)
            except FileNotFoundError:
                return []
        found = (_GENERATION.fullmatch(str(n).rstrip("/").rsplit("/", 1)[-1]) for n in names)
        return sorted(int(m.group(1)) for m in found if m)

    def read(self, generation: int) -> Lease | None:
        """The lease of ``generation``; None if it vanished (collected) meanwhile."""
        for attempt in range(5):
            try:
                with store_io(self.url):
                    raw = json.loads(self.fs.cat_file(self.file(generation)))
                return Lease(**{**raw["attributes"][LEASE_ATTR], "generation": generation})
            except FileNotFoundError:
                return None
            except (ValueError, TypeError, KeyError) as e:
                if attempt == 4:  # not a lease we wrote: refuse to guess who holds the run
                    raise StoreError(
                        f"lease {self.file(generation)} is unreadable ({type(e).__name__}); "
                        "if no job writes this run, delete it"
                    ) from e
                time.sleep(0.05)
        return None

    def _put_new(self, target: str, data: bytes) -> bool:
        """Write ``target`` only if absent: True when this call created it."""
        return create_if_absent(self.url, target, data, "so a run's lease cannot be taken safely")

    def create(self, generation: int, lease: Lease) -> bool:
        """Create ``generation``'s lease only if absent: True when this call created it."""
        for folder in (self.leases, self.path):  # the zarr groups above the leases
            if not self.fs.exists(f"{folder}/zarr.json"):
                self._put_new(f"{folder}/zarr.json", group_doc({}))
        return self._put_new(self.file(generation), _encode(lease))

    def rewrite(self, lease: Lease) -> None:
        """Overwrite the holder's own lease (renewal, release)."""
        data = _encode(lease)
        target = self.file(lease.generation)
        with store_io(self.url):
            if self.local:
                tmp = f"{self.path}/.{uuid.uuid4().hex}.tmp"
                with open(tmp, "xb") as f:
                    f.write(data)
                os.replace(tmp, target)
            else:
                self.fs.pipe_file(target, data)

    def collect(self, below: int) -> None:
        """Delete generations older than ``below - 1`` (best effort)."""
        for g in self.generations():
            if g < below - (_KEEP - 1):
                try:
                    with store_io(self.url):
                        self.fs.rm(self.file(g).rsplit("/", 1)[0], recursive=True)
                except (FileNotFoundError, VitcnnError, OSError):
                    pass


def _encode(lease: Lease) -> bytes:
    raw = asdict(lease)
    raw.pop("generation")  # the group's name says it
    return group_doc({LEASE_ATTR: raw})


def _head(folder: _Folder) -> Lease | None:
    """The lease with the highest generation (re-listing if it was collected meanwhile)."""
    for _ in range(5):
        gens = folder.generations()
        if not gens:
            return None
        # The highest readable one: a generation folder may exist before its file does
        # (a racer between making the folder and linking the file into it).
        for g in reversed(gens):
            lease = folder.read(g)
            if lease is not None:
                return lease
    raise StoreError(f"the leases under {folder.path} keep changing; try again")


def _legacy(url: str, run: str) -> Lease | None:
    """A lease attribute left by an older version on the run group, if readable."""
    try:
        with quiet_zarr():
            raw = open_root(url, mode="r")[run].attrs.get(LEGACY_ATTR)
        return Lease(**raw) if isinstance(raw, dict) else None
    except Exception:  # no store, no run, or not a lease we understand: no legacy lease
        return None


def current_lease(url: str, run: str) -> Lease | None:
    """The lease on ``run`` (expired or not); None when none was taken or it was released."""
    lease = _head(_Folder(url, run))
    if lease is None:
        lease = _legacy(url, run)
    return None if lease is None or lease.released else lease


def _refusal(run: str, lease: Lease | None) -> RunLockedError:
    if lease is None:  # its holder's lease vanished between two reads
        return RunLockedError(f"run {run!r} was just taken by another job; try again later")
    return RunLockedError(
        f"run {run!r} is being written by {lease.describe()}; wait for it, or if that job "
        "died, run again with --resume once its lease has expired"
    )


def check_not_leased(url: str, run: str, owner: str | None = None) -> None:
    """Raise :class:`RunLockedError` if another live job holds ``run``. Writes nothing."""
    lease = current_lease(url, run)
    if lease is not None and not lease.expired and lease.owner != owner:
        raise _refusal(run, lease)


def _new(owner: str, ttl: float, generation: int, acquired_at: str | None = None) -> Lease:
    now = _now()
    return Lease(
        owner=owner,
        host=socket.gethostname(),
        pid=os.getpid(),
        acquired_at=acquired_at or now.isoformat(timespec="seconds"),
        expires_at=(now + _dt.timedelta(seconds=ttl)).isoformat(timespec="milliseconds"),
        generation=generation,
    )


def acquire_lease(url: str, run: str, owner: str, ttl: float = DEFAULT_TTL) -> Lease:
    """Take the lease on ``run`` for ``owner`` or raise :class:`RunLockedError`.

    Atomic: the next generation's file is created only if absent, so of racing
    jobs exactly one gets it; a refused job has written nothing.
    """
    folder = _Folder(url, run)
    head = _head(folder)
    if head is None:
        legacy = _legacy(url, run)
        if legacy is not None and not legacy.expired and legacy.owner != owner:
            raise _refusal(run, legacy)
    elif not head.expired and head.owner != owner:
        raise _refusal(run, head)
    generation = (head.generation if head is not None else 0) + 1
    lease = _new(owner, ttl, generation)
    _HELD.add(owner)  # before the file exists, so no one in this process takes it as abandoned
    try:
        if not folder.create(generation, lease):
            raise _refusal(run, folder.read(generation))
        # A job acting on a listing older than a collection may have created a generation
        # that is no longer the highest: only the highest holds the run.
        latest = _head(folder)
        if latest is None or latest.generation != generation:
            folder.rewrite(replace(lease, released=True))
            raise _refusal(run, latest)
    except BaseException:
        _HELD.discard(owner)
        raise
    folder.collect(generation)
    return lease


def renew_lease(url: str, run: str, lease: Lease, ttl: float = DEFAULT_TTL) -> Lease:
    """Extend a held lease; raises :class:`RunLockedError` if another job took it over."""
    folder = _Folder(url, run)
    head = _head(folder)
    if head is None or head.generation != lease.generation or head.owner != lease.owner:
        taker = f"by {head.describe()}" if head is not None else "(its lease file is gone)"
        raise RunLockedError(
            f"run {run!r}: this job's lease lapsed and the run was taken over {taker}; "
            "stopping without writing more"
        )
    renewed = _new(lease.owner, ttl, lease.generation, lease.acquired_at)
    folder.rewrite(renewed)
    return renewed


def release_lease(url: str, run: str, owner: str) -> None:
    """Mark the lease released if ``owner`` still holds it (the file stays: generations
    only grow, so a job acting on an old listing can never take a generation twice)."""
    _HELD.discard(owner)  # let go even if the release below cannot be written
    folder = _Folder(url, run)
    head = _head(folder)
    if head is not None and head.owner == owner and not head.released:
        now = _now().isoformat(timespec="seconds")
        folder.rewrite(replace(head, released=True, expires_at=now))
