"""DINO's weighted KNN against an explicit loop and a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pathflow.evaluate.knn import knn_classify


def knn_loop(train, labels, test, n_classes, k, t):  # type: ignore[no-untyped-def]
    """The textbook definition, one test sample and one neighbour at a time."""
    out = []
    for q in test:
        qn = q / np.linalg.norm(q)
        sims = [float(qn @ (x / np.linalg.norm(x))) for x in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * n_classes
        for i in order:
            votes[labels[i]] += math.exp(sims[i] / t)
        out.append(votes)
    return np.array(out)


def test_matches_explicit_loop() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 60)
    test = rng.normal(size=(25, 16)).astype(np.float32)
    ref = knn_loop(train, labels, test, 5, 20, 0.07)
    res = knn_classify(train, labels, test, 5, k=20, temperature=0.07, chunk=7)
    np.testing.assert_allclose(res.votes, ref, rtol=1e-4)
    assert res.predictions.tolist() == ref.argmax(1).tolist()
    np.testing.assert_allclose(res.scores.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(res.scores, ref / ref.sum(1, keepdims=True), rtol=1e-4)


def test_hand_computed_vote() -> None:
    # Unit vectors at 0, 60, 90 and 180 degrees; the query at 0 degrees. k=3 picks the first
    # three (cosines 1, 1/2, 0): votes a = e^(1/T) + e^(0.5/T), b = e^(0/T) = 1.
    train = np.array([[1, 0], [0.5, math.sqrt(3) / 2], [0, 1], [-1, 0]], np.float32)
    labels = np.array([0, 0, 1, 1])
    res = knn_classify(train, labels, np.array([[3, 0]], np.float32), 2, k=3, temperature=0.5)
    assert res.votes[0].tolist() == pytest.approx([math.exp(2) + math.exp(1), 1.0], rel=1e-6)
    # With k=4 the opposite vector adds e^(-1/T) to b.
    res = knn_classify(train, labels, np.array([[3, 0]], np.float32), 2, k=4, temperature=0.5)
    assert res.votes[0, 1] == pytest.approx(1.0 + math.exp(-2), rel=1e-6)


def test_weights_beat_majority() -> None:
    # One very close neighbour of class 1 outweighs two distant ones of class 0 at T=0.07.
    train = np.array([[1, 0.01], [0.6, 0.8], [0.6, -0.8]], np.float32)
    res = knn_classify(train, np.array([1, 0, 0]), np.array([[1, 0]], np.float32), 2, k=3)
    assert res.predictions.tolist() == [1]


def test_k_is_clipped_and_bad_input_rejected() -> None:
    train = np.eye(3, dtype=np.float32)
    res = knn_classify(train, np.array([0, 1, 2]), train, 3, k=20)
    assert res.predictions.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="equal D"):
        knn_classify(train, np.array([0, 1, 2]), np.ones((1, 4), np.float32), 3)
    with pytest.raises(ValueError, match="train labels"):
        knn_classify(train, np.array([0, 1]), train, 3)
