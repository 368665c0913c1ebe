"""edge-ssl: self-supervised image encoders from server GPUs to Jetson-class devices."""

from edge_ssl.errors import EdgeSSLError

__version__ = "0.1.0"
__all__ = ["EdgeSSLError", "__version__"]
