"""Distillation losses against NumPy re-implementations of the papers (CompRess/DisCo, SEED)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edge_ssl.compress.losses import FeatureRegressionLoss, SEEDLoss, distill_head

from edge_ssl.errors import ConfigError
from tests.conftest import ATOL, RTOL


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def feature_reference(p: np.ndarray, t: np.ndarray) -> float:
    """CompRess/DisCo regression: mean of 1 - cos(projected student, teacher)."""
    return float(np.mean(1 - np.sum(_unit(p) * _unit(t), axis=1)))


def seed_reference(s: np.ndarray, t: np.ndarray, queue: np.ndarray, tau_s: float, tau_t: float) -> float:
    """SEED Eq. 2-4: anchors = queue plus the sample's own teacher embedding; cross entropy."""
    s, t = _unit(s), _unit(t)
    total = 0.0
    for i in range(len(s)):
        anchors = np.concatenate([queue, t[i : i + 1]])
        p_t = _softmax((anchors @ t[i])[None] / tau_t)[0]
        p_s = _softmax((anchors @ s[i])[None] / tau_s)[0]
        total += -np.sum(p_t * np.log(p_s))
    return total / len(s)


def test_feature_regression_matches_reference():
    rng = np.random.default_rng(0)
    p, t = rng.standard_normal((6, 16)), rng.standard_normal((6, 16))
    got = FeatureRegressionLoss()(torch.from_numpy(p), torch.from_numpy(t))
    np.testing.assert_allclose(got.item(), feature_reference(p, t), rtol=RTOL, atol=ATOL)


def test_feature_regression_is_zero_for_aligned_and_two_for_opposite():
    t = torch.randn(4, 8, dtype=torch.float64)
    loss = FeatureRegressionLoss()
    assert loss(3 * t, t).item() == pytest.approx(0.0, abs=ATOL)
    assert loss(-t, t).item() == pytest.approx(2.0, abs=ATOL)


def test_seed_matches_reference_and_enqueues_teacher_embeddings():
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((5, 12)), rng.standard_normal((5, 12))
    criterion = SEEDLoss(12, queue_size=8, student_temperature=0.2, teacher_temperature=0.05).double()
    queue = criterion.queue.numpy().copy()
    got = criterion(torch.from_numpy(s), torch.from_numpy(t))
    np.testing.assert_allclose(got.item(), seed_reference(s, t, queue, 0.2, 0.05), rtol=RTOL, atol=ATOL)
    # The batch's teacher embeddings (normalized) replaced the oldest queue entries.
    np.testing.assert_allclose(criterion.queue.numpy()[:5], _unit(t), rtol=RTOL, atol=ATOL)
    assert int(criterion.pointer) == 5
    criterion(torch.from_numpy(s), torch.from_numpy(t))  # wraps around the 8-long queue
    assert int(criterion.pointer) == 2


def test_seed_with_student_equal_teacher_and_same_temperature_is_the_teacher_entropy():
    # Cross entropy H(p, q) equals the entropy H(p) exactly when q = p.
    rng = np.random.default_rng(2)
    t = rng.standard_normal((4, 10))
    criterion = SEEDLoss(10, queue_size=6, student_temperature=0.1, teacher_temperature=0.1).double().eval()
    queue = _unit(criterion.queue.numpy())
    got = criterion(torch.from_numpy(t), torch.from_numpy(t)).item()
    entropy = 0.0
    for row in _unit(t):
        p = _softmax((np.concatenate([queue, row[None]]) @ row)[None] / 0.1)[0]
        entropy -= np.sum(p * np.log(p))
    assert got == pytest.approx(entropy / 4, rel=RTOL)
    assert int(criterion.pointer) == 0  # eval mode never touches the queue


def test_gradients_reach_the_student_only():
    s = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    (FeatureRegressionLoss()(s, t) + SEEDLoss(8, queue_size=4)(s, t)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_head_maps_student_dim_to_teacher_dim_and_shapes_are_checked():
    head = distill_head(32, 64, hidden_dim=16)
    assert head(torch.randn(3, 32)).shape == (3, 64)
    with pytest.raises(ConfigError, match="same shape"):
        FeatureRegressionLoss()(torch.randn(3, 32), torch.randn(3, 64))
    with pytest.raises(ConfigError, match="temperatures"):
        SEEDLoss(8, student_temperature=0.0)
