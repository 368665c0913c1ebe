"""edge_ssl.compress: SSL distillation, structured pruning and quantization of encoders."""
