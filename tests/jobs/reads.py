"""Count what an in-process job reads from a local store, chunk by chunk.

Wraps zarr's own ``LocalStore.get`` (the call every read of a local store goes
through) to record each key fetched and its size; nothing is changed or faked.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


@contextmanager
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[int]]]:
    """Yield ``{key: [bytes of each read]}`` for reads of local zarr stores in this process."""
    from zarr.storage import LocalStore

    original = LocalStore.get
    reads: dict[str, list[int]] = defaultdict(list)

    async def get(self: Any, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        buf = await original(self, key, prototype, byte_range)
        if buf is not None:
            reads[key].append(len(buf))
        return buf

    with monkeypatch.context() as m:
        m.setattr(LocalStore, "get", get)
        yield reads


def chunk_reads(reads: dict[str, list[int]], array: str) -> dict[str, list[int]]:
    """The reads of one array's chunks (``run/layer/activation`` → its ``c/...`` keys)."""
    prefix = f"{array}/c/"
    return {k: v for k, v in reads.items() if k.startswith(prefix)}


def stored_bytes(url: str, array: str) -> int:
    """Bytes of one array's chunk objects on disk."""
    return sum(p.stat().st_size for p in (Path(url) / array / "c").rglob("*") if p.is_file())
