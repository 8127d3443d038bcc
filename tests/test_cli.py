"""The vitcnn CLI: listing, showing, querying, and one-line errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import snapshot
from vitcnn_store.cli import main


def exit_code(*args: str) -> int:
    """``vitcnn ARGS`` in this process (tests/test_help.py runs one real process):
    the exit status, whether argparse or a job gave it."""
    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)


def test_ls_and_show(tiny_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", tiny_store]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224" in out and "resnet18" in out and "3/3" in out
    assert main(["show", tiny_store, "vit"]) == 0
    out = capsys.readouterr().out
    assert "weights_source: random-init" in out
    assert "blocks.1.attn/attention" in out and "failed images: 0" in out


def test_query_writes_values_with_their_image_ids(
    tiny_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitcnn_store import open_store

    ids = open_store(tiny_store)["vit"].image_ids
    out = tmp_path / "x"
    assert (
        main(["query", tiny_store, "vit", "blocks.1", "--images", "0:16", "--out", str(out)]) == 0
    )
    assert capsys.readouterr().out.strip().endswith(f"-> {out}.npz")  # the file written
    with np.load(f"{out}.npz") as got:
        assert got["values"].shape == (16, 5, 192)
        assert got["dims"].tolist() == ["image", "token", "channel"]
        assert got["image"].tolist() == list(range(16))
        assert got["image_id"].tolist() == ids[:16].tolist()
    out = tmp_path / "y.npz"
    assert (
        main(
            [
                "query",
                tiny_store,
                "vit",
                "blocks.1",
                "--ids",
                "faces/0100,faces/0000",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with np.load(out) as got:
        assert got["values"].shape == (2, 5, 192)
        assert sorted(got["image_id"].tolist()) == ["faces/0000", "faces/0100"]
        first = open_store(tiny_store)["vit"]["blocks.1"].values[got["image"][0]]
        np.testing.assert_array_equal(got["values"][0], first)
    assert (
        main(
            [
                "query",
                tiny_store,
                "vit",
                "blocks.0.attn",
                "--attention",
                "--images",
                "1,2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with np.load(out) as got:
        assert got["values"].shape == (2, 3, 5, 5) and got["image_id"].tolist() == ids[1:3].tolist()


def test_layers_lists_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "layers",
                "vit_tiny_patch16_224",
                "--img-size",
                "32",
                "--model-arg",
                "depth=1",
                "--layers",
                "blocks.*.attn",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "blocks.0.attn" in out and "(5, 192)" in out and "attention" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "extract",
                "vit_bse_patch16_224",
                "--images",
                "builtin:faces",
                "--store",
                "{tmp}/s.zarr",
                "--run",
                "r",
            ],
            "closest timm names",
        ),
        (
            [
                "extract",
                "resnet18",
                "--images",
                "builtin:faces",
                "--store",
                "{tmp}/s.zarr",
                "--run",
                "r",
                "--layers",
                "layer9.*",
            ],
            "matches no module",
        ),
        (
            [
                "extract",
                "resnet18",
                "--images",
                "{tmp}/nowhere",
                "--store",
                "{tmp}/s.zarr",
                "--run",
                "r",
            ],
            "nowhere",
        ),
        (
            [
                "extract",
                "resnet18",
                "--images",
                "builtin:faces",
                "--store",
                "{tmp}/s.zarr",
                "--run",
                "../r",
            ],
            "invalid run name",
        ),
        (
            [
                "extract",
                "resnet18",
                "--images",
                "builtin:faces",
                "--store",
                "{tmp}/s.zarr",
                "--run",
                "r",
                "--workers",
                "-1",
            ],
            "--workers must be >= 0",
        ),
        (["ls", "{tmp}"], "not a vitcnn store"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "junk.txt").write_text("not a store")
    assert exit_code(*[a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()  # nothing written


def test_query_unknown_layer_exit_2(tiny_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", tiny_store, "vit", "blocks.7"]) == 2
    assert "near" in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code("extract", "resnet18") == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "0:5:0"], "step must not be zero"),
        (["--images", "a:b"], "START:STOP"),
        (["--out", "{tmp}/no/such/folder/x.npz"], "does not exist; create it first"),
        (["--images", "0:999", "--out", "{tmp}/x"], "--images 0:999: the run has 40 images"),
        (["--images=-41:", "--out", "{tmp}/x"], "the run has 40 images"),
        (["--images", "3,40", "--out", "{tmp}/x"], "indices must be in 0..39"),
        (["--out", "{tmp}/x.npy"], "name it {tmp}/x.npz"),
    ],
)
def test_query_bad_input_is_one_line_exit_2(
    tiny_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = snapshot(tiny_store)
    assert main(["query", tiny_store, "vit", "blocks.1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.replace("{tmp}", str(tmp_path)) in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert snapshot(tiny_store) == before


def test_analyze_negative_seed_is_one_line_exit_2(
    tiny_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """issue 16: ``analyze cka --seed -5`` was a traceback from numpy's sampler."""
    before = snapshot(tiny_store), snapshot(f"{tiny_store}.figures")
    assert main(["analyze", "cka", tiny_store, "vit", "--seed", "-5", "--no-progress"]) == 2
    assert capsys.readouterr().err == "vitcnn analyze: error: --seed must be >= 0, got -5\n"
    assert (snapshot(tiny_store), snapshot(f"{tiny_store}.figures")) == before


def test_show_and_verify_name_checks(tiny_store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", tiny_store, "x" * 300]) == 2
    assert "300 characters" in capsys.readouterr().err
    assert main(["verify", tiny_store, "zarr.json"]) == 2
    assert "zarr uses that name" in capsys.readouterr().err


def test_model_arg_cannot_carry_weights(capsys: pytest.CaptureFixture[str]) -> None:
    for key in ("checkpoint_path='w.pth'", "pretrained=True", "pretrained_cfg_overlay={}"):
        assert main(["layers", "resnet18", "--model-arg", key]) == 2
        err = capsys.readouterr().err
        assert "--checkpoint" in err and "--pretrained" in err, err


def test_roles_choices_are_the_jobs_role_sets(tmp_path: Path) -> None:
    """``--roles`` of cka and probe offers exactly the selections the jobs act on: each
    choice selects layers of a run, and a value outside them is refused by the job."""
    from jobs.analyze.depth import select_by_role
    from vitcnn_store import open_store
    from vitcnn_store.cli import build_parser
    from vitcnn_store.errors import UsageError
    from vitcnn_store.store import ArraySpec, create_run

    attrs = {"kind": "channel", "depth_index": 0, "depth_fraction": 0.0}
    create_run(
        str(tmp_path / "s.zarr"),
        "r",
        image_ids=["a"],
        labels=[0],
        chunk=1,
        dtype="float32",
        arrays=[ArraySpec("fc", "activation", ("channel",), (2,), {}, attrs)],
        attrs={"model": "m", "dtype": "float32", "chunk_size": 1, "n_images": 1},
        image_sha256=["0" * 64],
    )
    run = open_store(str(tmp_path / "s.zarr"))["r"]
    analyze = next(a for a in build_parser()._actions if a.choices and "analyze" in a.choices)
    for name in ("cka", "probe"):
        sub = analyze.choices["analyze"]._actions  # type: ignore[index]
        cmd = next(a for a in sub if a.choices and name in a.choices).choices[name]
        roles = next(a for a in cmd._actions if "--roles" in a.option_strings)
        assert roles.choices and roles.default in roles.choices, name
        for choice in roles.choices:
            assert select_by_role(run, None, choice)[0] == ["fc"], (name, choice)
    with pytest.raises(UsageError, match="--roles"):
        select_by_role(run, None, "blocks")
