"""Structured pruning: smaller models that still run, rebuild from the manifest, keep the embedding."""

from __future__ import annotations

import pytest
import torch
from edge_ssl.compress.prune import (
    PruneConfig,
    PruneError,
    check_runs,
    prune,
    prune_encoder,
    step_ratios,
)

from edge_ssl.bundle import Bundle, sha256_file
from edge_ssl.errors import ConfigError
from edge_ssl.models import build_from_spec, create_encoder, load_encoder
from tests.conftest import ATOL
from tests.test_compress_fixtures import tiny_dataset, write_tiny_bundle


@pytest.fixture(scope="module")
def teacher_bundle(tmp_path_factory):
    """A tiny ResNet-18 (width 0.25) teacher bundle."""
    return write_tiny_bundle(tmp_path_factory.mktemp("teacher") / "teacher.edge")


def _conv_widths(model) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_prune_removes_channels_and_the_bundle_rebuilds_without_pickles(teacher_bundle, tmp_path):
    before = sha256_file(teacher_bundle.path / "model.pt")
    result = prune(teacher_bundle.path, PruneConfig(ratio=0.5), None, tmp_path / "p.edge")
    bundle = Bundle.open(tmp_path / "p.edge")
    assert bundle.manifest.encoder.factory == "edge_ssl.compress.prune.build_pruned_encoder"
    assert bundle.manifest.files["model.pt"].bytes < teacher_bundle.manifest.files["model.pt"].bytes
    metrics = bundle.manifest.metrics
    assert metrics["params"] < 0.6 * metrics["prune"]["params_before"]
    assert metrics["macs"] < metrics["prune"]["macs_before"]
    rebuilt = load_encoder(bundle)  # weights_only load into the rebuilt pruned architecture
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), result.encoder(x), atol=ATOL)
    assert rebuilt(x).shape == (2, teacher_bundle.manifest.embed_dim)
    assert all(w % 8 == 0 for w in _conv_widths(rebuilt))
    assert sha256_file(teacher_bundle.path / "model.pt") == before
    assert bundle.manifest.lineage[-1].stage == "prune"


def test_pruned_onnx_export_shrinks(teacher_bundle, tmp_path):
    from edge_ssl.runtime.export import export_encoder_onnx

    encoder = load_encoder(teacher_bundle)
    pruned = prune_encoder(encoder, PruneConfig(ratio=0.5, importance="bn_scale", scope="uniform")).encoder
    full = export_encoder_onnx(encoder, tmp_path / "full.onnx")
    small = export_encoder_onnx(pruned, tmp_path / "small.onnx")
    assert small.stat().st_size < 0.6 * full.stat().st_size


def test_excluded_layers_keep_their_channels_and_round_to_is_respected(teacher_bundle):
    encoder = load_encoder(teacher_bundle)
    config = PruneConfig(ratio=0.5, exclude=("backbone.conv1",), scope="uniform")
    pruned = prune_encoder(encoder, config).encoder
    assert pruned.backbone.conv1.out_channels == encoder.backbone.conv1.out_channels
    assert pruned.backbone.layer2[0].conv1.out_channels < encoder.backbone.layer2[0].conv1.out_channels
    coarse = prune_encoder(encoder, PruneConfig(ratio=0.5, round_to=16)).encoder
    assert all(w % 16 == 0 for w in _conv_widths(coarse))
    with pytest.raises(ConfigError, match="matches no module"):
        prune_encoder(encoder, PruneConfig(ratio=0.5, exclude=("backbone.nope*",)))


def test_iterative_taylor_pruning_with_recovery_distillation(teacher_bundle):
    encoder = load_encoder(teacher_bundle)
    config = PruneConfig(ratio=0.5, importance="taylor", steps=2, recovery_epochs=1, batch_size=8,
                         taylor_batches=1, recovery={"cache_views": 1, "head_hidden_dim": 16})
    result = prune_encoder(encoder, config, tiny_dataset(16))
    assert [s["step"] for s in result.steps] == [0, 1, 2]
    assert result.steps[2]["params"] < result.steps[1]["params"] < result.steps[0]["params"]
    rebuilt = build_from_spec(result.encoder.spec)
    rebuilt.load_state_dict(result.encoder.state_dict())
    assert sum(step_ratios(0.5, 1)) == pytest.approx(0.5)


@pytest.mark.parametrize("prune_heads", [False, True])
def test_vit_heads_and_mlp_width_are_pruned_and_rebuild(prune_heads):
    torch.manual_seed(0)
    vit = create_encoder("vit_tiny_cifar", width=0.5).eval()
    pruned = prune_encoder(vit, PruneConfig(ratio=0.5, prune_heads=prune_heads)).encoder
    block, original = pruned.backbone.blocks[0], vit.backbone.blocks[0]
    assert block.mlp.fc1.out_features < original.mlp.fc1.out_features
    assert block.attn.qkv.out_features < original.attn.qkv.out_features
    if prune_heads:
        assert block.attn.num_heads < original.attn.num_heads
    rebuilt = build_from_spec(pruned.spec)
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), pruned(x), atol=1e-4)
        assert pruned(x).shape == (2, vit.spec.embed_dim)


def test_ratio_outside_0_1_and_broken_models_are_clear_errors(teacher_bundle, tmp_path):
    for ratio in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"\(0, 1\)"):
            PruneConfig(ratio=ratio)
    encoder = create_encoder("resnet18_cifar", width=0.125)
    encoder.backbone.fc = torch.nn.Linear(7, 3)  # a head that no longer fits: the model cannot run
    with pytest.raises(PruneError, match="no longer runs"):
        check_runs(encoder)
    with pytest.raises(PruneError, match="--data"):
        prune(teacher_bundle.path, PruneConfig(importance="taylor"), None, tmp_path / "t.edge")
    assert not (tmp_path / "t.edge").exists()
