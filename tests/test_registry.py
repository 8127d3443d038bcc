"""The registry of analyses is the one place an analysis is declared: every entry's job
and plotter resolve, and an entry added to it reaches the CLI, the report and the
service without another edit."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

from vitcnn_store.errors import UsageError
from vitcnn_store.interface import report
from vitcnn_store.interface.registry import ANALYSES, entry


@pytest.mark.parametrize("name", list(ANALYSES))
def test_each_entry_resolves(name: str) -> None:
    e = ANALYSES[name]
    assert e.name == name
    module, function = e.job.split(":")
    job = getattr(importlib.import_module(module), function)
    assert inspect.signature(job).parameters  # takes the config
    # The jobs package offers the same job as jobs.analyze.run_<module>.
    jobs_analyze = importlib.import_module("jobs.analyze")
    assert getattr(jobs_analyze, function) is job
    if e.plotter is not None:
        plots = importlib.import_module("vitcnn_store.interface.plots")
        assert callable(getattr(plots, e.plotter))
    assert (e.section is not None) == e.draws_figure, "a report section needs a figure"


def test_report_sections_follow_the_registry() -> None:
    assert [name for name, _ in report.sections()] == [
        "cka",
        "attention",
        "localization",
        "skip",
        "probe",
        "heads",
    ]


def test_unknown_analysis_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown analysis 'nope'"):
        entry("nope")
    with pytest.raises(AttributeError):
        importlib.import_module("jobs.analyze").run_nope  # noqa: B018


def test_one_entry_adds_an_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry added to the registry is a ``vitcnn analyze`` subcommand with its config's
    options, a job the service accepts, and a report section."""
    from vitcnn_store.interface.cli import build_parser
    from vitcnn_store.serve.config import ServeConfig
    from vitcnn_store.serve.jobs import JobRequest, analysis_config

    added = dataclasses.replace(
        ANALYSES["skip"], name="skip-again", help="skip ratios once more", section=("Again", "")
    )
    monkeypatch.setitem(ANALYSES, "skip-again", added)
    args = build_parser().parse_args(["analyze", "skip-again", "s.zarr", "vit", "--bootstrap", "3"])
    assert (args.analysis, args.bootstrap) == ("skip-again", 3)
    config = analysis_config(
        ServeConfig(store="s.zarr"), JobRequest(analysis="skip-again", run="vit")
    )
    assert type(config) is ANALYSES["skip"].config
    assert ("skip-again", ("Again", "")) in report.sections()
