"""Collapse monitors (pathflow.train.monitors) on closed forms, and their values in the
outputs of SimCLR and DINO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pathflow.train import TrainConfig, create_backbone, create_method
from pathflow.train.monitors import cluster_usage, effective_rank, embedding_std


def test_collapsed_embeddings_have_zero_std_and_rank_one() -> None:
    z = torch.tensor([[0.3, -1.2, 2.0, 0.5, 0.1]]).repeat(8, 1)
    assert float(embedding_std(z)) == pytest.approx(0.0, abs=1e-6)
    # one non-zero singular value: p = (1 + eps, eps, ...), exp(entropy) = 1 up to ~1e-5
    assert float(effective_rank(z)) == pytest.approx(1.0, abs=1e-4)
    assert float(effective_rank(5.0 * z)) == pytest.approx(1.0, abs=1e-4)


def test_orthonormal_rows() -> None:
    """Rows of the d x d identity: each column holds one 1 and d - 1 zeros, mean 1/d, sum of
    squared deviations (1 - 1/d)^2 + (d - 1)/d^2 = (d - 1)/d, unbiased variance 1/d: the
    std is 1/sqrt(d) in every dimension. All d singular values are 1: p = 1/d, rank d."""
    d = 6
    assert float(embedding_std(torch.eye(d))) == pytest.approx(1 / math.sqrt(d), rel=1e-6)
    assert float(effective_rank(torch.eye(d))) == pytest.approx(d, rel=1e-5)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    assert float(effective_rank(q.T)) == pytest.approx(d, rel=1e-5)  # any orthonormal rows


def test_effective_rank_of_known_singular_values() -> None:
    """Singular values (3, 1): p = (3/4, 1/4), RankMe = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) =
    (3/4)^(-3/4) (1/4)^(-1/4); no centring (the rows' mean is not removed)."""
    z = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = 0.75**-0.75 * 0.25**-0.25
    assert float(effective_rank(z)) == pytest.approx(expected, rel=1e-5)
    # against numpy's SVD on a random matrix, entropy summed in a loop
    a = np.random.default_rng(0).normal(size=(7, 4))
    s = np.linalg.svd(a, compute_uv=False)
    h = 0.0
    for sk in s:
        p = sk / s.sum() + 1e-7
        h -= p * math.log(p)
    assert float(effective_rank(torch.from_numpy(a))) == pytest.approx(math.exp(h), rel=1e-5)


def test_monitors_are_float32_scalars_without_gradient() -> None:
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for value in (embedding_std(z), effective_rank(z), embedding_std(z.bfloat16())):
        assert value.shape == () and value.dtype == torch.float32 and not value.requires_grad
    # healthy random directions: std near 1/sqrt(d)
    assert 0.5 / 4 < float(embedding_std(z)) < 1.5 / 4


def test_cluster_usage() -> None:
    k = 8
    entropy, used = cluster_usage(torch.arange(k).repeat(3), k)
    assert float(entropy) == pytest.approx(math.log(k)) and int(used) == k
    entropy, used = cluster_usage(torch.zeros(10, dtype=torch.long), k)
    assert float(entropy) == 0.0 and int(used) == 1
    entropy, used = cluster_usage(torch.tensor([5, 5, 2, 2]), k)
    assert float(entropy) == pytest.approx(math.log(2)) and int(used) == 2
    # scores [N, k]: the argmax is the cluster (one-hot to cluster 3 -> one cluster used)
    entropy, used = cluster_usage(torch.nn.functional.one_hot(torch.full((6,), 3), k), k)
    assert float(entropy) == 0.0 and int(used) == 1
    probs = torch.eye(k).repeat(2, 1) * 0.5 + 0.5 / k  # uniform argmax over the k clusters
    entropy, used = cluster_usage(probs, k)
    assert float(entropy) == pytest.approx(math.log(k)) and int(used) == k


def _capture(module: torch.nn.Module, store: list[torch.Tensor]) -> None:
    module.register_forward_hook(lambda m, inp, out: store.append(out.detach()))


def test_simclr_logs_monitors_of_its_projections() -> None:
    torch.manual_seed(0)
    net, dim = create_backbone("test_resnet")
    cfg = TrainConfig(
        method="simclr", arch="test_resnet", steps=2,
        options={"proj_hidden_dim": 16, "proj_dim": 8},
    ).resolve()  # fmt: skip
    simclr = create_method("simclr", net, dim, cfg)
    z: list[torch.Tensor] = []
    _capture(simclr.encoder, z)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    out = simclr(views, step=0)
    assert out["embed_std"].shape == () and out["eff_rank"].shape == ()
    assert float(out["embed_std"]) == pytest.approx(float(embedding_std(z[0])))
    assert float(out["eff_rank"]) == pytest.approx(float(effective_rank(z[0])))
    assert 1.0 <= float(out["eff_rank"]) <= 8.0 + 1e-3  # at most min(2B, proj_dim)


def test_dino_logs_monitors_of_the_teacher_backbone_features() -> None:
    torch.manual_seed(0)
    net, dim = create_backbone("test_vit")
    cfg = TrainConfig(method="dino", arch="test_vit", steps=2, options={"out_dim": 32})
    dino = create_method("dino", net, dim, cfg.resolve())
    feats: list[torch.Tensor] = []
    _capture(dino.teacher.backbone, feats)
    views = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16)] * 2
    out = dino(views, step=0)
    assert feats[0].shape == (6, dim)  # the two global views of the batch
    assert float(out["embed_std"]) == pytest.approx(float(embedding_std(feats[0])))
    assert float(out["eff_rank"]) == pytest.approx(float(effective_rank(feats[0])))
    assert dino._teacher_feats is None  # nothing kept between steps
    out["loss"].backward()
