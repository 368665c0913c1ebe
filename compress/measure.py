"""What every compression stage reports: params, MACs, bytes, kNN top-1 (torch or ONNX runner)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.errors import DataError


def count_macs(encoder: Any) -> int:
    """Multiply-accumulates of one image through ``encoder`` (Torch-Pruning's op counter)."""
    import torch
    import torch_pruning as tp

    example = torch.zeros(1, *encoder.spec.input.shape)
    was_training = encoder.training
    encoder.eval()
    try:
        macs, _params = tp.utils.count_ops_and_params(encoder, example)
    finally:
        encoder.train(was_training)
    return int(macs)


def model_metrics(encoder: Any) -> dict[str, int]:
    """``{"params", "macs"}`` of a float torch encoder."""
    from edge_ssl.models import count_parameters

    return {"params": int(count_parameters(encoder)), "macs": count_macs(encoder)}


def bundle_bytes(bundle: Any, names: tuple[str, ...] = ("model.onnx", "model.pt")) -> int:
    """Size of the deployable model file: the ONNX graph when present, else the weights."""
    for name in names:
        if bundle.has(name):
            return int(bundle.manifest.files[name].bytes)
    return 0


@dataclass(frozen=True)
class KnnData:
    """Labeled bank (train) and test images for kNN top-1 of every stage."""

    bank_images: np.ndarray
    bank_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    k: int = 20

    @classmethod
    def from_datasets(cls, bank: Any, test: Any, k: int = 20) -> KnnData:
        if bank.labels is None or test.labels is None:
            raise DataError(
                f"kNN evaluation needs labeled images; {bank.source if bank.labels is None else test.source} "
                "has no labels. Pass labeled --eval-data / --eval-test (e.g. cifar10 .npz files)."
            )
        return cls(bank.images, np.asarray(bank.labels), test.images, np.asarray(test.labels), k)

    def top1(self, embed_fn: Any) -> float:
        """kNN top-1 of embeddings from ``embed_fn(uint8 images) -> (N, D)``."""
        from edge_ssl.evaluate import knn_top1

        num_classes = int(max(self.bank_labels.max(), self.test_labels.max())) + 1
        return float(knn_top1(embed_fn(self.bank_images), self.bank_labels, embed_fn(self.test_images),
                              self.test_labels, k=self.k, num_classes=num_classes))


def torch_embedder(encoder: Any, batch_size: int = 256, device: str = "cpu") -> Any:
    """``images -> embeddings`` through a float torch encoder."""
    from edge_ssl.evaluate import embed

    return lambda images: embed(encoder, images, batch_size=batch_size, device=device)


def ort_latency_ms(onnx_path: str | Path, input_spec: Any, batch_size: int = 1, *,
                  seconds: float = 3.0, threads: int | None = None) -> float:
    """p50 latency (ms) of one batch on onnxruntime's CPU provider, with the runtime's harness."""
    from edge_ssl.runtime.bench import benchmark
    from edge_ssl.runtime.ort import OrtRunner

    runner = OrtRunner(onnx_path, input_spec=input_spec, threads=threads)
    report = benchmark(runner, batch_sizes=(batch_size,), duration_s=seconds,
                       warmup_s=min(1.0, seconds / 2))
    return float(report.batches[0].latency_ms["p50"])
