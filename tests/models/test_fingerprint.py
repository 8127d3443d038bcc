"""Fingerprints of what Python callers hand in: the same in every process, different
whenever what the object computes may differ."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

from vitcnn_store.models.fingerprint import callable_fingerprint, module_sha256


def scale(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    return x * factor


def scaler(factor: float):  # type: ignore[no-untyped-def]
    def inner(x: torch.Tensor) -> torch.Tensor:
        return x * factor

    return inner


class Holder:
    """A callable object holding a function (as a torchvision ``Lambda`` does)."""

    def __init__(self, fn: object) -> None:
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)  # type: ignore[operator]

    def __repr__(self) -> str:
        return "Holder()"


def _fingerprints() -> list[str]:
    return [
        callable_fingerprint(f)
        for f in (
            scale,
            scaler(3.0),
            functools.partial(scale, factor=4.0),
            Holder(scale),
        )
    ]


def test_fingerprints_hold_no_address_and_are_the_same_in_another_process() -> None:
    here = _fingerprints()
    assert not any("0x" in f for f in here)
    assert here[0].startswith("tests.models.test_fingerprint.scale (function, sha256 ")
    code = "from tests.models.test_fingerprint import _fingerprints; print(repr(_fingerprints()))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    ).stdout
    assert out.strip() == repr(here)


def test_fingerprints_differ_when_the_computation_may() -> None:
    assert callable_fingerprint(scaler(3.0)) != callable_fingerprint(scaler(5.0))  # closure
    assert callable_fingerprint(functools.partial(scale, factor=4.0)) != callable_fingerprint(
        functools.partial(scale, factor=5.0)
    )
    assert callable_fingerprint(Holder(scale)) != callable_fingerprint(Holder(scaler(2.0)))
    assert callable_fingerprint(scale) != callable_fingerprint(scaler(2.0))


def test_module_sha256_sees_settings_and_buffers_not_only_weights() -> None:
    torch.manual_seed(0)
    relu = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    tanh = torch.nn.Sequential(relu[0], torch.nn.Tanh())
    assert module_sha256(relu) != module_sha256(tanh)
    same = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    same.load_state_dict(relu.state_dict())
    assert module_sha256(same) == module_sha256(relu)
    relu.register_buffer("offset", torch.zeros(3), persistent=False)  # not in the state dict
    before = module_sha256(relu)
    relu.offset += 1
    assert module_sha256(relu) != before
