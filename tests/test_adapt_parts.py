"""Adaptation building blocks: trainable subsets, LoRA merge, AdaBN, BN folding, the memory model, the guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edge_ssl.adapt.bn import batch_norms, reestimate_bn_stats
from edge_ssl.adapt.config import AdaptConfig
from edge_ssl.adapt.export import fold_batchnorm
from edge_ssl.adapt.guard import GuardConfig, check_embeddings
from edge_ssl.adapt.lora import add_lora, merge_lora
from edge_ssl.adapt.memory import MemoryFit, StepMemory, fit_memory, measure_step
from edge_ssl.adapt.plan import measure_configuration
from edge_ssl.adapt.trainables import apply_trainables
from edge_ssl.errors import ConfigError
from edge_ssl.evaluate import embedding_health
from edge_ssl.models import create_encoder
from tests.conftest import ATOL, RTOL


@pytest.fixture
def encoder() -> nn.Module:
    torch.manual_seed(0)
    return create_encoder("resnet18_cifar", width=0.25).eval()


@pytest.fixture
def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


def _trainable(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_subsets_free_what_their_names_say(encoder):
    names = dict(encoder.named_parameters())
    norm = apply_trainables(encoder, "norm")
    assert norm.names and all(".bn" in n or "downsample.1" in n for n in norm.names)
    bias = apply_trainables(encoder, "bias")
    assert bias.names and all(n.endswith(".bias") for n in bias.names)
    last = apply_trainables(encoder, "last-stage")
    assert last.names and all(n.startswith("backbone.layer4.") for n in last.names)
    assert apply_trainables(encoder, "bn-stats").names == ()
    assert set(apply_trainables(encoder, "full").names) == set(names)
    with pytest.raises(ConfigError, match="trainable"):
        apply_trainables(encoder, "everything")


def test_lora_starts_as_identity_and_merges_back_into_the_same_weights(encoder, batch):
    keys = set(encoder.state_dict())
    before = encoder(batch)
    plan = apply_trainables(encoder, "lora", lora_rank=2)
    assert plan.lora_layers and all(".down." in n or ".up." in n for n in plan.names)
    torch.testing.assert_close(encoder(batch), before, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    adapted = encoder(batch)
    assert not torch.allclose(adapted, before, atol=1e-3)
    assert merge_lora(encoder) == len(plan.lora_layers)
    assert set(encoder.state_dict()) == keys
    torch.testing.assert_close(encoder(batch), adapted, atol=1e-4, rtol=1e-4)


def test_lora_on_linear_layers():
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    x = torch.randn(3, 16)
    assert add_lora(model, rank=2) == ["0", "2"]
    with torch.no_grad():
        model[0].up.add_(0.1)
    out = model(x)
    merge_lora(model)
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model(x), out, atol=ATOL, rtol=RTOL)


def test_adabn_sets_statistics_of_the_local_data(encoder, batch):
    shifted = batch * 3 + 2
    first = next(batch_norms(encoder))
    source = first.running_mean.clone()
    reestimate_bn_stats(encoder, iter([shifted[:2], shifted[2:]]))
    expected = encoder.backbone.conv1(shifted).mean(dim=(0, 2, 3))
    torch.testing.assert_close(first.running_mean, expected, atol=1e-4, rtol=1e-4)
    assert not encoder.training  # modes restored
    target = first.running_mean.clone()
    first.running_mean.copy_(source)
    reestimate_bn_stats(encoder, iter([shifted]), prior=0.5)
    torch.testing.assert_close(first.running_mean, (source + target) / 2, atol=1e-4, rtol=1e-4)


def test_a_shallow_depth_reestimates_only_the_first_layers_and_gives_the_deep_ones_the_source(encoder, batch):
    from edge_ssl.adapt.bn import bn_statistics, shallow_count

    deployed = bn_statistics(encoder)
    layers = list(batch_norms(encoder))
    shallow = shallow_count(len(layers), 0.5)
    assert 1 <= shallow < len(layers)
    for bn in layers[shallow:]:  # stand-in for statistics an earlier full pass left behind
        bn.running_mean.add_(5.0)
    reestimate_bn_stats(encoder, iter([batch * 3 + 2]), prior=0.0, source=deployed, depth=0.5)
    after = bn_statistics(encoder)
    for (mean, _), (deployed_mean, _) in zip(after[:shallow], deployed[:shallow], strict=True):
        assert not torch.allclose(mean, deployed_mean)
    for (mean, var), (deployed_mean, deployed_var) in zip(after[shallow:], deployed[shallow:], strict=True):
        torch.testing.assert_close(mean, deployed_mean)
        torch.testing.assert_close(var, deployed_var)
    assert not encoder.training and not any(bn.training for bn in layers)
    full = create_encoder("resnet18_cifar", width=0.25).eval()
    full.load_state_dict(encoder.state_dict())
    reestimate_bn_stats(full, iter([batch * 3 + 2]), prior=0.0, source=deployed)
    for (mean, _), (full_mean, _) in zip(after[:shallow], bn_statistics(full)[:shallow], strict=True):
        torch.testing.assert_close(mean, full_mean)  # the shallow layers never depend on deeper ones
    assert [shallow_count(20, d) for d in (0.01, 0.5, 1.0)] == [1, 10, 20]


def test_bn_input_statistics_are_those_of_each_layers_input_and_change_nothing(encoder, batch):
    from edge_ssl.adapt.bn import bn_input_statistics, bn_statistics

    before = bn_statistics(encoder)
    stats = bn_input_statistics(encoder, iter([batch[:2], batch[2:]]))
    conv = encoder.backbone.conv1(batch)
    torch.testing.assert_close(stats[0][0], conv.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats[0][1], conv.var(dim=(0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-4)
    assert len(stats) == len(before) and not encoder.training
    for (mean, var), (same_mean, same_var) in zip(before, bn_statistics(encoder), strict=True):
        assert torch.equal(mean, same_mean) and torch.equal(var, same_var)


def test_carrying_the_step_change_moves_only_deep_layers_whose_inputs_changed(encoder):
    from edge_ssl.adapt.bn import bn_statistics, carry_step_change

    source = bn_statistics(encoder)
    count = len(source)
    before = [(torch.randn_like(m), torch.rand_like(v) + 0.5) for m, v in source]
    after = [(m.clone(), v.clone()) for m, v in before]
    after[-1] = (before[-1][0] + 2.0, before[-1][1] * 3.0)  # the steps reached the last layer only
    shallow_before = [(m.clone(), v.clone()) for m, v in bn_statistics(encoder)[: count // 2]]
    carry_step_change(encoder, source, before, after, depth=0.5)
    now = bn_statistics(encoder)
    for (mean, var), (kept_mean, kept_var) in zip(now[: count // 2], shallow_before, strict=True):
        assert torch.equal(mean, kept_mean) and torch.equal(var, kept_var)  # shallow: untouched
    for (mean, var), (source_mean, source_var) in zip(now[count // 2 : -1], source[count // 2 : -1], strict=True):
        torch.testing.assert_close(mean, source_mean)
        torch.testing.assert_close(var, source_var)
    torch.testing.assert_close(now[-1][0], source[-1][0] + 2.0)
    torch.testing.assert_close(now[-1][1], source[-1][1] * 3.0, rtol=1e-4, atol=1e-4)


def test_alignment_is_zero_at_the_deployed_statistics_and_grows_with_the_shift(encoder, batch):
    from edge_ssl.adapt.bn import bn_input_statistics, shallow_count
    from edge_ssl.adapt.step import aligned_norms, alignment_term

    every = list(batch_norms(encoder))
    assert aligned_norms(encoder, AdaptConfig(bn_depth=0.5)) == every[shallow_count(len(every), 0.5):]
    assert aligned_norms(encoder, AdaptConfig(bn_stats=False)) == list(batch_norms(encoder))
    stats = bn_input_statistics(encoder, iter([batch]))
    for bn, (mean, var) in zip(batch_norms(encoder), stats, strict=True):
        bn.running_mean.copy_(mean)  # what each layer sees on this batch, one layer at a time
        bn.running_var.copy_(var)
    # the inputs of deep layers depend on the statistics of earlier ones: compare at the first
    first = list(batch_norms(encoder))[:1]
    assert float(alignment_term(encoder, first, batch).detach()) < 1e-6
    assert float(alignment_term(encoder, first, batch * 2 + 1).detach()) > 0.5
    weight = encoder.backbone.conv1.weight
    weight.requires_grad_(True)
    alignment_term(encoder, first, batch * 2 + 1).backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0  # the steps can act on it


def test_alignment_needs_layers_that_keep_the_deployed_statistics():
    from edge_ssl.adapt.step import check_alignment

    with pytest.raises(ConfigError, match="align_weight"):
        AdaptConfig(align_weight=1.0, bn_depth=1.0)
    AdaptConfig(align_weight=1.0, bn_depth=1.0, bn_stats=False)
    AdaptConfig(align_weight=1.0, ssl_weight=0.0, distill_weight=0.0)  # alignment alone is an objective
    without_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError, match="this encoder has none"):
        check_alignment(without_bn, AdaptConfig(align_weight=1.0))
    check_alignment(without_bn, AdaptConfig())  # nothing asked, nothing to refuse


def test_bn_depth_zero_is_refused_with_what_to_use_instead():
    with pytest.raises(ConfigError, match="bn_stats=false"):
        AdaptConfig(bn_depth=0)
    with pytest.raises(ConfigError, match="bn_depth"):
        AdaptConfig(bn_depth=1.5)


def test_folding_batchnorm_keeps_the_output(encoder, batch):
    reestimate_bn_stats(encoder, iter([batch * 2 + 1]))  # non-trivial statistics
    folded = fold_batchnorm(encoder.backbone)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(batch), encoder.backbone(batch), atol=1e-4, rtol=1e-4)


def test_memory_model_of_a_linear_layer_is_exact():
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    memory = measure_step(lambda b: (layer(x[:b]).square().sum(), [x]), [layer], 4, optimizer="sgd")
    weight_bytes = (16 * 8 + 8) * 4
    assert memory.weights == weight_bytes
    assert memory.gradients == weight_bytes and memory.optimizer_state == weight_bytes
    assert memory.inputs == 4 * 16 * 4
    assert memory.activations >= 4 * 16 * 4  # the input saved for the weight gradient
    assert all(p.grad is None for p in layer.parameters())  # no step taken, nothing left behind


def test_memory_fit_picks_the_largest_batch_that_fits():
    small = StepMemory(batch=4, weights=100, inputs=0, activations=40, gradients=0, optimizer_state=0)
    large = StepMemory(batch=8, weights=100, inputs=0, activations=80, gradients=0, optimizer_state=0)
    fit = fit_memory(small, large)
    assert fit == MemoryFit(fixed=100.0, per_image=10.0)
    assert fit.largest_batch(260, cap=64) == 16
    assert fit.largest_batch(50, cap=64) == 0


def test_frozen_prefixes_keep_no_activations(encoder):
    """The ranking a user budgets with: LoRA/last stage << norm (backward to the stem) <= full."""
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    targets = np.zeros((8, encoder.spec.embed_dim), np.float32)
    config = AdaptConfig(head_dim=64)
    measured = {k: measure_configuration(encoder, k, images, targets, config, batch=8)
                for k in ("full", "norm", "last-stage", "lora")}
    acts = {k: m.activations for k, m in measured.items()}
    assert acts["last-stage"] < 0.3 * acts["full"] and acts["lora"] < 0.3 * acts["full"]
    assert acts["norm"] <= acts["full"]
    assert measured["lora"].gradients < measured["last-stage"].gradients < measured["full"].gradients
    full = measured["full"]
    checkpointed = measure_configuration(encoder, "full", images, targets, config, batch=8,
                                         checkpointing=True,
                                         block_bytes_per_image=full.largest_block / 8)
    assert checkpointed.model_bytes < full.model_bytes


def test_guard_flags_collapse_and_drift():
    rng = np.random.default_rng(0)
    deployed = rng.normal(size=(32, 16))
    baseline = embedding_health(deployed)
    config = GuardConfig(min_agreement=0.5)
    assert check_embeddings(1, deployed + 0.01 * rng.normal(size=deployed.shape), deployed, baseline, config).ok
    collapsed = np.tile(rng.normal(size=(1, 16)), (32, 1)) + 1e-6 * rng.normal(size=(32, 16))
    report = check_embeddings(2, collapsed, deployed, baseline, config)
    assert not report.ok and "collapsed" in report.reason
    drifted = check_embeddings(3, rng.normal(size=(32, 16)), deployed, baseline, config)
    assert not drifted.ok and "agreement" in drifted.reason


def test_a_second_reestimation_mixes_with_the_deployed_statistics_not_the_adapted_ones(encoder, batch):
    from edge_ssl.adapt.bn import bn_statistics

    deployed = bn_statistics(encoder)
    shifted = batch * 3 + 2
    reestimate_bn_stats(encoder, iter([shifted]), prior=0.5, source=deployed)
    once = bn_statistics(encoder)
    reestimate_bn_stats(encoder, iter([shifted]), prior=0.5, source=deployed)  # e.g. after training
    for (mean, var), (again_mean, again_var) in zip(once, bn_statistics(encoder), strict=True):
        torch.testing.assert_close(again_mean, mean)
        torch.testing.assert_close(again_var, var)
    reestimate_bn_stats(encoder, iter([shifted]), prior=0.5)  # default source: the current stats
    assert not torch.allclose(bn_statistics(encoder)[0][0], once[0][0])  # the prior compounds
