"""Adaptation-ready by construction: a bundle from `edge-ssl compress` adapts with no option, and an
INT8 bundle adapts into an INT8 bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_ssl.adapt.replay import REPLAY_FILE, load_replay_bank
from edge_ssl.adapt.tune import SETTINGS_FILE, bundle_adapt_settings
from edge_ssl.bundle import Bundle
from tests.test_compress_fixtures import tiny_dataset, write_tiny_bundle


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """`edge-ssl compress` (distill, prune, INT8) on small data with labeled eval images."""
    from edge_ssl.cli import main

    tmp = tmp_path_factory.mktemp("ready")
    teacher = write_tiny_bundle(tmp / "teacher.edge")
    data = tiny_dataset(48, labeled=True)
    np.savez(tmp / "bank.npz", x=data.images[:32], y=data.labels[:32])
    np.savez(tmp / "test.npz", x=data.images[32:], y=data.labels[32:])
    np.savez(tmp / "unlabeled.npz", x=data.images)
    recipe = tmp / "r.yaml"
    recipe.write_text(
        "distill: {epochs: 1, batch_size: 8, cache_views: 1, queue_size: 16, head_hidden_dim: 16,"
        " warmup_epochs: 0.0}\nquantize_options: {calibration_images: 16}\nbench_seconds: 0.2\n")
    out = tmp / "c.edge"
    with pytest.raises(SystemExit) as done:
        main(["compress", str(teacher.path), "--student", "resnet18_cifar", "--arch-opt", "width=0.125",
              "--prune", "0.5", "--quantize", "int8", "--target", "ort-cpu", "--data",
              str(tmp / "unlabeled.npz"), "--eval-data", str(tmp / "bank.npz"), "--eval-test",
              str(tmp / "test.npz"), "--recipe", str(recipe), "--device", "cpu", "--out", str(out)])
    assert done.value.code in (0, None)
    return tmp, Bundle.open(out)


def test_the_compressed_bundle_carries_settings_and_labeled_replay_images(compressed):
    _, bundle = compressed
    assert bundle.manifest.precision == "int8"
    assert {SETTINGS_FILE, REPLAY_FILE} <= set(bundle.manifest.files)  # in the final bundle itself
    settings = bundle_adapt_settings(bundle)
    assert settings["bn_stats"] is True and settings["replay_weight"] > 0
    images, labels = load_replay_bank(bundle)
    assert len(images) == len(labels) and len(images) >= 4
    assert bundle.manifest.lineage[-1].stage == "adapt-tune"


def test_adapt_with_no_option_uses_them_and_writes_int8_again(compressed):
    from edge_ssl.cli import main

    tmp, bundle = compressed
    out = tmp / "adapted.edge"
    with pytest.raises(SystemExit) as done:
        main(["adapt", str(bundle.path), "--data", str(tmp / "unlabeled.npz"), "--out", str(out),
              "--steps", "1", "--batch-size", "8", "--device", "cpu", "--json"])
    assert done.value.code in (0, None)
    adapted = Bundle.open(out)
    assert adapted.manifest.precision == "int8" and not adapted.has("model.pt")
    entry = adapted.manifest.lineage[-1]
    assert entry.stage == "quantize"
    measured = entry.settings["requantize"]
    assert measured["seconds"] > 0 and measured["cosine_to_float"]["mean"] > 0.5
    assert measured["knn_top1"]["int8"] is not None
    assert entry.settings["adapt_device_cost"]["measured_host"]["sec_per_step"] > 0  # the cost ships too
    recorded = bundle.manifest.lineage[-1].settings
    float_parent = Bundle.open(tmp / "adapted.edge.stages" / "adapt.edge")
    used = float_parent.manifest.lineage[-1].settings
    assert {k: used["config"][k] for k in recorded["settings"]} == recorded["settings"]
    assert used["replay"]["images"] == len(load_replay_bank(bundle)[0])  # the shipped replay images
    assert used["selection"]["criterion"] == "knn_information"  # the shipped labels are its bank
    # the quantize settings recorded for the deployed bundle are the ones used again
    original = next(e for e in reversed(bundle.manifest.lineage) if e.stage == "quantize").settings
    assert entry.settings["calibration"] == original["calibration"]
    assert json.dumps(measured)
