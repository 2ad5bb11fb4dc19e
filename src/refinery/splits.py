"""Seeded, stratified selections: the test split of a one-split source, the val
split and the labeled subset. One implementation, so every split in the
pipeline rounds and treats small classes the same way.
"""

from __future__ import annotations

import numpy as np


def round_half_up(x: float) -> int:
    """Conventional rounding (Python's round() sends 2.5 to 2)."""
    return int(np.floor(x + 0.5))


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of ``round(n_c * fraction)`` items of each class ``c``, chosen by ``rng``.

    Per-class rounding keeps each class's share the same on both sides (what
    sklearn's ``train_test_split(stratify=...)`` approximates globally) and,
    unlike it, works for any class size: a class of two or more keeps at least
    one item on each side; a singleton stays out of the holdout.
    """
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = round_half_up(len(members) * fraction)
        n = min(max(n, 1), len(members) - 1) if len(members) >= 2 else 0
        held[rng.permutation(members)[:n]] = True
    return held


def labeled_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``max(1, round(n_c * fraction))`` items of each class."""
    picked: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n = min(len(members), max(1, round_half_up(len(members) * fraction)))
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
