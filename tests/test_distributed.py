"""DDP: two CPU processes (gloo) under torchrun train the same model and agree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from edge_ssl.bundle import Bundle

SCRIPT = textwrap.dedent(
    """
    import hashlib, os, sys
    import numpy as np
    import torch
    from edge_ssl.data.sources import ImageDataset
    from edge_ssl.train.pretrain import PretrainConfig, pretrain

    out, method = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8), None, None, "random")
    config = PretrainConfig(method=method, arch="resnet18_cifar", arch_kwargs={"width": 0.125},
                            epochs=1, batch_size=8, steps_per_epoch=3, warmup_epochs=0.0)
    result = pretrain(config, data, out)
    digest = hashlib.sha256()
    for key, value in sorted(result.encoder.state_dict().items()):
        digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    rank = os.environ["RANK"]
    with open(out + f".rank{rank}", "w") as f:
        f.write(digest.hexdigest() + " " + str(result.bundle is not None))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_two_cpu_processes_agree(tmp_path, method):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the test interpreter")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = str(tmp_path / "ddp.edge")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), out, method],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = open(out + ".rank0").read().split()
    rank1 = open(out + ".rank1").read().split()
    assert rank0[0] == rank1[0], "ranks ended with different weights"
    assert (rank0[1], rank1[1]) == ("True", "False"), "only rank 0 writes the bundle"
    bundle = Bundle.open(out)
    assert bundle.manifest.lineage[-1].settings["world_size"] == 2
    assert bundle.manifest.lineage[-1].settings["global_batch"] == 16


def test_without_torchrun_nothing_is_initialised_and_helpers_are_identities():
    import torch

    from edge_ssl.train.distributed import (
        DistInfo,
        barrier,
        broadcast_buffers,
        gather_batch,
        init_distributed,
        mean_over_ranks,
        shutdown,
    )

    info = init_distributed("cpu", environ={})
    assert info == DistInfo() and not info.enabled and info.is_main
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_batch(x) is x and mean_over_ranks(x) is x
    barrier()
    broadcast_buffers(torch.nn.BatchNorm1d(2))
    shutdown(info)  # never destroys a group it did not create


def test_one_process_group_joins_and_gathers_with_gradients(tmp_path):
    """A real gloo group of size 1 from torchrun-style variables; gathers keep the gradient."""
    import torch
    import torch.distributed as dist

    from edge_ssl.train.distributed import _GatherWithGradient, init_distributed, shutdown

    env = {"WORLD_SIZE": "1"}
    assert not init_distributed("cpu", environ=env).enabled  # size 1: no group at all
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        info = init_distributed("cpu", environ={"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
        assert not info.owns_group, "a group the caller made stays the caller's"
        x = torch.randn(3, 2, requires_grad=True)
        gathered = _GatherWithGradient.apply(x)
        (gathered * 2).sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
        shutdown(info)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
