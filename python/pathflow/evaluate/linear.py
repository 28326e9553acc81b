"""Linear probe: multinomial logistic regression on frozen, standardised features.

Full-batch L-BFGS (strong Wolfe line search) minimises ``mean cross-entropy + wd/2 * ||W||²``
(bias not penalised; the same optimum as scikit-learn's ``LogisticRegression(C=1/(wd*n))``).
The weight decay is picked from a small sweep on a stratified validation split of the
training set (best balanced accuracy, ties to the stronger decay), then the probe is refit
on the whole training set.

Example:
    >>> import numpy as np
    >>> from pathflow.evaluate.linear import LinearProbeConfig, train_linear_probe
    >>> x = np.array([[0.0], [1.0], [4.0], [5.0]] * 5, np.float32)
    >>> y = np.array([0, 0, 1, 1] * 5)
    >>> probe = train_linear_probe(x, y, 2, LinearProbeConfig(weight_decays=(1e-3,)))
    >>> probe.predict(np.array([[0.5], [4.5]], np.float32)).tolist()
    [0, 1]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.evaluate.splits import grouped_split, stratified_split

log = logging.getLogger("pathflow.eval")

F32 = npt.NDArray[np.float32]


@dataclass
class LinearProbeConfig:
    """Weight decays swept, validation fraction, L-BFGS iterations, seed."""

    weight_decays: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    val_fraction: float = 0.2
    max_iter: int = 500
    seed: int = 0


@dataclass
class LinearProbe:
    """A fitted probe: standardisation (``mean``, ``std``) then ``x @ weight.T + bias``."""

    mean: F32
    std: F32
    weight: F32
    bias: F32
    weight_decay: float
    sweep: list[dict[str, float]] = field(default_factory=list)

    def logits(self, features: npt.ArrayLike) -> F32:
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        return np.asarray(x @ self.weight.T + self.bias, np.float32)

    def predict_proba(self, features: npt.ArrayLike) -> F32:
        """Softmax class probabilities (N, C)."""
        z = self.logits(features)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(1, keepdims=True), np.float32)

    def predict(self, features: npt.ArrayLike) -> npt.NDArray[np.int64]:
        return self.logits(features).argmax(1).astype(np.int64)


def fit_logistic(
    x: F32,
    y: npt.NDArray[np.int64],
    n_classes: int,
    weight_decay: float,
    max_iter: int = 500,
    init: tuple[F32, F32] | None = None,
    device: Any = None,
) -> tuple[F32, F32]:
    """Minimise mean CE + ``weight_decay``/2 ||W||² with full-batch L-BFGS; ``(W, b)``."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    xt = torch.as_tensor(x, dtype=torch.float32, device=dev)
    yt = torch.as_tensor(y, dtype=torch.int64, device=dev)
    d = xt.shape[1]
    if init is None:
        w = torch.zeros(n_classes, d, device=dev, requires_grad=True)
        b = torch.zeros(n_classes, device=dev, requires_grad=True)
    else:
        w = torch.tensor(init[0], device=dev, requires_grad=True)
        b = torch.tensor(init[1], device=dev, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.t() + b, yt)
        loss = loss + 0.5 * weight_decay * (w * w).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[no-untyped-call]
    return w.detach().cpu().numpy(), b.detach().cpu().numpy()


def _standardise(x: F32) -> tuple[F32, F32]:
    mean = x.mean(0).astype(np.float32)
    std = x.std(0).astype(np.float32)
    std[std < 1e-6] = 1.0
    return mean, std


def _balanced_accuracy(y: npt.NDArray[np.int64], pred: npt.NDArray[np.int64]) -> float:
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return float(np.mean(recalls)) if recalls else math.nan


def train_linear_probe(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    n_classes: int,
    config: LinearProbeConfig | None = None,
    device: Any = None,
    groups: Sequence[str] | None = None,
) -> LinearProbe:
    """Sweep the weight decay on a validation split, refit on all of ``features``.
    ``groups`` (a slide id per sample): the validation split keeps each group on one side
    (:func:`grouped_split`) where it can, else it is random and stratified."""
    cfg = config or LinearProbeConfig()
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features (N, D) and labels (N,) expected, got {x.shape}, {y.shape}")
    if not cfg.weight_decays:
        raise ValueError("at least one weight decay is needed")
    decays = sorted(cfg.weight_decays, reverse=True)  # strong -> weak, warm-started
    sweep: list[dict[str, float]] = []
    best = decays[0]
    if len(decays) > 1:
        res = grouped_split(y, list(groups), cfg.val_fraction, cfg.seed) if groups else None
        tr, va = res if res is not None else stratified_split(y, cfg.val_fraction, cfg.seed)
        if len(va) == 0 or len(np.unique(y[tr])) < 2:
            log.warning("linear probe: too few samples for a validation split; wd=%g", best)
        else:
            mean, std = _standardise(x[tr])
            xtr, xva = (x[tr] - mean) / std, (x[va] - mean) / std
            init: tuple[F32, F32] | None = None
            best_score = -1.0
            for wd in decays:
                init = fit_logistic(xtr, y[tr], n_classes, wd, cfg.max_iter, init, device)
                pred = (xva @ init[0].T + init[1]).argmax(1)
                score = _balanced_accuracy(y[va], pred)
                acc = float((pred == y[va]).mean())
                sweep.append({"weight_decay": wd, "val_balanced_accuracy": score, "val_acc": acc})
                log.info("linear probe wd=%g: val balanced accuracy %.4f", wd, score)
                if score > best_score + 1e-12:
                    best, best_score = wd, score
    mean, std = _standardise(x)
    w, b = fit_logistic((x - mean) / std, y, n_classes, best, cfg.max_iter, None, device)
    return LinearProbe(mean=mean, std=std, weight=w, bias=b, weight_decay=best, sweep=sweep)
