"""The images that drive each channel most: per-chunk top-k, merged exactly across chunks.

An image's score for a channel is the channel's **maximum over positions**
(patch tokens of a token layer, y·x of a spatial layer, the single value of a
pooled layer), and the position of that maximum says where it fires. For each
channel the ``k`` images with the highest scores are kept, ties broken by the
lower image index, so the answer does not depend on how images were chunked:
the top ``k`` of a union is the top ``k`` of the parts' top ``k`` lists
(:func:`merge_top_k`). Alongside, :class:`TopK` carries the per-channel sums
that give each channel's mean and standard deviation over images and
positions.

Examples
--------
>>> x = np.array([[[1.0, 0.0]], [[3.0, -1.0]], [[2.0, 5.0]]])  # 3 images, 1 position, 2 channels
>>> top = chunk_top_k(x, np.array([10, 11, 12]), np.array([0]), k=2)
>>> top.image.tolist(), top.value.tolist()
([[11, 12], [12, 10]], [[3.0, 5.0], [2.0, 0.0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TopK", "chunk_top_k", "merge_top_k"]


@dataclass
class TopK:
    """Top-``k`` images per channel of one set of images, best first along ``rank``.

    ``value``, ``image`` and ``position`` are (rank, channel): the score, the
    image index and the flat position (token index, or y·W + x; -1 for pooled
    layers) of the maximum. ``total``, ``total_sq`` (float64, per channel) and
    ``count`` (values summed per channel) give the channel's mean and std.
    """

    value: np.ndarray
    image: np.ndarray
    position: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    count: int

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        mean = self.mean
        return np.sqrt(np.maximum(self.total_sq / max(self.count, 1) - mean**2, 0.0))


def _select(value: np.ndarray, image: np.ndarray, k: int) -> np.ndarray:
    """Row indices (rank, channel) of the top ``k`` per channel: highest value, then lowest
    image index."""
    # lexsort sorts by the last key first: -value ascending, then image ascending.
    order = np.lexsort((image, -value), axis=0)
    return order[:k]


def chunk_top_k(x: np.ndarray, images: np.ndarray, positions: np.ndarray, k: int) -> TopK:
    """Top ``k`` images per channel of one chunk.

    Parameters
    ----------
    x : array (image, position, channel)
        Activations of the chunk's images, every position of the layer (any float dtype).
    images : array (image,)
        Their indices in the run.
    positions : array of int
        Which positions are scored (e.g. the patch tokens; prefix tokens left out).
        An empty array scores a pooled layer's single value, with position -1.
    k : int
        Images kept per channel (fewer when the chunk has fewer).
    """
    x = np.asarray(x)
    values = x.astype(np.float64, copy=False)
    total = values.sum(axis=(0, 1))
    total_sq = np.square(values).sum(axis=(0, 1))
    count = int(x.shape[0] * x.shape[1])
    if positions.size:
        scored = x[:, positions, :]
        where = np.asarray(positions)[np.argmax(scored, axis=1)]  # first maximum
        score = scored.max(axis=1)
    else:
        score = x[:, 0, :]
        where = np.full(score.shape, -1)
    image = np.broadcast_to(np.asarray(images)[:, None], score.shape)
    pick = _select(score, image, k)
    return TopK(
        value=np.take_along_axis(score, pick, 0).astype(np.float32),
        image=np.take_along_axis(image, pick, 0).astype(np.int64),
        position=np.take_along_axis(where, pick, 0).astype(np.int64),
        total=total,
        total_sq=total_sq,
        count=count,
    )


def merge_top_k(a: TopK, b: TopK, k: int) -> TopK:
    """The top ``k`` of two disjoint image sets' lists: exactly the top ``k`` of their union."""
    value = np.concatenate([a.value, b.value])
    image = np.concatenate([a.image, b.image])
    position = np.concatenate([a.position, b.position])
    pick = _select(value, image, k)
    return TopK(
        value=np.take_along_axis(value, pick, 0),
        image=np.take_along_axis(image, pick, 0),
        position=np.take_along_axis(position, pick, 0),
        total=a.total + b.total,
        total_sq=a.total_sq + b.total_sq,
        count=a.count + b.count,
    )
