"""How a result's numbers were estimated, in words: the one place that text is built.

The CKA and localization jobs write it into a result's ``summary``; the CKA
figure's title (:mod:`vitcnn_store.interface.plots`) and the report's "This
figure" line (:mod:`vitcnn_store.interface.report`) read it back from the
result's attributes, so an old result and a new one are described alike.

Examples
--------
>>> attrs = dict(estimator="unbiased-minibatch", kernel="linear", reduce="cls", n=40,
...              batch_size=16, n_batches=2, repeats=3)
>>> cka_protocol(attrs)
'unbiased-minibatch, linear kernel, cls, n=40 (batch 16 × 2 per repeat, 3 repeat(s))'
>>> sampling({"estimator": "biased", "n": 40})
'all 40 usable images, one batch'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["cka_protocol", "sampling"]


def sampling(attrs: Mapping[str, Any]) -> str:
    """Which images entered the estimate: all of them in one batch, or batches (× repeats)."""
    if attrs.get("estimator", "unbiased-minibatch") != "unbiased-minibatch":
        return f"all {attrs.get('n', '?')} usable images, one batch"
    text = f"batch {attrs.get('batch_size', '?')} × {attrs.get('n_batches', '?')}"
    if "repeats" in attrs:
        text += f" per repeat, {attrs['repeats']} repeat(s)"
    return text


def cka_protocol(attrs: Mapping[str, Any]) -> str:
    """Estimator, kernel, reduction, n and :func:`sampling` of a CKA result."""
    return (
        f"{attrs.get('estimator', '')}, {attrs.get('kernel', 'linear')} kernel, "
        f"{attrs.get('reduce', '')}, n={attrs.get('n', '?')} ({sampling(attrs)})"
    )
