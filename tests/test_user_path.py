"""The user's path through the CLI: a foreign checkpoint -> import -> distill -> prune ->
quantize -> export -> bench -> predict -> report, at 32, 64 and 96 pixels.

Every checkpoint is built here from a randomly initialised small model in its format's layout
(never downloaded). Each stage's output is checked on real images (finite, not constant,
effective rank above 1), and the report must show the numbers each command printed.
Prune runs in a subprocess so that a native crash fails its test instead of killing pytest.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import CIFAR_DIR
from tests.test_checkpoint import (
    make_dino,
    make_lightly,
    make_lightly_sequential,
    make_moco_v2,
    make_moco_v3,
    make_solo_learn,
    make_state_dict,
)
from tests.test_report import md_stage_table

SIZES = (32, 64, 96)
#: Every format walks the path at this size; PATH_FORMAT walks it at every size in SIZES.
FORMAT_SIZE = 64
PATH_FORMAT = "dino"
TRAIN_IMAGES = 64
CHECK_IMAGES = 48
#: The teacher every ResNet-layout checkpoint holds: the issue's ImageNet-stem ResNet-18, narrowed.
TEACHER = ("resnet18", {"width": 0.25})
STUDENT = ("resnet18_cifar", {"width": 0.125})
PREDICT_PROFILE = "orin-nano-8gb"


def _torchvision(src: nn.Module, oth: nn.Module) -> dict:
    # torchvision's resnet state dict carries its 1000-way classifier; import drops it.
    state = dict(src.state_dict())
    width = state["layer4.1.bn2.weight"].shape[0]
    return state | {"fc.weight": torch.randn(1000, width), "fc.bias": torch.zeros(1000)}


def _timm_mobilenet(src: nn.Module, oth: nn.Module) -> dict:
    return src.state_dict()


@dataclass(frozen=True)
class Format:
    """A foreign checkpoint layout: how to write it, and which encoder it belongs to."""

    name: str
    make: Callable[[nn.Module, nn.Module], dict]
    arch: tuple[str, dict[str, Any]] = TEACHER


FORMATS = {f.name: f for f in (
    Format("torchvision", _torchvision),
    Format("dino", make_dino),
    Format("solo-learn", make_solo_learn),
    Format("lightly", make_lightly),
    Format("lightly-sequential", make_lightly_sequential),
    Format("moco-v2", make_moco_v2),
    Format("moco-v3", make_moco_v3),
    Format("state_dict", make_state_dict),
    Format("timm", _timm_mobilenet, ("mobilenetv3_small_cifar", {})),
)}


# ---------------------------------------------------------------- running the CLI


@dataclass
class Step:
    """One command as the user ran it: its exit code and what it printed."""

    args: list[str]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def why(self) -> str:
        return f"edge-ssl {' '.join(self.args)} -> rc {self.code}\n{self.err[-2000:]}"


def run_cli(*args: str) -> Step:
    """`edge-ssl ARGS` in this process, as a user's shell would run it."""
    from edge_ssl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return Step(list(args), code, out.getvalue(), err.getvalue())


def run_cli_subprocess(*args: str, timeout: float = 300) -> Step:
    """`edge-ssl ARGS` in its own process: a segfault is rc -11 here, not a dead test run."""
    done = subprocess.run([sys.executable, "-m", "edge_ssl", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)
    return Step(list(args), done.returncode, done.stdout, done.stderr)


# ---------------------------------------------------------------- data and checkpoints


def real_images(count: int) -> np.ndarray:
    """Real photos (the CIFAR-10 test subset) when present, else the embedded real digit scans."""
    path = CIFAR_DIR / "cifar10_test.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["x"][:count], dtype=np.uint8)
    from edge_ssl.data.sources import embedded_default

    return embedded_default("all").images[:count]


def resized(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
                     for img in images])


def write_image_folder(folder: Path, images: np.ndarray) -> Path:
    """A user's own folder of PNG files (flat, no labels)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img_{i:03d}.png")
    return folder


def source_model(fmt: Format, size: int, seed: int) -> nn.Module:
    """A randomly initialised backbone in the format's layout.

    Random BN affine parameters (so a BN tensor loaded into the wrong place shows), and BN
    statistics measured on real images, as a trained model has: with the default statistics
    a random network maps every image to nearly the same direction, which no user's model does.
    """
    from edge_ssl.runtime.preprocess import preprocess_images

    from edge_ssl.models import create_encoder

    torch.manual_seed(seed)
    arch, kwargs = fmt.arch
    encoder = create_encoder(arch, **kwargs, image_size=size)
    backbone = encoder.backbone
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.reset_running_stats()
                module.momentum = None  # a cumulative average over the calibration batch
        backbone.train()
        images = resized(real_images(TRAIN_IMAGES), size)
        backbone(torch.from_numpy(preprocess_images(images, encoder.spec.input)))
    return backbone.eval()


def write_checkpoint(fmt: Format, size: int, path: Path) -> Path:
    torch.save(fmt.make(source_model(fmt, size, 1), copy.deepcopy(source_model(fmt, size, 2))), path)
    return path


# ---------------------------------------------------------------- the walk


@dataclass
class Walk:
    """Every bundle one user path wrote, what each command printed, and where it stopped."""

    fmt: str
    size: int
    root: Path
    bundles: dict[str, Path] = field(default_factory=dict)
    printed: dict[str, Any] = field(default_factory=dict)
    failed: Step | None = None
    failed_stage: str = ""

    def stage(self, name: str, step: Step) -> bool:
        if step.code != 0 and self.failed is None:
            self.failed, self.failed_stage = step, name
        return step.code == 0


def arch_opts(arch: tuple[str, dict[str, Any]], size: int) -> list[str]:
    opts = [f"{k}={v}" for k, v in {**arch[1], "image_size": size}.items()]
    return [part for opt in opts for part in ("--arch-opt", opt)]


def walk_user_path(fmt: Format, size: int, root: Path) -> Walk:
    """import -> distill -> prune -> quantize -> export -> bench -> predict -> report."""
    walk = Walk(fmt.name, size, root)
    images = write_image_folder(root / "images", resized(real_images(TRAIN_IMAGES), size))
    checkpoint = write_checkpoint(fmt, size, root / f"{fmt.name}.pth")
    b = {name: root / f"{name}.edge" for name in ("teacher", "student", "pruned", "int8", "exported")}
    init = ["--init", "teacher"] if fmt.arch == TEACHER else []
    steps: list[tuple[str, str, Callable[[], Step]]] = [
        ("import", "teacher", lambda: run_cli(
            "import", str(checkpoint), "--arch", fmt.arch[0], *arch_opts(fmt.arch, size),
            "--out", str(b["teacher"]))),
        ("distill", "student", lambda: run_cli(
            "distill", str(b["teacher"]), "--student", STUDENT[0], *arch_opts(STUDENT, size), *init,
            "--data", str(images), "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--warmup-epochs", "0",
            "--queue-size", "64", "--cache-views", "1", "--device", "cpu", "--out", str(b["student"]))),
        ("prune", "pruned", lambda: run_cli_subprocess(
            "prune", str(b["student"]), "--ratio", "0.3", "--importance", "l2", "--recovery-epochs", "1",
            "--data", str(images), "--out", str(b["pruned"]))),
        ("quantize", "int8", lambda: run_cli(
            "quantize", str(b["pruned"]), "--precision", "int8", "--data", str(images),
            "--calibration-images", str(TRAIN_IMAGES), "--out", str(b["int8"]))),
        ("export", "exported", lambda: run_cli(
            "export", str(b["pruned"]), "--data", str(images), "--out", str(b["exported"]))),
    ]
    for stage, bundle, step in steps:
        if not walk.stage(stage, step()):
            return walk
        walk.bundles[bundle] = b[bundle]
    for name, precision in (("exported", "fp16"), ("int8", "int8")):
        bench = run_cli("bench", str(b[name]), "--backend", "ort", "--iterations", "20",
                        "--warmup", "0.05", "--threads", "1", "--json")
        predict = run_cli("predict", str(b[name]), "--for", PREDICT_PROFILE, "--precision", precision,
                          "--json")
        if not (walk.stage("bench", bench) and walk.stage("predict", predict)):
            return walk
        walk.printed[f"bench {name}"], walk.printed[f"predict {name}"] = bench.json(), predict.json()
    report = run_cli("report", *map(str, walk.bundles.values()), "--out", str(root / "report.html"), "--md")
    if walk.stage("report", report):
        walk.printed["report"] = (root / "report.md").read_text(encoding="utf-8")
    return walk


@pytest.fixture(scope="module")
def user_paths(tmp_path_factory):
    """Walks shared between tests: each (format, size) is walked once per module."""
    walks: dict[tuple[str, int], Walk] = {}

    def walked(fmt: str, size: int) -> Walk:
        if (fmt, size) not in walks:
            root = tmp_path_factory.mktemp(f"{fmt}-{size}")
            walks[fmt, size] = walk_user_path(FORMATS[fmt], size, root)
        return walks[fmt, size]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield walked
    torch.set_num_threads(before)


# ---------------------------------------------------------------- checks


def stage_embeddings(bundle: Path, images: np.ndarray) -> np.ndarray:
    """The bundle's embeddings of real images through the runtime a user would deploy with."""
    from edge_ssl.runtime.backends import open_runner
    from edge_ssl.runtime.preprocess import preprocess_images

    from edge_ssl.bundle import Bundle

    opened = Bundle.open(bundle)
    backend = "ort" if opened.has("model.onnx") else "torch"
    batch = preprocess_images(images, opened.manifest.input)
    with open_runner(opened, backend, threads=1) as runner:
        return np.asarray(runner(batch), dtype=np.float64)


def check_healthy(walk: Walk) -> None:
    from edge_ssl.evaluate import embedding_health

    images = resized(real_images(TRAIN_IMAGES + CHECK_IMAGES)[TRAIN_IMAGES:], walk.size)
    for stage, bundle in walk.bundles.items():
        emb = stage_embeddings(bundle, images)
        where = f"{walk.fmt} at {walk.size}px, {stage} ({bundle.name})"
        assert np.isfinite(emb).all(), f"{where}: non-finite embeddings"
        assert np.ptp(emb, axis=0).max() > 1e-6, f"{where}: the same embedding for every image"
        health = embedding_health(emb)
        assert health.effective_rank > 1.0, f"{where}: effective rank {health.effective_rank:.3f}"


def check_report_shows_what_was_recorded(walk: Walk) -> None:
    """Params and MACs from each manifest, p50/p90 from bench, ms from predict: as printed."""
    from edge_ssl.bundle import Bundle
    from edge_ssl.report.rows import human_count

    report = walk.printed["report"]
    table = md_stage_table(report)
    assert len(table) == len(walk.bundles)
    for cells, (stage, path) in zip(table, walk.bundles.items(), strict=True):
        metrics = Bundle.open(path).manifest.metrics
        for column, key in (("params", "params"), ("MACs", "macs")):
            if isinstance(metrics.get(key), (int, float)):
                assert cells[column] == human_count(metrics[key]), (stage, column, cells)
        latencies = {v for k, v in cells.items() if k.endswith("p50 / p90 ms") and v != "—"}
        if f"bench {stage}" in walk.printed:
            batch = next(iter(walk.printed[f"bench {stage}"]["batches"]))
            ms = walk.printed[f"bench {stage}"]["batches"][batch]["latency_ms"]
            assert latencies == {f"{ms['p50']:.2f} / {ms['p90']:.2f}"}, (stage, cells)
        else:
            assert not latencies, (stage, cells)
    predicted = report.split("## Predicted latency", 1)[1].split("\n## ", 1)[0]
    for stage in ("exported", "int8"):
        name = Bundle.open(walk.bundles[stage]).manifest.name
        ms = walk.printed[f"predict {stage}"]["predicted_ms"]
        assert f"| {name} | {PREDICT_PROFILE} |" in predicted and f"{ms:.3f} ms predicted" in predicted


def check_walk(walk: Walk) -> None:
    if walk.failed is not None:
        check_healthy(walk)  # the stages before the failure must still be sound
        pytest.fail(f"{walk.fmt} at {walk.size}px: stage {walk.failed_stage} failed: {walk.failed.why()}")
    check_healthy(walk)
    check_report_shows_what_was_recorded(walk)


# ---------------------------------------------------------------- the matrix


def source_embeddings(fmt: Format, size: int, images: np.ndarray, spec: Any) -> np.ndarray:
    """What the model inside the checkpoint computes (pooled backbone features), on ``spec``'s input."""
    from edge_ssl.runtime.preprocess import preprocess_images

    with torch.no_grad():
        batch = torch.from_numpy(preprocess_images(images, spec))
        return source_model(fmt, size, 1)(batch).double().numpy()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_foreign_format_walks_the_user_path(user_paths, fmt, tmp_path):
    """Each format imports to the model it holds; then the rest of the path is walked on it.

    The ResNet layouts all hold the same weights (one source model): one that imports to the
    same model.pt as PATH_FORMAT's teacher continues on that walk instead of repeating it.
    """
    from edge_ssl.bundle import Bundle

    form = FORMATS[fmt]
    if form.arch != TEACHER:
        walk = user_paths(fmt, FORMAT_SIZE)
        teacher = walk.root / "teacher.edge"
    else:
        walk = user_paths(PATH_FORMAT, FORMAT_SIZE)
        teacher = tmp_path / "teacher.edge"
        imported = run_cli("import", str(write_checkpoint(form, FORMAT_SIZE, tmp_path / "c.pth")),
                           "--arch", form.arch[0], *arch_opts(form.arch, FORMAT_SIZE), "--out", str(teacher))
        assert imported.code == 0, imported.why()
        same = Bundle.open(walk.root / "teacher.edge").manifest.files["model.pt"].sha256
        assert Bundle.open(teacher).manifest.files["model.pt"].sha256 == same
    images = resized(real_images(TRAIN_IMAGES + CHECK_IMAGES)[TRAIN_IMAGES:], FORMAT_SIZE)
    if teacher.exists():  # else the walk failed at import, and says why below
        spec = Bundle.open(teacher).manifest.input
        np.testing.assert_allclose(stage_embeddings(teacher, images),
                                   source_embeddings(form, FORMAT_SIZE, images, spec), rtol=1e-4, atol=1e-4)
    check_walk(walk)


@pytest.mark.parametrize("size", SIZES)
def test_the_user_path_at_each_image_size(user_paths, size):
    check_walk(user_paths(PATH_FORMAT, size))
