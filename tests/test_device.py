"""The one device resolver: names, CUDA indices, and the torch.cuda.set_device regression."""

from __future__ import annotations

import pytest
import torch

from edge_ssl.device import activate_device, parse_device_name, resolve_device
from edge_ssl.errors import ConfigError


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch believes it sees two GPUs (current: 1); set_device checks like the real one."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    # The real set_device starts with this call; it is what raised on torch.device("cuda").
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: calls.append(torch.cuda._utils._get_device_index(d))
    )
    return calls


def test_get_device_index_refuses_an_unindexed_cuda_device():
    """The bug behind issue 5: this is what torch.cuda.set_device(torch.device('cuda')) hits."""
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda._utils._get_device_index(torch.device("cuda"))


@pytest.mark.parametrize("name", ["auto", "cuda", "CUDA", " cuda:0 "])
def test_default_cuda_names_resolve_to_an_indexed_device_that_set_device_accepts(two_fake_gpus, name):
    device = resolve_device(name)
    assert device.type == "cuda" and device.index is not None
    activate_device(device)
    assert two_fake_gpus == [device.index]


def test_unindexed_cuda_takes_the_local_rank_or_the_current_device(two_fake_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)  # explicit wins


def test_cuda_index_that_does_not_exist(two_fake_gpus):
    with pytest.raises(ConfigError, match=r"'cuda:5' does not exist: torch sees 2 GPU\(s\), indices 0..1"):
        resolve_device("cuda:5")


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    activate_device(torch.device("cpu"))  # a no-op, never touches CUDA
    with pytest.raises(ConfigError, match="sees no CUDA GPU.*--device cpu"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("name", ["GPU0", "cuda:", "cuda:x", "mps", "", 0, None])
def test_unknown_names_list_the_allowed_ones(name):
    with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N"):
        parse_device_name(name)


def test_every_core_path_resolves_through_edge_ssl_device(two_fake_gpus, monkeypatch):
    """pretrain's setup resolves 'auto' to an indexed CUDA device and activates it."""
    import edge_ssl.train.pretrain as pretrain_module

    seen = []
    monkeypatch.setattr("edge_ssl.device.activate_device", lambda d: seen.append(d))

    class Stop(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr(pretrain_module, "_count_steps", stop)
    with pytest.raises(Stop):
        pretrain_module._setup(pretrain_module.PretrainConfig(), None, None)
    assert seen == [torch.device("cuda", 1)]
