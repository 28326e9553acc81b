"""Classification metrics for patch-level evaluation (KNN and linear probes).

Computed with :mod:`sklearn.metrics` (``pip install ".[eval]"``): accuracy, balanced accuracy
(mean recall over the classes present in ``y_true``), macro F1 (over the classes present in
``y_true`` or ``y_pred``; an F1 with a zero denominator counts as 0), per-class precision /
recall / F1 / support, the confusion matrix, and the macro one-vs-rest ROC AUC: the unweighted
mean of the per-class binary AUCs (ties scored 1/2) over the classes that have both positives
and negatives in ``y_true`` (classes without are ``None``, as in the per-class table).

Example:
    >>> import numpy as np
    >>> from pathflow.evaluate.metrics import classification_metrics
    >>> y = np.array([0, 0, 1, 1]); s = np.array([[.9, .1], [.4, .6], [.3, .7], [.2, .8]])
    >>> m = classification_metrics(y, s.argmax(1), s, ["a", "b"])
    >>> m.accuracy, m.macro_auc
    (0.75, 1.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


def _sk() -> Any:
    try:
        import sklearn.metrics
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the [eval] extra
        raise ImportError('pathflow eval needs scikit-learn: pip install "pathflow[eval]"') from exc
    return sklearn.metrics


def _labels(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int
) -> tuple[IntArray, IntArray]:
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must be equal-length 1-D")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    return t, p


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int) -> IntArray:
    """``C[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    t, p = _labels(y_true, y_pred, n_classes)
    if not t.size:
        return np.zeros((n_classes, n_classes), np.int64)
    cm = _sk().confusion_matrix(t, p, labels=np.arange(n_classes))
    return np.asarray(cm, dtype=np.int64)


def binary_auc(positive: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive`` (ties count 1/2).

    Returns NaN when there are no positives or no negatives.

    Example:
        >>> binary_auc([True, False, True, False], [0.9, 0.9, 0.8, 0.1])
        0.625
    """
    pos = np.asarray(positive, dtype=bool)
    n_pos = int(pos.sum())
    if n_pos == 0 or n_pos == pos.size:
        return math.nan
    return float(_sk().roc_auc_score(pos, np.asarray(scores, dtype=np.float64)))


@dataclass
class ClassMetrics:
    """Per-class figures: support (true count), predicted count, precision, recall, F1, AUC."""

    name: str
    support: int
    predicted: int
    precision: float
    recall: float
    f1: float
    auc: float | None


@dataclass
class ClassificationMetrics:
    """Summary metrics of one evaluation (``auc`` fields are ``None`` when undefined)."""

    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    macro_auc: float | None
    per_class: list[ClassMetrics] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def table(self, title: str = "") -> str:
        """Readable text table: summary line, then one row per class."""
        return format_table(self, title)


def classification_metrics(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    scores: npt.ArrayLike | None,
    class_names: Sequence[str],
) -> ClassificationMetrics:
    """Accuracy, balanced accuracy, macro F1, macro OvR AUC and per-class counts.

    ``scores`` is (N, C): KNN vote shares or probe probabilities (any monotone score works
    for AUC); ``None`` skips AUC.
    """
    sk = _sk()
    names = list(class_names)
    c = len(names)
    t, p = _labels(y_true, y_pred, c)
    n = int(t.size)
    cm = confusion_matrix(t, p, c)
    labels = np.arange(c)
    aucs = np.full(c, math.nan)
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (n, c):
            raise ValueError(f"scores must be (N, C) = ({n}, {c}), got {s.shape}")
        for k in range(c):
            aucs[k] = binary_auc(t == k, s[:, k])
    defined = ~np.isnan(aucs)
    zeros = np.zeros(c)
    precision, recall, f1, support = zeros, zeros, zeros, zeros
    accuracy = balanced = macro_f1 = math.nan
    if n:
        precision, recall, f1, support = sk.precision_recall_fscore_support(
            t, p, labels=labels, zero_division=0
        )
        accuracy = float(sk.accuracy_score(t, p))
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
            warnings.simplefilter("ignore", UserWarning)
            balanced = float(sk.balanced_accuracy_score(t, p))
        macro_f1 = float(sk.f1_score(t, p, average="macro", zero_division=0))
    predicted = cm.sum(0)
    per_class = [
        ClassMetrics(
            name=names[k],
            support=int(support[k]),
            predicted=int(predicted[k]),
            precision=float(precision[k]),
            recall=float(recall[k]),
            f1=float(f1[k]),
            auc=None if math.isnan(aucs[k]) else float(aucs[k]),
        )
        for k in range(c)
    ]
    return ClassificationMetrics(
        n=n,
        accuracy=accuracy,
        balanced_accuracy=balanced,
        macro_f1=macro_f1,
        macro_auc=float(aucs[defined].mean()) if defined.any() else None,
        per_class=per_class,
        confusion=cm.tolist(),
    )


def format_table(m: ClassificationMetrics, title: str = "") -> str:
    """Text table of a :class:`ClassificationMetrics` (what ``pathflow eval`` prints)."""

    def f(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    width = max([5, *(len(c.name) for c in m.per_class)])
    lines = []
    if title:
        lines.append(title)
    lines.append(
        f"n={m.n}  accuracy {f(m.accuracy)}  balanced accuracy {f(m.balanced_accuracy)}  "
        f"macro F1 {f(m.macro_f1)}  macro AUC {f(m.macro_auc)}"
    )
    head = (
        f"{'class':<{width}}  {'support':>7}  {'predicted':>9}  {'precision':>9}  "
        f"{'recall':>7}  {'F1':>7}  {'AUC':>7}"
    )
    lines += [head, "-" * len(head)]
    for c in m.per_class:
        lines.append(
            f"{c.name:<{width}}  {c.support:>7}  {c.predicted:>9}  {f(c.precision):>9}  "
            f"{f(c.recall):>7}  {f(c.f1):>7}  {f(c.auc):>7}"
        )
    return "\n".join(lines)
