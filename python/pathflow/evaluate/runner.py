"""Driver of ``pathflow eval knn|linear``: embed a labelled dataset, classify, report.

Writes into ``out``: ``features/{data,train,test}.h5`` (cached features, reused while the
model and the files are unchanged), ``<method>/metrics.json`` and ``<method>/metrics.txt``
(accuracy, balanced accuracy, macro F1, macro one-vs-rest AUC, per-class table, confusion
matrix), ``<method>/config.yaml`` and ``tsne_test.png`` (t-SNE of the test embedding).

Example:
    >>> from pathflow.evaluate import EvalConfig, run_eval
    >>> cfg = EvalConfig.build({}, {"method": "knn", "data": "crc",
    ...                             "arch": "resnet50"})  # doctest: +SKIP
    >>> result = run_eval(cfg)  # doctest: +SKIP
    >>> print(result.metrics.table())  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathflow.evaluate.config import EvalConfig
from pathflow.evaluate.dataset import (
    LabelledFeatures,
    LabelledImages,
    embed_labelled,
    load_cache,
    save_cache,
    scan_labelled,
)
from pathflow.evaluate.groups import ImageGroups, image_groups
from pathflow.evaluate.metrics import ClassificationMetrics, classification_metrics
from pathflow.evaluate.splits import grouped_split, stratified_split
from pathflow.exceptions import ConfigError
from pathflow.extract.engine import Decoder
from pathflow.outputs import atomic_path

log = logging.getLogger("pathflow.eval")


@dataclass
class EvalResult:
    """Metrics of the test split and where the outputs went."""

    method: str
    metrics: ClassificationMetrics
    out: Path
    metrics_path: Path
    plot_path: Path | None
    n_train: int
    n_test: int
    seconds: float
    params: dict[str, Any]

    def summary(self) -> str:
        return (
            f"{self.metrics.table(f'{self.method} ({self.n_train} train / {self.n_test} test)')}"
            f"\n-> {self.metrics_path}"
            + (f", {self.plot_path}" if self.plot_path else "")
            + f" ({self.seconds:.1f} s)"
        )


class _LazyEmbedder:
    """Loads the backbone only when some features are not cached."""

    def __init__(
        self, cfg: EvalConfig, decoder: Decoder | None, weights_sha256: str | None = None
    ) -> None:
        self.cfg = cfg
        self.decoder = decoder
        self.weights_sha256 = weights_sha256
        self._embedder: Any = None

    def get(self) -> Any:
        if self._embedder is None:
            from pathflow.extract.engine import Embedder
            from pathflow.extract.model import load_extractor

            c = self.cfg
            bb = load_extractor(str(c.arch), c.weights, c.pretrained, c.image_size, c.norm,
                                c.device, weights_sha256=self.weights_sha256,
                                precision=c.precision, compile=c.compile)  # fmt: skip
            self._embedder = Embedder(bb, c.batch_size, c.workers, decoder=self.decoder)
        return self._embedder


def _features(
    name: str, data: LabelledImages, model_key: dict[str, Any], lazy: _LazyEmbedder,
    out: Path, progress: bool | None,
) -> tuple[LabelledFeatures, bool]:  # fmt: skip
    key = json.dumps({"model": model_key, "data": data.fingerprint()}, sort_keys=True)
    fingerprint = hashlib.sha1(key.encode()).hexdigest()
    path = out / "features" / f"{name}.h5"
    cached = load_cache(path, fingerprint)
    if cached is not None:
        log.info("%s: reusing cached features %s", data.root, path)
        return cached, True
    emb = lazy.get()
    feats = embed_labelled(data, emb, progress, desc=f"embed {name}")
    save_cache(path, feats, fingerprint, emb.backbone.attrs())
    return feats, False


def run_eval(
    cfg: EvalConfig, progress: bool | None = None, decoder: Decoder | None = None
) -> EvalResult:
    """Run one evaluation (see the module docstring)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    model_key = cfg.model_key()  # hashes the weights file: once per run
    lazy = _LazyEmbedder(cfg, decoder, model_key["weights_sha256"])
    split: dict[str, Any]
    train_groups: list[str] | None = None
    if cfg.data is not None:
        data = scan_labelled(cfg.data, max_per_class=cfg.max_per_class, seed=cfg.seed)
        _need_two_classes(data.classes, cfg.data, cfg.method)
        allf, cached = _features("data", data, model_key, lazy, out, progress)
        groups = image_groups(cfg.data, allf.names, cfg.group_by, cfg.groups)
        tr, te, split = _split(allf, groups, cfg)
        train, test = allf.subset(tr), allf.subset(te)
        if groups is not None and split["kind"] == "grouped":
            train_groups = [groups.values[i] for i in tr]
        skipped = allf.skipped
    else:
        tr_data = scan_labelled(str(cfg.train), max_per_class=cfg.max_per_class, seed=cfg.seed)
        _need_two_classes(tr_data.classes, str(cfg.train), cfg.method)
        te_data = scan_labelled(str(cfg.test), tr_data.classes, cfg.max_per_class, cfg.seed)
        train, c1 = _features("train", tr_data, model_key, lazy, out, progress)
        test, c2 = _features("test", te_data, model_key, lazy, out, progress)
        cached = c1 and c2
        skipped = train.skipped + test.skipped
        split = _given_split(train, test, cfg)
        train_groups = split.pop("_train_groups", None)
    if len(train.labels) == 0 or len(test.labels) == 0:
        raise ValueError(f"empty split: {len(train.labels)} train, {len(test.labels)} test images")
    present = sorted({train.classes[c] for c in np.unique(train.labels).tolist()})
    if len(present) < 2:
        raise ConfigError(f"{cfg.data or cfg.train}: the training images hold {len(present)} "
                          f"class ({', '.join(present)}) once undecodable images are left "
                          f"out; {cfg.method} needs at least two")  # fmt: skip
    classes = train.classes
    n_classes = len(classes)
    params: dict[str, Any]
    if cfg.method == "knn":
        from pathflow.evaluate.knn import knn_classify

        res = knn_classify(train.features, train.labels, test.features, n_classes, cfg.k,
                           cfg.temperature, device=_device(cfg))  # fmt: skip
        pred, scores = res.predictions, res.scores
        params = {"k": min(cfg.k, len(train.labels)), "temperature": cfg.temperature}
    else:
        from pathflow.evaluate.linear import LinearProbeConfig, train_linear_probe

        pcfg = LinearProbeConfig(tuple(cfg.weight_decays), cfg.val_fraction, cfg.max_iter,
                                 cfg.seed)  # fmt: skip
        probe = train_linear_probe(train.features, train.labels, n_classes, pcfg, _device(cfg),
                                   groups=train_groups)  # fmt: skip
        scores = probe.predict_proba(test.features)
        pred = scores.argmax(1).astype(np.int64)
        params = {"weight_decay": probe.weight_decay, "sweep": probe.sweep,
                  "val_fraction": cfg.val_fraction, "max_iter": cfg.max_iter}  # fmt: skip
    metrics = classification_metrics(test.labels, pred, scores, classes)
    mdir = out / cfg.method
    report = {
        "method": cfg.method,
        "arch": cfg.arch,
        "weights": cfg.weights,
        "weights_sha256": model_key["weights_sha256"],
        "pretrained": cfg.pretrained,
        "classes": classes,
        "n_train": len(train.labels),
        "n_test": len(test.labels),
        "skipped_images": skipped,
        "split": split,
        "params": params,
        "metrics": metrics.to_dict(),
    }
    _write_text(mdir / "metrics.json", json.dumps(_nan_to_none(report), indent=1))
    table = metrics.table(f"{cfg.method} on {cfg.arch}: {len(train.labels)} train / "
                          f"{len(test.labels)} test images")  # fmt: skip
    _write_text(mdir / "metrics.txt", table + "\n")
    cfg.save(mdir / "config.yaml")
    plot_path = None
    if cfg.plot:
        plot_path = _plot(out, test, cfg, model_key, split, reuse=cached)
    else:
        _drop_stale_plot(out, _plot_key(test, cfg, model_key, split))
    return EvalResult(
        method=cfg.method,
        metrics=metrics,
        out=out,
        metrics_path=mdir / "metrics.json",
        plot_path=plot_path,
        n_train=len(train.labels),
        n_test=len(test.labels),
        seconds=time.perf_counter() - t0,
        params=params,
    )


def _need_two_classes(classes: list[str], root: str, method: str) -> None:
    """A one-class dataset scores 1.0 whatever the features: refused."""
    if len(classes) < 2:
        raise ConfigError(f"{root}: {len(classes)} class folder with images "
                          f"({', '.join(classes)}); {method} needs at least two classes "
                          "(ROOT/<class>/<image>)")  # fmt: skip


def _split(
    feats: LabelledFeatures, groups: ImageGroups | None, cfg: EvalConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Train/test indices of DATA and their record for metrics.json: grouped (each slide or
    patient on one side) when the groups are known, else random and stratified."""
    info: dict[str, Any] = {"data": str(cfg.data), "test_fraction": cfg.test_fraction,
                            "seed": cfg.seed, "group_by": cfg.group_by}  # fmt: skip
    if groups is not None:
        res = grouped_split(feats.labels, groups.values, cfg.test_fraction, cfg.seed)
        if res is not None:
            tr, te = res
            g = np.asarray(groups.values)
            info.update(kind="grouped", group_key=groups.key, group_source=groups.source,
                        groups={"train": len(set(g[tr].tolist())),
                                "test": len(set(g[te].tolist()))},
                        shared_groups=0, test_groups=sorted(set(g[te].tolist())))  # fmt: skip
            log.info("split by %s (%s): %d / %d %ss", groups.key, groups.source,
                     info["groups"]["train"], info["groups"]["test"], groups.key)  # fmt: skip
            return tr, te, info
        why = _ungroupable(feats, groups)
        if cfg.group_by != "auto":
            raise ConfigError(
                f"{cfg.data}: cannot split by {groups.key} with every class on both sides "
                f"({why}); use --group-by none for a random split"
            )
        log.warning("%s: cannot split by %s with every class on both sides (%s): random split, "
                    "patches of one %s are on both sides", cfg.data, groups.key, why,
                    groups.key)  # fmt: skip
        info["reason"] = f"cannot split by {groups.key}: {why}"
    else:
        info["reason"] = ("--group-by none" if cfg.group_by == "none"
                          else "no slide id for every image")  # fmt: skip
    tr, te = stratified_split(feats.labels, cfg.test_fraction, cfg.seed)
    info.update(kind="random", group_key=None, groups=None)
    if groups is not None:
        g = np.asarray(groups.values)
        info["group_key"] = groups.key
        info["shared_groups"] = len(set(g[tr].tolist()) & set(g[te].tolist()))
    return tr, te, info


def _ungroupable(feats: LabelledFeatures, groups: ImageGroups) -> str:
    g = np.asarray(groups.values)
    one = [feats.classes[c] for c in np.unique(feats.labels).tolist()
           if len(set(g[feats.labels == c].tolist())) < 2]  # fmt: skip
    if one:
        return (
            f"class(es) {', '.join(one)} come from one {groups.key} only; "
            f"{groups.count()} {groups.key}(s) in all"
        )
    return f"no fold of the {groups.count()} {groups.key}(s) holds every class on both sides"


def _given_split(
    train: LabelledFeatures, test: LabelledFeatures, cfg: EvalConfig
) -> dict[str, Any]:
    """Record of a --train/--test split; a warning when a slide is on both sides."""
    info: dict[str, Any] = {"kind": "given", "train": str(cfg.train), "test": str(cfg.test),
                            "group_by": cfg.group_by, "group_key": None,
                            "groups": None}  # fmt: skip
    gtr = image_groups(str(cfg.train), train.names, cfg.group_by, cfg.groups, warn=False)
    gte = image_groups(str(cfg.test), test.names, cfg.group_by, cfg.groups, warn=False)
    if gtr is None or gte is None:
        return info
    shared = sorted(set(gtr.values) & set(gte.values))
    info.update(group_key=gtr.key, group_source=gtr.source, shared_groups=len(shared),
                groups={"train": gtr.count(), "test": gte.count()},
                _train_groups=gtr.values)  # fmt: skip
    if shared:
        log.warning("%d %s(s) have images in both --train and --test (e.g. %s): the test "
                    "figures are optimistic", len(shared), gtr.key, shared[0])  # fmt: skip
    return info


def _plot(
    out: Path,
    test: LabelledFeatures,
    cfg: EvalConfig,
    model_key: dict[str, Any],
    split: dict[str, Any],
    reuse: bool,
) -> Path:
    """t-SNE of the test embedding; kept when the features and split are unchanged."""
    from pathflow.evaluate.plot import tsne_plot

    dest = out / "tsne_test.png"
    stamp = out / "tsne_test.json"
    key = _plot_key(test, cfg, model_key, split)
    if reuse and dest.is_file() and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == json.loads(json.dumps(key)):
                return dest
        except ValueError:
            pass
    title = f"{cfg.arch}: test embedding (t-SNE, {min(len(test.labels), cfg.plot_points)} points)"
    log.info("t-SNE of %d test embeddings", min(len(test.labels), cfg.plot_points))
    tsne_plot(test.features, test.labels, test.classes, dest, title, cfg.plot_points, cfg.seed)
    _write_text(stamp, json.dumps(key))
    return dest


def _plot_key(
    test: LabelledFeatures, cfg: EvalConfig, model_key: dict[str, Any], split: dict[str, Any]
) -> dict[str, Any]:
    return {"model": model_key, "split": split, "points": cfg.plot_points,
            "n": len(test.labels)}  # fmt: skip


def _drop_stale_plot(out: Path, key: dict[str, Any]) -> None:
    """``--no-plot``: a t-SNE plot left by a run of another model or split is removed (it
    would sit beside metrics it does not show)."""
    dest, stamp = out / "tsne_test.png", out / "tsne_test.json"
    if not dest.exists() and not stamp.exists():
        return
    try:
        if json.loads(stamp.read_text()) == json.loads(json.dumps(key)):
            return
    except (OSError, ValueError):
        pass
    log.warning("%s: removed, a plot of another model or split (--no-plot)", dest)
    dest.unlink(missing_ok=True)
    stamp.unlink(missing_ok=True)


def _device(cfg: EvalConfig) -> Any:
    from pathflow.extract.model import resolve_device

    return resolve_device(cfg.device)


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
