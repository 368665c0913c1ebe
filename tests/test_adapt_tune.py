"""`edge-ssl adapt-tune`: the grid, the choice, the tuned bundle, and `adapt` reading it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edge_ssl.adapt.api import adapt
from edge_ssl.adapt.bn import blend_bn_statistics, bn_statistics, reestimate_bn_stats
from edge_ssl.adapt.replay import REPLAY_FILE
from edge_ssl.adapt.step import iterate_batches
from edge_ssl.adapt.tune import (
    SETTINGS_FILE,
    STEP_FIELDS,
    TuneConfig,
    adapt_config_for,
    bundle_adapt_settings,
    choose,
    tune_bn_settings,
    write_tuned,
)
from edge_ssl.bundle import Bundle, BundleWriter, write_encoder_bundle
from edge_ssl.cli import app
from edge_ssl.data.sources import ImageDataset, embedded_default
from edge_ssl.errors import BundleError, ConfigError, DataError
from edge_ssl.models import create_encoder

SMALL = {"corruptions": ("gaussian_noise",), "depths": (0.5, 1.0), "priors": (0.5, 0.9),
         "probe_images": 200, "bank_images": 600, "device": "cpu"}


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Bundle:
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.25)
    return write_encoder_bundle(tmp_path_factory.mktemp("tune") / "deployed.edge", encoder, lineage=())


@pytest.fixture(scope="module")
def tuned(parent, tmp_path_factory):
    from edge_ssl.models import load_encoder

    result = tune_bn_settings(load_encoder(parent), embedded_default(), TuneConfig(**SMALL))
    out = tmp_path_factory.mktemp("tuned") / "tuned.edge"
    return result, write_tuned(parent, result, out)


def _row(depth, prior, recovery, drop):
    return {"bn_stats": depth is not None, "bn_depth": depth, "bn_prior": prior,
            "recovery_significant": recovery, "clean_drop_pts": drop}


def test_choose_takes_the_most_recovery_within_the_clean_budget():
    keep = _row(None, None, 0.0, 0.0)  # the deployed statistics: every grid has this row
    grid = [keep, _row(1.0, 0.5, 0.9, 2.0), _row(0.75, 0.5, 0.6, 0.5), _row(0.5, 0.7, 0.6, 0.3),
            _row(0.5, 0.9, 0.2, 0.0)]
    best = choose(grid, 0.5)
    assert (best["bn_depth"], best["bn_prior"]) == (0.5, 0.7)  # tie on recovery: fewer points lost
    assert choose([keep, _row(1.0, 0.9, 0.4, 0.8)], 0.5) is keep  # nothing else fits
    assert choose([keep, _row(1.0, 0.9, -0.2, 0.1)], 0.5) is keep  # re-estimation that hurts loses


def test_blending_a_prior_0_pass_equals_reestimating_at_that_prior():
    torch.manual_seed(1)
    encoder = create_encoder("resnet18_cifar", width=0.25).eval()
    images = embedded_default().images[:96]
    source = bn_statistics(encoder)
    for depth, prior in ((0.5, 0.7), (1.0, 0.3)):
        direct, measured = copy.deepcopy(encoder), copy.deepcopy(encoder)
        reestimate_bn_stats(direct, iterate_batches(images, 32, torch.device("cpu"), encoder.spec.input),
                            prior=prior, depth=depth)
        reestimate_bn_stats(measured, iterate_batches(images, 32, torch.device("cpu"), encoder.spec.input),
                            prior=0.0, depth=depth)
        blend_bn_statistics(measured, bn_statistics(measured), source, depth=depth, prior=prior)
        for (m1, v1), (m2, v2) in zip(bn_statistics(direct), bn_statistics(measured), strict=True):
            torch.testing.assert_close(m1, m2)
            torch.testing.assert_close(v1, v2)


@pytest.mark.parametrize("bad", [{"corruptions": ("fog_of_war",)}, {"priors": (1.0,)}, {"depths": (0.0,)},
                                 {"severity": 6}, {"max_clean_drop": -1}, {"probe_images": 10}, {"depths": ()}])
def test_config_refuses_bad_settings(bad):
    with pytest.raises(ConfigError):
        TuneConfig(**bad)


def test_tunes_on_the_grid_and_records_the_choice(parent, tuned):
    result, bundle = tuned
    assert len(result.grid) == 5 and result.significant == ("gaussian_noise",)
    assert result.shifted["gaussian_noise"] < result.clean
    keep = result.grid[0]
    assert not keep["bn_stats"] and keep["recovery_significant"] == keep["clean_drop_pts"] == 0
    best = choose([dict(r) for r in result.grid], result.config.max_clean_drop)
    assert (result.bn_stats, result.bn_depth, result.bn_prior) == (best["bn_stats"], best["bn_depth"],
                                                                   best["bn_prior"])
    assert result.images == {"adapt": 100, "eval": 100, "bank": 600}
    # the tuned bundle: every file of the parent unchanged, plus the settings and a lineage entry
    assert set(bundle.manifest.files) == set(parent.manifest.files) | {SETTINGS_FILE, REPLAY_FILE}
    assert bundle.manifest.files["model.pt"] == parent.manifest.files["model.pt"]
    assert bundle.manifest.lineage[-1].stage == "adapt-tune"
    assert bundle.manifest.lineage[-1].parent == parent.manifest_sha256
    assert bundle_adapt_settings(bundle) == result.settings()
    assert bundle_adapt_settings(parent) == {}


def test_adapt_uses_the_bundle_settings_unless_set_and_carries_them(tuned, tmp_path):
    result, bundle = tuned
    config = adapt_config_for(bundle, {"steps": 2})
    assert {k: getattr(config, k) for k in result.settings()} == result.settings()
    explicit = adapt_config_for(bundle, {"bn_prior": 0.25})  # any explicit BN setting replaces the record
    assert (explicit.bn_stats, explicit.bn_depth, explicit.bn_prior) == (True, 0.75, 0.25)
    fast = {"trainable": "bn-stats", "steps": 1, "batch_size": 8, "head_dim": 32, "device": "cpu"}
    adapted = adapt(bundle, ImageDataset(embedded_default().images[:64], None, None, "digits"),
                    tmp_path / "a.edge", adapt_config_for(bundle, fast), export="never").bundle
    recorded = adapted.manifest.lineage[-1].settings["config"]
    assert {k: recorded[k] for k in result.settings()} == result.settings()
    assert bundle_adapt_settings(adapted) == result.settings()  # the next adaptation uses them too


def test_cli_tunes_and_adapt_picks_it_up(parent, tmp_path, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "t.edge"
    args = ["adapt-tune", str(parent.path), "--out", str(out), "--corruptions", "gaussian_noise",
            "--probe-images", "200", "--device", "cpu", "--opt", "depths=[1.0]", "--opt", "priors=[0.6]",
            "--opt", "bank_images=400", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    bn = {k: v for k, v in report["settings"].items() if k not in STEP_FIELDS}
    assert bn in ({"bn_stats": True, "bn_depth": 1.0, "bn_prior": 0.6}, {"bn_stats": False})
    # replay images shipped: replay on; alignment only where some BN layers keep the deployed statistics
    assert report["settings"]["replay_weight"] == 1.0
    assert report["settings"]["align_weight"] == (0.0 if bn["bn_stats"] else 1.0)
    again = runner.invoke(app, args)  # an existing OUT is never replaced silently
    assert again.exit_code != 0 and "exists" in str(again.exception or again.output)
    adapted = tmp_path / "a.edge"
    result = runner.invoke(app, ["adapt", str(out), "--data", str(_digits_npz(tmp_path)), "--out", str(adapted),
                                 "--trainable", "bn-stats", "--steps", "1", "--device", "cpu",
                                 "--export", "never", "--opt", "head_dim=32"])
    assert result.exit_code == 0, result.output
    config = Bundle.open(adapted).manifest.lineage[-1].settings["config"]
    assert {k: config[k] for k in report["settings"]} == report["settings"]


def _digits_npz(tmp_path):
    path = tmp_path / "local.npz"
    np.savez(path, x=embedded_default().images[:64])
    return path


def test_bad_input_is_refused_before_any_work(parent, tmp_path):
    from edge_ssl.models import load_encoder

    encoder = load_encoder(parent)
    digits = embedded_default()
    with pytest.raises(DataError, match="no labels"):
        tune_bn_settings(encoder, ImageDataset(digits.images, None, None, "unlabeled"), TuneConfig(**SMALL))
    with pytest.raises(DataError, match="probe_images"):
        tune_bn_settings(encoder, ImageDataset(digits.images[:250], digits.labels[:250], None, "few"),
                         TuneConfig(**SMALL))


def _with_record(parent, path, settings):
    with BundleWriter(path) as writer:
        writer.copy_file("model.pt", parent.file("model.pt"))
        writer.write_json(SETTINGS_FILE, {"settings": settings})
        return writer.commit(name=path.stem, encoder=parent.manifest.encoder, lineage=())


def test_records_are_read_and_broken_ones_are_a_clear_error(parent, tmp_path):
    tuned = _with_record(parent, tmp_path / "ok.edge", {"bn_stats": True, "bn_depth": 0.5, "bn_prior": 0.6})
    config = adapt_config_for(tuned, {"steps": 3})
    assert (config.bn_stats, config.bn_depth, config.bn_prior, config.steps) == (True, 0.5, 0.6, 3)
    assert not adapt_config_for(_with_record(parent, tmp_path / "keep.edge", {"bn_stats": False}), {}).bn_stats
    for index, bad in enumerate([{"bn_stats": True, "bn_depth": 0.0, "bn_prior": 0.5},
                                 {"bn_stats": True, "bn_prior": 0.5}, {"bn_stats": "yes"},
                                 {"bn_stats": False, "lr": 1.0}]):
        broken = _with_record(parent, tmp_path / f"broken{index}.edge", bad)
        with pytest.raises(BundleError, match="not a valid adapt-tune record"):
            adapt_config_for(broken, {})


def test_writing_over_the_input_is_refused(parent, tuned):
    result, _ = tuned
    with pytest.raises(BundleError, match="input bundle"):
        write_tuned(parent, result, parent.path)
    assert Bundle.open(parent.path, verify=True).manifest_sha256 == parent.manifest_sha256
