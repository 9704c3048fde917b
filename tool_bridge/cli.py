"""``ibis-jax tool serve`` / ``ibis-jax tool ping``: run or probe a tool server.

Examples::

    ibis-jax tool serve --backend medsam2 --checkpoint MedSAM2_latest.pt --port 50151 --device cuda
    ibis-jax tool serve --backend classical --port 50151
    ibis-jax tool serve --backend classical --volume-backend classical-tissue --port 50151
    ibis-jax tool ping 127.0.0.1:50151
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tool_bridge.backends import BACKENDS
from tool_bridge.backends.volume import VOLUME_BACKENDS


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tool_command", metavar="{serve,ping}")
    serve = sub.add_parser("serve", help="serve a segmentation backend over gRPC")
    serve.add_argument("--backend", choices=BACKENDS, required=True)
    serve.add_argument("--checkpoint", help="medsam2: MedSAM2_latest.pt or a SAM2.1 checkpoint")
    serve.add_argument("--model", default="medsam2",
                       help="medsam2 (SAM2.1 Hiera-T at 512 px) or sam2.1_hiera_{t,s,b+,l} (1024 px)")
    serve.add_argument("--volume-backend", default="auto", choices=("auto", "none", *VOLUME_BACKENDS),
                       help="the tool behind OpenVolume/VolumeStep: auto (the --backend's own: classical -> "
                            "the 3D random walker, medsam2 -> sam2's video predictor with the same "
                            "--checkpoint/--model), classical, classical-tissue, medsam2, or none")
    serve.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    serve.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind; anything but loopback needs --token-file")
    serve.add_argument("--port", type=int, default=50151, help="0 picks a free port (printed)")
    serve.add_argument("--max-batch", type=int, default=8)
    serve.add_argument("--max-wait-ms", type=float, default=2.0)
    serve.add_argument("--fuse-decoder", action="store_true",
                       help="medsam2: one decoder pass per batch of steps (faster on GPU; answers "
                            "may then depend on batch composition, breaking exact replay)")
    serve.add_argument("--max-queue", type=int, default=256)
    serve.add_argument("--cache-mb", type=int, default=2048,
                       help="feature cache cap in MiB; open episodes are never evicted: a full cache "
                            "answers new opens RESOURCE_EXHAUSTED (clients back off and retry)")
    serve.add_argument("--admit-wait-s", type=float, default=2.0,
                       help="an open that does not fit the cache waits this long for a close before "
                            "RESOURCE_EXHAUSTED (default 2)")
    serve.add_argument("--idle-timeout-s", type=float, default=300.0,
                       help="free an episode after this many seconds without a request (abandoned by "
                            "its client; 0: never). Default 300")
    serve.add_argument("--max-clicks", type=int, default=64)
    serve.add_argument("--max-image-side", type=int, default=2048)
    serve.add_argument("--max-volume-mvoxels", type=float, default=64.0,
                       help="largest volume OpenVolume takes, in Mi voxels (depth*height*width; default 64)")
    serve.add_argument("--max-message-mb", type=int, default=64)
    serve.add_argument("--image-root", help="directory OpenEpisode/Segment may read paths under")
    _add_security(serve)
    serve.add_argument("--tls-key", help="server private key (PEM); with --tls-cert")
    serve.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(run=run_serve)

    ping = sub.add_parser("ping", help="health-check a server and print its Info")
    ping.add_argument("address", help="host:port")
    ping.add_argument("--timeout", type=float, default=10.0)
    _add_security(ping)
    ping.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    ping.add_argument("--tls-ca", help="CA that signed the server certificate")
    ping.set_defaults(run=run_ping)
    parser.set_defaults(run=lambda args: (parser.print_help(), 2)[1])


def _add_security(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-file",
                        help="file holding the shared token (or set IBIS_TOOL_TOKEN)")
    parser.add_argument("--tls-cert", help="certificate chain (PEM)")


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
        if not token:
            raise SystemExit(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get("IBIS_TOOL_TOKEN") or None


def run_serve(args: argparse.Namespace) -> int:
    from ibis_jax.tools.protocol import ToolError
    from tool_bridge.backends import make_backend
    from tool_bridge.server import ServerConfig, TLSConfig

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    config = ServerConfig(
        host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, cache_bytes=args.cache_mb << 20, max_clicks=args.max_clicks,
        max_image_side=args.max_image_side, max_volume_voxels=int(args.max_volume_mvoxels * 2**20),
        max_message_bytes=args.max_message_mb << 20,
        idle_timeout_s=args.idle_timeout_s, admit_wait_s=args.admit_wait_s,
        image_root=args.image_root, token=_token(args),
        tls=TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
    )
    try:
        backend = make_backend(args.backend, checkpoint=args.checkpoint, model=args.model,
                               device=args.device, num_threads=args.threads,
                               fuse_decoder=args.fuse_decoder)
        volume_backend = None
        volume_name = args.backend if args.volume_backend == "auto" else args.volume_backend
        if volume_name != "none":
            from tool_bridge.backends.volume import make_volume_backend

            volume_backend = make_volume_backend(volume_name, checkpoint=args.checkpoint, model=args.model,
                                                 device=args.device)
        return asyncio.run(_serve(backend, config, volume_backend))
    except ToolError as error:
        print(f"ibis-jax tool serve: {error}", file=sys.stderr)
        return 2


async def _serve(backend, config, volume_backend=None) -> int:
    from tool_bridge.server import BridgeServer

    server = BridgeServer(backend, config, volume_backend)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Tests and scripts wait for this line (the port matters with --port 0).
    print(f"tool_bridge: serving {backend.name} on {config.host}:{server.port} "
          f"(device {backend.device}, image size {backend.image_size}; volumes: "
          f"{volume_backend.name if volume_backend is not None else 'none'})", flush=True)
    await stop.wait()
    await server.stop(grace=2.0)
    return 0


def run_ping(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tool_bridge.proto import tool_bridge_pb2 as pb
    from tool_bridge.proto import tool_bridge_pb2_grpc as pb_grpc

    token = _token(args)
    if args.tls_ca or args.tls_cert:
        def read(path):
            return open(path, "rb").read() if path else None

        credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
        channel = grpc.secure_channel(args.address, credentials)
    else:
        channel = grpc.insecure_channel(args.address)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        with channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
            info = pb_grpc.ToolBridgeStub(channel).Info(pb.InfoRequest(), timeout=args.timeout,
                                                         metadata=metadata)
    except grpc.RpcError as error:
        print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    serving = status.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)}")
    print(f"  backend {info.backend}  device {info.device}  image size {info.image_size}  "
          f"version {info.version}")
    print(f"  checkpoint sha256 {info.checkpoint_sha256 or '-'}")
    print(f"  volumes {info.volume_backend or 'none'}"
          + (f" (at most {info.max_volume_voxels / 2**20:g} Mi voxels)" if info.volume_backend else ""))
    print(f"  open episodes {info.open_episodes}  cache {info.cache_bytes / 2**20:.1f} MiB  "
          f"max batch {info.max_batch}  max clicks {info.max_clicks}")
    return 0 if serving else 1
