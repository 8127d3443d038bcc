"""Reads that refuse damaged data: checksum mismatches and missing chunks become errors.

:class:`CheckedArray` wraps a zarr array for :func:`dask.array.from_array`. A
chunk whose crc32c does not match raises :class:`DamagedDataError` naming the
run, the layer and the work unit, from any dask compute (threads, processes or
a distributed cluster: the wrapper and the error both pickle). A chunk of a
done unit that is missing reads as zarr's fill value (NaN); since stored
activations of decoded images are never NaN, the wrapper checks one value per
such image row — almost free — and raises instead of returning the NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vitcnn_store.errors import DamagedDataError
from vitcnn_store.store.layout import environment_error, quiet_zarr

__all__ = [
    "CheckedArray",
    "checked_dask",
    "damage_error",
    "failure_reason",
    "read_checked",
    "read_many",
]


def failure_reason(e: BaseException) -> str:
    """A short reason for a failed chunk read: ``checksum mismatch`` or the decode error."""
    text = str(e)
    if "checksum" in text.lower():
        return "checksum mismatch"
    return f"cannot decode ({type(e).__name__}: {text.splitlines()[0][:80] if text else ''})"


def _advice(url: str, run: str) -> str:
    return f"run `vitcnn verify {url} {run} --repair`, then `vitcnn extract ... --resume`"


def damage_error(
    url: str,
    run: str,
    layer: str,
    e: BaseException,
    unit: int | None = None,
    images: tuple[int, int] | None = None,
    what: str = "chunk",
) -> Exception:
    """The error for a failed read: a storage failure, or damaged data named precisely."""
    mapped = environment_error(url, e)
    if mapped is not None:
        return mapped
    where = f"run {run!r}, layer {layer!r}"
    if unit is not None:
        where += f", unit {unit}"
    if images is not None:
        where += f" (images {images[0]}-{images[1] - 1})"
    return DamagedDataError(
        f"damaged {what} in {url}: {where}: {failure_reason(e)}; {_advice(url, run)}",
        run=run,
        layer=layer,
        unit=unit,
    )


def read_checked(array: Any, url: str, run: str, layer: str) -> np.ndarray:
    """All of a small array (coordinates, flags), damage reported as an error."""
    try:
        with quiet_zarr():
            return np.asarray(array[...])
    except Exception as e:
        raise damage_error(url, run, layer, e) from e


def read_many(reads: list[tuple[Any, Any]]) -> list[Any]:
    """``array[selection]`` for each ``(array, selection)`` of ``reads``, concurrently on
    zarr's event loop (at most 32 at once): one round of requests to a remote store
    instead of one request after the other. A failed read returns its exception."""
    import asyncio

    from zarr.core.sync import sync

    async def all_of() -> list[Any]:
        gate = asyncio.Semaphore(32)

        async def one(array: Any, selection: Any) -> Any:
            async with gate:
                return await array._async_array.getitem(selection)

        return await asyncio.gather(*(one(a, s) for a, s in reads), return_exceptions=True)

    if not reads:
        return []
    with quiet_zarr():
        return list(sync(all_of()))


def _rows(index: Any, n: int) -> tuple[np.ndarray, bool]:
    """Image indices selected by ``index`` (first axis), and whether that axis is kept."""
    if isinstance(index, slice):
        return np.arange(*index.indices(n)), True
    if isinstance(index, (int, np.integer)):
        return np.array([int(index) % n]), False
    return np.asarray(index, dtype=np.int64).reshape(-1) % max(n, 1), True


class CheckedArray:
    """A zarr array whose reads raise :class:`DamagedDataError` instead of returning damage.

    ``expected`` marks the images whose rows must hold data (their unit is done
    and they decoded); ``None`` skips the missing-chunk check.
    """

    def __init__(
        self,
        array: Any,
        *,
        url: str,
        run: str,
        layer: str,
        chunk: int,
        expected: np.ndarray | None,
    ) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.url, self.run, self.layer, self.chunk = url, run, layer, chunk
        self.expected = expected

    def _unit_error(self, rows: np.ndarray, e: BaseException) -> Exception:
        # Name the first unit that fails on its own (a read may span several units).
        for unit in sorted({int(r) // self.chunk for r in rows}):
            start, stop = unit * self.chunk, min((unit + 1) * self.chunk, self.shape[0])
            try:
                with quiet_zarr():
                    self.array[start:stop]
            except Exception as inner:
                return damage_error(self.url, self.run, self.layer, inner, unit, (start, stop))
        return damage_error(self.url, self.run, self.layer, e)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows, kept = _rows(key[0], self.shape[0]) if self.ndim else (np.array([], int), False)
        try:
            with quiet_zarr():
                out = np.asarray(self.array[key])
        except Exception as e:
            raise self._unit_error(rows, e) from e
        if self.expected is not None and self.dtype.kind == "f" and rows.size:
            self._check_present(rows, out if kept else out[None])
        return out

    def _check_present(self, rows: np.ndarray, out: np.ndarray) -> None:
        want = self.expected[rows]  # type: ignore[index]
        if not want.any() or out.size == 0:
            return
        first = out.reshape(len(rows), -1)[:, 0]
        bad = want & np.isnan(first)
        if bad.any():
            image = int(rows[np.flatnonzero(bad)[0]])
            unit = image // self.chunk
            start, stop = unit * self.chunk, min((unit + 1) * self.chunk, self.shape[0])
            raise DamagedDataError(
                f"missing chunk in {self.url}: run {self.run!r}, layer {self.layer!r}, unit "
                f"{unit} (images {start}-{stop - 1}) is marked done but its data is gone; "
                f"{_advice(self.url, self.run)}",
                run=self.run,
                layer=self.layer,
                unit=unit,
            )


def checked_dask(checked: CheckedArray, name: str) -> Any:
    """A dask array over ``checked``, one task per stored chunk."""
    import dask.array as da
    from dask.base import tokenize

    token = tokenize(name, checked.expected)
    return da.from_array(
        checked,
        chunks=tuple(checked.array.chunks),
        name=f"{name}-{token}",
        fancy=False,
        lock=False,
        asarray=False,
        meta=np.empty((0,) * checked.ndim, dtype=checked.dtype),
    )
