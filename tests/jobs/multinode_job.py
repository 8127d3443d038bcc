"""Run one extraction on a two-node Ray cluster simulated on this machine.

Used by test_multinode.py in a subprocess (a process holds one Ray connection,
and the test session's own cluster must stay up). Prints the nodes the actors
ran on, one per line, prefixed with ``node:``.
"""

from __future__ import annotations

import sys

import ray
from ray.cluster_utils import Cluster

from tests.conftest import extract_tiny


def main(store: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, logging_level="warning")
        # One CPU per node and one per worker: the two actors must land on both nodes.
        summary = extract_tiny(
            store,
            "multi",
            "vit",
            layers="preset:paper",
            attention=True,
            inputs=True,
            dtype="float32",
            workers=2,
        )
        for node in summary.nodes:  # type: ignore[attr-defined]
            print(f"node:{node}")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
