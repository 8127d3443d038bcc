"""Resume a run with the Python API in a process of its own (tests/jobs/test_api.py):
``python -m tests.jobs.resume_job URL RUN same|tanh``. Exits with the error's code."""

from __future__ import annotations

import sys

import torch

import vitcnn_store
from tests.jobs.test_api import COMMON, small_transform, tiny_net
from vitcnn_store.errors import VitcnnError


def main(url: str, run: str, variant: str) -> int:
    net = tiny_net()
    if variant == "tanh":
        net.block[2] = torch.nn.Tanh()  # the same weights, another module
    try:
        vitcnn_store.extract(
            net,
            "builtin:faces",
            url,
            run,
            layers="stem,head",
            transform=small_transform,
            resume=True,
            **COMMON,
        )
    except VitcnnError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
