"""Export and quantize carry a bundle's adaptation settings and replay images to the child."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edge_ssl.compress.quantize import QuantizeConfig, quantize
from edge_ssl.runtime.export import export_bundle

from edge_ssl.bundle import CARRIED_FILES, Bundle, lineage_entry, sha256_file, write_encoder_bundle
from edge_ssl.models import create_encoder
from tests.test_compress_fixtures import tiny_images


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A float bundle as `edge-ssl adapt-tune` leaves it: weights, settings, replay images."""
    folder = tmp_path_factory.mktemp("tuned")
    settings = folder / "adapt_settings.json"
    settings.write_text(json.dumps({"bn_depth": 0.5, "bn_prior": 0.5}))
    replay = folder / "adapt_replay.npz"
    np.savez(replay, x=tiny_images(8), y=np.arange(8) % 4)
    return write_encoder_bundle(folder / "t.edge", create_encoder("resnet18_cifar", width=0.125),
                                lineage=(lineage_entry("test", {}),),
                                extra_files={"adapt_settings.json": settings, "adapt_replay.npz": replay})


def _same_files(parent: Bundle, child: Bundle) -> None:
    for name in CARRIED_FILES:
        assert child.has(name), f"{name} was not carried"
        assert sha256_file(child.file(name)) == sha256_file(parent.file(name))


def test_an_int8_bundle_carries_the_adaptation_files(tuned, tmp_path):
    quantized = quantize(tuned, QuantizeConfig(calibration_images=16), tiny_images(16), tmp_path / "q.edge")
    bundle = quantized.bundle
    _same_files(tuned, bundle)


def test_an_exported_bundle_carries_them_too(tuned, tmp_path):
    _same_files(tuned, export_bundle(tuned, tmp_path / "x.edge").bundle)
