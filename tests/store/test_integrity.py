"""Damaged, missing and half-created data is refused by every reader, never returned.

Damage is made the way it happens: bytes flipped in a chunk file on disk, chunk
files deleted, a run creation interrupted part way, a corrupt ``zarr.json``.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.store.test_store import PROVENANCE, SPECS, make_run, unit_values
from vitcnn_store import open_store
from vitcnn_store.cli import main
from vitcnn_store.errors import BrokenRunError, DamagedDataError
from vitcnn_store.store import RunWriter, create_run, prepare_run
from vitcnn_store.store.checked import CheckedArray
from vitcnn_store.store.runs import list_runs


def flip(path: Path, offset: int = 12) -> None:
    """Flip one byte of a file, as bit rot or a bad copy would."""
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def store(filled_template: str, tmp_path: Path) -> str:
    """A private copy of :func:`tests.store.test_store.filled_store` (made once)."""
    return str(shutil.copytree(filled_template, tmp_path / "s.zarr"))


def chunk(url: str, run: str, array: str, unit: int) -> Path:
    ndim = zarr.open_array(f"{url}/{run}/{array}", mode="r").ndim
    return Path(url, run, array, "c", str(unit), *["0"] * (ndim - 1))


def test_flipped_bytes_are_refused_naming_run_layer_unit(store: str) -> None:
    flip(chunk(store, "r", "blocks.0/activation", 1))
    run = open_store(store)["r"]
    with pytest.raises(
        DamagedDataError, match=r"run 'r', layer 'blocks.0', unit 1 .*checksum"
    ) as e:
        _ = run["blocks.0"].values
    assert (e.value.run, e.value.layer, e.value.unit) == ("r", "blocks.0", 1)
    # Other units and layers still read; the error survives pickling (dask, Ray).
    assert run["blocks.0"].isel(image=slice(0, 2)).values.shape == (2, 3, 4)
    assert np.isfinite(run["layer1.0"].values).all()
    again = pickle.loads(pickle.dumps(e.value))
    assert isinstance(again, DamagedDataError) and again.unit == 1


def test_damaged_attention_inputs_and_coordinates(store: str) -> None:
    flip(chunk(store, "r", "blocks.0/attention", 2))
    with pytest.raises(DamagedDataError, match="unit 2"):
        open_store(store)["r"].attention("blocks.0").sum().compute()
    flip(Path(store, "r", "image_id", "c", "0"))
    with pytest.raises(DamagedDataError, match="layer 'image_id'"):
        _ = open_store(store)["r"].image_ids
    assert open_store(store)["other"].n_images == 5  # the other run is untouched


def test_damage_surfaces_from_dask_in_another_process(store: str) -> None:
    flip(chunk(store, "r", "layer1.0/activation", 0))
    run = open_store(store)["r"]
    wrapped = run["layer1.0"].data
    # What a dask worker receives: the pickled graph; the read fails there, typed.
    graph = pickle.loads(pickle.dumps(dict(wrapped.__dask_graph__())))
    arrays = [v for v in graph.values() if isinstance(v, CheckedArray)]
    assert arrays and arrays[0].run == "r"
    with pytest.raises(DamagedDataError, match="unit 0"):
        arrays[0][0:2, :, :, :]


def test_missing_chunk_of_a_done_unit_is_an_error_not_nan(store: str, capsys) -> None:  # type: ignore[no-untyped-def]
    chunk(store, "r", "layer1.0/activation", 2).unlink()
    run = open_store(store)["r"]
    with pytest.raises(DamagedDataError, match=r"missing chunk.*unit 2"):
        _ = run["layer1.0"].values
    assert run.missing_chunks() == [("layer1.0/activation", 2)]
    assert main(["ls", store]) == 0
    out = capsys.readouterr().out
    assert "DAMAGED: 1 missing chunk(s) in 1 unit(s)" in out
    assert main(["show", store, "r"]) == 0
    assert "DAMAGED" in capsys.readouterr().out


def test_failed_images_stay_nan_without_error(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url)
    writer = RunWriter(url, "r")
    for unit, (start, stop) in enumerate(writer.units):
        values = unit_values(stop - start, unit)
        failed = np.zeros(stop - start, bool)
        if unit == 1:
            failed[0] = True
            for v in values.values():
                v[0] = np.nan
        writer.write_unit(unit, values, failed, ["bad" if f else "" for f in failed])
    x = open_store(url)["r"]["blocks.0"].values
    assert np.isnan(x[2]).all() and not np.isnan(np.delete(x, 2, axis=0)).any()


def test_unfinished_units_read_as_nan(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url)
    x = open_store(url)["r"]["blocks.0"].values  # nothing done yet: nothing expected
    assert np.isnan(x).all()


class _Interrupt(Exception):
    pass


def interrupt_creation(url: str, name: str, after: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Create a run but stop after ``after`` arrays, as a crash or a full disk would."""
    calls = {"n": 0}
    original = zarr.Group.create_array

    def create_array(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > after:
            raise _Interrupt
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(zarr.Group, "create_array", create_array)
        with pytest.raises(_Interrupt):
            create_run(
                url,
                name,
                image_ids=["a", "b", "c"],
                labels=[0, 1, 2],
                chunk=2,
                dtype="float32",
                arrays=SPECS,
                attrs=PROVENANCE,
            )


@pytest.mark.parametrize("after", [0, 3, 12])
def test_half_created_run_is_broken_never_a_crash(
    store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], after: int
) -> None:
    interrupt_creation(store, "half", after, monkeypatch)
    entries = {e.name: e for e in list_runs(store)}
    assert not entries["half"].created and entries["other"].created
    s = open_store(store)
    assert s.runs == ["other", "r"] and "half" in s.broken
    with pytest.raises(BrokenRunError, match="--overwrite"):
        s["half"]
    assert main(["ls", store]) == 0
    out = capsys.readouterr().out
    assert "BROKEN: creation interrupted" in out and "other" in out
    assert main(["show", store, "half"]) == 0
    assert "BROKEN" in capsys.readouterr().out
    assert main(["query", store, "half", "blocks.0"]) == 1
    assert "broken" in capsys.readouterr().err
    # Either flag recreates it; neither refuses with the reason.
    assert prepare_run(store, "half", PROVENANCE, resume=True, overwrite=False) is True
    with pytest.raises(Exception, match="broken"):
        prepare_run(store, "half", PROVENANCE, resume=False, overwrite=False)
    make_run(store, "half")
    assert open_store(store)["half"].n_images == 5


def test_corrupt_run_metadata_is_listed_broken(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Path(store, "other", "zarr.json").write_text("{not json")
    assert main(["ls", store]) == 0
    out = capsys.readouterr().out
    assert "metadata unreadable" in out and "r  " in out
    assert open_store(store)["r"].n_images == 5


def test_corrupt_root_metadata_is_one_line_exit_1(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Path(store, "zarr.json").write_bytes(b"\x00garbage{")
    for args in (["ls", store], ["verify", store], ["query", store, "r", "blocks.0"]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "zarr.json is unreadable" in err, err


def test_show_reports_damage_instead_of_failing(store: str, capsys) -> None:  # type: ignore[no-untyped-def]
    flip(Path(store, "r", "blocks.0", "token_kind", "c", "0"))
    flip(Path(store, "r", "done", "c", "1"), offset=0)
    assert main(["show", store, "r"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\nblocks\.0 +DAMAGED", out), out
    assert "layer1.0" in out and "units done: unreadable" in out
    assert main(["ls", store]) == 0
    assert "DAMAGED: unreadable flags" in capsys.readouterr().out


def test_corrupt_layer_metadata(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path(store, "r", "blocks.0", "activation", "zarr.json").write_text('{"zarr_format": 3, "no')
    # Readers open the run from its consolidated metadata: the damaged file is not read
    # (the data is intact); verify scrubs what is stored and finds it.
    assert main(["query", store, "r", "layer1.0"]) == 0
    capsys.readouterr()
    assert main(["ls", store]) == 0
    assert "other" in capsys.readouterr().out
    assert main(["verify", store, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "unreadable" in out and "OK" not in out
