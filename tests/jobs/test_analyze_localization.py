"""The localization job equals the kernel on un-normalized input patches."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.analyze.localization import (
    LocalizationConfig,
    default_targets,
    resolve_targets,
    run_localization,
)
from tests.jobs.test_analyze_common import MEAN, PATCH, STD, cli
from vitcnn_store import open_store
from vitcnn_store.analysis.cka import sample_batches
from vitcnn_store.analysis.localization import MinibatchLocalization, image_to_patches
from vitcnn_store.errors import UsageError
from vitcnn_store.interface.cli_analyze import parse_tokens


def _reference(reps: np.ndarray, pixels: np.ndarray, batches: list[np.ndarray], patch: int):  # type: ignore[no-untyped-def]
    acc = MinibatchLocalization()
    for rows in batches:
        acc.update(
            [reps[rows][:, t] for t in range(reps.shape[1])], image_to_patches(pixels[rows], patch)
        )
    return acc.result()


def test_vit_tokens_match_kernel(synth: str) -> None:
    cfg = LocalizationConfig(
        store=synth, run="vit", tokens=((0, 1), 2), batch_size=10, seed=4, progress=False
    )
    ds = run_localization(cfg).dataset
    run = open_store(synth)["vit"]
    usable = np.flatnonzero(run.valid)
    x = run["blocks.1"].values  # default layer: the last block
    pixels = run.inputs.values.astype(np.float64) * STD + MEAN
    tokens = [2, 3]  # grid (0, 1) and flat patch 2 = (1, 0), after the CLS token
    (batches,) = sample_batches(usable.size, 10, 1, 4)
    ref = _reference(x[:, tokens], pixels, [usable[p] for p in batches], PATCH)
    np.testing.assert_allclose(ds["localization"].values.reshape(2, -1), ref, rtol=1e-5, atol=1e-5)
    assert ds.attrs["layer"] == "blocks.1" and ds.attrs["patch_size"] == PATCH
    assert ds["target_row"].values.tolist() == [0, 1] and ds["target_col"].values.tolist() == [1, 0]
    assert ds["target_index"].values.tolist() == tokens
    assert ds["localization"].dims == ("target", "grid_y", "grid_x")


def test_cnn_positions_map_to_stride_patches(synth: str) -> None:
    cfg = LocalizationConfig(
        store=synth, run="resnet", layer="layer1.0", batch_size=12, progress=False
    )
    ds = run_localization(cfg).dataset
    run = open_store(synth)["resnet"]
    x = run["layer1.0"].values  # 4×4 grid over an 8-px input: stride 2
    targets = default_targets(4, 4)
    flat = x.reshape(x.shape[0], 16, -1)[:, [r * 4 + c for r, c in targets]]
    pixels = run.inputs.values.astype(np.float64) * STD + MEAN
    (batches,) = sample_batches(48, 12, 1, 0)
    ref = _reference(flat, pixels, list(batches), 2)
    np.testing.assert_allclose(
        ds["localization"].values.reshape(len(targets), -1), ref, rtol=1e-5, atol=1e-5
    )
    assert ds.attrs["patch_size"] == 2


def test_token_parsing_and_resolution() -> None:
    import argparse

    assert default_targets(2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert resolve_targets(parse_tokens("3"), 2, 2) == [(1, 1)]
    assert parse_tokens("0:1; 2,") == ((0, 1), 2)
    for bad in ("5", "2:0"):
        with pytest.raises(UsageError):
            resolve_targets(parse_tokens(bad), 2, 2)
    for text in ("a:b", ",", "1:2:3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_tokens(text)


def test_missing_inputs_and_bad_layer_exit_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from tests.jobs.test_analyze_common import ids, make_run

    url = str(tmp_path / "n.zarr")
    make_run(url, "v", ids(16), inputs=False, attention=False)
    assert cli(["analyze", "localization", url, "v", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--inputs" in err and len(err.splitlines()) == 1
    make_run(url, "w", ids(16), attention=False)
    assert cli(["analyze", "localization", url, "w", "--layer", "nope", "--no-progress"]) == 2
    assert cli(["analyze", "localization", url, "w", "--tokens", "9:9", "--no-progress"]) == 2


def _ref_cka1(K: np.ndarray, L: np.ndarray) -> tuple[float, float, float]:
    """HSIC₁ terms (Song et al. 2012) of one batch, term by term: (KL, KK, LL)."""

    def h(A: np.ndarray, B: np.ndarray) -> float:
        n = A.shape[0]
        A, B = A.copy(), B.copy()
        np.fill_diagonal(A, 0.0)
        np.fill_diagonal(B, 0.0)
        ra, rb = A.sum(1), B.sum(1)
        return float(
            (np.sum(A * B) + ra.sum() * rb.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ra @ rb)
            / (n * (n - 3))
        )

    return h(K, L), h(K, K), h(L, L)


def test_batches_baseline_and_batch_bootstrap_recorded(synth: str) -> None:
    """Recorded batches; the input baseline and the bootstrap over batches recomputed with a
    term-by-term HSIC₁ from the un-normalized pixels."""
    cfg = LocalizationConfig(
        store=synth,
        run="vit",
        tokens=((1, 1),),
        batch_size=8,
        seed=2,
        bootstrap=100,
        ci_level=0.8,
        progress=False,
    )
    ds = run_localization(cfg).dataset
    run = open_store(synth)["vit"]
    usable = np.flatnonzero(run.valid)
    (batches,) = sample_batches(usable.size, 8, 1, 2)
    assert ds["batch_image"].values.tolist() == [usable[b].tolist() for b in batches]
    assert (ds["batch_image_id"].values == run.image_ids[ds["batch_image"].values]).all()
    pixels = run.inputs.values.astype(np.float64) * STD + MEAN
    token = run["blocks.1"].values[:, 4].astype(np.float64)  # (1, 1) on the 2×2 grid
    patches = image_to_patches(pixels, PATCH)  # (image, 4, P·P·3)
    terms, base = [], []
    for rows in ds["batch_image"].values:
        K = token[rows].reshape(len(rows), -1) @ token[rows].reshape(len(rows), -1).T
        P = [patches[rows, p] @ patches[rows, p].T for p in range(4)]
        terms.append([_ref_cka1(K, L) for L in P])
        base.append([_ref_cka1(P[3], L) for L in P])
    terms_a, base_a = np.array(terms), np.array(base)  # (batch, patch, 3)

    def cka(t: np.ndarray) -> np.ndarray:
        return t[..., 0] / np.sqrt(t[..., 1] * t[..., 2])

    np.testing.assert_allclose(
        ds["localization_input"].values.ravel(), cka(base_a.sum(0)), rtol=1e-6, atol=1e-6
    )
    assert ds["localization_input"].values.ravel()[3] == pytest.approx(1.0, abs=1e-9)
    counts = np.zeros((100, len(batches)))
    draws = np.random.default_rng(2).integers(0, len(batches), size=(100, len(batches)))
    for b, d in enumerate(draws):
        np.add.at(counts[b], d, 1.0)
    reps = np.stack([cka(np.tensordot(c, terms_a, 1)) for c in counts])
    np.testing.assert_allclose(
        ds["localization_lo"].values.ravel(), np.percentile(reps, 10, axis=0), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        ds["localization_hi"].values.ravel(), np.percentile(reps, 90, axis=0), rtol=1e-5, atol=1e-5
    )
    one = run_localization(
        LocalizationConfig(store=synth, run="vit", tokens=((1, 1),), progress=False, name="one")
    ).dataset
    assert "localization_lo" not in one and "one batch" in one.attrs["bootstrap"]
