"""Resume a run with the Python API in a process of its own (tests/jobs/test_api.py):
``python -m tests.jobs.resume_job URL RUN VARIANT...``, each variant ``same`` or ``tanh``.

One attempt per variant, in order, in this one process (an interpreter with torch takes
seconds to start): after each it prints the attempt's exit status (the error's code, 0
on success) on a line of its own, errors go to stderr, and before the next attempt it
waits for a line on stdin, so the test can look at the store in between.
"""

from __future__ import annotations

import sys

import torch

import vitcnn_store
from tests.jobs.test_api import COMMON, small_transform, tiny_net
from vitcnn_store.errors import VitcnnError


def attempt(url: str, run: str, variant: str) -> int:
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
        print(e, file=sys.stderr, flush=True)
        return e.exit_code
    return 0


def main(url: str, run: str, variants: list[str]) -> None:
    for i, variant in enumerate(variants):
        if i:
            sys.stdin.readline()
        print(attempt(url, run, variant), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
