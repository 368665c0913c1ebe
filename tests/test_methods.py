"""SSL methods: registry, configs, forward/backward, momentum networks, parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edge_ssl.errors import ConfigError
from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, EncoderSpec, InputSpec
from edge_ssl.train.methods import (
    METHODS,
    DINOConfig,
    SimCLRConfig,
    SSLMethod,
    create_method,
    method_names,
)
from edge_ssl.train.methods.base import (
    cosine_schedule,
    ema_update,
    encode_grouped,
    mlp_head,
    off_diagonal,
)

ALL_METHODS = ["barlow_twins", "byol", "dino", "simclr", "simsiam", "vicreg"]
MOMENTUM_METHODS = ["byol", "dino"]

#: Tiny heads so a training step takes milliseconds; DINO also gets two local crops.
SMALL: dict[str, dict] = {
    "simclr": {"projection_hidden_dim": 32, "projection_dim": 16},
    "byol": {"projection_hidden_dim": 32, "projection_dim": 16, "prediction_hidden_dim": 32},
    "dino": {
        "out_dim": 64,
        "head_hidden_dim": 32,
        "head_bottleneck_dim": 16,
        "num_local_crops": 2,
        "freeze_last_layer_fraction": 0.0,
    },
    "simsiam": {"projection_hidden_dim": 32, "projection_dim": 32, "prediction_hidden_dim": 8},
    "vicreg": {"projection_hidden_dim": 32, "projection_dim": 32},
    "barlow_twins": {"projection_hidden_dim": 32, "projection_dim": 32},
}

PAPER_OPTIMIZERS = {
    "simclr": "lars",
    "byol": "lars",
    "barlow_twins": "lars",
    "vicreg": "lars",
    "dino": "adamw",
    "simsiam": "sgd",
}


class TinyEncoder(nn.Module):
    """(N, 3, H, W) -> (N, embed_dim), with BatchNorm like the real CIFAR encoders."""

    def __init__(self, embed_dim: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, embed_dim),
        )
        self.spec = EncoderSpec(
            arch="tiny_test",
            input=InputSpec(shape=(3, 8, 8), mean=CIFAR_MEAN, std=CIFAR_STD),
            embed_dim=embed_dim,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def make_views(method: SSLMethod, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 8, 8, generator=generator) for _ in range(method.num_views)]
    views += [
        torch.randn(batch, 3, 4, 4, generator=generator) for _ in range(method.num_local_views)
    ]
    return views


def small_method(name: str, **overrides) -> SSLMethod:
    torch.manual_seed(0)
    return create_method(name, TinyEncoder(), **{**SMALL[name], **overrides})


def target_pairs(method: SSLMethod) -> list[tuple[nn.Module, nn.Module]]:
    """(online, momentum copy) module pairs of a momentum method."""
    if method.name == "byol":
        return [
            (method.encoder, method.target_encoder),
            (method.projector, method.target_projector),
        ]
    return [(method.encoder, method.teacher_encoder), (method.head, method.teacher_head)]


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# --- registry and factory -----------------------------------------------------------


def test_registry_has_every_method():
    assert method_names() == ALL_METHODS
    assert sorted(SMALL) == ALL_METHODS
    assert len(METHODS) == len(ALL_METHODS)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_paper_defaults_build_an_optimizer_that_trains_only_the_online_network(name):
    """What `pretrain` does with a method's defaults: one step moves the online weights only."""
    from edge_ssl.train.optim import build_optimizer

    torch.manual_seed(0)
    method = create_method(name, TinyEncoder(), **SMALL[name])
    assert PAPER_OPTIMIZERS[name] == method.default_optimizer  # the optimizer the paper used
    groups = method.parameter_groups(method.default_weight_decay)
    optimizer = build_optimizer(method.default_optimizer, groups, method.default_lr, method.default_weight_decay)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    loss, _ = method([torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)] + _local_views(method))
    loss.backward()
    optimizer.step()
    after = method.state_dict()
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    moved = {k for k in trainable if not torch.equal(before[k], after[k])}
    assert moved, "no trainable weight moved"
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert all(torch.equal(before[k], after[k]) for k in frozen), "a momentum network took a gradient step"


def _local_views(method):
    return [torch.rand(4, 3, 4, 4) for _ in range(method.num_local_views)]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_default_config_forward_backward(name):
    torch.manual_seed(0)
    encoder = TinyEncoder()
    method = create_method(name, encoder)
    assert method.num_views == 2
    assert method.config == method.config_class()

    loss, logs = method(make_views(method))

    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"loss", "std"} <= set(logs)
    for key, value in logs.items():
        assert value.ndim == 0 and not value.requires_grad, key
        assert torch.isfinite(value), key
    loss.backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_training_step_changes_encoder_and_keeps_finite(name):
    method = small_method(name)
    optimizer = torch.optim.SGD(method.parameter_groups(weight_decay=1e-4), lr=0.1)
    before = flat(method.encoder)
    for step in range(2):
        loss, _ = method(make_views(method, seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.momentum_update(progress=(step + 1) / 2)
        assert torch.isfinite(loss)
    assert not torch.equal(before, flat(method.encoder))


def test_unknown_method_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'simclr'"):
        create_method("simclrr", TinyEncoder())


def test_unknown_setting_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'temperature'") as info:
        create_method("simclr", TinyEncoder(), temprature=0.2)
    assert "temprature" in str(info.value)


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("simclr", "temperature", 0.0),
        ("simclr", "temperature", "0.5"),
        ("simclr", "projection_dim", 0),
        ("byol", "base_momentum", 1.5),
        ("byol", "prediction_hidden_dim", 2.5),
        ("dino", "student_temp", -0.1),
        ("dino", "num_local_crops", -1),
        ("dino", "use_bn_in_head", "false"),
        ("dino", "warmup_teacher_temp_fraction", float("nan")),
        ("simsiam", "projection_layers", 0),
        ("vicreg", "variance_eps", 0.0),
        ("vicreg", "covariance_weight", True),
        ("barlow_twins", "redundancy_weight", -1.0),
    ],
)
def test_invalid_setting_raises_config_error(name, key, value):
    with pytest.raises(ConfigError) as info:
        create_method(name, TinyEncoder(), **{key: value})
    message = str(info.value)
    assert key in message and repr(value) in message


def test_numbers_are_stored_as_floats_and_survive_a_lineage_round_trip():
    from edge_ssl.config import config_from_dict, config_to_dict

    config = SimCLRConfig(temperature=1)
    assert isinstance(config.temperature, float) and config.temperature == 1.0
    assert config_from_dict(SimCLRConfig, config_to_dict(config)) == config


@pytest.mark.parametrize("name", ALL_METHODS)
def test_numpy_settings_are_stored_as_python_numbers_for_the_manifest(name):
    import json

    import numpy as np

    from edge_ssl.config import config_to_dict

    config = small_method(name).config
    values = config_to_dict(config)
    as_numpy = {
        key: np.bool_(value) if isinstance(value, bool)
        else np.int64(value) if isinstance(value, int) else np.float32(value)
        for key, value in values.items()
    }
    stored = config_to_dict(type(config)(**as_numpy))
    assert json.loads(json.dumps(stored)) == pytest.approx(values)


def test_encoder_without_spec_is_rejected():
    with pytest.raises(ConfigError, match="embed_dim"):
        create_method("byol", nn.Linear(4, 4))


def test_wrong_config_type_is_rejected():
    with pytest.raises(ConfigError, match="BYOLConfig"):
        METHODS.get("byol")(TinyEncoder(), SimCLRConfig())


@pytest.mark.parametrize(
    ("views", "match"),
    [
        ([torch.randn(4, 3, 8, 8)], "expects a list of 2 views"),
        ([torch.randn(4, 3, 8, 8), torch.randn(3, 3, 8, 8)], "one batch size"),
        ([torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)], "at least 2 images"),
        ([torch.randn(4, 3, 8, 8), torch.randn(4, 8, 8)], r"\(N, C, H, W\)"),
    ],
)
def test_bad_views_are_rejected(views, match):
    method = small_method("simclr")
    with pytest.raises(ConfigError, match=match):
        method(views)


def test_dino_expects_its_local_crops():
    method = small_method("dino", num_local_crops=2)
    assert method.num_local_views == 2
    with pytest.raises(ConfigError, match="2 global \\+ 2 local"):
        method([torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)])


@pytest.mark.parametrize("progress", [-0.1, 1.5, float("nan"), "0.5"])
def test_progress_outside_unit_interval_is_rejected(progress):
    with pytest.raises(ConfigError, match="progress"):
        small_method("byol").momentum_update(progress)


# --- momentum networks ----------------------------------------------------------------


@pytest.mark.parametrize("name", MOMENTUM_METHODS)
def test_momentum_update_moves_target_toward_online(name):
    method = small_method(name)
    with torch.no_grad():
        for online, _ in target_pairs(method):
            for param in online.parameters():
                param.add_(torch.randn_like(param))
    base = method.config.base_momentum
    gaps_before = [flat(target) - flat(online) for online, target in target_pairs(method)]
    method.momentum_update(0.0)
    gaps_after = [flat(target) - flat(online) for online, target in target_pairs(method)]
    for before, after in zip(gaps_before, gaps_after, strict=True):
        torch.testing.assert_close(after, base * before)
        assert after.norm() < before.norm()


@pytest.mark.parametrize("name", MOMENTUM_METHODS)
@pytest.mark.parametrize(("base_momentum", "progress"), [(1.0, 0.3), (0.9, 1.0)])
def test_momentum_one_leaves_target_unchanged(name, base_momentum, progress):
    method = small_method(name, base_momentum=base_momentum)
    with torch.no_grad():
        for param in method.encoder.parameters():
            param.add_(1.0)
    before = [flat(target) for _, target in target_pairs(method)]
    method.momentum_update(progress)
    for old, (_, target) in zip(before, target_pairs(method), strict=True):
        assert torch.equal(old, flat(target))


@pytest.mark.parametrize("name", MOMENTUM_METHODS)
def test_momentum_networks_are_frozen_children_in_the_state_dict(name):
    method = small_method(name)
    keys = method.state_dict().keys()
    for online, target in target_pairs(method):
        assert all(not p.requires_grad for p in target.parameters())
        assert all(p.requires_grad for p in online.parameters())
        assert target is not online
    prefix = "target_encoder." if name == "byol" else "teacher_encoder."
    assert any(key.startswith(prefix) for key in keys)
    if name == "dino":
        assert {"criterion.center", "progress"} <= set(keys)


def test_byol_targets_get_no_gradient():
    method = small_method("byol")
    loss, _ = method(make_views(method))
    loss.backward()
    assert all(p.grad is None for p in method.target_encoder.parameters())
    assert all(p.grad is None for p in method.target_projector.parameters())


@pytest.mark.parametrize("name", ["simclr", "simsiam", "vicreg", "barlow_twins"])
def test_momentum_update_is_a_no_op_without_target(name):
    method = small_method(name)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.momentum_update(0.5)
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_trained_encoder(name):
    encoder = TinyEncoder()
    method = create_method(name, encoder, **SMALL[name])
    kept = method.trained_encoder()
    if name == "dino":
        assert kept is method.teacher_encoder and kept is not encoder
    else:
        assert kept is encoder
    assert kept.spec.embed_dim == encoder.spec.embed_dim
    assert kept(torch.randn(2, 3, 8, 8)).shape == (2, encoder.spec.embed_dim)


def test_dino_records_progress_and_warms_up_teacher_temperature():
    method = small_method("dino", warmup_teacher_temp_fraction=0.5)
    _, logs = method(make_views(method))
    assert logs["teacher_temp"].item() == pytest.approx(method.config.warmup_teacher_temp)
    method.momentum_update(0.25)
    assert float(method.progress) == pytest.approx(0.25)
    _, logs = method(make_views(method))
    middle = (method.config.warmup_teacher_temp + method.config.teacher_temp) / 2
    assert logs["teacher_temp"].item() == pytest.approx(middle)
    method.momentum_update(0.75)
    _, logs = method(make_views(method))
    assert logs["teacher_temp"].item() == pytest.approx(method.config.teacher_temp)


def test_dino_teacher_temperature_schedule():
    config = DINOConfig(
        warmup_teacher_temp=0.04, teacher_temp=0.08, warmup_teacher_temp_fraction=0.2
    )
    assert config.teacher_temperature(0.0) == pytest.approx(0.04)
    assert config.teacher_temperature(0.1) == pytest.approx(0.06)
    assert config.teacher_temperature(0.2) == pytest.approx(0.08)
    assert config.teacher_temperature(1.0) == pytest.approx(0.08)
    assert DINOConfig(warmup_teacher_temp_fraction=0.0).teacher_temperature(0.0) == 0.07


def test_dino_freezes_last_layer_early():
    method = small_method("dino", freeze_last_layer_fraction=0.5)
    loss, _ = method(make_views(method))
    loss.backward()
    assert torch.count_nonzero(method.head.last_layer.weight.grad) == 0
    assert any(p.grad.abs().sum() > 0 for p in method.head.mlp.parameters())

    method.zero_grad()
    method.momentum_update(0.6)
    loss, _ = method(make_views(method))
    loss.backward()
    assert torch.count_nonzero(method.head.last_layer.weight.grad) > 0


def test_dino_forward_updates_center():
    method = small_method("dino")
    assert torch.count_nonzero(method.criterion.center) == 0
    method(make_views(method))
    assert torch.count_nonzero(method.criterion.center) > 0


def test_single_process_makes_no_distributed_calls(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called in a single process")

    for collective in ("all_reduce", "all_gather", "barrier", "broadcast"):
        monkeypatch.setattr(torch.distributed, collective, forbidden)
    for name in ALL_METHODS:
        method = small_method(name)
        loss, _ = method(make_views(method))
        loss.backward()
        method.momentum_update(0.5)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_losses_stay_float32_under_autocast(name):
    method = small_method(name)
    views = make_views(method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = method(views)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.encoder.parameters())


def test_loss_arithmetic_ignores_autocast():
    from edge_ssl.train.methods import BarlowTwinsLoss, NTXentLoss, VICRegLoss

    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 6, generator=generator), torch.randn(8, 6, generator=generator)
    for criterion in (BarlowTwinsLoss(), VICRegLoss(), NTXentLoss(0.1)):
        expected = criterion(z1, z2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(criterion(z1, z2), expected), type(criterion).__name__


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL_METHODS)
def test_methods_train_on_cuda_with_bf16_autocast(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")
    method = small_method(name).cuda()
    views = [v.cuda() for v in make_views(method, batch=8)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, logs = method(views)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(v.device.type == "cuda" for v in logs.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.encoder.parameters())
    method.momentum_update(0.5)


# --- parameter groups -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_METHODS)
def test_parameter_groups_split_decay_and_skip_frozen(name):
    method = small_method(name)
    groups = method.parameter_groups(weight_decay=0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])
    grouped = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in method.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert len(set(grouped)) == len(grouped)
    torch.optim.AdamW(groups, lr=1e-3)


def test_parameter_groups_reject_negative_weight_decay():
    with pytest.raises(ConfigError, match="weight_decay"):
        small_method("simclr").parameter_groups(-1.0)


# --- shared helpers ---------------------------------------------------------------------


def test_cosine_schedule_endpoints():
    assert cosine_schedule(0.99, 1.0, 0.0) == pytest.approx(0.99)
    assert cosine_schedule(0.99, 1.0, 0.5) == pytest.approx(0.995)
    assert cosine_schedule(0.99, 1.0, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(0.99, 1.0, 0.25) == pytest.approx(
        1.0 - 0.01 * (math.cos(math.pi / 4) + 1) / 2
    )


def test_ema_update_is_a_convex_combination():
    torch.manual_seed(0)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [
        0.9 * t.detach() + 0.1 * o.detach()
        for t, o in zip(target.parameters(), online.parameters(), strict=True)
    ]
    ema_update(target, online, 0.9)
    for want, got in zip(expected, target.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want)


def test_mlp_head_layout():
    head = mlp_head([4, 8, 8, 2], last_batch_norm=True, last_affine=False)
    kinds = [type(m).__name__ for m in head]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
    ]
    assert head[0].bias is None and head[6].bias is None and not head[7].affine
    plain = mlp_head([4, 8, 2], batch_norm=False, activation=nn.GELU)
    assert [type(m).__name__ for m in plain] == ["Linear", "GELU", "Linear"]
    assert plain[0].bias is not None and plain[2].bias is not None


def test_off_diagonal_takes_every_entry_but_the_diagonal():
    matrix = torch.arange(9.0).view(3, 3)
    assert sorted(off_diagonal(matrix).tolist()) == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]


def test_encode_grouped_runs_one_forward_per_resolution():
    calls = []
    encoder = TinyEncoder()
    encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    views = [torch.randn(2, 3, 8, 8)] * 2 + [torch.randn(2, 3, 4, 4)] * 3
    out = encode_grouped(encoder, views)
    assert calls == [4, 6]
    assert out.shape == (10, 16)
