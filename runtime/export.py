"""Export an encoder to ONNX (TorchScript exporter, opset 17), clean it and check parity."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edge_ssl.runtime.compare import COSINE_FLOOR, compare_outputs
from edge_ssl.runtime.embed import embed_with_runner
from edge_ssl.runtime.errors import ParityError
from edge_ssl.runtime.ort import META_NORMALIZATION, META_PRECISION, OrtRunner
from edge_ssl.runtime.preprocess import preprocess_images

from edge_ssl.errors import BundleError, ConfigError
from edge_ssl.lazy import require
from edge_ssl.outputs import check_bundle_out
from edge_ssl.spec import InputSpec

__all__ = ["ParityError", "ParityReport", "check_parity", "export_bundle", "export_encoder_onnx"]

EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = {"torchscript": 11, "dynamo": 18}
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
#: Scale-relative max error allowed besides the cosine floor, by graph precision.
MAX_REL = {"fp32": 1e-3, "fp16": 3e-2}
PARITY_IMAGES = 64
#: What `edge-ssl export` writes by default, and the graph every compress float stage ships.
EXPORT_DEFAULTS = {"opset": 17, "fp16": False, "dynamic_batch": True, "bake_normalization": False,
                   "exporter": "torchscript"}
#: Ops a clean inference graph must not contain (they block INT8 fusion and TensorRT tactics).
TRAINING_OPS = ("BatchNormalization", "Dropout", "Identity")


@dataclass(frozen=True)
class ParityReport:
    """Exported graph vs torch on the same real images (see compare.Comparison)."""

    output: str
    precision: str
    max_abs: float
    max_rel: float
    min_cosine: float
    mean_cosine: float
    samples: int
    min_cosine_required: float
    max_rel_allowed: float

    @property
    def passed(self) -> bool:
        return self.min_cosine >= self.min_cosine_required and self.max_rel <= self.max_rel_allowed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        return (
            f"{self.precision} output {self.output!r}: min cosine {self.min_cosine:.6f} (need >= "
            f"{self.min_cosine_required}), max_rel {self.max_rel:.3g} (allowed {self.max_rel_allowed}), "
            f"max_abs {self.max_abs:.3g} over {self.samples} images"
        )


def _check_export_args(opset: int, exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}.")
    if not isinstance(opset, int) or opset < MIN_OPSET[exporter] or opset > 23:
        raise ConfigError(
            f"opset {opset!r} is not supported by the {exporter} exporter: use "
            f"{MIN_OPSET[exporter]}..23 (17 is what JetPack's TensorRT 8.5/10.x parse best)."
        )


def export_encoder_onnx(
    encoder: Any,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    fp16: bool = False,
    bake_normalization: bool = False,
    exporter: str = "torchscript",
) -> Path:
    """Write ``encoder`` as a clean ONNX graph: export, onnxslim, onnx.checker.

    Input ``images`` float32 (N, C, H, W), normalized unless ``bake_normalization``
    (then 0..1 pixels; the graph normalizes in FP32). ``fp16`` puts FP16 weights and
    compute in the graph (for TensorRT strongly typed networks), with FP32 input/output
    and normalization layers kept in FP32. The encoder is not modified.
    """
    _check_export_args(opset, exporter)
    out = Path(path)
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: folder {out.parent} does not exist.")
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    wrapper = _ExportWrapper.build(encoder, fp16=fp16, bake_normalization=bake_normalization)
    # Batch 2 in the trace keeps the batch axis symbolic; a static graph gets batch 1.
    dummy = torch.zeros((2 if dynamic_batch else 1, *encoder.spec.input.shape), dtype=torch.float32)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(torch, wrapper, dummy, raw, opset=opset, dynamic_batch=dynamic_batch,
                      exporter=exporter)
        model = _slim(onnx, raw)
        _annotate(onnx, model, encoder.spec.input, fp16=fp16, baked=bake_normalization)
        staged = Path(tmp) / out.name
        onnx.save(model, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        os.replace(staged, out)
    return out


class _ExportWrapper:
    """Builds the module that is traced: [normalize] -> [cast fp16] -> encoder -> cast fp32."""

    @staticmethod
    def build(encoder: Any, *, fp16: bool, bake_normalization: bool) -> Any:
        import copy

        import torch
        from torch import nn

        model = copy.deepcopy(encoder).float().eval()
        if fp16:
            model = _half_keeping_norms_fp32(model)
        spec = encoder.spec.input

        class Exported(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
                self.register_buffer("inv_std", 1.0 / torch.tensor(spec.std).view(1, -1, 1, 1))

            def forward(self, images: torch.Tensor) -> torch.Tensor:
                if bake_normalization:
                    images = (images - self.mean) * self.inv_std
                if fp16:
                    images = images.half()
                return self.model(images).float()

        return Exported().eval()


def _half_keeping_norms_fp32(model: Any) -> Any:
    """FP16 weights except LayerNorm/GroupNorm, which run in FP32 (variance overflows fp16)."""
    from torch import nn

    class Fp32Island(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner(x.float()).to(x.dtype)

    model = model.half()
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, Fp32Island(module.float()))
    return model


def _torch_export(torch: Any, wrapper: Any, dummy: Any, path: Path, *, opset: int,
                  dynamic_batch: bool, exporter: str) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    if exporter == "dynamo":
        require("onnxscript", "the dynamo ONNX exporter (pip install onnxscript)")
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
        program = torch.onnx.export(wrapper, (dummy,), dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=shapes)
        program.save(str(path))
        return
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (opset 17 for JetPack's TensorRT).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper, (dummy,), str(path), opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True,
            training=torch.onnx.TrainingMode.EVAL, dynamo=False,
        )


def _slim(onnx: Any, raw: Path) -> Any:
    """onnxslim: fold constants, fuse Conv+BN, drop Identity; keep the result only if valid."""
    model = onnx.load(str(raw))
    try:
        import onnxslim
    except ImportError:
        return model
    slimmed = onnxslim.slim(model)
    return slimmed if slimmed is not None else model


def _annotate(onnx: Any, model: Any, spec: InputSpec, *, fp16: bool, baked: bool) -> None:
    meta = {
        META_NORMALIZATION: "baked" if baked else "outside",
        META_PRECISION: "fp16" if fp16 else "fp32",
        "edge_ssl.mean": ",".join(f"{v:g}" for v in spec.mean),
        "edge_ssl.std": ",".join(f"{v:g}" for v in spec.std),
        "edge_ssl.input_shape": ",".join(str(v) for v in spec.shape),
    }
    onnx.helper.set_model_props(model, meta)
    model.producer_name = "edge-ssl"


def graph_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each op type the graph holds (cleanliness checks and reports)."""
    onnx = require("onnx", "reading ONNX graphs")
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_parity(
    encoder: Any,
    onnx_path: str | os.PathLike,
    images_uint8: np.ndarray,
    input_spec: InputSpec,
    *,
    fp16: bool = False,
) -> ParityReport:
    """Run the same real images through torch (FP32, eval) and the ONNX graph (onnxruntime CPU).

    The graph gets the input its metadata asks for (normalized, or raw with baked
    normalization); a static-batch graph is fed padded batches. ``encoder`` is not modified.
    """
    import copy

    torch = require("torch", "the parity check")
    got = embed_with_runner(OrtRunner(onnx_path, input_spec=input_spec), images_uint8, input_spec, batch_size=32)
    model = encoder if _is_float32(encoder) and not encoder.training else copy.deepcopy(encoder).float().eval()
    with torch.no_grad():
        want = model(torch.from_numpy(preprocess_images(images_uint8, input_spec))).float().numpy()
    precision = "fp16" if fp16 else "fp32"
    cmp = compare_outputs(want, got, output=OUTPUT_NAME, names=("torch", "onnx"))
    return ParityReport(
        output=OUTPUT_NAME, precision=precision, max_abs=cmp.max_abs, max_rel=cmp.max_rel,
        min_cosine=cmp.min_cosine, mean_cosine=cmp.mean_cosine, samples=cmp.samples,
        min_cosine_required=COSINE_FLOOR[precision], max_rel_allowed=MAX_REL[precision],
    )


def _is_float32(encoder: Any) -> bool:
    return all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in encoder.parameters())


def require_parity(report: ParityReport, where: str) -> None:
    """Raise ParityError naming the output and the numbers when ``report`` did not pass."""
    if not report.passed:
        raise ParityError(
            f"parity check failed for {where}: {report.describe()}. The exported graph does not "
            "compute what the torch model does; try another --opset, export without --fp16, or "
            "report the encoder (a custom op may trace wrongly)."
        )


def default_parity_images(data: Sequence[str] | None = None, limit: int = PARITY_IMAGES) -> np.ndarray:
    """Real images for the parity check: ``data`` sources or the embedded digits test split."""
    from edge_ssl.runtime.embed import sample_images

    return sample_images(list(data) if data else None, limit)


def export_bundle(
    bundle_path: str | os.PathLike | Any,
    out: str | os.PathLike,
    *,
    opset: int = 17,
    fp16: bool = False,
    dynamic_batch: bool = True,
    bake_normalization: bool = False,
    exporter: str = "torchscript",
    parity_images: np.ndarray | Sequence[str] | None = None,
    overwrite: bool = False,
) -> Any:
    """A new bundle = the parent's model.pt + a parity-checked model.onnx (stage "export").

    ``parity_images``: uint8 NHWC images, data source paths, or None (embedded digits). A
    parent that already ships the graph these settings make (a compress stage: the graph its
    kNN and latency were measured on) gives that graph, parity-checked again, instead of a
    new export. Returns a ``StageResult``; nothing is written when export or parity fails.
    """
    from edge_ssl.bundle import Bundle, carried_files, write_encoder_bundle
    from edge_ssl.models import load_encoder
    from edge_ssl.stage import StageResult

    _check_export_args(opset, exporter)
    bundle = bundle_path if isinstance(bundle_path, Bundle) else Bundle.open(bundle_path)
    _check_out(Path(out), overwrite)
    if not bundle.has("model.pt"):
        raise BundleError(
            f"export needs float weights (model.pt); {bundle.path} has {sorted(bundle.manifest.files)}. "
            "Pass the float bundle (an INT8 bundle already holds its ONNX graph)."
        )
    images = _parity_images(parity_images)
    encoder = load_encoder(bundle)
    settings = {"opset": opset, "fp16": fp16, "dynamic_batch": dynamic_batch,
                "bake_normalization": bake_normalization, "exporter": exporter}
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        graph = Path(tmp) / "model.onnx"
        record = export_checked(encoder, graph, images, settings, where=f"{bundle.path} -> {out}",
                                shipped=shipped_graph(bundle, settings))
        metrics = {**bundle.manifest.metrics, "export": record}
        result = StageResult()
        result.wrote(write_encoder_bundle(
            out, encoder, lineage=bundle.child_lineage("export", settings), metrics=metrics,
            extra_files={"model.onnx": graph, **carried_files(bundle)},
            precision="fp16" if fp16 else "fp32",
            overwrite=overwrite,
        ))
        return result


def shipped_graph(bundle: Any, settings: dict[str, Any]) -> Path | None:
    """``bundle``'s own model.onnx when it is the float graph ``settings`` would export (same
    settings recorded, file unchanged since), else None."""
    from edge_ssl.bundle import sha256_file

    record = bundle.manifest.metrics.get("export") or {}
    if not bundle.has("model.onnx") or bundle.manifest.precision != "fp32":
        return None
    if any(record.get(key) != value for key, value in settings.items()):
        return None
    graph = bundle.file("model.onnx")
    return graph if record.get("sha256") == sha256_file(graph) else None


def export_checked(encoder: Any, path: Path, images: np.ndarray, settings: dict[str, Any], *,
                   where: str, shipped: Path | None = None) -> dict[str, Any]:
    """Write ``encoder``'s graph to ``path`` (a copy of ``shipped`` when given, else a new
    export with ``settings``), check parity on ``images`` and return the record a bundle keeps
    under ``metrics["export"]`` (settings, parity, op counts, the graph's sha256)."""
    import shutil

    from edge_ssl.bundle import sha256_file

    if shipped is not None:
        shutil.copyfile(shipped, path)
    else:
        export_encoder_onnx(encoder, path, **settings)
    report = check_parity(encoder, path, images, encoder.spec.input, fp16=settings["fp16"])
    require_parity(report, where)
    return {**settings, "normalization": "baked" if settings["bake_normalization"] else "outside",
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "parity": report.to_dict(),
            "ops": graph_op_counts(path), "sha256": sha256_file(path), "reused": shipped is not None}


def _check_out(out: Path, overwrite: bool) -> None:
    check_bundle_out(out, overwrite=overwrite)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)


def _parity_images(images: Any) -> np.ndarray:
    if images is None or (isinstance(images, (list, tuple)) and not isinstance(images, np.ndarray)):
        return default_parity_images(images or None)
    if isinstance(images, np.ndarray):
        return images
    raise ConfigError(f"parity_images must be uint8 images, data paths or None; got {type(images).__name__}.")
