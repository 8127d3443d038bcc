"""``vitcnn verify``: a clean store passes, every kind of damage is found and named."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.store.test_integrity import chunk, flip, interrupt_creation
from vitcnn_store import open_store
from vitcnn_store.cli import main
from vitcnn_store.store import verify_store
from vitcnn_store.store.lease import acquire_lease


@pytest.fixture
def store(filled_template: str, tmp_path: Path) -> str:
    """A private copy of :func:`tests.store.test_store.filled_store` (made once)."""
    return str(shutil.copytree(filled_template, tmp_path / "s.zarr"))


def run_verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["verify", *args, "--no-progress"])
    return code, capsys.readouterr().out


def test_clean_store_exits_0(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_verify(capsys, store)
    assert code == 0 and "OK, 2 run(s)" in out and "no damaged or missing chunks" in out
    report = verify_store(store)
    assert report.ok and report.chunks_checked > 30


def test_finds_flipped_missing_and_half_created(
    store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flip(chunk(store, "r", "blocks.0/activation", 1))
    flip(chunk(store, "r", "failure", 2), offset=3)
    chunk(store, "other", "layer1.0/activation", 0).unlink()
    flip(Path(store, "r", "blocks.0", "token_kind", "c", "0"))
    interrupt_creation(store, "half", 4, monkeypatch)
    code, out = run_verify(capsys, store)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["run", "layer", "unit", "problem"]

    def row(*cells: str) -> bool:
        return any(line.split()[: len(cells)] == list(cells) for line in lines)

    assert row("r", "blocks.0/activation", "1", "damaged", "chunk", "(checksum", "mismatch)")
    assert row("r", "failure", "2", "damaged", "chunk")
    assert row("r", "blocks.0/token_kind", "-", "damaged", "chunk")
    assert row("other", "layer1.0/activation", "0", "missing", "chunk")
    assert row("half", "-", "-", "creation", "interrupted:")
    assert "5 problem(s) in 3 run(s)" in out and "--repair" in out
    # One run only.
    code, out = run_verify(capsys, store, "other")
    assert code == 1 and "1 problem(s) in 1 run(s)" in out


def test_repair_clears_done_of_damaged_units_only(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flip(chunk(store, "r", "blocks.0/attention", 1))
    chunk(store, "r", "layer1.0/activation", 2).unlink()
    code, out = run_verify(capsys, store, "r", "--repair")
    assert code == 1 and "repaired 'r': cleared done for unit(s) 1, 2" in out
    assert list(open_store(store)["r"].done) == [True, False, False]
    # Damaged units are now unfinished work, no longer damage: the store verifies clean.
    assert run_verify(capsys, store)[0] == 0
    assert open_store(store)["r"]["blocks.0"].isel(image=slice(0, 2)).values.shape == (2, 3, 4)


def test_damaged_done_flag_is_found_and_repaired(store: str, capsys) -> None:  # type: ignore[no-untyped-def]
    flip(Path(store, "other", "done", "c", "1"), offset=0)
    code, out = run_verify(capsys, store, "other", "--repair")
    assert code == 1 and "other  done" in out
    assert list(open_store(store)["other"].done) == [True, False, True]


def test_repair_refuses_while_a_job_holds_the_run(store: str, capsys) -> None:  # type: ignore[no-untyped-def]
    chunk(store, "r", "layer1.0/activation", 0).unlink()
    acquire_lease(store, "r", "job-writer", ttl=60)
    assert main(["verify", store, "--repair", "--no-progress"]) == 2
    assert "being written by job-writer" in capsys.readouterr().err
    assert bool(open_store(store)["r"].done[0])


def test_verify_changes_nothing_without_repair(store: str) -> None:
    chunk(store, "r", "layer1.0/activation", 0).unlink()

    def snapshot() -> dict[str, str]:
        return {
            str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(store).rglob("*")
            if p.is_file()
        }

    before = snapshot()
    assert not verify_store(store).ok
    assert snapshot() == before


def test_progress_bar_on_stderr(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", store]) == 0
    assert "verify" in capsys.readouterr().err
    seen: list[int] = []
    verify_store(store, on_progress=seen.append)
    assert seen == list(range(1, len(seen) + 1)) and len(seen) > 30


def test_unknown_run_is_bad_input(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", store, "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert np.all(open_store(store)["r"].done)


# -- the run's manifest (issue 16, hostile case 5) -------------------------------------


def test_a_lost_layer_is_damage_not_a_smaller_run(store: str, capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from vitcnn_store.errors import DamagedDataError

    shutil.rmtree(Path(store, "r", "layer1.0"))
    code, out = run_verify(capsys, store)
    assert code == 1 and "r    layer1.0" in out and "layer missing" in out and "--resume" in out
    assert main(["ls", store]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith("r "))
    assert "DAMAGED: layer1.0 missing" in row and "2/2" not in row
    with pytest.raises(DamagedDataError, match=r"layer1\.0 missing"):
        open_store(store)["r"]  # analyses open runs this way: they refuse, naming it
    assert main(["show", store, "r"]) == 0
    assert "DAMAGED (damaged: layer1.0 missing)" in capsys.readouterr().out
    assert open_store(store)["other"].complete  # the other run is untouched


@pytest.mark.parametrize("lost", ["done", "image_id"])
def test_lost_flags_or_ids_are_reported_and_repaired(store: str, lost: str, capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil

    shutil.rmtree(Path(store, "other", lost))
    for command in (["ls", store], ["show", store, "other"]):
        assert main(command) == 0  # no KeyError: the run is reported damaged
        assert "DAMAGED" in capsys.readouterr().out
    code, out = run_verify(capsys, store)
    assert code == 1 and f"other  {lost}" in out and "--repair recreates it" in out
    code, out = run_verify(capsys, store, "--repair")
    assert code == 1
    run = open_store(store)["other"]
    if lost == "done":  # recreated from the manifest: every unit to rewrite
        assert "cleared done for unit(s) 0, 1, 2" in out and not run.done.any()
    else:  # rewritten from a layer's intact copy
        assert "from its intact copy" in out and run.complete
        assert run_verify(capsys, store)[0] == 0


def test_damaged_image_hashes_are_rewritten_from_a_copy(store: str, capsys) -> None:  # type: ignore[no-untyped-def]
    hashes = open_store(store)["r"].image_sha256.copy()
    flip(Path(store, "r", "image_sha256", "c", "0"), offset=0)
    code, out = run_verify(capsys, store)
    assert code == 1 and "--repair rewrites it from an intact copy" in out
    code, out = run_verify(capsys, store, "--repair")
    assert "rewrote r/image_sha256 from its intact copy" in out
    assert run_verify(capsys, store)[0] == 0
    np.testing.assert_array_equal(open_store(store)["r"].image_sha256, hashes)


def test_runs_without_a_manifest_keep_the_old_behaviour(store: str, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from vitcnn_store.store.writer import consolidate

    meta = Path(store, "r", "zarr.json")
    doc = json.loads(meta.read_text())
    del doc["attributes"]["vitcnn_store.manifest"]  # a format-2 run from before manifests
    meta.write_text(json.dumps(doc))
    consolidate(store)
    assert open_store(store)["r"].complete
    assert run_verify(capsys, store)[0] == 0


def test_a_changed_array_is_named(store: str, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    meta = Path(store, "r", "zarr.json")
    doc = json.loads(meta.read_text())
    doc["attributes"]["vitcnn_store.manifest"]["arrays"]["blocks.0/activation"]["shape"][1] = 9
    meta.write_text(json.dumps(doc))
    code, out = run_verify(capsys, store)
    assert code == 1 and "blocks.0/activation" in out and "(created as [5, 9, 4])" in out
