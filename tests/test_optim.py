"""Cosine schedule with warm-up, linear LR scaling, LARS and the optimizer factory."""

from __future__ import annotations

import math

import pytest
import torch

from edge_ssl.errors import ConfigError
from edge_ssl.train.optim import LARS, build_optimizer, cosine_with_warmup, scaled_lr


def test_cosine_with_warmup_shape():
    values = [cosine_with_warmup(s, 100, 10, base=1.0, final=0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1)  # (0 + 1) / 10 of base
    assert values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    mid = 10 + 45
    assert values[mid] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_cosine_without_warmup_and_bad_total():
    assert cosine_with_warmup(0, 10, 0, base=2.0) == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        cosine_with_warmup(0, 0, 0, base=1.0)


def test_linear_scaling_rule():
    assert scaled_lr(0.3, 512) == pytest.approx(0.6)


def _numpy_lars_step(w, g, lr, wd, eta):
    """LARS per You et al. 2017, Alg. 1 with zero momentum buffer at step one."""
    update = g + wd * w
    trust = eta * torch.linalg.vector_norm(w) / torch.linalg.vector_norm(update)
    return w - lr * trust * update


def test_lars_matches_the_paper_update_and_skips_excluded_groups():
    torch.manual_seed(0)
    w = torch.randn(8, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
        lr=0.5, weight_decay=1e-4, eta=0.02,
    )
    (w.sum() * 2 + (b * b).sum()).backward()
    grad_w, grad_b = w.grad.clone(), b.grad.clone()
    opt.step()
    assert torch.allclose(w.detach(), _numpy_lars_step(w0, grad_w, 0.5, 1e-4, 0.02), atol=1e-6)
    assert torch.allclose(b.detach(), b0 - 0.5 * grad_b, atol=1e-6)


def test_lars_rejects_bad_settings():
    with pytest.raises(ConfigError, match="LARS needs"):
        LARS([torch.zeros(1, requires_grad=True)], lr=-1)


@pytest.mark.parametrize("name", ["lars", "adamw", "sgd"])
def test_build_optimizer_keeps_no_decay_groups(name):
    decay = torch.nn.Parameter(torch.ones(3, 3))
    no_decay = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer(
        name, [{"params": [decay]}, {"params": [no_decay], "weight_decay": 0.0}], lr=0.1, weight_decay=0.05
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    if name == "lars":
        assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]


def test_build_optimizer_unknown_name_hints():
    with pytest.raises(ConfigError, match="Did you mean 'adamw'"):
        build_optimizer("adamw2", [{"params": [torch.nn.Parameter(torch.ones(1))]}], 0.1, 0.0)


def test_lars_foreach_matches_the_per_tensor_reference_over_steps():
    """The fast (foreach) LARS and the plain loop give the same weights, momentum included."""
    torch.manual_seed(0)
    start = [torch.randn(6, 3), torch.randn(3), torch.zeros(2, 2)]  # a zero tensor: trust 1
    runs = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = LARS(
            [{"params": params[::2]}, {"params": params[1:2], "lars_exclude": True, "weight_decay": 0.0}],
            lr=0.3, weight_decay=1e-3, foreach=foreach,
        )
        for step in range(3):
            opt.zero_grad()
            sum((p * (step + 1 + i)).pow(2).sum() for i, p in enumerate(params)).backward()
            opt.step()
        runs.append([p.detach() for p in params])
    for fast, reference in zip(*runs, strict=True):
        torch.testing.assert_close(fast, reference)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_cuda_runs_get_fused_steps_with_the_same_update(name):
    """The CUDA choice (fused kernels) is checked on CPU, where torch has them too."""
    updates = []
    for device_type in ("cpu", "cuda"):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
        opt = build_optimizer(name, [{"params": [param]}], lr=0.1, weight_decay=0.01, device_type=device_type)
        assert bool(opt.defaults.get("fused")) == (device_type == "cuda")
        for _ in range(2):
            param.grad = param.detach() * 2
            opt.step()
        updates.append(param.detach())
    torch.testing.assert_close(updates[0], updates[1])


def _ops_per_lars_step(num_tensors: int, foreach: bool) -> int:
    """Aten ops one LARS step dispatches (after the first step made the momentum buffers)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(num_tensors)]
    opt = LARS([{"params": params}], lr=0.1, foreach=foreach)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with Count():
        opt.step()
    return Count.ops


def test_lars_foreach_step_dispatches_the_same_ops_for_any_number_of_tensors():
    """On a GPU each op is a kernel launch: the fast path must not grow with the model's depth."""
    assert _ops_per_lars_step(3, foreach=True) == _ops_per_lars_step(30, foreach=True)
    assert _ops_per_lars_step(30, foreach=False) > _ops_per_lars_step(3, foreach=False)
