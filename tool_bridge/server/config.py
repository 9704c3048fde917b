"""The server's settings (``ServerConfig``, ``TLSConfig``) and the names on the wire."""

from __future__ import annotations

import dataclasses

SERVICE_NAME = "ibis_jax.tool_bridge.v1.ToolBridge"
TOKEN_HEADER = "authorization"
MAX_EPISODE_ID_CHARS = 256


@dataclasses.dataclass
class TLSConfig:
    """PEM files. With ``client_ca`` set, clients must present a certificate signed by it."""

    cert: str
    key: str
    client_ca: str | None = None


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50151  # 0 picks a free port (see BridgeServer.port)
    max_batch: int = 8  # requests per worker call
    max_wait_ms: float = 2.0  # how long a lone request waits for company
    max_queue: int = 256  # pending model requests; beyond: RESOURCE_EXHAUSTED
    cache_bytes: int = 2 << 30  # feature cache cap (MedSAM2: ~4 MiB per image)
    max_clicks: int = 64
    max_image_side: int = 2048
    max_volume_voxels: int = 64 << 20  # OpenVolume: depth * height * width at most (each side <= max_image_side)
    idle_timeout_s: float = 300.0  # free episodes with no request for this long (abandoned)
    admit_wait_s: float = 2.0  # an open that does not fit waits this long for a close, then RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 << 20
    image_root: str | None = None  # OpenEpisode/Segment by path read only under here
    max_path_chars: int = 4096
    token: str | None = None  # shared secret, sent as "authorization: Bearer <token>"
    tls: TLSConfig | None = None
