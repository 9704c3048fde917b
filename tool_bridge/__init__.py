"""tool_bridge: the PyTorch segmentation sidecar (backends, gRPC server, client).

Never imports JAX. The client needs only grpcio + protobuf + numpy; the ``medsam2`` backend needs
torch and sam2. See ``tool_bridge/README.md``.
"""

__version__ = "0.1.0"
