"""Metrics (scikit-learn underneath) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pathflow.evaluate.metrics import (
    binary_auc,
    classification_metrics,
    confusion_matrix,
    format_table,
)

Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 1, 0, 1, 2, 2])
SCORES = np.array(
    [[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.1, 0.4, 0.5],
     [0.2, 0.2, 0.6]]
)  # fmt: skip


def test_confusion_matrix_by_hand() -> None:
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix([0, 3], [0, 0], 3)


def test_summary_metrics_by_hand() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, SCORES, ["a", "b", "c"])
    assert m.n == 6
    assert m.accuracy == pytest.approx(4 / 6)
    # recalls 2/3, 1/2, 1/1
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # precisions 1, 1/2, 1/2 -> F1 0.8, 0.5, 2/3
    assert [c.f1 for c in m.per_class] == pytest.approx([0.8, 0.5, 2 / 3])
    assert m.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # class b: positives 0.6, 0.4 vs negatives 0.2, 0.5, 0.3, 0.2 -> 7 of 8 pairs
    assert [c.auc for c in m.per_class] == pytest.approx([1.0, 7 / 8, 1.0])
    assert m.macro_auc == pytest.approx((1 + 7 / 8 + 1) / 3)
    assert [(c.support, c.predicted) for c in m.per_class] == [(3, 2), (2, 2), (1, 2)]
    assert m.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_class_predicted_but_never_true() -> None:
    # class c is predicted once and never true: out of balanced accuracy (no recall) and of
    # the AUC average (no positives), in macro F1 with F1 = 0 (zero denominators count 0)
    y, p = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    s = np.array([[0.8, 0.1, 0.1], [0.3, 0.2, 0.5], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics(y, p, s, ["a", "b", "c"])
    assert m.accuracy == pytest.approx(3 / 4)
    assert m.balanced_accuracy == pytest.approx((1 / 2 + 1) / 2)
    # a: P 1, R 1/2 -> F1 2/3; b: P 1, R 1 -> 1; c: P 0 (0 of 1), R 0/0 -> 0
    assert [c.precision for c in m.per_class] == pytest.approx([1, 1, 0])
    assert [c.recall for c in m.per_class] == pytest.approx([0.5, 1, 0])
    assert [c.f1 for c in m.per_class] == pytest.approx([2 / 3, 1, 0])
    assert m.macro_f1 == pytest.approx((2 / 3 + 1 + 0) / 3)
    # a: positives .8, .3 vs negatives .1, .2 -> 4 of 4 pairs; b: .8, .7 vs .1, .2 -> 4 of 4
    assert [c.auc for c in m.per_class] == [1.0, 1.0, None]
    assert m.macro_auc == 1.0
    assert [(c.support, c.predicted) for c in m.per_class] == [(2, 1), (2, 2), (0, 1)]
    assert m.confusion == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]


def test_perfect_and_reversed_rankings() -> None:
    assert binary_auc([False, False, True, True], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert binary_auc([True, True, False, False], [0.1, 0.2, 0.3, 0.4]) == 0.0
    # one positive ranked above 2 of 3 negatives
    assert binary_auc([False, True, False, False], [0.1, 0.5, 0.9, 0.3]) == pytest.approx(2 / 3)
    m = classification_metrics([1, 1, 1], [1, 1, 0], None, ["a", "b"])
    assert m.accuracy == pytest.approx(2 / 3) and m.balanced_accuracy == pytest.approx(2 / 3)
    assert m.macro_auc is None and m.per_class[0].auc is None


def test_auc_ties_count_half() -> None:
    # pairs (pos, neg): (.9,.9)=1/2, (.9,.1)=1, (.8,.9)=0, (.8,.1)=1 -> 2.5 / 4
    assert binary_auc([True, False, True, False], [0.9, 0.9, 0.8, 0.1]) == 0.625
    assert binary_auc([1, 1, 0], [0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(binary_auc([True, True], [0.1, 0.2]))


def test_absent_class_is_left_out_of_averages() -> None:
    # class 2 has no true sample and is never predicted: not in balanced acc / F1 / AUC
    y, p = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    s = np.array([[0.8, 0.2, 0.0], [0.4, 0.6, 0.0], [0.1, 0.9, 0.0], [0.3, 0.7, 0.0]])
    m = classification_metrics(y, p, s, ["a", "b", "c"])
    assert m.balanced_accuracy == pytest.approx((0.5 + 1.0) / 2)
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)  # F1 a = 2/3, b = 0.8
    assert m.per_class[2].auc is None
    assert m.macro_auc == pytest.approx(1.0)
    assert classification_metrics(y, p, None, ["a", "b", "c"]).macro_auc is None


def test_table_is_readable() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, SCORES, ["tumor", "stroma", "adipose"])
    text = format_table(m, "knn")
    lines = text.splitlines()
    assert lines[0] == "knn"
    assert "accuracy 0.6667" in lines[1] and "macro AUC 0.9583" in lines[1]
    assert lines[4].split() == ["tumor", "3", "2", "1.0000", "0.6667", "0.8000", "1.0000"]
    assert m.to_dict()["per_class"][1]["name"] == "stroma"
