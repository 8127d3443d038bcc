"""One option table per command: every option reaches the config, argparse and validation agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from jobs.config import ExtractConfig
from jobs.submit import SubmitOptions
from vitcnn_store.errors import UsageError, VitcnnError
from vitcnn_store.interface.cli import LayersOptions, _extract_config, build_parser, main
from vitcnn_store.models import ModelSpec
from vitcnn_store.options import AUTO, config_kwargs, options_of, to_argv

BASE = ["extract", "resnet18", "--images", "builtin:faces", "--store", "s.zarr", "--run", "r"]

# One non-default value per option of `vitcnn extract`: (argv, the field's value).
SAMPLES: dict[str, tuple[list[str], Any]] = {
    "model.pretrained": (["--pretrained"], True),
    "model.checkpoint": (["--checkpoint", "w.pth"], "w.pth"),
    "model.img_size": (["--img-size", "64"], 64),
    "model.model_args": (
        ["--model-arg", "depth=2", "--model-arg", "act=gelu"],
        {"depth": 2, "act": "gelu"},
    ),
    "model.seed": (["--seed", "7"], 7),
    "layers": (["--layers", "layer1.*"], "layer1.*"),
    "reduce": (
        ["--reduce", "layer1.*=pool:2", "--reduce", "layer2.*=mean"],
        ("layer1.*=pool:2", "layer2.*=mean"),
    ),
    "attention": (["--attention"], True),
    "attention_layers": (["--attention-layers", "blocks.0.attn"], "blocks.0.attn"),
    "attention_heads": (["--attention-heads"], True),
    "inputs": (["--inputs"], True),
    "dtype": (["--dtype", "float32"], "float32"),
    "compression": (["--compression", "zstd"], "zstd"),
    "chunk_size": (["--chunk-size", "8"], 8),
    "batch_size": (["--batch-size", "4"], 4),
    "limit": (["--limit", "10"], 10),
    "strict": (["--strict"], True),
    "resume": (["--resume"], True),
    "overwrite": (["--overwrite"], True),
    "workers": (["--workers", "3"], 3),
    "cpus_per_worker": (["--cpus-per-worker", "1.5"], 1.5),
    "gpus_per_worker": (["--gpus-per-worker", "0.5"], 0.5),
    "device": (["--device", "cpu"], "cpu"),
    "autocast": (["--autocast"], True),
    "address": (["--address", "127.0.0.1:6379"], "127.0.0.1:6379"),
    "progress": (["--no-progress"], False),
    "lease_ttl": (["--lease-ttl", "30"], 30.0),
}


def table_fields(cls: Any, prefix: str = "") -> list[str]:
    out = []
    for f, opt in options_of(cls):
        if opt.nested is not None:
            out += table_fields(opt.nested, f"{prefix}{f.name}.")
        elif opt.action != "positional" and opt.flag not in ("--images", "--store", "--run"):
            out.append(prefix + f.name)
    return out


def field_value(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def parse(*extra: str) -> ExtractConfig:
    return _extract_config(build_parser().parse_args([*BASE, *extra]))


def test_every_extract_option_has_a_sample() -> None:
    assert sorted(table_fields(ExtractConfig)) == sorted(SAMPLES)


@pytest.mark.parametrize("path", sorted(SAMPLES))
def test_every_extract_option_reaches_the_config(path: str) -> None:
    argv, expected = SAMPLES[path]
    cfg = parse(*argv)
    assert field_value(cfg, path) == expected
    # ... and nothing else moved: every other field keeps its default.
    default = parse()
    for other in SAMPLES:
        if other != path:
            assert field_value(cfg, other) == field_value(default, other), other


def test_required_and_positional_options() -> None:
    cfg = parse()
    assert (cfg.model, cfg.images, cfg.store, cfg.run) == (
        ModelSpec("resnet18"),
        "builtin:faces",
        "s.zarr",
        "r",
    )
    assert (cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker) == (AUTO, AUTO, AUTO)


def test_config_round_trips_through_its_command_line() -> None:
    argv = [
        a
        for path in SAMPLES
        if path not in ("resume", "model.checkpoint")
        for a in SAMPLES[path][0]
    ]
    cfg = parse(*argv)
    assert _extract_config(build_parser().parse_args(["extract", *to_argv(cfg)])) == cfg


def choice_cases() -> list[tuple[str, str, tuple[str, ...]]]:
    return [(f.name, opt.flag, opt.choices) for f, opt in options_of(ExtractConfig) if opt.choices]


@pytest.mark.parametrize(("name", "flag", "choices"), choice_cases())
def test_argparse_and_validation_accept_the_same_choices(
    name: str, flag: str, choices: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    for value in choices:
        cfg = parse(flag, value)
        cfg.validate()
        dataclasses.replace(cfg, **{name: value}).validate()
    with pytest.raises(SystemExit) as exit_info:
        parse(flag, "bogus")
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(UsageError, match=f"{flag} must be one of {', '.join(choices)}"):
        dataclasses.replace(parse(), **{name: "bogus"}).validate()


def bound_cases() -> list[tuple[str, str, str]]:
    bad = {"positive": "0", "non-negative": "-1"}
    return [(f.name, opt.flag, bad[opt.check]) for f, opt in options_of(ExtractConfig) if opt.check]


@pytest.mark.parametrize(("name", "flag", "bad"), bound_cases())
def test_cli_and_python_refuse_the_same_values_with_the_same_words(
    name: str, flag: str, bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("s.zarr", str(tmp_path / "s.zarr")) for a in BASE]
    assert main([*argv, flag, bad]) == 2
    cli_error = capsys.readouterr().err.strip().removeprefix("vitcnn extract: error: ")
    value = parse(flag, bad).__getattribute__(name)
    with pytest.raises(UsageError) as python_error:
        dataclasses.replace(parse(), **{name: value}).validate()
    assert cli_error == str(python_error.value) and flag in cli_error
    assert not (tmp_path / "s.zarr").exists()


def test_auto_is_taken_where_the_table_allows_it() -> None:
    assert parse("--workers", "auto").workers == AUTO
    with pytest.raises(SystemExit):
        parse("--chunk-size", "auto")  # not an auto option: argparse refuses the text


def test_model_spec_checks_its_own_table() -> None:
    with pytest.raises(VitcnnError, match="--img-size must be positive, got 0"):
        ModelSpec("resnet18", img_size=0)
    with pytest.raises(VitcnnError, match="--pretrained or --checkpoint"):
        ModelSpec("resnet18", pretrained=True, checkpoint="w.pth")


def test_submit_and_layers_options_reach_their_configs() -> None:
    args = build_parser().parse_args(
        ["submit", *BASE, "--wait", "--pip", "a", "--pip", "b", "--job-id", "j1"]
    )
    assert SubmitOptions(**config_kwargs(SubmitOptions, args)) == SubmitOptions(
        wait=True, pip=("a", "b"), job_id="j1"
    )
    args = build_parser().parse_args(["layers", "resnet18", "--img-size", "48", "--layers", "x*"])
    assert LayersOptions(**config_kwargs(LayersOptions, args)) == LayersOptions(
        ModelSpec("resnet18", img_size=48), "x*"
    )


def test_python_only_fields_have_no_flag() -> None:
    flags = {f.name for f, _ in options_of(ExtractConfig)}
    assert {"extra_attrs", "transform", "data_config"}.isdisjoint(flags)
    with pytest.raises(UsageError, match="either transform or data_config"):
        dataclasses.replace(parse(), transform=lambda im: im, data_config={}).validate()


# --- vitcnn analyze: the option tables of jobs/analyze/options.py ---


def _analyze_subparsers() -> dict[str, Any]:
    top = next(a for a in build_parser()._actions if a.choices and "analyze" in a.choices)
    analyze = top.choices["analyze"]  # type: ignore[index]
    sub = next(a for a in analyze._actions if a.choices and "cka" in a.choices)
    return dict(sub.choices)


def test_analyze_parsers_are_built_from_the_option_tables() -> None:
    """Every flagged field of each analysis config is an argument with the field's name,
    default and choices; the only other options are the interface's (figures, storage
    options, help)."""
    from vitcnn_store.interface.cli_analyze import analysis_config
    from vitcnn_store.interface.registry import ANALYSES

    parsers = _analyze_subparsers()
    assert list(parsers) == list(ANALYSES)
    for name, config in ((e.name, e.config) for e in ANALYSES.values()):
        actions = {s: a for a in parsers[name]._actions for s in a.option_strings}
        table = set()
        for f, opt in options_of(config):
            action = actions[opt.flag]
            table.add(opt.flag)
            assert action.dest == f.name, (name, opt.flag)
            assert action.default == f.default, (name, opt.flag)
            assert (tuple(action.choices) if action.choices else None) == opt.choices
            assert action.help is not None and action.help.startswith(opt.help)
        interface = {"-h", "--help", "--figures", "--no-figure", "--storage-option"}
        assert set(actions) - table == interface, name
        run2 = {"run2": "r2"} if name == "heads" else {}  # heads compares two runs
        args = build_parser().parse_args(["analyze", name, "s.zarr", "r", *run2.values()])
        assert analysis_config(args) == config(store="s.zarr", run="r", **run2), name


def test_mean_is_gap_wherever_an_analysis_takes_a_feature_reduction() -> None:
    """``mean`` (extraction's word) is an alias of ``gap``: the CLI and the Python config
    both keep ``gap``, so parameters, result keys and argv are the same for both words."""
    from vitcnn_store.interface.cli_analyze import analysis_config
    from vitcnn_store.interface.registry import ANALYSES
    from vitcnn_store.store.analyses import parameters_key

    aliased = [
        (entry, f, opt)
        for entry in ANALYSES.values()
        for f, opt in options_of(entry.config)
        if opt.aliases
    ]
    flags = {(entry.name, opt.flag) for entry, _, opt in aliased}
    assert {("cka", "--reduce"), ("probe", "--features")} <= flags
    for entry, f, opt in aliased:
        assert opt.aliases == {"mean": "gap"}
        base = ["analyze", entry.name, "s.zarr", "r", *(["r2"] if entry.name == "heads" else [])]
        run2 = {"run2": "r2"} if entry.name == "heads" else {}
        configs = [
            analysis_config(build_parser().parse_args([*base, opt.flag, word]))
            for word in ("mean", "gap")
        ]
        configs += [
            entry.config(store="s.zarr", run="r", **run2, **{f.name: w}) for w in ("mean", "gap")
        ]
        assert all(c == configs[-1] for c in configs), (entry.name, opt.flag)
        assert getattr(configs[0], f.name) == "gap"
        assert len({parameters_key(c.parameters()) for c in configs}) == 1
        argv = to_argv(configs[0])
        assert argv[argv.index(opt.flag) + 1] == "gap"
        assert opt.help.count("also spelled mean") == 1, (entry.name, opt.flag)


# (analysis, CLI arguments, the same value given to the Python config)
ANALYZE_REFUSALS = [
    ("cka", ["--batch-size", "3"], {"batch_size": 3}),
    ("cka", ["--batches", "0"], {"max_batches": 0}),
    ("cka", ["--rbf-threshold", "0"], {"rbf_threshold": 0.0}),
    ("cka", ["--gather-memory", "0"], {"gather_bytes": 0}),
    ("cka", ["--seed", "-5"], {"seed": -5}),  # was numpy's traceback (issue 16)
    ("localization", ["--seed", "-1"], {"seed": -1}),
    ("probe", ["--seed", "-1"], {"seed": -1}),
    ("attention", ["--threads", "0"], {"threads": 0}),
    ("localization", ["--batch-size", "2"], {"batch_size": 2}),
    ("skip", ["--threads", "0"], {"threads": 0}),
    ("probe", ["--cv-folds", "1"], {"cv_folds": 1}),
    ("probe", ["--test-fraction", "1"], {"test_fraction": 1.0}),
    ("probe", ["--l2-grid", "1,0"], {"l2_grid": (1.0, 0.0)}),
    ("probe", ["--shots", "1"], {"shots": 1}),  # a check across fields (no --l2)
]


@pytest.mark.parametrize(("analysis", "argv", "kwargs"), ANALYZE_REFUSALS)
def test_analyze_refuses_a_bad_value_alike_from_cli_and_python(
    analysis: str,
    argv: list[str],
    kwargs: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vitcnn_store.interface.registry import ANALYSES

    store = str(tmp_path / "never.zarr")
    with pytest.raises(UsageError) as refused:
        ANALYSES[analysis].config(store=store, run="r", **kwargs)
    message = str(refused.value)
    assert message.startswith(argv[0]), message  # names the flag
    assert main(["analyze", analysis, store, "r", *argv]) == 2
    assert capsys.readouterr().err == f"vitcnn analyze: error: {message}\n"
    assert not (tmp_path / "never.zarr").exists()


def test_the_cli_parser_loads_no_analysis_job() -> None:
    """Building the parser (``vitcnn --help``) imports the option tables, not the jobs."""
    import subprocess
    import sys

    code = (
        "import sys; from vitcnn_store.cli import build_parser; build_parser(); "
        "heavy = ('dask', 'xarray', 'zarr', 'torch', 'ray', 'matplotlib', 'jobs.analyze.cka'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
