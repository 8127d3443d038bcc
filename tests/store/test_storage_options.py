"""Object storage through ``--storage-option`` / ``open_store(url, storage_options)`` only
(no AWS variables): extraction, ls, show, query, verify and analyses against moto on
loopback, the run registry under two writers, and one-line errors for a wrong endpoint,
missing or rejected credentials, nothing written on refusal."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import pytest

from tests.helpers import moto_server
from tests.test_bad_input import TINY
from vitcnn_store import open_store
from vitcnn_store.errors import StoreUnavailableError
from vitcnn_store.interface.cli import main, parse_storage_options

_AWS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with bucket ``team``; no AWS variable is set."""
    saved = {k: os.environ.pop(k, None) for k in _AWS}
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.environ["AWS_CONFIG_FILE"] = os.devnull
    try:
        with moto_server() as url:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem(endpoint_url=url, key="k", secret="s").mkdir("team")
            yield url
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def _opts(endpoint: str) -> list[str]:
    return [
        "--storage-option",
        f"endpoint_url={endpoint}",
        "--storage-option",
        "key=k",
        "--storage-option",
        "secret=s",
    ]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_parse_storage_options() -> None:
    assert parse_storage_options(["anon=true", "client_kwargs.region_name=auto"]) == {
        "anon": True,
        "client_kwargs": {"region_name": "auto"},
    }


@pytest.mark.slow  # an extraction and an analysis through a moto server
def test_cli_end_to_end_with_storage_options(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VITCNN_STORAGE_OPTIONS", raising=False)
    url = "s3://team/acts.zarr"
    for run, limit in (("a", "8"), ("b", "4")):  # b is there to be listed: one unit will do
        code, _, err = _cli(
            [
                "extract",
                *TINY,
                "--images",
                "builtin:faces",
                "--store",
                url,
                "--run",
                run,
                "--limit",
                limit,
                "--chunk-size",
                "4",
                "--no-progress",
                *_opts(endpoint),
            ]
        )
        assert code == 0, err
    code, out, err = _cli(["ls", url, *_opts(endpoint)])
    assert code == 0 and "2 run(s)" in out and "\na " in out and "?" not in out, out + err
    code, out, _ = _cli(["show", url, "a", *_opts(endpoint)])
    assert code == 0 and "units done: 2/2" in out
    code, out, _ = _cli(["query", url, "a", "blocks.0", "--images", "0:3", *_opts(endpoint)])
    assert code == 0 and "3 image(s) with data" in out
    code, out, _ = _cli(["verify", url, "--no-progress", *_opts(endpoint)])
    assert code == 0 and "OK, 2 run(s)" in out
    code, out, err = _cli(
        [
            "analyze",
            "cka",
            url,
            "a",
            "--batch-size",
            "4",
            "--no-figure",  # figures of an S3 store's result: tests/jobs/test_object_store.py
            *_opts(endpoint),
        ]
    )
    assert code == 0 and "cka: wrote s3://team/acts.zarr/a/_analyses/cka/" in out, out + err
    code, out, err = _cli(
        [
            "analyze",
            "cka",
            url,
            "a",
            "--batch-size",
            "4",
            "--no-figure",  # figures of an S3 store's result: tests/jobs/test_object_store.py
            *_opts(endpoint),
        ]
    )
    assert code == 0 and "cka: reused" in out, out + err
    store = open_store(url, {"endpoint_url": endpoint, "key": "k", "secret": "s"})
    assert store.runs == ["a", "b"]
    assert store["a"].recorded_bytes() == store["a"].nbytes_stored() > 0


def test_errors_in_one_line_and_nothing_written(endpoint: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="k", secret="s")
    before = sorted(fs.find("team"))
    # Nothing listens on port 9: a wrong endpoint.
    code, _, err = _cli(
        [
            "ls",
            "s3://team/acts.zarr",
            "--storage-option",
            "endpoint_url=http://127.0.0.1:9",
            "--storage-option",
            "key=k",
            "--storage-option",
            "secret=s",
            "--storage-option",
            'config_kwargs={"retries": {"max_attempts": 1}}',
        ]
    )
    assert code == 1 and err.count("\n") == 1 and "endpoint" in err, err
    # No credentials at all (and none in the environment).
    code, _, err = _cli(
        ["ls", "s3://team/acts.zarr", "--storage-option", f"endpoint_url={endpoint}"]
    )
    assert code == 1 and err.count("\n") == 1 and "credentials" in err, err
    with pytest.raises(StoreUnavailableError):
        open_store("s3://team/acts.zarr", {"endpoint_url": endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    assert sorted(fs.find("team")) == before
