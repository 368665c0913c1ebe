"""edge_ssl.runtime: ONNX export, runners (torch, onnxruntime, TensorRT) and latency measurement."""
