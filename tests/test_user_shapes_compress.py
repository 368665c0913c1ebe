"""Pruning with recovery off the 32x32 path: a ResNet-18-like student at 64x64 and 96x96."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.test_compress_fixtures import tiny_images

# Runs in a child process: a native crash (the reported segfault / "double free or
# corruption" in loss.backward) then fails this test with its exit code instead of
# killing pytest.
_PRUNE_WITH_RECOVERY = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from edge_ssl.compress.prune import PruneConfig, prune_encoder
    from edge_ssl.data.sources import ImageDataset
    from edge_ssl.models import create_encoder
    from edge_ssl.tensors import images_to_tensor, normalize

    size = int(sys.argv[1])
    images = np.load(sys.argv[2], allow_pickle=False)
    torch.manual_seed(0)
    student = create_encoder("resnet18_cifar", width=0.25, image_size=size).eval()
    with torch.no_grad():  # like a trained net: no zero-initialized residual BN scales
        for module in student.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    config = PruneConfig(ratio=0.3, importance="l2", recovery_epochs=1, batch_size=32,
                         recovery={"cache_views": 2})
    result = prune_encoder(student, config, ImageDataset(images, None, None, "user"))
    batch = normalize(images_to_tensor(images), student.spec.input)
    with torch.no_grad():
        out = result.encoder.eval()(batch)
    print(json.dumps({
        "params": [result.steps[0]["params"], result.steps[-1]["params"]],
        "finite": bool(torch.isfinite(out).all()),
        "zero_rows": int((out.abs().amax(dim=1) == 0).sum()),
        "spread": float(out.std(dim=0).mean() / out.abs().mean().clamp_min(1e-12)),
    }))
""")


def _user_images(size: int, count: int = 64) -> np.ndarray:
    """Smooth photo-like images at the user's size (tiny 32x32 images upsampled)."""
    small = tiny_images(count)
    index = (np.arange(size) * 32) // size
    return np.ascontiguousarray(small[:, index][:, :, index])


@pytest.mark.parametrize("size", [64, 96])
def test_prune_with_recovery_runs_and_keeps_a_spread_embedding_at_the_users_size(tmp_path, size):
    path = tmp_path / "images.npy"
    np.save(path, _user_images(size))
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _PRUNE_WITH_RECOVERY,
                           str(size), str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"prune at {size}x{size} exited {done.returncode}:\n{done.stderr[-3000:]}"
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["params"][1] < 0.9 * found["params"][0]  # channels were really removed
    assert found["finite"] and found["zero_rows"] == 0
    assert found["spread"] > 0.05  # embeddings differ between images
