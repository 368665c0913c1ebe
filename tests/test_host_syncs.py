"""A pretraining step never makes the host wait for the GPU (issue 5), checked without a GPU.

The step runs on the ``meta`` device, which stands in for CUDA: device tensors have no
data, so anything that would read one back fails or is caught here, while the host-side
random numbers of the views stay real. ``HostSyncs`` records the three ways a step can
wait for a GPU: reading a device value (``.item()``, ``bool()``, ``nonzero``), a blocking
host-to-device copy, and a device tensor built from host data (``torch.tensor(...,
device=cuda)``, ``x.new_tensor(list)``), which is such a copy. The real-GPU version is
``tests/device/test_gpu_pretrain.py::test_training_step_never_syncs_with_the_host``.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from edge_ssl.data.views import ViewAugment, view_preset
from edge_ssl.models import create_encoder
from edge_ssl.train import pretrain
from edge_ssl.train.distributed import DistInfo
from edge_ssl.train.methods import create_method
from edge_ssl.train.optim import build_optimizer

DEVICE = torch.device("meta")
_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
_FROM_HOST_DATA = (torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor)


def _caller() -> str:
    """The innermost edge_ssl frame of the current stack: where a sync comes from."""
    frames = [f for f in traceback.extract_stack() if "edge_ssl" in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


class _Ops(TorchDispatchMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _READS and args[0].device.type != "cpu":
            self.found.append(f"{func} reads a device value at {_caller()}")
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu":
            target = torch.device(kwargs.get("device") or "cpu")
            if target.type != "cpu" and not kwargs.get("non_blocking", False):
                self.found.append(f"blocking host-to-device copy at {_caller()}")
        if func is torch.ops.aten.copy_.default and args[1].device.type == "cpu" != args[0].device.type:
            if not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
                self.found.append(f"blocking copy_ from the host at {_caller()}")
        return func(*args, **kwargs)


class _Factories(TorchFunctionMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in _FROM_HOST_DATA and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            self.found.append(f"{func.__name__} copies host data to the device at {_caller()}")
        return out


class HostSyncs:
    """Context that lists, in ``found``, every point where the code inside would wait for a GPU."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self._modes = (_Factories(self.found), _Ops(self.found))

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _run(method_name: str, optimizer: str | None) -> pretrain._Run:
    """What ``pretrain._build_run`` makes, on the stand-in device (no DDP, no autocast)."""
    torch.manual_seed(0)
    kwargs = {"num_local_crops": 2} if method_name == "dino" else {}
    with DEVICE:
        method = create_method(method_name, create_encoder("resnet18_cifar", width=0.25), **kwargs)
    config = pretrain.PretrainConfig(method=method_name, batch_size=8, optimizer=optimizer)
    spec = method.encoder.spec.input
    views = ViewAugment(view_preset(method.view_preset, spec.image_size, local_crops=method.num_local_views), spec)
    return pretrain._Run(
        config=config, source=None, dist=DistInfo(), device=DEVICE, method=method, model=method,
        optimizer=build_optimizer(optimizer or method.default_optimizer, method.parameter_groups(1e-4), 0.1, 1e-4),
        scaler=torch.amp.GradScaler("cuda", enabled=False), views=views.to(DEVICE), autocast=None,
        steps_per_epoch=4, warmup_steps=1, base_lr=0.1, settings={}, ckpt_path=Path("unused"), log_every=4,
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("optimizer", [None, "adamw", "sgd"])
@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam", "vicreg", "barlow_twins", "dino"])
def test_training_step_never_waits_for_the_device(method, optimizer):
    run = _run(method, optimizer)
    batch = torch.empty(8, 3, 32, 32, device=DEVICE)
    with HostSyncs() as syncs:
        for step in range(2):  # the second step has optimizer state
            loss = pretrain._train_step(run, batch, step)
    assert loss.device == DEVICE
    assert syncs.found == []


@pytest.mark.parametrize("preset,size", [("byol", 96), ("dino", 96), ("simclr", 32)])
def test_views_never_wait_for_the_device(preset, size):
    """Blur, solarize and local crops included (the 96 px presets turn them on)."""
    spec = create_encoder("resnet18_cifar").spec.input
    config = view_preset(preset, size, local_crops=2 if preset == "dino" else 0)
    views = ViewAugment(config, spec).to(DEVICE)
    with HostSyncs() as syncs:
        out = views(torch.empty(16, 3, size, size, device=DEVICE))
    assert [tuple(v.shape[-2:]) for v in out][:2] == [(size, size), (size, size)]
    assert syncs.found == []


def test_views_left_on_the_host_still_work_on_a_device():
    """Not moved with .to(device): the constants follow the images (one copy per call)."""
    spec = create_encoder("resnet18_cifar").spec.input
    views = ViewAugment(view_preset("simclr", 32), spec)
    out = views(torch.empty(4, 3, 32, 32, device=DEVICE))
    assert out[0].device == DEVICE


def test_host_syncs_catches_every_kind_of_wait():
    """The checker itself: each way of waiting for a device is reported with where it happened."""
    device_tensor = torch.empty(3, device=DEVICE)
    with HostSyncs() as syncs:
        torch.tensor([1.0, 2.0], device=DEVICE)
        device_tensor.new_tensor([1.0, 2.0, 3.0])
        torch.ones(3).to(DEVICE)
        device_tensor.copy_(torch.ones(3))
        with pytest.raises(RuntimeError, match="meta"):  # meta tensors hold no data
            device_tensor.sum().item()
        torch.ones(3).to(DEVICE, non_blocking=True)  # async: not a wait
        torch.full((3,), 2.0, device=DEVICE)  # a fill kernel: not a wait
    kinds = [entry.split(" at ")[0] for entry in syncs.found]
    assert kinds == [
        "tensor copies host data to the device",
        "new_tensor copies host data to the device",
        "blocking host-to-device copy",
        "blocking copy_ from the host",
        "aten._local_scalar_dense.default reads a device value",
    ]
