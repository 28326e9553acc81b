"""DINO and NT-Xent losses against hand computations with plain numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pathflow.train.losses import DINOLoss, NTXentLoss


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def dino_loss_by_hand(
    student: np.ndarray,  # [ncrops, B, K]
    teacher: np.ndarray,  # [2, B, K]
    center: np.ndarray,  # [K]
    t_temp: float,
    s_temp: float,
) -> float:
    ncrops, batch, _ = student.shape
    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            pair = 0.0
            for b in range(batch):
                p = _softmax((teacher[iq, b] - center) / t_temp)
                logq = _log_softmax(student[v, b] / s_temp)
                pair += -(p * logq).sum()
            total += pair / batch
            terms += 1
    return total / terms


def test_dino_loss_matches_hand_computation_and_updates_centre() -> None:
    rng = np.random.default_rng(0)
    ncrops, batch, k = 4, 3, 5
    student = rng.normal(size=(ncrops, batch, k)).astype(np.float32)
    teacher = rng.normal(size=(2, batch, k)).astype(np.float32)
    temps = np.array([0.04, 0.055, 0.07])
    loss_fn = DINOLoss(out_dim=k, teacher_temps=temps, student_temp=0.1, center_momentum=0.9)

    s = torch.from_numpy(student.reshape(ncrops * batch, k))
    t = torch.from_numpy(teacher.reshape(2 * batch, k))
    got = loss_fn(s, t, step=1)
    expected = dino_loss_by_hand(student, teacher, np.zeros(k), t_temp=0.055, s_temp=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)

    # centre: 0.9 * 0 + 0.1 * mean of the teacher outputs over the batch
    centre = 0.1 * teacher.reshape(2 * batch, k).mean(axis=0)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], centre, rtol=1e-5, atol=1e-7)

    # the next call uses that centre; steps past the schedule keep its last temperature
    got2 = loss_fn(s, t, step=10)
    expected2 = dino_loss_by_hand(student, teacher, centre, t_temp=0.07, s_temp=0.1)
    assert got2.item() == pytest.approx(expected2, rel=1e-5)
    centre2 = 0.9 * centre + 0.1 * teacher.reshape(2 * batch, k).mean(axis=0)
    np.testing.assert_allclose(loss_fn.center.numpy()[0], centre2, rtol=1e-5, atol=1e-7)


def test_dino_loss_gradient_flows_to_student_only() -> None:
    loss_fn = DINOLoss(out_dim=6, teacher_temps=[0.04])
    s = torch.randn(8, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    loss_fn(s, t, 0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def ntxent_by_hand(a: np.ndarray, b: np.ndarray, temperature: float) -> float:
    """SimCLR: 2N anchors, one positive each, 2N - 2 negatives, mean over anchors."""
    z = np.concatenate([a, b]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = i + n if i < n else i - n
        denom = 0.0
        for k in range(n2):
            if k != i:
                denom += math.exp(float(z[i] @ z[k]) / temperature)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / temperature) / denom)
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_matches_hand_computation(temperature: float) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 7)).astype(np.float32)
    b = rng.normal(size=(5, 7)).astype(np.float32)
    got = NTXentLoss(temperature)(torch.from_numpy(a), torch.from_numpy(b))
    assert got.item() == pytest.approx(ntxent_by_hand(a, b, temperature), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_ntxent_closed_form_for_orthogonal_pairs(temperature: float) -> None:
    """N orthonormal images, both views identical: each anchor's positive has similarity 1,
    its 2N - 2 negatives 0, so the loss is log(1 + (2N - 2) exp(-1 / t)) exactly."""
    n = 4
    z = torch.eye(n, 8)
    got = NTXentLoss(temperature)(z, z.clone()).item()
    want = math.log(1 + (2 * n - 2) * math.exp(-1 / temperature))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    # invariant to the scale of the embeddings (cosine similarity) and to batch order
    perm = torch.tensor([2, 0, 3, 1])
    assert NTXentLoss(temperature)(5 * z[perm], 0.5 * z[perm]).item() == pytest.approx(got)


def test_dino_loss_closed_form_uniform_teacher() -> None:
    """A constant teacher output gives a uniform target over K prototypes; a constant student
    output gives a uniform prediction: the cross-entropy is log K for every pair."""
    k = 7
    loss = DINOLoss(out_dim=k, teacher_temps=[0.04])(torch.zeros(4 * 3, k), torch.ones(2 * 3, k), 0)
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)


def test_ntxent_perfect_pairs_beat_random_pairs_and_rejects_bad_temperature() -> None:
    a = torch.randn(16, 8)
    assert NTXentLoss(0.1)(a, a) < NTXentLoss(0.1)(a, torch.randn(16, 8))
    with pytest.raises(ValueError):
        NTXentLoss(0.0)
