"""Reading a store over plain HTTP from a server that cannot list folders (404 for every
folder, as object-store gateways and CDNs answer): every reader works from what the
writers recorded, with the same answers as on the local disk; writing is refused."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import extract_tiny
from tests.helpers import snapshot
from tests.http_store import serve_without_listing
from vitcnn_store import open_store
from vitcnn_store.cli import main


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list[int]]]:
    """``(local store, the same store over HTTP without listing, request counter)``."""
    folder = tmp_path_factory.mktemp("served")
    store = str(folder / "acts.zarr")
    extract_tiny(
        store, "vit", "vit", layers="preset:blocks", attention=True, limit=16, chunk_size=8
    )
    extract_tiny(store, "resnet", "resnet", layers="preset:blocks", limit=16, chunk_size=8)
    _cli(["analyze", "cka", store, "vit", "--batch-size", "8", "--figures", str(folder / "f")])
    with serve_without_listing(str(folder)) as (base, counter):
        yield store, f"{base}/acts.zarr", counter


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "command",
    [
        ["ls"],
        ["show", "vit"],
        ["show", "resnet"],
        ["query", "vit", "blocks.1", "--images", "2:9"],
        ["query", "vit", "blocks.0.attn", "--attention", "--images", "3,1"],
        ["verify", "--no-progress"],
    ],
)
def test_commands_answer_as_on_the_local_disk(
    served: tuple[str, str, list[int]], command: list[str]
) -> None:
    local, url, _ = served
    code, out, _ = _cli([command[0], local, *command[1:]])
    code_http, out_http, err = _cli([command[0], url, *command[1:]])
    assert (code_http, err) == (code, "") and code == 0
    assert out_http.replace(url, "STORE") == out.replace(local, "STORE")


def test_python_api_reads_runs_layers_and_results(served: tuple[str, str, list[int]]) -> None:
    local, url, counter = served
    before = counter[0]
    remote, here = open_store(url), open_store(local)
    assert remote.runs == here.runs == ["resnet", "vit"]
    run = remote["vit"]
    assert run.layers == here["vit"].layers and run.attention_layers
    np.testing.assert_array_equal(run["blocks.1"].values, here["vit"]["blocks.1"].values)
    assert run.analyses == ["cka"]
    np.testing.assert_array_equal(
        run.analysis("cka")["cka"].values, here["vit"].analysis("cka")["cka"].values
    )
    assert run.recorded_bytes() == here["vit"].nbytes_stored() > 0
    assert counter[0] > before  # it was the server that answered


def test_writing_is_refused_in_one_line(served: tuple[str, str, list[int]]) -> None:
    local, url, _ = served
    before = snapshot(Path(local))
    code, _, err = _cli(["analyze", "cka", url, "vit", "--batch-size", "4"])
    assert code == 1 and err.count("\n") == 1 and "read-only" in err, err
    assert snapshot(Path(local)) == before
