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
from pathflow.evaluate.metrics import ClassificationMetrics, classification_metrics
from pathflow.evaluate.splits import stratified_split
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
                                c.device, weights_sha256=self.weights_sha256)  # fmt: skip
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
    if cfg.data is not None:
        data = scan_labelled(cfg.data, max_per_class=cfg.max_per_class, seed=cfg.seed)
        allf, cached = _features("data", data, model_key, lazy, out, progress)
        tr, te = stratified_split(allf.labels, cfg.test_fraction, cfg.seed)
        train, test = allf.subset(tr), allf.subset(te)
        skipped = allf.skipped
        split = {"data": str(cfg.data), "test_fraction": cfg.test_fraction, "seed": cfg.seed}
    else:
        tr_data = scan_labelled(str(cfg.train), max_per_class=cfg.max_per_class, seed=cfg.seed)
        te_data = scan_labelled(str(cfg.test), tr_data.classes, cfg.max_per_class, cfg.seed)
        train, c1 = _features("train", tr_data, model_key, lazy, out, progress)
        test, c2 = _features("test", te_data, model_key, lazy, out, progress)
        cached = c1 and c2
        skipped = train.skipped + test.skipped
        split = {"train": str(cfg.train), "test": str(cfg.test)}
    if len(train.labels) == 0 or len(test.labels) == 0:
        raise ValueError(f"empty split: {len(train.labels)} train, {len(test.labels)} test images")
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
        probe = train_linear_probe(train.features, train.labels, n_classes, pcfg, _device(cfg))
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
    key = {
        "model": model_key,
        "split": split,
        "points": cfg.plot_points,
        "n": len(test.labels),
    }
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
