"""``pathflow eval slide-knn``: HIPT's self-supervised slide-level evaluation.

Each slide is represented by the mean of its rows in a features file written by ``pathflow
extract`` (regions of a HIPT file, patches of a plain features file), and the slide embeddings
are classified with a K-nearest-neighbours classifier under stratified k-fold cross-validation;
a logistic-regression probe on the same folds is reported beside it. Per fold: the macro ROC
AUC of the predicted class probabilities (binary: the AUC of the positive class, the second
class name in sorted order; more classes: the unweighted mean of the one-vs-rest AUCs over all
classes) and the balanced accuracy (mean per-class recall) of the predicted classes; reported
as mean ± std over the folds (population std, ``ddof=0``).

What follows HIPT (Chen et al., CVPR 2022; the scikit-learn evaluation in its repository's
``3-Self-Supervised-Eval`` notebooks): ``KNeighborsClassifier()`` with scikit-learn's defaults
(k = 5, uniform votes, Euclidean distance, class probabilities = vote shares),
``StratifiedKFold(n_splits=10, shuffle=True, random_state=0)``, AUC via ``roc_auc_score``
(``"roc_auc"`` for two classes, macro ``"roc_auc_ovr"`` for more), and mean-pooled slide
embeddings (``cls4k``: mean of the [CLS]_4K region tokens). Differences: HIPT reports the mean
AUC only; here the std over folds and the balanced accuracy are added, the logistic-regression
probe standardises the features first (``StandardScaler`` fitted on the train folds, then
``LogisticRegression(C=1, max_iter=1000)``; HIPT's commented-out alternative was an
unstandardised ``LogisticRegression(random_state=0)``), and HIPT's TCGA results used its own
10 fixed train/test splits, where ``--seed`` here picks the shuffled stratified folds.

Features (``--feature``): ``cls4k`` [M, 192], ``mean256`` [M, 384] or ``concat`` [M, 576] of
``pathflow-hipt-v1`` files; ``features`` [N, D] of plain patch features files;
``region_features`` [M, 256, 384] (mean over the regions and their 256 patches); ``auto``
(default): ``cls4k`` if the file has it, else ``features``, else ``region_features``. The slide
id is the file's root attr ``slide`` (else the file stem); ids match the labels CSV with or
without a slide-file extension (``.svs``, ``.tif``...).

Example:
    >>> import numpy as np
    >>> from pathflow.evaluate.slide_knn import evaluate_slides
    >>> x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [12.0], [13.0]])
    >>> y = ["a"] * 4 + ["b"] * 4
    >>> res = evaluate_slides(x, y, folds=2, k=3, seed=0)
    >>> res.knn.auc.mean, res.knn.balanced_accuracy.mean
    (1.0, 1.0)
    >>> print(res.table())  # doctest: +NORMALIZE_WHITESPACE
    classifier                         AUC      balanced acc
    --------------------------------------------------------
    knn (k=3)                1.000 ± 0.000     1.000 ± 0.000
    logreg (C=1)             1.000 ± 0.000     1.000 ± 0.000
    >>> from pathflow.evaluate.slide_knn import SlideKnnConfig, run_slide_knn
    >>> cfg = SlideKnnConfig.build({}, {"inputs": ["out/features"],
    ...                                 "labels": "slides.csv"})  # doctest: +SKIP
    >>> print(run_slide_knn(cfg).summary())  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.evaluate.config import FEATURE_CHOICES, SlideKnnConfig
from pathflow.exceptions import ConfigError
from pathflow.outputs import atomic_path, atomic_write_text

log = logging.getLogger("pathflow.eval")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: ``auto`` tries these datasets in order (``--feature`` choices: FEATURE_CHOICES).
AUTO_ORDER = ("cls4k", "features", "region_features")
#: Slide-file extensions ignored when matching slide ids with the labels CSV.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
                  ".svslide", ".czi", ".dcm", ".isyntax", ".h5", ".pt")  # fmt: skip
#: Values read per HDF5 chunk when averaging (about 64 MB of float64).
_CHUNK_VALUES = 8 << 20
_SHOWN = 5


# --------------------------------------------------------------------------------- inputs


@dataclass
class SlideEmbeddings:
    """One row per slide: ``x[i]`` is the mean embedding of slide ``names[i]`` (``paths[i]``)."""

    names: list[str]
    x: FloatArray
    feature: str
    paths: list[Path]
    empty: list[str] = field(default_factory=list)


def slide_key(name: str) -> str:
    """The id used to match slides with the labels CSV: stripped, without a slide-file
    extension (``"TCGA-1.svs"`` and ``"TCGA-1"`` match)."""
    name = name.strip()
    root, ext = os.path.splitext(name)
    return root if root and ext.lower() in SLIDE_SUFFIXES else name


def _feature_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
            continue
        found = sorted(p.glob("*.h5"))
        if not found and (p / "features").is_dir():  # the --out folder of pathflow extract
            found = sorted((p / "features").glob("*.h5"))
        if not found:
            raise ConfigError(f"{p}: no .h5 feature files (expected <slide>.h5 files written "
                              "by pathflow extract)")  # fmt: skip
        files.extend(found)
    return files


def _pick_dataset(f: Any, path: Path, feature: str) -> str:
    if feature != "auto":
        if feature not in f:
            have = ", ".join(k for k in f if k in FEATURE_CHOICES) or "none of them"
            raise ConfigError(f"{path}: no dataset {feature!r} for --feature {feature} "
                              f"(has: {have})")  # fmt: skip
        return feature
    for name in AUTO_ORDER:
        if name in f:
            return name
    raise ConfigError(f"{path}: no features dataset (looked for {', '.join(AUTO_ORDER)}); "
                      "not a file written by pathflow extract?")  # fmt: skip


def _mean_rows(ds: Any, path: Path, name: str) -> FloatArray | None:
    """Mean over every axis but the last of an HDF5 dataset, read in chunks (float64
    accumulation); ``None`` when it has no rows."""
    shape = tuple(int(s) for s in ds.shape)
    expect = 3 if name == "region_features" else 2
    if len(shape) != expect or shape[-1] < 1:
        raise ConfigError(f"{path}: dataset {name!r} has shape {shape}, expected "
                          f"{'[M, 256, 384]' if expect == 3 else '[N, D]'}")  # fmt: skip
    if shape[0] == 0 or (expect == 3 and shape[1] == 0):
        return None
    per_row = int(np.prod(shape[1:]))
    step = max(1, _CHUNK_VALUES // per_row)
    total = np.zeros(shape[-1], np.float64)
    for start in range(0, shape[0], step):
        block = np.asarray(ds[start : start + step], dtype=np.float64)
        total += block.reshape(-1, shape[-1]).sum(axis=0)
    mean = total / (shape[0] * (per_row // shape[-1]))
    if not np.all(np.isfinite(mean)):
        raise ConfigError(f"{path}: dataset {name!r} holds NaN or infinite values")
    return mean


def _attr_text(v: Any) -> str | None:
    """A string HDF5 attr (str, bytes or a one-element array of them), else ``None``."""
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(()).item()
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if not isinstance(v, str):
        return None
    return v.strip() or None


def load_slide_embeddings(
    inputs: Sequence[str | os.PathLike[str]], feature: str = "auto"
) -> SlideEmbeddings:
    """Mean embedding of every ``.h5`` features file in ``inputs`` (folders or files).

    A folder with no ``.h5`` files but a ``features/`` sub-folder (the ``--out`` folder of
    ``pathflow extract``) is read from there. Files whose dataset has no rows are listed in
    ``empty`` and left out. Raises :class:`ConfigError` when a file lacks the dataset, when
    ``auto`` resolves to different datasets in different files, when the embedding sizes differ
    or when two files hold the same slide id.
    """
    import h5py

    if feature not in FEATURE_CHOICES:
        raise ConfigError(f"--feature must be one of {', '.join(FEATURE_CHOICES)}")
    names: list[str] = []
    rows: list[FloatArray] = []
    paths: list[Path] = []
    empty: list[str] = []
    picked: dict[str, Path] = {}
    seen: dict[str, Path] = {}
    for path in _feature_files(inputs):
        try:
            with h5py.File(path, "r") as f:
                name = _pick_dataset(f, path, feature)
                slide = _attr_text(f.attrs.get("slide")) or path.stem
                mean = _mean_rows(f[name], path, name)
        except OSError as exc:
            raise OSError(f"{path}: cannot read as HDF5 ({exc})") from exc
        picked.setdefault(name, path)
        key = slide_key(slide)
        if key in seen:
            raise ConfigError(f"{path}: slide {slide!r} is also in {seen[key]}")
        seen[key] = path
        if mean is None:
            empty.append(slide)
            continue
        names.append(slide)
        rows.append(mean)
        paths.append(path)
    if len(picked) > 1:
        kinds = ", ".join(f"{k} ({p.name})" for k, p in picked.items())
        raise ConfigError(f"the feature files hold different datasets ({kinds}); choose one "
                          "with --feature")  # fmt: skip
    dims = Counter(len(r) for r in rows)
    if len(dims) > 1:
        common = dims.most_common(1)[0][0]
        odd = next(p for p, r in zip(paths, rows, strict=True) if len(r) != common)
        raise ConfigError(f"{odd}: embedding size differs from the other files "
                          f"({dict(dims)}); were they made by different models?")  # fmt: skip
    resolved = next(iter(picked)) if picked else feature
    x = np.stack(rows) if rows else np.zeros((0, 0), np.float64)
    return SlideEmbeddings(names=names, x=x, feature=resolved, paths=paths, empty=empty)


def read_labels(
    path: str | os.PathLike[str], slide_column: str = "slide", label_column: str = "label"
) -> dict[str, str]:
    """``{slide: label}`` from a CSV (comma, tab or semicolon separated) with a header.

    Rows with an empty slide or label are ignored. Raises :class:`ConfigError` naming the file
    when it is missing or unreadable, lacks a column, or gives one slide two labels.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{p}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the labels file ({exc})") from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{p}: empty labels file (expected a header with columns "
                          f"{slide_column},{label_column})")  # fmt: skip
    try:
        dialect: Any = csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=",\t;")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(lines, dialect=dialect)
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    for col, flag in ((slide_column, "--slide-column"), (label_column, "--label-column")):
        if col not in columns:
            raise ConfigError(f"{p}: no column {col!r} (columns: {', '.join(columns)}; "
                              f"choose one with {flag})")  # fmt: skip
    labels: dict[str, str] = {}
    where: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        slide = (row.get(slide_column) or "").strip()
        label = (row.get(label_column) or "").strip()
        if not slide or not label:
            continue
        key = slide_key(slide)
        if key in labels and labels[key] != label:
            raise ConfigError(f"{p}: slide {slide!r} has two labels ({labels[key]!r} on line "
                              f"{where[key]}, {label!r} on line {line})")  # fmt: skip
        labels[key] = label
        where.setdefault(key, line)
    return labels


# ------------------------------------------------------------------------------ evaluation


@dataclass
class FoldScores:
    """One metric over the folds."""

    folds: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.folds)) if self.folds else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.folds)) if self.folds else math.nan

    def text(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "folds": list(self.folds)}


@dataclass
class ClassifierScores:
    """Per-fold AUC and balanced accuracy of one classifier, and its out-of-fold
    probabilities ``proba`` (N, C) (each slide scored by the model that did not see it)."""

    name: str
    auc: FoldScores
    balanced_accuracy: FoldScores
    proba: FloatArray

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc.to_dict(), "balanced_accuracy": self.balanced_accuracy.to_dict()}


@dataclass
class SlideEvalResult:
    """Cross-validated scores of the KNN and the logistic-regression probe."""

    classes: list[str]
    counts: dict[str, int]
    fold_of: IntArray
    knn: ClassifierScores
    logreg: ClassifierScores
    folds: int
    k: int
    seed: int
    logreg_c: float

    @property
    def auc_kind(self) -> str:
        if len(self.classes) == 2:
            return f"binary, positive class {self.classes[1]!r}"
        return "macro one-vs-rest"

    def table(self, title: str = "") -> str:
        head = f"{'classifier':<22}{'AUC':>16}{'balanced acc':>18}"
        lines = [title] if title else []
        lines += [head, "-" * len(head)]
        for c, label in ((self.knn, f"knn (k={self.k})"),
                         (self.logreg, f"logreg (C={self.logreg_c:g})")):  # fmt: skip
            lines.append(f"{label:<22}{c.auc.text():>16}{c.balanced_accuracy.text():>18}")
        return "\n".join(lines)


def _proba_full(model: Any, x: FloatArray, n_classes: int) -> FloatArray:
    """Class probabilities in the columns 0..C-1 (a class absent from the train folds gets 0)."""
    p = np.asarray(model.predict_proba(x), np.float64)
    out = np.zeros((len(x), n_classes), np.float64)
    out[:, np.asarray(model.classes_, np.int64)] = p
    return out


def _fold_metrics(y: IntArray, proba: FloatArray, n_classes: int) -> tuple[float, float]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    pred = proba.argmax(axis=1)
    if n_classes == 2:
        auc = roc_auc_score(y == 1, proba[:, 1])
    else:
        auc = roc_auc_score(
            y, proba, multi_class="ovr", average="macro", labels=np.arange(n_classes)
        )
    return float(auc), float(balanced_accuracy_score(y, pred))


def evaluate_slides(
    x: npt.ArrayLike,
    y: Sequence[Any] | npt.ArrayLike,
    folds: int = 10,
    k: int = 5,
    seed: int = 0,
    logreg_c: float = 1.0,
) -> SlideEvalResult:
    """KNN and logistic regression on slide embeddings ``x`` (S, D) with labels ``y`` under
    ``StratifiedKFold(folds, shuffle=True, random_state=seed)``.

    Classes are the sorted distinct labels. Predictions are the argmax of the class
    probabilities (a tie goes to the first class in sorted order), as scikit-learn's
    ``predict``. Raises :class:`ConfigError` with fewer than two classes, a class with fewer
    slides than ``folds``, or ``k`` larger than the training slides of a fold.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xs = np.asarray(x, np.float64)
    labels = np.asarray(y)
    if xs.ndim != 2 or len(xs) != len(labels):
        raise ValueError(f"x must be (S, D) with one label per row, got {xs.shape} and "
                         f"{labels.shape}")  # fmt: skip
    classes_arr, yi = np.unique(labels, return_inverse=True)
    classes = [str(c) for c in classes_arr]
    yi = yi.astype(np.int64)
    sizes = np.bincount(yi, minlength=len(classes))
    counts = {c: int(n) for c, n in zip(classes, sizes, strict=True)}
    if len(classes) < 2:
        raise ConfigError(f"need at least 2 classes, got {len(classes)} ({counts})")
    if folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")
    small = {c: n for c, n in counts.items() if n < folds}
    if small:
        c, n = min(small.items(), key=lambda kv: kv[1])
        raise ConfigError(f"class {c!r} has {n} slide{'s' * (n != 1)}, fewer than --folds "
                          f"{folds}; use --folds {n} or fewer")  # fmt: skip
    n_train = len(yi) - math.ceil(len(yi) / folds)
    if k > n_train:
        raise ConfigError(f"--k {k} exceeds the {n_train} training slides of a fold")
    n_classes = len(classes)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.full(len(yi), -1, np.int64)
    oof = {"knn": np.zeros((len(yi), n_classes)), "logreg": np.zeros((len(yi), n_classes))}
    scores: dict[str, tuple[list[float], list[float]]] = {"knn": ([], []), "logreg": ([], [])}
    for i, (tr, te) in enumerate(splitter.split(xs, yi)):
        fold_of[te] = i
        models = {
            "knn": KNeighborsClassifier(n_neighbors=k),
            "logreg": make_pipeline(
                StandardScaler(), LogisticRegression(C=logreg_c, max_iter=1000)
            ),
        }
        for name, model in models.items():
            model.fit(xs[tr], yi[tr])
            proba = _proba_full(model, xs[te], n_classes)
            oof[name][te] = proba
            auc, bacc = _fold_metrics(yi[te], proba, n_classes)
            scores[name][0].append(auc)
            scores[name][1].append(bacc)

    def pack(name: str) -> ClassifierScores:
        auc, bacc = scores[name]
        return ClassifierScores(name, FoldScores(auc), FoldScores(bacc), oof[name])

    return SlideEvalResult(
        classes=classes, counts=counts, fold_of=fold_of, knn=pack("knn"),
        logreg=pack("logreg"), folds=folds, k=k, seed=seed, logreg_c=logreg_c,
    )  # fmt: skip


# ---------------------------------------------------------------------------------- driver


@dataclass
class SlideKnnResult:
    """The evaluation and where its outputs went."""

    evaluation: SlideEvalResult
    feature: str
    slides: list[str]
    out: Path
    metrics_path: Path
    plot_path: Path | None
    seconds: float

    def title(self) -> str:
        counts = ", ".join(f"{c} {n}" for c, n in self.evaluation.counts.items())
        return (f"slide-knn on {self.feature}: {len(self.slides)} slides ({counts}), "
                f"{self.evaluation.folds}-fold stratified CV (seed {self.evaluation.seed}), "
                f"AUC {self.evaluation.auc_kind}")  # fmt: skip

    def summary(self) -> str:
        return (
            f"{self.evaluation.table(self.title())}\n-> {self.metrics_path}"
            + (f", {self.plot_path}" if self.plot_path else "")
            + f" ({self.seconds:.1f} s)"
        )


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:_SHOWN])
    return shown + (", ..." if len(names) > _SHOWN else "")


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v


def plot_folds(result: SlideEvalResult, dest: str | os.PathLike[str], title: str = "") -> None:
    """PNG with the per-fold AUC and balanced accuracy of both classifiers (dots joined per
    classifier, dashed line at each mean)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    folds = np.arange(1, result.folds + 1)
    colours = {"knn": "tab:blue", "logreg": "tab:orange"}
    for j, metric in enumerate(("auc", "balanced_accuracy")):
        ax = fig.add_subplot(1, 2, j + 1)
        for c in (result.knn, result.logreg):
            s: FoldScores = getattr(c, metric)
            label = f"{c.name} ({s.text()})"
            ax.plot(folds, s.folds, "o-", color=colours[c.name], label=label, alpha=0.85)
            ax.axhline(s.mean, color=colours[c.name], linestyle="--", linewidth=1)
        ax.set_xlabel("fold")
        ax.set_xticks(folds)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("macro AUC" if metric == "auc" else "balanced accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")


def run_slide_knn(cfg: SlideKnnConfig) -> SlideKnnResult:
    """Load the slide embeddings, join the labels, cross-validate, write the outputs."""
    t0 = time.perf_counter()
    assert cfg.labels is not None  # validated
    labels = read_labels(cfg.labels, cfg.slide_column, cfg.label_column)
    emb = load_slide_embeddings(cfg.inputs, cfg.feature)
    have = {slide_key(n) for n in emb.names} | {slide_key(n) for n in emb.empty}
    no_file = [s for s in labels if s not in have]
    if no_file:
        log.warning(f"{len(no_file)} slide(s) in {cfg.labels} have no features file and were "
                    f"left out: {_few(no_file)}")  # fmt: skip
    if emb.empty:
        log.warning(f"{len(emb.empty)} features file(s) have no rows and were left out: "
                    f"{_few(emb.empty)}")  # fmt: skip
    keep = [i for i, n in enumerate(emb.names) if slide_key(n) in labels]
    unlabelled = [n for n in emb.names if slide_key(n) not in labels]
    if unlabelled:
        log.warning(f"{len(unlabelled)} features file(s) have no label in {cfg.labels} and "
                    f"were left out: {_few(unlabelled)}")  # fmt: skip
    slides = [emb.names[i] for i in keep]
    y = [labels[slide_key(s)] for s in slides]
    if not slides:
        raise ConfigError(f"{cfg.labels}: no slide has both a label and a features file "
                          f"({len(labels)} labels, {len(emb.names)} files)")  # fmt: skip
    try:
        res = evaluate_slides(emb.x[keep], y, cfg.folds, cfg.k, cfg.seed, cfg.logreg_c)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.labels}: {exc}") from None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_path = out / "slide_knn.png" if cfg.plot else None
    result = SlideKnnResult(
        evaluation=res, feature=emb.feature, slides=slides, out=out,
        metrics_path=out / "metrics.json", plot_path=plot_path, seconds=0.0,
    )  # fmt: skip
    if plot_path is not None:
        title = (f"slide-knn on {emb.feature}: {len(slides)} slides, {len(res.classes)} "
                 f"classes, {res.folds}-fold CV (seed {res.seed})")  # fmt: skip
        plot_folds(res, plot_path, title)
    result.seconds = time.perf_counter() - t0
    report = {
        "method": "slide-knn",
        "feature": emb.feature,
        "embedding_dim": int(emb.x.shape[1]),
        "folds": cfg.folds,
        "k": cfg.k,
        "seed": cfg.seed,
        "logreg_c": cfg.logreg_c,
        "classes": res.classes,
        "n_slides": len(slides),
        "slides_per_class": res.counts,
        "auc": res.auc_kind,
        "knn": res.knn.to_dict(),
        "logreg": res.logreg.to_dict(),
        "inputs": [str(p) for p in cfg.inputs],
        "labels": str(cfg.labels),
        "n_feature_files": len(emb.names) + len(emb.empty),
        "missing_features": sorted(no_file),
        "unlabelled": sorted(unlabelled),
        "empty": sorted(emb.empty),
        "fold_of_slide": {s: int(f) for s, f in zip(slides, res.fold_of, strict=True)},
        "seconds": round(result.seconds, 3),
    }
    atomic_write_text(out / "metrics.json", json.dumps(_nan_to_none(report), indent=1) + "\n")
    atomic_write_text(out / "metrics.txt", res.table(result.title()) + "\n")
    cfg.save(out / "config.yaml")
    return result


# ------------------------------------------------------------------------------------- CLI


__all__ = [
    "ClassifierScores",
    "FoldScores",
    "SlideEmbeddings",
    "SlideEvalResult",
    "SlideKnnConfig",
    "SlideKnnResult",
    "evaluate_slides",
    "load_slide_embeddings",
    "plot_folds",
    "read_labels",
    "run_slide_knn",
]
