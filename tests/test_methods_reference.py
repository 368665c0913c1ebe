"""SSL losses against NumPy re-implementations of the papers' pseudocode, analytic cases, DDP."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edge_ssl.train.methods import (
    BarlowTwinsLoss,
    BYOLLoss,
    DINOLoss,
    NegativeCosineLoss,
    NTXentLoss,
    VICRegLoss,
)
from tests.conftest import ATOL, RTOL

# --- NumPy references (float64), written from each paper's pseudocode ----------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _off_diagonal(m: np.ndarray) -> np.ndarray:
    return m[~np.eye(m.shape[0], dtype=bool)]


def simclr_reference(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """SimCLR Algorithm 1: mean over the 2N anchors of l(i, j) with cosine similarities."""
    z = _unit(np.concatenate([z1, z2]))
    two_n = len(z)
    sim = z @ z.T
    total = 0.0
    for i in range(two_n):
        j = (i + two_n // 2) % two_n
        denominator = sum(math.exp(sim[i, k] / temperature) for k in range(two_n) if k != i)
        total += -math.log(math.exp(sim[i, j] / temperature) / denominator)
    return total / two_n


def byol_reference(p1, p2, z1, z2) -> float:
    """BYOL Eq. 2: squared distance of normalized prediction and target, both directions."""

    def regression(p, z):
        return float(np.mean(np.sum((_unit(p) - _unit(z)) ** 2, axis=1)))

    return regression(p1, z2) + regression(p2, z1)


def simsiam_reference(p1, p2, z1, z2) -> float:
    """SimSiam Algorithm 1: D(p1, z2) / 2 + D(p2, z1) / 2, D the negative mean cosine."""

    def d(p, z):
        return -float(np.mean(np.sum(_unit(p) * _unit(z), axis=1)))

    return d(p1, z2) / 2 + d(p2, z1) / 2


def dino_reference(student, teacher, center, student_temp, teacher_temp, momentum):
    """DINO Algorithm 1 with multi-crop: (loss, new center)."""
    total, pairs = 0.0, 0
    for t_index, t in enumerate(teacher):
        q = _softmax((t - center) / teacher_temp)
        for s_index, s in enumerate(student):
            if s_index == t_index:
                continue
            log_p = np.log(_softmax(s / student_temp))
            total += float(np.mean(-np.sum(q * log_p, axis=1)))
            pairs += 1
    new_center = momentum * center + (1 - momentum) * np.concatenate(teacher).mean(axis=0)
    return total / pairs, new_center


def vicreg_reference(z_a, z_b, lam=25.0, mu=25.0, nu=1.0, gamma=1.0, eps=1e-4):
    """VICReg Algorithm 1; the variance term averages the branches as the authors' code does."""
    n, d = z_a.shape
    invariance = float(np.mean((z_a - z_b) ** 2))
    std_a = np.sqrt(z_a.var(axis=0, ddof=1) + eps)
    std_b = np.sqrt(z_b.var(axis=0, ddof=1) + eps)
    variance = (np.mean(np.maximum(0, gamma - std_a)) + np.mean(np.maximum(0, gamma - std_b))) / 2
    a = z_a - z_a.mean(axis=0)
    b = z_b - z_b.mean(axis=0)
    cov_a = a.T @ a / (n - 1)
    cov_b = b.T @ b / (n - 1)
    covariance = (_off_diagonal(cov_a) ** 2).sum() / d + (_off_diagonal(cov_b) ** 2).sum() / d
    loss = lam * invariance + mu * variance + nu * covariance
    return float(loss), invariance, float(variance), float(covariance)


def barlow_reference(z_a, z_b, lam=0.0051, eps=1e-5) -> float:
    """Barlow Twins Algorithm 1 with the BatchNorm standardization of the authors' code."""
    n, d = z_a.shape
    a = (z_a - z_a.mean(axis=0)) / np.sqrt(z_a.var(axis=0) + eps)
    b = (z_b - z_b.mean(axis=0)) / np.sqrt(z_b.var(axis=0) + eps)
    c = a.T @ b / n
    c_diff = (c - np.eye(d)) ** 2
    c_diff[~np.eye(d, dtype=bool)] *= lam
    return float(c_diff.sum())


def _random(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def close(actual, expected) -> None:
    np.testing.assert_allclose(
        np.asarray(torch.as_tensor(actual).detach()), expected, rtol=RTOL, atol=ATOL
    )


# --- random inputs against the references -----------------------------------------------


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_ntxent_matches_reference(temperature):
    z1, z2 = _random(0, 6, 5), _random(1, 6, 5)
    close(NTXentLoss(temperature)(_t(z1), _t(z2)), simclr_reference(z1, z2, temperature))


def test_byol_loss_matches_reference():
    p1, p2, z1, z2 = (_random(seed, 5, 7) for seed in range(4))
    close(BYOLLoss()(_t(p1), _t(p2), _t(z1), _t(z2)), byol_reference(p1, p2, z1, z2))


def test_simsiam_loss_matches_reference():
    p1, p2, z1, z2 = (_random(seed, 5, 7) for seed in range(4))
    close(NegativeCosineLoss()(_t(p1), _t(p2), _t(z1), _t(z2)), simsiam_reference(p1, p2, z1, z2))


@pytest.mark.parametrize("num_local", [0, 3])
def test_dino_loss_matches_reference(num_local):
    student = [_random(10 + v, 4, 9) for v in range(2 + num_local)]
    teacher = [_random(20 + v, 4, 9) for v in range(2)]
    center = _random(30, 1, 9) * 0.1
    criterion = DINOLoss(out_dim=9, student_temp=0.1, center_momentum=0.9).double()
    criterion.center.copy_(_t(center))

    loss = criterion([_t(s) for s in student], [_t(t) for t in teacher], teacher_temp=0.04)

    want_loss, want_center = dino_reference(student, teacher, center, 0.1, 0.04, 0.9)
    close(loss, want_loss)
    close(criterion.center, want_center)


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)])
def test_vicreg_loss_matches_reference(weights):
    lam, mu, nu = weights
    z1, z2 = _random(0, 8, 6), _random(1, 8, 6) * 0.3
    terms = VICRegLoss(lam, mu, nu, variance_target=1.0, eps=1e-4).components(_t(z1), _t(z2))
    loss, invariance, variance, covariance = vicreg_reference(z1, z2, lam, mu, nu)
    close(terms["loss"], loss)
    close(terms["invariance"], invariance)
    close(terms["variance"], variance)
    close(terms["covariance"], covariance)


@pytest.mark.parametrize("lam", [0.0051, 0.5])
def test_barlow_twins_loss_matches_reference(lam):
    z1, z2 = _random(0, 8, 6), _random(1, 8, 6) + 0.5 * _random(0, 8, 6)
    close(BarlowTwinsLoss(redundancy_weight=lam)(_t(z1), _t(z2)), barlow_reference(z1, z2, lam))


@pytest.mark.parametrize(
    "loss",
    [NTXentLoss(0.5), VICRegLoss(), BarlowTwinsLoss(0.1)],
    ids=["ntxent", "vicreg", "barlow_twins"],
)
def test_loss_gradients_match_finite_differences(loss):
    z1 = _t(_random(0, 4, 3)).requires_grad_()
    z2 = _t(_random(1, 4, 3)).requires_grad_()
    assert torch.autograd.gradcheck(loss, (z1, z2))


def test_half_precision_inputs_are_computed_in_float32():
    z1, z2 = _random(0, 6, 5), _random(1, 6, 5)
    loss = BarlowTwinsLoss()(_t(z1).bfloat16(), _t(z2).bfloat16())
    assert loss.dtype == torch.float32
    assert abs(loss.item() - barlow_reference(z1, z2)) < 0.05 * barlow_reference(z1, z2)


# --- analytic cases -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.1])
def test_ntxent_lower_bound_for_separated_embeddings(temperature):
    # Positives coincide, all other embeddings orthogonal: the loss is at its minimum,
    # log(1 + (2N - 2) exp(-1/t)), which shrinks toward 0 as t -> 0.
    n = 4
    z = torch.eye(n, 6, dtype=torch.float64)
    bound = math.log(1 + (2 * n - 2) * math.exp(-1 / temperature))
    close(NTXentLoss(temperature)(z, z.clone()), bound)
    noisy = z + 0.3 * _t(_random(3, n, 6))
    assert NTXentLoss(temperature)(noisy, z).item() > bound


def test_ntxent_is_tiny_at_low_temperature_for_separated_embeddings():
    z = torch.eye(4, 6, dtype=torch.float64)
    assert NTXentLoss(0.02)(z, z).item() < 1e-15


def test_byol_loss_of_aligned_and_opposite_vectors():
    p = _t(_random(0, 5, 4))
    close(BYOLLoss()(p, 3 * p, 2 * p, p), 0.0)
    close(BYOLLoss()(p, p, -p, -p), 8.0)


def test_simsiam_loss_of_aligned_vectors_and_stop_gradient():
    p = _t(_random(0, 5, 4)).requires_grad_()
    z = (2 * p.detach()).requires_grad_()
    loss = NegativeCosineLoss()(p, p, z, z)
    close(loss, -1.0)
    loss.backward()
    assert z.grad is None


def test_barlow_twins_loss_is_zero_for_identity_cross_correlation():
    # Centered, unit-variance, uncorrelated columns: C = I (up to eps).
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    criterion = BarlowTwinsLoss(redundancy_weight=0.0051)
    close(criterion.cross_correlation(z, z), np.eye(2) / math.sqrt(1 + 1e-5))
    assert criterion(z, z).item() < 1e-9


def test_barlow_twins_penalizes_redundant_dimensions():
    column = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    z = torch.stack([column, column], dim=1)  # two copies of one feature: C = all ones
    terms = BarlowTwinsLoss(redundancy_weight=0.5).components(z, z)
    close(terms["on_diagonal"], 0.0)
    close(terms["off_diagonal"], 2.0)
    close(terms["loss"], 1.0)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_vicreg_variance_term_of_constant_embeddings_is_gamma(gamma):
    eps = 1e-4
    z = torch.full((6, 4), 3.0, dtype=torch.float64)
    terms = VICRegLoss(variance_target=gamma, eps=eps).components(z, z)
    # Zero variance: every dimension pays gamma - sqrt(eps), i.e. gamma up to eps.
    close(terms["variance"], gamma - math.sqrt(eps))
    close(terms["invariance"], 0.0)
    close(terms["covariance"], 0.0)


def test_vicreg_covariance_term_of_decorrelated_embeddings_is_zero():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    terms = VICRegLoss().components(z, z)
    close(terms["covariance"], 0.0)
    close(terms["variance"], 0.0)  # std = sqrt(4/3) > gamma = 1


def test_dino_loss_of_uniform_outputs_is_log_k():
    k = 16
    flat_output = torch.zeros(4, k, dtype=torch.float64)
    terms = DINOLoss(out_dim=k).double().components([flat_output] * 3, [flat_output] * 2, 0.04)
    close(terms["loss"], math.log(k))
    close(terms["teacher_entropy"], math.log(k))


def test_dino_center_moves_toward_teacher_mean():
    criterion = DINOLoss(out_dim=3, center_momentum=0.9).double()
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=torch.float64)
    criterion([teacher, teacher], [teacher, teacher], teacher_temp=0.04)
    close(criterion.center, [[0.2, 0.2, 0.2]])


# --- distributed (2 CPU processes over gloo) ----------------------------------------------

WORLD_SIZE = 2


def _distributed_worker(rank: int, init_file: str, data_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        data = torch.load(data_file)
        local = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for name, criterion in [
            ("simclr", NTXentLoss(0.5)),
            ("vicreg", VICRegLoss()),
            ("barlow_twins", BarlowTwinsLoss()),
        ]:
            z1 = data["z1"][local].clone().requires_grad_()
            z2 = data["z2"][local].clone().requires_grad_()
            loss = criterion(z1, z2)
            loss.backward()
            results[name] = (loss.detach(), z1.grad, z2.grad)
        dino = DINOLoss(out_dim=data["student"][0].shape[1])
        loss = dino([s[local] for s in data["student"]], [t[local] for t in data["teacher"]], 0.04)
        results["dino"] = (loss.detach(), dino.center.clone())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Tear down only when both ranks are done, or gloo may abort the early one.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_losses_equal_the_global_batch_loss(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = {
        "z1": torch.randn(8, 5, generator=generator, dtype=torch.float64),
        "z2": torch.randn(8, 5, generator=generator, dtype=torch.float64),
        "student": [torch.randn(8, 7, generator=generator, dtype=torch.float64) for _ in range(3)],
        "teacher": [torch.randn(8, 7, generator=generator, dtype=torch.float64) for _ in range(2)],
    }
    torch.save(data, tmp_path / "data.pt")
    mp.spawn(
        _distributed_worker,
        args=(str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    for name, criterion in [
        ("simclr", NTXentLoss(0.5)),
        ("vicreg", VICRegLoss()),
        ("barlow_twins", BarlowTwinsLoss()),
    ]:
        z1 = data["z1"].clone().requires_grad_()
        z2 = data["z2"].clone().requires_grad_()
        loss = criterion(z1, z2)
        loss.backward()
        # DDP averages gradients over ranks, so rank losses average to the global loss
        # and each rank's input gradient, divided by the world size, is the global one.
        close(sum(r[name][0] for r in ranks) / WORLD_SIZE, loss.item())
        for rank, result in enumerate(ranks):
            local = slice(rank * 4, (rank + 1) * 4)
            close(result[name][1] / WORLD_SIZE, z1.grad[local])
            close(result[name][2] / WORLD_SIZE, z2.grad[local])

    dino = DINOLoss(out_dim=7)
    loss = dino(data["student"], data["teacher"], 0.04)
    close(sum(r["dino"][0] for r in ranks) / WORLD_SIZE, loss.item())
    for result in ranks:
        close(result["dino"][1], dino.center)
