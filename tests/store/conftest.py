"""Fixtures of the store tests, found by pytest (never imported by a test module)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def filled_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """:func:`tests.store.test_store.filled_store`, made once per worker; read-only: a test
    that damages a store takes a copy of it (the ``store`` fixtures of test_verify and
    test_integrity), as creating its runs costs far more than copying their files."""
    from tests.store.test_store import filled_store

    return filled_store(tmp_path_factory.mktemp("filled"))
