"""Tests for safe checkpoint reading and foreign SSL checkpoint import (edge_ssl.checkpoint)."""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from edge_ssl.checkpoint import (
    SOURCE_FORMATS,
    ImportReport,
    import_checkpoint,
    import_checkpoint_dict,
    read_checkpoint,
)
from edge_ssl.errors import CheckpointError

# Same ops on the same weights in fp32 on CPU: only summation order may differ.
ATOL = 1e-5
RTOL = 1e-5
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on a busy 2-core runner, two oversubscribe it (about 5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give BN non-default statistics, so a BN tensor loaded into the wrong place shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.num_batches_tracked.fill_(1000)


def _resnet18(seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    _randomize_batchnorm(model, generator)
    return model.eval()


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """The torchvision ResNet-18 whose weights every format below carries."""
    return _resnet18(seed=1)


@pytest.fixture(scope="module")
def other() -> nn.Module:
    """Different weights: the parts an import must ignore (student, momentum encoder)."""
    return _resnet18(seed=2)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def expected(source: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    pooled = copy.deepcopy(source)
    pooled.fc = nn.Identity()
    with torch.no_grad():
        return pooled(batch)


def _backbone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def _sgd_state(model: nn.Module) -> dict:
    return torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9).state_dict()


def _mlp(prefix: str, dims: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Linear layers at indices 0, 2, 4 ... like nn.Sequential(Linear, ReLU, Linear, ...)."""
    out = {}
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(d_out, d_in)
        out[f"{prefix}{2 * i}.bias"] = torch.zeros(d_out)
    return out


def make_torchvision(src: nn.Module, oth: nn.Module) -> dict:
    return src.state_dict()


def make_state_dict(src: nn.Module, oth: nn.Module) -> dict:
    return _prefixed("backbone.", _backbone(src))


def make_dino(src: nn.Module, oth: nn.Module) -> dict:
    # main_dino.py: the student is DDP-wrapped ('module.'), MultiCropWrapper holds backbone + head.
    head = _mlp("head.mlp.", (512, 64, 32)) | {"head.last_layer.weight_g": torch.ones(256, 1)}
    return {
        "student": _prefixed("module.", _prefixed("backbone.", _backbone(oth)) | head),
        "teacher": _prefixed("backbone.", _backbone(src)) | head,
        "optimizer": _sgd_state(oth),
        "epoch": 100,
        "dino_loss": {"center": torch.zeros(1, 256)},
    }


def make_solo_learn(src: nn.Module, oth: nn.Module) -> dict:
    state = (
        _prefixed("backbone.", _backbone(src))
        | _mlp("projector.", (512, 256, 128))
        | _prefixed("momentum_backbone.", _backbone(oth))
        | _mlp("momentum_projector.", (512, 256, 128))
        | {"classifier.weight": torch.randn(10, 512), "classifier.bias": torch.zeros(10)}
    )
    return {
        "epoch": 399,
        "global_step": 78000,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": state,
        "optimizer_states": [_sgd_state(src)],
        "lr_schedulers": [{"last_epoch": 399}],
    }


def make_lightly(src: nn.Module, oth: nn.Module) -> dict:
    # lightly's docs: backbone = nn.Sequential(*list(resnet.children())[:-1]) in a model with heads.
    sequential = nn.Sequential(*list(copy.deepcopy(src).children())[:-1])
    return (
        _prefixed("backbone.", sequential.state_dict())
        | _mlp("projection_head.layers.", (512, 512, 128))
        | _prefixed("backbone_momentum.", nn.Sequential(*list(oth.children())[:-1]).state_dict())
    )


def make_lightly_sequential(src: nn.Module, oth: nn.Module) -> dict:
    return nn.Sequential(*list(copy.deepcopy(src).children())[:-1]).state_dict()


def make_moco_v2(src: nn.Module, oth: nn.Module) -> dict:
    mlp = _mlp("fc.", (512, 512, 128))
    state = (
        _prefixed("module.encoder_q.", _backbone(src) | mlp)
        | _prefixed("module.encoder_k.", _backbone(oth) | mlp)
        | {
            "module.queue": torch.randn(128, 4096),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
        }
    )
    return {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": _sgd_state(src)}


def make_moco_v3(src: nn.Module, oth: nn.Module) -> dict:
    mlp = _mlp("fc.", (512, 1024, 256))
    state = (
        _prefixed("module.base_encoder.", _backbone(src) | mlp)
        | _prefixed("module.momentum_encoder.", _backbone(oth) | mlp)
        | _mlp("module.predictor.", (256, 1024, 256))
    )
    return {
        "epoch": 100,
        "arch": "resnet18",
        "state_dict": state,
        "optimizer": _sgd_state(src),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
    }


FORMATS: list[tuple[str, Callable[[nn.Module, nn.Module], dict], tuple[str, ...]]] = [
    ("torchvision", make_torchvision, ("fc.weight", "fc.bias")),
    ("state_dict", make_state_dict, ()),
    (
        "dino",
        make_dino,
        ("student", "teacher.head.mlp.0.weight", "teacher.head.last_layer.weight_g"),
    ),
    (
        "solo-learn",
        make_solo_learn,
        (
            "state_dict.projector.0.weight",
            "state_dict.momentum_backbone.conv1.weight",
            "state_dict.classifier.weight",
        ),
    ),
    ("lightly", make_lightly, ("projection_head.layers.0.weight", "backbone_momentum.0.weight")),
    ("lightly", make_lightly_sequential, ()),
    (
        "moco-v2",
        make_moco_v2,
        (
            "state_dict.module.encoder_q.fc.0.weight",
            "state_dict.module.encoder_k.conv1.weight",
            "state_dict.module.queue",
        ),
    ),
    (
        "moco-v3",
        make_moco_v3,
        (
            "state_dict.module.base_encoder.fc.2.weight",
            "state_dict.module.momentum_encoder.conv1.weight",
            "state_dict.module.predictor.0.weight",
        ),
    ),
]


@pytest.mark.parametrize(
    ("fmt", "make", "must_drop"), FORMATS, ids=[m.__name__[5:] for _, m, _ in FORMATS]
)
def test_import_gives_the_source_models_embeddings(
    tmp_path: Path,
    source: nn.Module,
    other: nn.Module,
    batch: torch.Tensor,
    expected: torch.Tensor,
    fmt: str,
    make: Callable[[nn.Module, nn.Module], dict],
    must_drop: tuple[str, ...],
) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save(make(source, other), path)
    encoder, report = import_checkpoint(path, "resnet18")

    assert isinstance(report, ImportReport)
    assert report.source_format == fmt and fmt in SOURCE_FORMATS
    assert report.path == str(path)
    assert set(report.mapped) == set(encoder.backbone.state_dict())
    for key in must_drop:
        assert key in report.dropped, (key, report.dropped[:10])
    summary = report.summary()
    assert fmt in summary and f"mapped: {len(report.mapped)}" in summary
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(batch), expected, atol=ATOL, rtol=RTOL)


def test_dino_report_says_the_teacher_was_used(
    tmp_path: Path, source: nn.Module, other: nn.Module
) -> None:
    path = tmp_path / "dino.pth"
    torch.save(make_dino(source, other), path)
    _, report = import_checkpoint(path, "resnet18")
    assert "teacher" in report.note and "teacher" in report.summary()


def test_safetensors_encoder_state_dict_imports(
    tmp_path: Path, source: nn.Module, batch: torch.Tensor, expected: torch.Tensor
) -> None:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in make_state_dict(source, source).items()}, str(path))
    encoder, report = import_checkpoint(path, "resnet18")
    assert report.source_format == "state_dict"
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(batch), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("arch", "timm_name", "timm_kwargs", "head_keys"),
    [
        # Quarter/half width (what width= builds) keeps the ViT/ConvNeXt weight init cheap.
        (
            "vit_tiny",
            "vit_tiny_patch16_224",
            {"img_size": 32, "embed_dim": 48},
            ("head.weight", "head.bias"),
        ),
        # ConvNeXt keeps head.norm in the pooled backbone; only head.fc is a classifier.
        (
            "convnextv2_atto",
            "convnextv2_atto",
            {"dims": (24, 40, 80, 160)},
            ("head.fc.weight", "head.fc.bias"),
        ),
    ],
)
def test_timm_state_dict_imports_and_drops_only_the_classifier(
    tmp_path: Path, arch: str, timm_name: str, timm_kwargs: dict, head_keys: tuple[str, ...]
) -> None:
    torch.manual_seed(4)
    model = timm.create_model(timm_name, pretrained=False, num_classes=10, **timm_kwargs).eval()
    path = tmp_path / "timm.pth"
    torch.save(model.state_dict(), path)
    width = 0.25 if arch == "vit_tiny" else 0.5
    encoder, report = import_checkpoint(path, arch, image_size=32, width=width)
    assert report.source_format == "timm"
    assert set(report.dropped) == set(head_keys)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(encoder.eval()(images), reference, atol=ATOL, rtol=RTOL)


def test_vit_position_embedding_mismatch_names_the_image_size(tmp_path: Path) -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, embed_dim=48
    )
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"pos_embed.*image_size=32"):
        import_checkpoint(path, "vit_tiny", image_size=64, width=0.25)


@pytest.mark.parametrize("make", [make_moco_v2, make_lightly], ids=["moco_v2", "lightly"])
def test_import_never_mutates_the_checkpoint(
    source: nn.Module, other: nn.Module, make: Callable[[nn.Module, nn.Module], dict]
) -> None:
    checkpoint = make(source, other)
    inner = checkpoint.get("state_dict", checkpoint)
    keys = (list(checkpoint), list(inner))
    # A tensor's _version counts its in-place changes.
    versions = {k: (id(v), v._version) for k, v in inner.items()}
    import_checkpoint_dict(checkpoint, "resnet18")
    assert (list(checkpoint), list(inner)) == keys
    assert checkpoint.get("state_dict", checkpoint) is inner
    assert {k: (id(v), v._version) for k, v in inner.items()} == versions


class _Payload:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": {"conv1.weight": torch.ones(1)}, "payload": _Payload(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(CheckpointError, match=r"REFUSED.*system.*malicious") as caught:
        read_checkpoint(path)
    assert str(path) in str(caught.value)
    with pytest.raises(CheckpointError, match="REFUSED"):
        import_checkpoint(path, "resnet18")
    assert not marker.exists()


def test_namespace_checkpoint_is_refused_with_resave_instructions(
    tmp_path: Path, source: nn.Module, batch: torch.Tensor, expected: torch.Tensor
) -> None:
    path = tmp_path / "dino_full.pth"
    checkpoint = make_dino(source, source) | {
        "args": argparse.Namespace(arch="resnet18", lr=0.0005)
    }
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as caught:
        import_checkpoint(path, "resnet18")
    message = str(caught.value)
    for needle in (
        "argparse.Namespace",
        "weights_only=True",
        "arbitrary code",
        "ck.pop('args'",
        str(path),
    ):
        assert needle in message, needle

    # Following the advice on a file we trust (we just wrote it) gives an importable file.
    trusted = torch.load(path, map_location="cpu", weights_only=False)
    trusted.pop("args", None)
    torch.save(trusted, tmp_path / "weights.pt")
    encoder, report = import_checkpoint(tmp_path / "weights.pt", "resnet18")
    assert report.source_format == "dino"
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(batch), expected, atol=ATOL, rtol=RTOL)


def test_pickled_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match=r"refused.*state_dict\(\)"):
        read_checkpoint(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_checkpoint_is_reported_as_corrupt(
    tmp_path: Path, source: nn.Module, zip_format: bool
) -> None:
    good = tmp_path / "good.pth"
    torch.save(source.state_dict(), good, _use_new_zipfile_serialization=zip_format)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*truncated, corrupt") as caught:
        import_checkpoint(truncated, "resnet18")
    assert "refused" not in str(caught.value).lower()


def test_files_that_are_not_checkpoints(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (text, empty):
        with pytest.raises(CheckpointError, match=path.name):
            read_checkpoint(path)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.ones(3), tensor)
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        read_checkpoint(tensor)
    bookkeeping = tmp_path / "bookkeeping.pth"
    torch.save({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, bookkeeping)
    with pytest.raises(CheckpointError, match="no backbone tensors"):
        import_checkpoint(bookkeeping, "resnet18")
    with pytest.raises(CheckpointError, match="does not exist"):
        import_checkpoint(tmp_path / "nowhere.pth", "resnet18")
    with pytest.raises(CheckpointError, match="not a file"):
        read_checkpoint(tmp_path)


def test_imagenet_stem_into_cifar_arch_names_the_tensor_and_shapes(
    tmp_path: Path, source: nn.Module
) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(CheckpointError) as caught:
        import_checkpoint(path, "resnet18_cifar")
    message = str(caught.value)
    for needle in ("'conv1.weight'", "(64, 3, 7, 7)", "(64, 3, 3, 3)", "arch 'resnet18'"):
        assert needle in message, needle


def test_missing_backbone_tensors_are_counted_and_the_right_arch_suggested(
    tmp_path: Path, source: nn.Module
) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(make_moco_v2(source, source), path)
    with pytest.raises(CheckpointError) as caught:
        import_checkpoint(path, "resnet34")
    message = str(caught.value)
    # ResNet-34 has 8 more basic blocks, 10 tensors each (num_batches_tracked aside).
    for needle in ("moco-v2", "needs 80 tensors", "layer1.2.conv1.weight", "arch 'resnet18'"):
        assert needle in message, needle


def test_extra_source_tensors_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(5)
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(
        CheckpointError, match=r"have no place in resnet18.*arch .resnet34.; use that instead"
    ):
        import_checkpoint(path, "resnet18")
