"""torch backend: the bundle's float encoder on CPU, or CUDA FP32/FP16 with CUDA graphs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from edge_ssl.runtime.errors import RunnerError
from edge_ssl.runtime.runner import Runner, TensorSpec

from edge_ssl.lazy import require

PRECISIONS = ("fp32", "fp16")


class GraphCache:
    """One captured graph per input shape, replayed with static input/output buffers.

    ``capture(shape) -> (static_input, replay, static_output)``; kept torch-agnostic so the
    bookkeeping is tested on CPU with a fake capture.
    """

    def __init__(self, capture: Callable[[tuple[int, ...]], tuple[Any, Callable[[], None], Any]],
                 max_graphs: int = 8) -> None:
        self.capture = capture
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, ...], tuple[Any, Callable[[], None], Any]] = {}

    def run(self, batch: Any) -> Any:
        shape = tuple(batch.shape)
        entry = self.graphs.get(shape)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))  # oldest first: bounded GPU memory
            entry = self.graphs[shape] = self.capture(shape)
        static_in, replay, static_out = entry
        static_in.copy_(batch)
        replay()
        return static_out

    def clear(self) -> None:
        self.graphs.clear()


class TorchRunner(Runner):
    """Runs the bundle's ``model.pt`` encoder with torch.

    ``device`` cpu|cuda|cuda:N; ``precision`` fp16 (CUDA only: half weights, FP32 in/out);
    ``cuda_graphs`` (CUDA only; default on for fp16) captures one graph per batch shape.
    """

    backend = "torch"

    def __init__(self, bundle: Any, *, device: str = "cpu", precision: str = "fp32",
                 cuda_graphs: bool | None = None, threads: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise RunnerError(f"torch precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
        on_cuda = str(device).startswith("cuda")
        if not on_cuda and (precision == "fp16" or cuda_graphs):
            raise RunnerError(
                f"torch {precision}{' + CUDA graphs' if cuda_graphs else ''} needs a CUDA device; "
                f"got device {device!r}. Use precision fp32 on CPU, or export and use --backend ort."
            )
        super().__init__(f"torch[{device},{precision}{',graphs' if (cuda_graphs or (cuda_graphs is None and precision == 'fp16')) and on_cuda else ''}]")
        self.backend = "torch-cuda" if on_cuda else "torch"
        self._info["backend"] = self.backend
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.cuda_graphs = bool(on_cuda and (cuda_graphs if cuda_graphs is not None else precision == "fp16"))
        self.threads = threads
        self._saved_threads: int | None = None

    def _activate(self) -> None:
        torch = require("torch", "the torch backend")
        from edge_ssl.models import load_encoder

        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise RunnerError(f"device {self.device!r} requested but torch {torch.__version__} sees no CUDA GPU.")
        if self.threads:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        model = load_encoder(self.bundle).to(self.device)
        self.model = model.half() if self.precision == "fp16" else model
        spec = self.model.spec.input
        self._specs = (TensorSpec("images", (None, *spec.shape), "float32"),)
        self._torch = torch
        self._graphs = GraphCache(self._capture) if self.cuda_graphs else None
        self._info.update({
            "device": str(self.device), "precision": self.precision, "cuda_graphs": self.cuda_graphs,
            "providers": [str(self.device)], "normalization": "outside",
            "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__},
        })

    def device_memory_mb(self) -> float | None:
        if not self.is_active or not str(self.device).startswith("cuda"):
            return None
        return round(self._torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def _deactivate(self) -> None:
        if self._graphs is not None:
            self._graphs.clear()
        self.model = None
        if self._saved_threads is not None:
            self._torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def _forward(self, x: Any) -> Any:
        if self.precision == "fp16":
            x = x.half()
        return self.model(x).float()

    def _capture(self, shape: tuple[int, ...]) -> tuple[Any, Callable[[], None], Any]:
        torch = self._torch
        static_in = torch.zeros(shape, device=self.device, dtype=torch.float32)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                self._forward(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self._forward(static_in)
        return static_in, graph.replay, static_out

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        if str(self.device).startswith("cuda"):
            return self._infer_cuda(torch, batch)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model(torch.from_numpy(batch)).numpy()
        self.last_compute_ms = (time.perf_counter() - start) * 1000.0
        return out

    def _infer_cuda(self, torch: Any, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device, non_blocking=False)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        with torch.inference_mode():
            out = self._graphs.run(x) if self._graphs is not None else self._forward(x)
        end.record()
        result = out.cpu().numpy()  # synchronizes
        self.last_compute_ms = float(begin.elapsed_time(end))
        return result
