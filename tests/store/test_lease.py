"""Run leases: atomic create-if-absent outside the run, locally and on S3 (moto)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import moto_s3
from tests.store.test_store import filled_store
from vitcnn_store import open_store
from vitcnn_store.errors import RunLockedError
from vitcnn_store.store import list_runs
from vitcnn_store.store.lease import (
    acquire_lease,
    check_not_leased,
    current_lease,
    release_lease,
    renew_lease,
)


def race(url: str, run: str, n: int = 8, ttl: float = 60) -> list[str]:
    """``n`` owners try to take ``run`` at the same instant; returns the winners."""
    barrier = threading.Barrier(n)

    def one(i: int) -> str | None:
        barrier.wait()
        try:
            return acquire_lease(url, run, f"job-{i}", ttl=ttl).owner
        except RunLockedError as e:
            assert "is being written by job-" in str(e) or "just taken" in str(e)
            return None

    with ThreadPoolExecutor(n) as pool:
        return [w for w in pool.map(one, range(n)) if w is not None]


def test_one_winner_of_many_and_takeover_is_atomic_too(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")  # no store yet: a lease may come first
    for _ in range(3):
        winners = race(url, "r", ttl=2)
        assert len(winners) == 1
        assert current_lease(url, "r").owner == winners[0]  # type: ignore[union-attr]
        time.sleep(2.1)  # expired: the next race is a takeover of a dead job's lease
    # Old generations are collected: the live one and the one before it stay.
    assert len(os.listdir(Path(url, "_leases", "r"))) == 3  # two generations + zarr.json


def test_renew_release_and_a_lost_lease(tmp_path: Path) -> None:
    url = filled_store(tmp_path)
    lease = acquire_lease(url, "r", "job-a", ttl=60)
    lease = renew_lease(url, "r", lease, ttl=0.5)
    with pytest.raises(RunLockedError, match="job-a"):
        check_not_leased(url, "r", "job-b")
    time.sleep(1.1)
    acquire_lease(url, "r", "job-b", ttl=60)  # took the run over
    with pytest.raises(RunLockedError, match="taken over by job-b"):
        renew_lease(url, "r", lease)
    release_lease(url, "r", "job-a")  # not the holder: nothing happens
    assert current_lease(url, "r").owner == "job-b"  # type: ignore[union-attr]
    release_lease(url, "r", "job-b")
    assert current_lease(url, "r") is None
    check_not_leased(url, "r")


def test_leases_are_invisible_to_readers(tmp_path: Path) -> None:
    import warnings

    import xarray as xr

    url = filled_store(tmp_path)
    acquire_lease(url, "r", "job-a")
    assert [e.name for e in list_runs(url)] == ["other", "r"]
    assert open_store(url).runs == ["other", "r"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pure zarr hierarchy: no "not recognized" warning
        tree = xr.open_datatree(url, engine="zarr", consolidated=False)
    assert "activation" in tree["r"]["blocks.0"]


def test_a_legacy_lease_attribute_is_honoured_while_live(tmp_path: Path) -> None:
    import json

    url = filled_store(tmp_path)
    meta = Path(url, "r", "zarr.json")
    doc = json.loads(meta.read_text())
    legacy = {"owner": "job-old", "host": "h", "pid": 1, "acquired_at": "2026-01-01T00:00:00+00:00"}
    doc["attributes"]["lease"] = {**legacy, "expires_at": "2999-01-01T00:00:00+00:00"}
    meta.write_text(json.dumps(doc))
    with pytest.raises(RunLockedError, match="job-old"):
        acquire_lease(url, "r", "job-new")
    doc["attributes"]["lease"] = {**legacy, "expires_at": "2000-01-01T00:00:00+00:00"}
    meta.write_text(json.dumps(doc))
    assert acquire_lease(url, "r", "job-new").generation == 1


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    """An S3 server on loopback (moto honours If-None-Match: * on PUT)."""
    with moto_s3("leases") as bucket:
        yield f"{bucket}/acts.zarr"


def test_on_s3_one_winner_by_conditional_write(s3_url: str) -> None:
    winners = race(s3_url, "r", n=6)
    assert len(winners) == 1
    with pytest.raises(RunLockedError, match=winners[0]):
        acquire_lease(s3_url, "r", "job-late")
    release_lease(s3_url, "r", winners[0])
    assert acquire_lease(s3_url, "r", "job-late").generation == 2
