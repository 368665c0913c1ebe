"""After adaptation: re-export ONNX like the parent, refit its TensorRT engines, fold BN into convs."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_ssl.bundle import Bundle
from edge_ssl.errors import MissingDependencyError

_EXPORT_KEYS = ("opset", "fp16", "dynamic_batch", "bake_normalization", "exporter")


def parent_export_settings(bundle: Bundle) -> dict[str, Any]:
    """The ONNX export options the parent's model.onnx was made with (metrics, else lineage)."""
    exported = bundle.manifest.metrics.get("export")
    if isinstance(exported, dict):
        return {k: exported[k] for k in _EXPORT_KEYS if k in exported}
    for entry in reversed(bundle.manifest.lineage):
        if entry.stage == "export":
            return {k: entry.settings[k] for k in _EXPORT_KEYS if k in entry.settings}
    return {}


@contextlib.contextmanager
def export_artifacts(
    encoder: nn.Module, parent: Bundle, mode: str
) -> Iterator[tuple[dict[str, Path], dict[str, Any]]]:
    """Yield (extra bundle files, export info): model.onnx exported like the parent's.

    ``mode`` 'auto' exports only when the parent had model.onnx and the runtime's exporter
    is installed; 'always' raises when it cannot; 'never' skips. Files live in a temp dir
    until the bundle writer has copied them.
    """
    info: dict[str, Any] = {}
    files: dict[str, Path] = {}
    wanted = mode == "always" or (mode == "auto" and parent.has("model.onnx"))
    with tempfile.TemporaryDirectory(prefix="edge-ssl-adapt-") as tmp:
        if wanted:
            try:
                from edge_ssl.runtime.export import export_encoder_onnx
            except ImportError as exc:
                if mode == "always":
                    raise MissingDependencyError(
                        f"ONNX export needs edge_ssl.runtime.export ({exc}); install "
                        "'edge-ssl[cpu]' or pass --export never."
                    ) from exc
                info["onnx"] = f"skipped: edge_ssl.runtime.export unavailable ({exc})"
            else:
                settings = parent_export_settings(parent)
                path = export_encoder_onnx(encoder, Path(tmp) / "model.onnx", **settings)
                files["model.onnx"] = path
                info["onnx"] = {"exported": True, **settings}
                files.update(refit_engines(parent, path, Path(tmp), info))
        else:
            info["onnx"] = "skipped: the input bundle has no model.onnx" if mode == "auto" else "skipped"
        yield files, info


def parent_engines(bundle: Bundle) -> list[str]:
    """The TensorRT plans the parent bundle carries (``engines/*.plan``)."""
    return sorted(n for n in bundle.manifest.files if n.startswith("engines/") and n.endswith(".plan"))


def refit_engines(parent: Bundle, onnx_path: Path, workdir: Path, info: dict[str, Any]) -> dict[str, Path]:
    """Refit the parent's TensorRT engines with the new ONNX weights (no rebuild) where possible.

    The export folds BatchNorm into the convolutions exactly as the engine's graph was
    built, so the refitter finds every weight by name. An engine that is not refittable,
    was built for another GPU / TensorRT, or finds no TensorRT here is left out and
    reported: the device rebuilds it from model.onnx (`edge-ssl deploy --build-engine`).
    """
    from edge_ssl.errors import EdgeSSLError

    engines = parent_engines(parent)
    if not engines:
        return {}
    report: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for name in engines:
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            from edge_ssl.runtime.tensorrt import refit_engine

            result = refit_engine(parent.file(name), onnx_path, out=target)
        except (EdgeSSLError, ImportError) as exc:
            report[name] = f"not refit ({exc}); rebuild it on the device from model.onnx"
            continue
        files[name] = target
        report[name] = {"refit": True, "weights": result.refitted, "seconds": round(result.seconds, 3)}
    info["engines"] = report
    info["engine_path"] = {name: "refit" if isinstance(v, dict) else "rebuild" for name, v in report.items()}
    return files


def engine_messages(export: dict[str, Any]) -> list[str]:
    """One line per TensorRT engine of the input bundle: refit here, or rebuilt on the device."""
    paths = (export.get("requantize") or {}).get("engine_path") or export.get("engine_path") or {}
    return [f"engine refit here: {Path(name).name}" if path == "refit" else
            f"engine to rebuild on the device: {Path(name).name}" for name, path in paths.items()]


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy with every eval-mode BatchNorm2d that directly follows a Conv2d folded into it.

    ``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``; the BN
    becomes Identity. Engines fuse conv+BN at build time, so a refit supplies folded weights.
    Only pairs that are consecutive children of one parent (timm ResNet ``convN``/``bnN``
    attributes, Sequential conv-bn) are folded; the output is unchanged in eval mode.
    """
    folded = copy.deepcopy(module).eval()
    for parent in folded.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and \
                    conv.out_channels == bn.num_features:
                _fold_pair(conv, bn)
                setattr(parent, bn_name, nn.Identity())
    return folded


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
        bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    new_bias = (bias - bn.running_mean) * scale + shift
    conv.bias = nn.Parameter(new_bias)
