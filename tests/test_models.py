"""Tests for the encoder registry and factory (edge_ssl.models)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from edge_ssl.errors import CheckpointError, ConfigError
from edge_ssl.models import (
    ENCODER_KWARGS,
    ENCODERS,
    Encoder,
    EncoderInfo,
    build_from_spec,
    count_parameters,
    create_encoder,
    encoder_info,
    encoder_names,
    load_encoder,
    load_state_dict_file,
)
from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec

EXPECTED_NAMES = {
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenetv3_small",
    "mobilenetv3_large",
    "efficientnet_b0",
    "convnextv2_atto",
    "vit_tiny",
    "vit_small",
    "regnety_002",
    "regnetx_002",
    "resnet18_cifar",
    "resnet34_cifar",
    "resnet50_cifar",
    "mobilenetv3_small_cifar",
    "mobilenetv3_large_cifar",
    "efficientnet_b0_cifar",
    "vit_tiny_cifar",
}
# One encoder per family and stem kind, for the (costlier) width tests.
WIDTH_SAMPLES = (
    "resnet18",
    "resnet50_cifar",
    "mobilenetv3_small",
    "efficientnet_b0_cifar",
    "convnextv2_atto",
    "regnety_002",
    "vit_tiny",
)


# Tests that only look at shapes, specs and parameter counts build on the 'meta' device:
# no memory, no weight init.
META = torch.device("meta")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on a busy 2-core runner, two oversubscribe it (about 5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cheap_kwargs(name: str) -> dict[str, int]:
    """Keep unit tests at 32x32: *_cifar nets default to it; the others take image_size."""
    return {} if name.endswith("_cifar") else {"image_size": 32}


def test_registry_holds_the_documented_encoders() -> None:
    assert EXPECTED_NAMES <= set(encoder_names())
    assert encoder_names() == sorted(encoder_names())
    assert len(ENCODERS) == len(encoder_names())


@pytest.mark.parametrize("name", encoder_names())
def test_encoder_builds_runs_and_rebuilds_from_its_spec(name: str) -> None:
    torch.manual_seed(0)
    kwargs = cheap_kwargs(name)
    encoder = create_encoder(name, **kwargs)
    spec = encoder.spec
    size = spec.input.image_size
    assert spec.arch == name
    assert dict(spec.kwargs) == kwargs
    assert spec.input.shape == (3, size, size)

    encoder.eval()
    batch = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = encoder(batch)
    assert out.shape == (2, spec.embed_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()

    restored = EncoderSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec
    with META:
        rebuilt = build_from_spec(restored)
    assert rebuilt.spec == spec
    state = encoder.state_dict()
    assert all(key.startswith("backbone.") for key in state)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }


@pytest.mark.parametrize("name", encoder_names())
def test_encoder_info_matches_the_built_model(name: str) -> None:
    """`edge-ssl encoders` shows what --arch NAME really builds (input size, timm model)."""
    info = encoder_info(name)
    assert isinstance(info, EncoderInfo) and info.name == name
    with META:
        built = create_encoder(name)
    assert built.spec.input.shape[1:] == (info.input_size, info.input_size)
    assert built.backbone.default_cfg.get("architecture", info.timm_name) == info.timm_name
    assert info.description


def test_input_spec_uses_cifar_statistics_for_cifar_nets_and_timm_cfg_otherwise() -> None:
    with META:
        _check_input_specs()


def _check_input_specs() -> None:
    cifar = create_encoder("resnet18_cifar").spec.input
    assert (cifar.mean, cifar.std) == (CIFAR_MEAN, CIFAR_STD)
    assert cifar.shape == (3, 32, 32)
    imagenet = create_encoder("resnet18").spec.input
    assert (imagenet.mean, imagenet.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert imagenet.shape == (3, 224, 224)
    vit = create_encoder("vit_tiny", image_size=64)
    assert vit.spec.input.shape == (3, 64, 64)
    assert tuple(vit.spec.input.mean) == tuple(vit.backbone.pretrained_cfg["mean"])


def test_cifar_stems_keep_resolution() -> None:
    with META:
        _check_cifar_stems()


def _check_cifar_stems() -> None:
    resnet = create_encoder("resnet18_cifar").backbone
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity)
    for name in ("mobilenetv3_small_cifar", "mobilenetv3_large_cifar", "efficientnet_b0_cifar"):
        assert create_encoder(name).backbone.conv_stem.stride == (1, 1), name
    vit = create_encoder("vit_tiny_cifar").backbone
    assert vit.patch_embed.patch_size == (4, 4)
    assert vit.pos_embed.shape[1] == vit.num_prefix_tokens + 8 * 8


def test_resnet_matches_torchvision_parameter_count() -> None:
    with META:
        reference = torchvision.models.resnet18(weights=None)
        ours = create_encoder("resnet18")
    assert count_parameters(ours) == count_parameters(reference) - count_parameters(reference.fc)


def _channel_counts(model: nn.Module) -> list[tuple[str, int]]:
    counts = []
    for name, module in model.named_modules():
        # Squeeze-excite bottlenecks are tiny 1x1 convs on a 1x1 map; timm does not round them.
        if ".se." in f".{name}." or name.endswith(".se"):
            continue
        if isinstance(module, nn.Conv2d):
            counts.append((name, module.out_channels))
        elif isinstance(module, nn.Linear):
            counts.append((name, module.out_features))
    return counts


@pytest.mark.parametrize("name", WIDTH_SAMPLES)
def test_width_multiplier_shrinks_the_model_and_keeps_channels_multiples_of_8(name: str) -> None:
    with META:
        full = create_encoder(name, **cheap_kwargs(name))
        narrow = {w: create_encoder(name, width=w, **cheap_kwargs(name)) for w in (0.25, 0.5)}
    assert count_parameters(narrow[0.5]) < 0.6 * count_parameters(full)
    assert count_parameters(narrow[0.25]) < count_parameters(narrow[0.5])
    assert narrow[0.5].spec.kwargs["width"] == 0.5
    for width, encoder in narrow.items():
        assert encoder.spec.embed_dim % 8 == 0
        model = encoder.backbone
        odd = [(layer, n) for layer, n in _channel_counts(model) if n % 8]
        assert not odd, f"{name} width={width}: channel counts not multiples of 8: {odd[:5]}"


def test_narrow_resnet_scales_stem_and_stages() -> None:
    with META:
        backbone = create_encoder("resnet18", width=0.5, image_size=32).backbone
        bottleneck = create_encoder("resnet50_cifar", width=0.25).backbone
    assert backbone.conv1.out_channels == 32
    assert backbone.layer4[-1].conv2.out_channels == 256
    assert backbone.num_features == 256
    assert bottleneck.conv1.out_channels == 16
    assert bottleneck.num_features == 512


def test_vit_width_keeps_heads_whole() -> None:
    with META:
        vit = create_encoder("vit_small", width=0.25, image_size=32)
    assert vit.spec.embed_dim == 96
    assert vit.spec.embed_dim % vit.backbone.blocks[0].attn.num_heads == 0


def test_unknown_encoder_name_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'resnet18'"):
        create_encoder("resnet81")
    with pytest.raises(ConfigError, match="Valid names"):
        encoder_info("alexnet")


def test_unknown_kwarg_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'width'") as caught:
        create_encoder("resnet18", widht=0.5)
    for allowed in ENCODER_KWARGS:
        assert allowed in str(caught.value)
    with pytest.raises(ConfigError, match="never downloads weights"):
        create_encoder("resnet18", pretrained=True)


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("resnet18", {"width": 0}, "width"),
        ("resnet18", {"width": -1.0}, "width"),
        ("resnet18", {"width": "half"}, "width"),
        ("resnet18", {"width": True}, "width"),
        ("resnet18", {"image_size": 16}, "image_size"),
        ("resnet18", {"image_size": 32.0}, "image_size"),
        ("vit_tiny", {"image_size": 40}, "Try 32 or 48"),
        ("vit_tiny_cifar", {"image_size": 30}, "multiple of the patch size 4"),
    ],
)
def test_invalid_kwargs_raise_config_error(name: str, kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        create_encoder(name, **kwargs)


def test_build_from_spec_keeps_the_recorded_spec_and_checks_embed_dim() -> None:
    with META:
        _check_build_from_spec()


def _check_build_from_spec() -> None:
    spec = create_encoder("vit_tiny_cifar", width=0.5).spec
    imagenet_input = type(spec.input)(shape=spec.input.shape, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    custom = EncoderSpec(spec.arch, imagenet_input, spec.embed_dim, spec.kwargs)
    assert build_from_spec(custom).spec == custom

    wrong = EncoderSpec(spec.arch, spec.input, spec.embed_dim + 8, spec.kwargs)
    with pytest.raises(ConfigError, match="embed_dim"):
        build_from_spec(wrong)
    with pytest.raises(ConfigError, match="Did you mean"):
        build_from_spec(EncoderSpec("resnet_18", spec.input, 512))


def test_encoder_requires_a_spec() -> None:
    with pytest.raises(ConfigError, match="EncoderSpec"):
        Encoder(nn.Identity(), {"arch": "resnet18"})  # type: ignore[arg-type]


def test_load_state_dict_file_reads_torch_and_safetensors(tmp_path) -> None:
    encoder = create_encoder("resnet18_cifar", width=0.25)
    state = encoder.state_dict()
    torch.save(state, tmp_path / "model.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    for file in ("model.pt", "model.safetensors"):
        loaded = load_state_dict_file(tmp_path / file)
        assert loaded.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(loaded[key], value), (file, key)
        build_from_spec(encoder.spec).load_state_dict(loaded)


def test_load_state_dict_file_rejects_bad_files_naming_them(tmp_path) -> None:
    nested = tmp_path / "training.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, nested)
    with pytest.raises(CheckpointError, match="training.pt.*state_dict"):
        load_state_dict_file(nested)

    good = tmp_path / "good.pt"
    torch.save(create_encoder("resnet18_cifar", width=0.25).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_state_dict_file(truncated)

    broken = tmp_path / "broken.safetensors"
    save_file({"w": torch.ones(64)}, str(broken))
    broken.write_bytes(broken.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_state_dict_file(broken)

    with pytest.raises(CheckpointError, match="missing.pt"):
        load_state_dict_file(tmp_path / "missing.pt")


def test_load_encoder_rebuilds_a_bundle_with_its_weights(tmp_path) -> None:
    from edge_ssl.bundle import BundleWriter

    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.25).eval()
    with BundleWriter(tmp_path / "tiny.edge") as writer:
        writer.save_state_dict(encoder.state_dict())
        bundle = writer.commit(name="tiny", encoder=encoder.spec, lineage=())
    loaded = load_encoder(tmp_path / "tiny.edge")
    assert loaded.spec == encoder.spec and not loaded.training
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), encoder(batch))

    wrong = EncoderSpec("resnet18_cifar", encoder.spec.input, 256, {"width": 0.5})
    with BundleWriter(tmp_path / "wrong.edge") as writer:
        writer.save_state_dict(encoder.state_dict())
        writer.commit(name="wrong", encoder=wrong, lineage=())
    with pytest.raises(CheckpointError, match="do not fit the manifest's encoder"):
        load_encoder(tmp_path / "wrong.edge")
    assert load_encoder(bundle).spec == encoder.spec


def test_weights_mismatch_is_one_short_line_not_a_key_dump() -> None:
    from edge_ssl.models import weights_mismatch

    model = create_encoder("resnet18_cifar", width=0.125)
    state = dict(create_encoder("resnet34_cifar", width=0.125).state_dict())
    assert weights_mismatch(model, model.state_dict()) is None
    summary = weights_mismatch(model, state)
    assert summary.startswith("96 unexpected: ") and summary.endswith("and 93 more")
    state["backbone.conv1.weight"] = torch.zeros(1)
    assert "1 wrong shape: backbone.conv1.weight (1,) vs (8, 3, 3, 3)" in weights_mismatch(model, state)
