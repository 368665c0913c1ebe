"""No stage writes a degenerate model: zeroed, NaN or collapsed outputs fail with the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edge_ssl.compress.prune import PruneConfig, prune
from edge_ssl.compress.quantize import QuantizeConfig, quantize

from edge_ssl.bundle import lineage_entry, write_encoder_bundle
from edge_ssl.cli import main
from edge_ssl.models import create_encoder
from edge_ssl.output_check import (
    DegenerateOutputError,
    check_embeddings,
    probe_images,
    write_stage_bundle,
)
from tests.test_compress_fixtures import tiny_dataset, tiny_images, write_tiny_bundle


def _zeroed(encoder):
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
    return encoder


@pytest.fixture(scope="module")
def zeroed_bundle(tmp_path_factory):
    """A bundle whose encoder outputs exactly 0 for every image (written without a check)."""
    encoder = _zeroed(create_encoder("resnet18_cifar", width=0.125))
    path = tmp_path_factory.mktemp("zero") / "zero.edge"
    return write_encoder_bundle(path, encoder, lineage=(lineage_entry("test", {}),))


def test_a_zeroed_encoder_is_refused_with_the_numbers_and_nothing_is_written(tmp_path):
    encoder = _zeroed(create_encoder("resnet18_cifar", width=0.125))
    with pytest.raises(DegenerateOutputError, match=r"64 all-zero embeddings.*effective rank 0\.00"):
        write_stage_bundle(tmp_path / "z.edge", encoder, stage="prune",
                           lineage=(lineage_entry("test", {}),))
    assert not list(tmp_path.iterdir())


def test_prune_of_a_model_that_outputs_zeros_fails_and_writes_nothing(zeroed_bundle, tmp_path):
    with pytest.raises(DegenerateOutputError, match="prune produced a degenerate model"):
        prune(zeroed_bundle, PruneConfig(ratio=0.3), tiny_dataset(16), tmp_path / "p.edge")
    assert not (tmp_path / "p.edge").exists()


def test_quantize_of_a_zero_model_is_refused_not_reported_as_met(zeroed_bundle, tmp_path):
    with pytest.raises(DegenerateOutputError, match="quantize"):
        quantize(zeroed_bundle, QuantizeConfig(calibration_images=16), tiny_images(16), tmp_path / "q.edge")
    assert not (tmp_path / "q.edge").exists()


def test_the_cli_exits_1_with_one_line_for_a_degenerate_stage(zeroed_bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", str(zeroed_bundle.path), "--ratio", "0.3", "--out", str(tmp_path / "p.edge")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "degenerate" in err[0] and "effective rank" in err[0]


def test_compare_of_two_zero_models_is_a_mismatch(zeroed_bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", str(zeroed_bundle.path), str(zeroed_bundle.path), "--limit", "8"])
    assert info.value.code == 1
    assert "all-zero" in capsys.readouterr().err


def test_nan_and_collapse_relative_to_the_parent_are_refused():
    rng = np.random.default_rng(0)
    parent = rng.normal(size=(64, 32))
    with pytest.raises(DegenerateOutputError, match="not finite for 1 of 64"):
        check_embeddings("distill", np.where(np.arange(64)[:, None] == 3, np.nan, parent))
    # Every image on one line: well spread along it, but one direction against the parent's ~30.
    line = rng.normal(size=(64, 1)) * rng.normal(size=(1, 32)) + 0.05
    with pytest.raises(DegenerateOutputError, match=r"spread rank 1\.\d+ \(its parent's"):
        check_embeddings("adapt", line, parent)
    # Every image at one point plus a little noise: collapsed whatever the parent.
    point = np.ones((64, 32)) + 1e-4 * rng.normal(size=(64, 32))
    with pytest.raises(DegenerateOutputError, match=r"spread 0\.000\d of"):
        check_embeddings("adapt", point, parent)
    healthy = check_embeddings("adapt", parent + 0.1 * rng.normal(size=parent.shape), parent)
    assert healthy.spread_rank > healthy.rank_floor


def test_a_healthy_stage_records_its_check(tmp_path):
    bundle = write_tiny_bundle(tmp_path / "t.edge")
    result = prune(bundle, PruneConfig(ratio=0.3), tiny_dataset(16), tmp_path / "p.edge")
    check = result.bundle.manifest.metrics["output_check"]
    assert check["zero_rows"] == 0 and check["spread_rank"] >= check["rank_floor"] > 0
    assert check["parent_spread_rank"] is not None


@pytest.mark.parametrize("size", [32, 64, 96])
def test_probe_images_fit_the_model_input(size):
    spec = create_encoder("resnet18_cifar", width=0.125, image_size=size).spec.input
    images = probe_images(spec)
    assert images.dtype == np.uint8 and images.shape == (64, size, size, 3)
    own = np.full((10, size, size, 3), 7, np.uint8)
    assert probe_images(spec, own).shape[0] == 10  # the stage's own images when it has some
