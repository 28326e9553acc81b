"""Linear probe (L-BFGS logistic regression) and stratified splits."""

from __future__ import annotations

import numpy as np
import pytest
from pathflow.evaluate.linear import LinearProbeConfig, fit_logistic, train_linear_probe
from pathflow.evaluate.splits import stratified_split


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs in 10-D (with a large constant offset)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[4, 0], [-4, 0], [0, 4]], np.float32)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 10)).astype(np.float32) * 0.5 + 100
    x[:, :2] += centres[y] * 1.0
    return x, y


def test_probe_separates_separable_data() -> None:
    x, y = blobs(300, 0)
    xt, yt = blobs(100, 1)
    probe = train_linear_probe(x, y, 3, LinearProbeConfig(weight_decays=(1e-1, 1e-3)))
    assert (probe.predict(x) == y).all()
    assert (probe.predict(xt) == yt).all()
    p = probe.predict_proba(xt)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    assert p[np.arange(100), yt].min() > 0.5
    assert [s["weight_decay"] for s in probe.sweep] == [1e-1, 1e-3]
    assert probe.weight_decay == 1e-1  # both perfect on validation: ties go to the stronger


def test_same_optimum_as_sklearn() -> None:
    lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(np.int64) + (x[:, 1] > 0.8)
    wd = 1e-2
    w, b = fit_logistic(x, y, 3, wd, max_iter=500)
    sk = lm.LogisticRegression(C=1 / (wd * len(x)), tol=1e-10, max_iter=5000).fit(x, y)
    ours = np.exp(x @ w.T + b)
    ours /= ours.sum(1, keepdims=True)
    np.testing.assert_allclose(ours, sk.predict_proba(x), atol=2e-4)


def test_stronger_decay_shrinks_weights() -> None:
    x, y = blobs(200, 2)
    x = (x - x.mean(0)) / x.std(0)
    norms = [float(np.linalg.norm(fit_logistic(x, y, 3, wd)[0])) for wd in (1e-3, 1e-1, 1.0)]
    assert norms[0] > norms[1] > norms[2]


def test_stratified_split_counts_and_seed() -> None:
    y = np.array([0] * 10 + [1] * 5 + [2] * 1)
    tr, te = stratified_split(y, 0.2, seed=3)
    assert np.intersect1d(tr, te).size == 0 and np.union1d(tr, te).tolist() == list(range(16))
    # round(0.2 * 10) = 2, round(0.2 * 5) = 1, a single-sample class stays in train
    assert np.bincount(y[te], minlength=3).tolist() == [2, 1, 0]
    assert stratified_split(y, 0.2, seed=3)[1].tolist() == te.tolist()
    assert stratified_split(y, 0.2, seed=4)[1].tolist() != te.tolist()
    with pytest.raises(ValueError):
        stratified_split(y, 1.0)
