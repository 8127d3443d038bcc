"""``/api/``: runs, one run, slices cut on the server (JSON and npy), analysis results."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import xarray as xr

from tests.serve.conftest import ThreadServer
from vitcnn_store import open_store


def test_runs_list_provenance_completeness_and_sizes(open_server: ThreadServer) -> None:
    runs = {r["name"]: r for r in open_server.json("/api/runs")["runs"]}
    assert sorted(runs) == ["resnet", "vit"]
    vit = runs["vit"]
    assert vit["complete"] and (vit["units_done"], vit["units_total"]) == (2, 2)
    assert vit["provenance"]["model"] == "vit_tiny_patch16_224" and vit["n_images"] == 16
    assert vit["stored_bytes"] > 0 and "cli_attn" in vit["analyses"]


def test_one_run_lists_layers_with_shapes(open_server: ThreadServer, serve_store: str) -> None:
    run = open_server.json("/api/runs/vit")
    local = open_store(serve_store)["vit"]
    assert [layer["name"] for layer in run["layers"]] == local.layers
    for layer in run["layers"]:
        assert tuple(layer["shape"]) == local[layer["name"]].shape
        assert layer["dims"] == list(local[layer["name"]].dims)
    assert [a["name"] for a in run["attention_layers"]] == local.attention_layers
    assert run["attention_layers"][0]["dims"] == ["image", "head", "query", "key"]
    images = open_server.json("/api/runs/vit/images")
    assert images["image_id"] == local.image_ids.tolist() and all(images["valid"])


def test_slices_by_index_id_and_token_equal_the_local_values(
    open_server: ThreadServer, serve_store: str
) -> None:
    local = open_store(serve_store)["vit"]
    full = local["blocks.1"].values
    status, headers, body = open_server.request(
        "/api/runs/vit/layers/blocks.1?images=3:11&tokens=1:4&format=npy"
    )
    assert status == 200 and headers["x-dims"] == "image,token,channel"
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), full[3:11, 1:4])

    ids = local.image_ids[[5, 2]].tolist()
    answer = open_server.json(f"/api/runs/vit/layers/blocks.1?ids={','.join(ids)}&channel=0:7")
    assert answer["dims"] == ["image", "token", "channel"] and answer["shape"] == [2, 5, 7]
    assert answer["coords"]["image_id"]["data"] == ids
    assert answer["coords"]["token_kind"]["data"][0] == "cls"
    np.testing.assert_array_equal(np.array(answer["data"], dtype=np.float16), full[[5, 2], :, :7])

    attn = local.attention("blocks.0.attn").values
    status, _, body = open_server.request(
        "/api/runs/vit/layers/blocks.0.attn?array=attention&images=0&head=1&format=npy"
    )
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), attn[0, 1])


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/runs/nope", 404),
        ("/api/runs/vit/layers/blocks.9", 404),
        ("/api/runs/vit/layers/blocks.0?images=0:99:0", 400),
        ("/api/runs/vit/layers/blocks.0?images=16", 400),
        ("/api/runs/vit/layers/blocks.0?ids=nobody", 404),
        ("/api/runs/vit/layers/blocks.0?chanel=0:2", 400),
        ("/api/runs/vit/layers/blocks.0?format=xml", 400),
        ("/api/runs/resnet/layers/layer1?tokens=0:2", 400),
        ("/api/runs/vit/analyses/nope", 404),
        ("/api/runs/..%2F..%2Fetc/layers/x", 404),
        ("/api/nothing", 404),
    ],
)
def test_bad_requests_answer_one_line_json(
    open_server: ThreadServer, path: str, status: int
) -> None:
    got, headers, body = open_server.request(path)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    message = json.loads(body)["error"]
    assert message and "\n" not in message


def test_slices_over_the_response_limit_are_refused(token_server: ThreadServer) -> None:
    # blocks.0 of 16 images is 16x5x192 float16 = 30720 bytes > the 20 kB limit.
    status, _, body = token_server.request("/api/runs/vit/layers/blocks.0?format=npy")
    assert status == 413 and "limit" in json.loads(body)["error"]
    status, _, _ = token_server.request("/api/runs/vit/layers/blocks.0?images=0:4&format=npy")
    assert status == 200


def test_analysis_result_as_json_csv_and_netcdf(
    open_server: ThreadServer, serve_store: str
) -> None:
    stored = open_store(serve_store)["vit"].analysis("cli_attn")
    answer = open_server.json("/api/runs/vit/analyses/cli_attn")
    assert set(answer["data_vars"]) == set(stored.data_vars)
    assert answer["coords"]["layer"]["data"] == stored["layer"].values.tolist()
    np.testing.assert_allclose(
        np.array(answer["data_vars"]["mean_distance"]["data"], dtype=float),
        stored["mean_distance"].values,
        atol=1e-12,
    )
    assert answer["attrs"]["analysis"] == "attention"

    status, headers, body = open_server.request(
        "/api/runs/vit/analyses/cli_attn?format=csv&var=mean_distance"
    )
    assert status == 200 and headers["content-type"].startswith("text/csv")
    lines = body.decode().splitlines()
    assert "mean_distance" in lines[0].split(",") and lines[0].startswith("layer,head")
    assert len(lines) == 1 + stored["mean_distance"].size

    status, headers, body = open_server.request("/api/runs/vit/analyses/cli_attn?format=netcdf")
    assert status == 200 and headers["content-type"] == "application/x-netcdf"
    nc = xr.open_dataset(io.BytesIO(body), engine="scipy")
    np.testing.assert_allclose(
        nc["mean_distance"].values, stored["mean_distance"].values, atol=1e-12
    )
    assert json.loads(nc.attrs["parameters"]) == stored.attrs["parameters"]


def test_openapi_documents_the_api(open_server: ThreadServer) -> None:
    spec = open_server.json("/openapi.json")
    for path in (
        "/api/runs",
        "/api/runs/{run}",
        "/api/runs/{run}/layers/{layer}",
        "/api/runs/{run}/analyses/{name}",
        "/api/jobs",
        "/zarr/{key}",
    ):
        assert path in spec["paths"], path
    status, _, body = open_server.request("/docs")
    assert status == 200 and b"swagger" in body.lower()
