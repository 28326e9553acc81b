"""CluSiam / CluBYOL: the cluster term against a numpy hand computation, its straight-through
gradient, the fresh Gumbel noise and the cluster-count monitors; both methods' total loss on
a fixed batch (fixed noise) against numpy, and overfitting one real batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pathflow.data import create_views, make_loader
from pathflow.train import TrainConfig
from pathflow.train.heads.cluster_head import ClusterHead
from pathflow.train.losses.cluster_loss import ClusterLoss
from pathflow.train.trainer import build_method, build_optimizer, set_schedules

# 7 rows (both views stacked), K = 5 clusters; with this noise cluster 4 stays empty.
Z = np.array(
    [
        [1.0, 2.0, 0.5],
        [0.3, -1.0, 2.0],
        [2.0, 0.1, -0.4],
        [-1.0, 1.0, 1.0],
        [0.5, 0.5, -2.0],
        [1.5, -0.2, 0.7],
        [-0.3, 2.2, -1.1],
    ]
)
LOGITS = np.array(
    [
        [2.0, 0.1, 0.0, -1.0, 0.5],
        [0.0, 1.5, 0.2, 0.1, 0.3],
        [0.1, 0.0, 1.0, 0.4, -0.5],
        [1.0, 1.1, 0.0, 0.0, 0.2],
        [0.0, 0.0, 0.0, 3.0, 0.0],
        [0.2, 0.3, 0.1, 0.0, 0.1],
        [1.2, -0.3, 0.4, 0.9, 0.0],
    ]
)
NOISE = np.array(
    [
        [0.1, 0.3, -0.2, 0.0, 0.4],
        [0.5, 0.2, 0.0, 0.1, -0.3],
        [0.0, 0.0, 0.3, -0.1, 0.2],
        [0.9, 0.1, 0.0, 0.3, 0.0],
        [0.2, 0.0, 0.1, 0.0, 0.1],
        [0.0, 0.0, 0.8, 0.1, 0.0],
        [-0.5, 0.1, 0.0, 0.2, -0.2],
    ]
)


def _hand_cluster_loss(
    z: np.ndarray, logits: np.ndarray, noise: np.ndarray
) -> tuple[float, int, int]:
    """Loops: labels from argmax(logits + noise) (= argmax of the softmax), centroid of each
    used cluster = normalise(mean of the unit rows), mean cosine over distinct pairs."""
    labels = [int(np.argmax(logits[i] + noise[i])) for i in range(len(z))]
    unit = [row / np.linalg.norm(row) for row in z]
    centroids = {}
    for k in sorted(set(labels)):
        members = [unit[i] for i in range(len(z)) if labels[i] == k]
        c = sum(members) / len(members)
        centroids[k] = c / np.linalg.norm(c)
    keys = sorted(centroids)
    if len(keys) < 2:
        return 1.0, len({int(np.argmax(row)) for row in logits}), len(keys)
    cos = [
        float(np.dot(centroids[a], centroids[b])) for i, a in enumerate(keys) for b in keys[i + 1 :]
    ]
    plain = len({int(np.argmax(row)) for row in logits})
    return float(np.mean(cos)), plain, len(keys)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def test_cluster_loss_matches_hand_computation() -> None:
    expected, plain, used = _hand_cluster_loss(Z, LOGITS, NOISE)
    labels = np.argmax(LOGITS + NOISE, axis=1)
    assert 4 not in labels and used == 4  # one empty cluster, left out
    out = ClusterLoss()(_t(Z), _t(LOGITS), noise=_t(NOISE))
    assert abs(float(out.loss) - expected) < 1e-5
    assert int(out.clusters_used) == plain == 4  # argmax of the logits: 0, 1, 2, 3
    assert int(out.clusters_used_gumbel) == used
    # temperature does not move the argmax, so not the loss value either
    assert (
        abs(float(ClusterLoss(tau=0.3)(_t(Z), _t(LOGITS), noise=_t(NOISE)).loss) - expected) < 1e-5
    )


def test_single_cluster_gives_one_without_gradient() -> None:
    logits = torch.zeros(4, 3, requires_grad=True)
    noise = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    out = ClusterLoss()(torch.randn(4, 5), logits, noise=noise)
    assert float(out.loss.detach()) == 1.0 and int(out.clusters_used_gumbel) == 1
    out.loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_straight_through_gradient_reaches_assigner_not_z() -> None:
    torch.manual_seed(0)
    upstream = torch.nn.Linear(6, 8)
    head = ClusterHead(8, hidden_dim=16, num_clusters=5)
    x = torch.randn(12, 6)
    z = upstream(x)
    z.retain_grad()
    logits = head(z.detach()) + 0.0 * z.sum()  # z only reaches the loss via the term's Z
    out = ClusterLoss()(z, logits, noise=_t(np.tile(NOISE, (2, 1))[:12]))
    out.loss.backward()
    assert head.assigner.weight.grad is not None
    assert float(head.assigner.weight.grad.abs().sum()) > 0
    assert head.projector[0].weight.grad is not None
    assert float(head.projector[0].weight.grad.abs().sum()) > 0
    # Z is a constant of the term: nothing flows back into it
    assert z.grad is None or torch.all(z.grad == 0)
    assert upstream.weight.grad is None or torch.all(upstream.weight.grad == 0)


def test_straight_through_gradient_is_that_of_the_soft_assignment() -> None:
    """d loss / d logits = J_softmax^T (d loss / d H) with d loss / d H by finite differences
    of the centroid formula in numpy (H continuous, one-hot at the evaluation point)."""
    z, logits, noise = Z, LOGITS, NOISE
    labels = np.argmax(logits + noise, axis=1)
    hard = np.eye(5)[labels]
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    used = sorted(set(labels.tolist()))

    def f(h: np.ndarray) -> float:
        cents = []
        for k in used:
            c = h[:, k] @ unit / max(h[:, k].sum(), 1.0)
            cents.append(c / np.linalg.norm(c))
        return float(
            np.mean(
                [cents[a] @ cents[b] for a in range(len(used)) for b in range(a + 1, len(used))]
            )
        )

    d_h = np.zeros_like(hard)
    for i in range(hard.shape[0]):
        for k in range(hard.shape[1]):
            step = np.zeros_like(hard)
            step[i, k] = 1e-6
            d_h[i, k] = (f(hard + step) - f(hard - step)) / 2e-6
    y = logits + noise
    s = np.exp(y - y.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    expected = np.stack([(np.diag(s[i]) - np.outer(s[i], s[i])) @ d_h[i] for i in range(len(s))])
    lt = _t(logits).requires_grad_(True)
    ClusterLoss()(_t(z), lt, noise=_t(noise)).loss.backward()
    assert lt.grad is not None
    np.testing.assert_allclose(lt.grad.numpy(), expected, atol=1e-4)


def test_gumbel_noise_is_fresh_every_call() -> None:
    torch.manual_seed(0)
    z, logits = torch.randn(32, 8), torch.zeros(32, 100)
    loss = ClusterLoss()
    a, b = loss(z, logits), loss(z, logits)
    assert float(a.loss) != float(b.loss)
    # a seeded generator makes the draws reproducible
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c, d = ClusterLoss(generator=g1)(z, logits), ClusterLoss(generator=g2)(z, logits)
    assert float(c.loss) == float(d.loss)


def test_monitors_count_clusters_with_and_without_noise() -> None:
    logits = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    # noise moves row 1 to cluster 3 and row 3 to cluster 1: {0, 3, 1} -> 3 used with noise
    noise = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 9.0], [0, 0, 0, 0], [0, 9.0, 0, 0]])
    out = ClusterLoss()(torch.randn(4, 3), logits, noise=noise)
    assert out.clusters_used.ndim == 0 and out.clusters_used_gumbel.ndim == 0
    assert int(out.clusters_used) == 3  # {0, 1, 2}
    assert int(out.clusters_used_gumbel) == 3  # {0, 3, 1}
    noise2 = torch.zeros(4, 4)
    noise2[0, 3] = 9.0  # rows to {3, 2, 1, 2}: 3 clusters in use
    noise2[1, 2] = 9.0
    out2 = ClusterLoss()(torch.randn(4, 3), logits, noise=noise2)
    assert int(out2.clusters_used_gumbel) == 3  # {3, 2, 1}


def test_cluster_term_alone_is_minimised_through_the_assignments() -> None:
    """A cluster head trained on the term alone, on fixed Z (4 blobs) and fixed noise: the
    straight-through gradient moves the assignments until the centroids spread out."""
    torch.manual_seed(0)
    centers = torch.randn(4, 16) * 3
    z = centers.repeat_interleave(8, 0) + torch.randn(32, 16)
    noise = -torch.empty(32, 8).exponential_().log()
    head = ClusterHead(16, 16, 8)
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    loss, values = ClusterLoss(), []
    for _ in range(30):
        out = loss(z, head(z), noise=noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        values.append(float(out.loss.detach()))
    assert values[-1] < 0.5 * values[0], values


# ------------------------------------------------------------------------------ methods
CPU = torch.device("cpu")
SMALL: dict[str, Any] = {
    "proj_hidden_dim": 32,
    "proj_dim": 16,
    "pred_hidden_dim": 8,
    "cluster_hidden_dim": 8,
    "num_clusters": 6,
}


def _cfg(method: str, shards: Path | None = None, **options: Any) -> TrainConfig:
    extra = {"data": str(shards)} if shards is not None else {}
    cfg = TrainConfig(
        method=method, arch="test_vit", img_size=32, steps=10, drop_path_rate=0.0,
        device="cpu", batch_size=8, options={**SMALL, **options}, **extra,
    )  # fmt: skip
    return cfg.resolve()


def _cos_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i), with loops."""
    return float(
        np.mean(
            [a[i] @ b[i] / (np.linalg.norm(a[i]) * np.linalg.norm(b[i])) for i in range(len(a))]
        )
    )


def test_registered_with_reference_defaults() -> None:
    from pathflow.train.methods import list_methods

    assert {"clusiam", "clubyol"} <= set(list_methods())
    siam = TrainConfig(method="clusiam", steps=10).resolve().options
    assert (siam.alpha, siam.num_clusters, siam.gumbel_tau) == (0.5, 100, 1.0)
    byol = TrainConfig(method="clubyol", steps=10).resolve()
    assert (byol.options.alpha, byol.options.num_clusters) == (0.9, 100)
    assert (byol.options.momentum, byol.options.momentum_schedule) == (0.99, "constant")
    from pathflow.exceptions import ConfigError

    with pytest.raises(ConfigError, match="alpha"):
        TrainConfig(method="clusiam", steps=10, options={"alpha": 1.5}).resolve()


@pytest.mark.parametrize("name", ["clusiam", "clubyol"])
def test_total_is_alpha_weighted_sum_on_a_fixed_batch(name: str) -> None:
    """loss = alpha * cluster + (1 - alpha) * invariance with the reference's invariance
    (CluSiam: -(cos(p1, z2) + cos(p2, z1)); CluBYOL: 2 - cos(p1, t2) - cos(p2, t1)) and the
    cluster term by hand, the Gumbel noise fixed by a seeded generator."""
    alpha = 0.3
    method = build_method(_cfg(name, alpha=alpha), CPU)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    method.cluster_loss.generator = torch.Generator().manual_seed(7)  # type: ignore[union-attr]
    out = method(views, step=0)
    with torch.no_grad():  # the same forward passes again (train-mode BN: batch statistics)
        z1, z2 = method.online([views[0]]), method.online([views[1]])
        p1, p2 = method.predictor(z1), method.predictor(z2)
        head = method.cluster_head
        logits = torch.cat([head(z1), head(z2)]).numpy()
        if name == "clusiam":
            inv = -(_cos_rows(p1.numpy(), z2.numpy()) + _cos_rows(p2.numpy(), z1.numpy()))
        else:
            t1, t2 = method.target([views[0]]), method.target([views[1]])
            inv = 2 - _cos_rows(p1.numpy(), t2.numpy()) - _cos_rows(p2.numpy(), t1.numpy())
    e = torch.empty(8, 6).exponential_(generator=torch.Generator().manual_seed(7))
    noise = (-e.log()).numpy()
    cluster, plain, used = _hand_cluster_loss(torch.cat([z1, z2]).numpy(), logits, noise)
    assert float(out["invariance_loss"]) == pytest.approx(inv, abs=1e-5)
    assert float(out["cluster_loss"]) == pytest.approx(cluster, abs=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(
        alpha * cluster + (1 - alpha) * inv, abs=1e-5
    )
    assert int(out["clusters_used"]) == plain and int(out["clusters_used_gumbel"]) == used


@pytest.mark.parametrize("name", ["clusiam", "clubyol"])
def test_overfits_one_real_batch(name: str, sample_shards: Path) -> None:
    """One batch of real patches, the Gumbel noise re-seeded every step (a fixed objective):
    the total loss and the invariance term go down. The cluster term's value only moves when
    an argmax flips (and with the drift of the detached Z), so over a few steps it is the
    invariance term that drives the total; the cluster term's own descent is tested above."""
    cfg = _cfg(name, sample_shards)
    loader = make_loader(
        sample_shards, views=create_views("simclr", global_size=32), batch_size=8,
        backend="torch", num_workers=0, device="cpu",
    )  # fmt: skip
    batch = next(iter(loader))
    method = build_method(cfg, CPU)
    opt = build_optimizer(method, cfg, CPU)
    losses, invariance = [], []
    for step in range(16):
        set_schedules(opt, 1e-2, 0.0)
        method.cluster_loss.generator = torch.Generator().manual_seed(0)  # type: ignore[union-attr]
        out = method(batch.views, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(step)
        losses.append(out["loss"].item())
        invariance.append(float(out["invariance_loss"]))
    assert all(np.isfinite(losses))
    assert min(losses[-4:]) < losses[0], losses
    assert invariance[-1] < invariance[0] - 0.1, invariance
